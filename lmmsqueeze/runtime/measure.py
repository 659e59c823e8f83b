"""Measuring prefill: latency (whole forward and decoder only) and peak tensor memory.

Timings are interleaved across pipelines (A B C A B C ...) after warm-up so that machine noise
hits every pipeline alike; on CUDA they use CUDA events. Each timed call also adds up the time
spent inside the pipeline's hooks (its overhead: scoring, selection, gathers, masks; CPU only).
Peak memory is CUDA's allocator peak on GPU, and on CPU the peak of live tensor bytes allocated
during the call, tracked by a dispatch mode (weights and other tensors that existed before the
call are not counted), and the peak resident set size above the call's start, sampled every
half millisecond (Linux). glibc keeps freed heap memory, so the RSS of one call depends on the
calls before it unless large blocks are always mapped: run with ``MALLOC_MMAP_THRESHOLD_=65536``
for RSS figures that compare (``benchmarks/scaling.py`` measures memory that way).
"""

from __future__ import annotations

import os
import statistics
import threading
import time
import weakref
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..compose.plan import compile_pipeline
from ..errors import LmmsqueezeError
from ..models import family_for
from .hooks import HookSet, HookTimer
from .loading import build_prompt, model_inputs
from .run import Prepared, prepare


class PeakTensorMemory(TorchDispatchMode):
    """Tracks the peak of live tensor bytes created while it is active (CPU or any device)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[tuple[int, int], int] = defaultdict(int)

    def _release(self, key: tuple[int, int], nbytes: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # storages of the inputs that existed before the mode (weights, the caller's tensors): an output
        # on one of them is a view or an in-place result, no new memory (a weight's ``t()`` in a linear)
        foreign = {_key(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0]
                   if isinstance(t, torch.Tensor) and t.device.type != "meta"} - self._refs.keys()
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key, nbytes = _key(storage), storage.nbytes()
                if nbytes == 0 or key in foreign:
                    continue
                if key not in self._refs:
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                self._refs[key] += 1
                weakref.finalize(t, self._release, key, nbytes)
        return out


def _key(storage: torch.UntypedStorage) -> tuple[int, int]:
    return storage.data_ptr(), storage.device.index or 0


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes of tensors allocated while ``fn`` runs."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    mode = PeakTensorMemory()
    with mode:
        fn()
    return mode.peak


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_bytes(fn: Callable[[], Any], interval: float = 0.0005) -> int | None:
    """Peak resident set size above its value when ``fn`` starts, sampled every ``interval`` seconds
    while it runs (None where /proc/self/statm is missing)."""
    start = _rss_bytes()
    if start is None:
        return None
    peak = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes() or 0)
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], _rss_bytes() or 0) - start


class Clock:
    """Wall time on CPU, CUDA events on GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed_ms(self, start: Any, end: Any) -> float:
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end)
        return (end - start) * 1000.0


@dataclass
class Timing:
    """Per-pipeline samples of prefill latency (ms) for the whole forward and the decoder only."""

    total: list[float] = field(default_factory=list)
    decoder: list[float] = field(default_factory=list)
    overhead: list[float] = field(default_factory=list)  # time inside the pipeline's hooks (CPU)

    @staticmethod
    def summary(values: list[float]) -> dict[str, float]:
        if not values:
            return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "iqr": float("nan")}
        q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        return {"median": statistics.median(values), "min": min(values), "max": max(values),
                "iqr": q[2] - q[0]}


def rotated(n: int, r: int) -> list[int]:
    """``0 .. n-1`` started at ``r % n``: the order of interleaved round ``r``, so that no item is always
    timed first."""
    return [(r + i) % n for i in range(n)]


def time_prefills(
    model: Any, inputs: dict, prepared: list[Prepared], runs: int = 5, warmup: int = 1
) -> list[Timing]:
    """Interleaved prefill timings of each prepared pipeline on the same inputs (rotating the order
    every round)."""
    device = next(model.parameters()).device
    clock = Clock(device)
    decoder = model.model.language_model
    timings = [Timing() for _ in prepared]
    marks: dict[str, Any] = {}

    with HookSet() as hooks, torch.no_grad():
        hooks.pre(decoder, lambda m, a, k: marks.__setitem__("lm_start", clock.mark()))
        hooks.post(decoder, lambda m, a, k, o: marks.__setitem__("lm_end", clock.mark()))
        for r in range(warmup + runs):
            for i in rotated(len(prepared), r):
                timer = HookTimer()
                with prepared[i].apply(timer):
                    start = clock.mark()
                    model(**inputs, logits_to_keep=1, use_cache=True)
                    end = clock.mark()
                if r >= warmup:
                    timings[i].total.append(clock.elapsed_ms(start, end))
                    timings[i].decoder.append(clock.elapsed_ms(marks["lm_start"], marks["lm_end"]))
                    if not clock.cuda:
                        timings[i].overhead.append(1000.0 * timer.seconds)
    return timings


def peak_prefill_memory(prepared: Prepared, inputs: dict) -> int:
    """Peak tensor bytes of one prefill with a prepared pipeline installed."""
    model = prepared.model
    device = next(model.parameters()).device
    with prepared.apply(), torch.no_grad():
        return peak_memory_bytes(lambda: model(**inputs, logits_to_keep=1, use_cache=True), device)


def peak_prefill_rss(prepared: list[Prepared], inputs: dict, runs: int = 3) -> list[float | None]:
    """Median over ``runs`` interleaved rounds of each pipeline's peak RSS above its prefill's start
    (bytes; None off Linux). See the module's note on glibc."""
    model = prepared[0].model
    seen: list[list[int]] = [[] for _ in prepared]
    with torch.no_grad():
        for _ in range(runs):
            for i, p in enumerate(prepared):
                with p.apply():
                    rss = peak_rss_bytes(lambda: model(**inputs, logits_to_keep=1, use_cache=True))
                if rss is not None:
                    seen[i].append(rss)
    return [statistics.median(s) if s else None for s in seen]


def bench(model: Any, processor: Any, pipelines: list[Any], image: Any, prompt: str, runs: int = 5,
          warmup: int = 1, weights: Any = None, rss_runs: int = 1, batch: int = 1) -> list[dict[str, Any]]:
    """Vanilla and each pipeline on the same input: latency, overhead, peak memory (tensors and RSS,
    the latter over ``rss_runs`` interleaved rounds; 0: not measured), measured vs analytic saving.
    ``batch`` copies of the sample run as one batch (the analytic saving is per sample, the same).

    ``weights`` (e.g. a ProxyV adapter) go to every pipeline with a stage that runs with trained
    weights; each pipeline is prepared (and refused) before anything is measured.

    ``realized_fraction`` is the measured decoder-time saving over the analytic FLOPs saving (1.0:
    the FLOPs saving turned fully into time).
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise LmmsqueezeError(f"batch={batch!r} must be an integer >= 1 (copies of the sample run together)")
    inputs = model_inputs(processor, model, [image] * batch, [build_prompt(processor, prompt)] * batch)
    family = family_for(model)
    plans = [compile_pipeline(p, family.geometry) for p in ["none", *pipelines]]
    prepared = [prepare(model, plan, weights if any(s.where.takes_weights for s in plan.stages) else None)
                for plan in plans]
    image_tokens = prepared[0].family.count_image_tokens(inputs) // batch  # per sample: the copies are alike
    text_tokens = inputs["input_ids"].shape[1] - image_tokens
    timings = time_prefills(model, dict(inputs), prepared, runs=runs, warmup=warmup)
    base_total = Timing.summary(timings[0].total)["median"]
    base_decoder = Timing.summary(timings[0].decoder)["median"]
    rss = peak_prefill_rss(prepared, dict(inputs), rss_runs) if rss_runs else [None] * len(prepared)
    rows = []
    for p, timing, rss_bytes in zip(prepared, timings, rss, strict=True):
        plan = p.plan
        total, dec = Timing.summary(timing.total), Timing.summary(timing.decoder)
        costs = p.costs()
        costs.add(inputs)
        if any(s.adaptive for s in plan.stages):  # cost what an adaptive stage kept on this input
            with p.apply() as run, torch.no_grad():
                model(**inputs, logits_to_keep=1)
            costs.observe(run)
        cost = costs.cost(text_tokens)
        analytic = cost["saving"]
        measured = 1.0 - dec["median"] / base_decoder
        rows.append({
            "pipeline": plan.canonical,
            "latency_ms": total["median"],
            "latency_iqr_ms": total["iqr"],
            "latency_min_ms": total["min"],
            "latency_max_ms": total["max"],
            "decoder_ms": dec["median"],
            "decoder_iqr_ms": dec["iqr"],
            "decoder_runs_ms": list(timing.decoder),  # per interleaved round, in order
            "overhead_ms": statistics.median(timing.overhead) if timing.overhead else None,
            "overhead_fraction": (statistics.median(o / t for o, t in zip(timing.overhead, timing.total,
                                                                         strict=True))
                                  if timing.overhead else None),
            # the share of the pipeline's prefill FLOPs that its stages' own arithmetic takes (the released
            # selection included): the part of ``overhead_fraction`` no runtime can remove
            "analytic_overhead_fraction": cost["overhead_flops"] / cost["prefill_flops"],
            "peak_memory_mb": peak_prefill_memory(p, dict(inputs)) / 2**20,
            "peak_rss_mb": None if rss_bytes is None else rss_bytes / 2**20,
            "measured_saving": measured,
            "total_saving": 1.0 - total["median"] / base_total,
            "analytic_saving": analytic,
            "realized_fraction": measured / analytic if analytic > 0 else None,
            "runs": runs,
        })
    return rows
