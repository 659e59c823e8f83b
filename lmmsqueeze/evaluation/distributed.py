"""Data-parallel evaluation over ``torch.distributed``: every rank answers its own shard of a run's samples,
rank 0 gathers the shards and alone writes the results store.

The ranks come from the environment that ``torchrun``, ``accelerate launch`` (or ``lmmsqueeze eval
--processes N``, which starts ``torch.distributed.run``) set: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``. The process group is gloo on CPU and nccl on CUDA (each rank on
``cuda:LOCAL_RANK``).

Rank 0 is the :class:`Leader`: it runs the sweep as one process would (the store, what to skip, the
vanilla reference) and, for every run, broadcasts the command; each other rank :func:`follow`\\ s, answers
samples ``rank, rank + world, ...`` and sends its raw measurements (answers, latencies, token counts) with
an ok/error status to rank 0 (object collectives). Rank 0 reassembles the answers in sample order, so a
row equals a single process's answer by answer, in accuracy and FLOPs; its latency is the median over
every sample of every rank. A rank that raises makes the row ``failed`` with its one-line error; a rank
that dies (or hangs) fails the collectives after :func:`timeout` seconds at most, and no row is written
before every rank has answered, so nothing partial is ever stored.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..errors import LmmsqueezeError
from ..runtime import loading  # module access: tests replace loading.load_model
from ..runtime.loading import pick_device
from .runner import measure, summarize
from .sweep import run_sweep
from .tasks import get_task

#: seconds a rank waits in a collective (for the other ranks' shards, or for rank 0's next command)
TIMEOUT_ENV = "LMMSQUEEZE_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 1800


@dataclass(frozen=True)
class World:
    """This process's place among the ranks."""

    rank: int
    size: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0


def _env_int(environ: Any, name: str, default: int) -> int:
    text = str(environ.get(name, default)).strip()
    if not text.isdigit():
        raise LmmsqueezeError(f"{name}={text!r} is not a non-negative integer; the launcher (torchrun, "
                              "accelerate launch) sets it: start lmmsqueeze through one")
    return int(text)


def world(environ: Any = None) -> World | None:
    """The ranks a launcher started this process among, or None for a single process (``WORLD_SIZE``
    unset or 1)."""
    environ = os.environ if environ is None else environ
    size = _env_int(environ, "WORLD_SIZE", 1)
    if size <= 1:
        return None
    rank = _env_int(environ, "RANK", 0)
    if rank >= size:
        raise LmmsqueezeError(f"RANK={rank} is not below WORLD_SIZE={size}; start lmmsqueeze through "
                              "torchrun or accelerate launch")
    return World(rank, size, _env_int(environ, "LOCAL_RANK", rank))


def is_main() -> bool:
    """Whether this process prints and writes: a single process, or rank 0."""
    here = world()
    return here is None or here.main


def timeout() -> float:
    """Seconds a collective waits (``LMMSQUEEZE_DIST_TIMEOUT``, default 30 minutes)."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        value = float(text) if text else DEFAULT_TIMEOUT
    except ValueError:
        value = -1.0
    if not value > 0:
        raise LmmsqueezeError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds > 0; e.g. "
                              f"{TIMEOUT_ENV}=600")
    return value


def rank_device(device: str | None, here: World) -> str | None:
    """The device of this rank: ``cuda`` (or the CUDA default) becomes ``cuda:LOCAL_RANK``; an explicit
    index or another kind stays."""
    dev = pick_device(device)
    if dev.type == "cuda" and dev.index is None:
        return f"cuda:{here.local_rank % torch.cuda.device_count()}"
    return device


def init(here: World, device: str | None) -> None:
    """Join the process group (once): nccl when this rank runs on a CUDA device of its own, else gloo (CPU,
    or more local ranks than GPUs: nccl refuses two ranks on one GPU; the collectives carry objects)."""
    if dist.is_initialized():
        return
    dev = pick_device(device)
    local = _env_int(os.environ, "LOCAL_WORLD_SIZE", here.size)
    own_gpu = dev.type == "cuda" and local <= torch.cuda.device_count() and dev.index == here.local_rank
    backend = "nccl" if own_gpu else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, rank=here.rank, world_size=here.size,
                            timeout=timedelta(seconds=timeout()))


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class RanksLost(BaseException):  # not an Exception: run_sweep must not store it as a failed row
    """A collective failed (a rank died or hung): no row of this run can be trusted, none is written."""


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


class _Counter:
    """Samples done over all ranks, counted in the process group's key-value store (the one torchrun's
    rendezvous made); without one, rank 0 counts its own samples times the ranks."""

    def __init__(self, run: str, here: World):
        self.key, self.here = f"lmmsqueeze/progress/{run}", here
        try:
            self.store = dist.distributed_c10d._get_default_store()
        except Exception:  # noqa: BLE001 - an older or other torch: count locally
            self.store = None
        self.own = 0

    def add(self, done: int) -> int:
        """Record that this rank has done ``done`` samples; returns the count over all ranks."""
        step, self.own = done - self.own, done
        if self.store is None:
            return done * self.here.size
        return int(self.store.add(self.key, step))


def _shard(command: dict[str, Any], here: World, loaded: list[Any], load: Callable[[], tuple[Any, Any]],
           counter: _Counter, on_total: Callable[[int], None] | None = None) -> tuple[Any, str | None]:
    """Measure this rank's shard of one run: (its part without the cost model, None) or (None, error)."""
    try:
        if not loaded:
            loaded.extend(load())
        model, processor = loaded
        task = get_task(command["task"])

        def progress(done: int, total: int) -> None:
            count = counter.add(done)
            if on_total:
                on_total(count)

        part = measure(model, processor, command["pipeline"], task, command["limit"], command["seed"],
                       command["adapter"], command["batch_size"], progress, shard=(here.rank, here.size))
        return part, None
    except Exception as exc:  # noqa: BLE001 - reported to rank 0, which stores the row as failed
        return None, _one_line(exc)


class Leader:
    """Rank 0: :meth:`evaluate` has :func:`lmmsqueeze.evaluation.runner.evaluate`'s signature (what
    :func:`lmmsqueeze.evaluation.sweep.run_sweep` calls) and runs the evaluation on every rank;
    :meth:`stop` (or the context manager's exit) releases the other ranks."""

    def __init__(self, here: World):
        self.here, self.runs, self.broken = here, 0, None
        self.name = uuid.uuid4().hex[:12]  # progress counters stay apart when a group runs several sweeps

    def __enter__(self) -> Leader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.broken is None:
            try:
                dist.broadcast_object_list([None], src=0)
            except Exception:  # noqa: BLE001 - the others are gone already; they time out
                pass
            self.broken = "stopped"

    def evaluate(self, model: Any, processor: Any, pipeline: Any, task: Any, limit: int | None = None,
                 seed: int = 0, adapter: Any = None, batch_size: int = 1,
                 on_progress: Callable[[int, int], None] | None = None, **_: Any) -> dict[str, Any]:
        self.runs += 1
        n = task.size if limit is None else min(limit, task.size)
        command = {"pipeline": str(pipeline), "task": task.name, "limit": n, "seed": seed,
                   "adapter": adapter, "batch_size": batch_size, "run": f"{self.name}-{self.runs}"}
        counter = _Counter(command["run"], self.here)
        try:
            dist.broadcast_object_list([command], src=0)
            part, error = _shard(command, self.here, [model, processor], lambda: (model, processor), counter,
                                 (lambda count: on_progress(min(count, n), n)) if on_progress else None)
            sent = None if part is None else {k: v for k, v in part.items() if k != "costs"}
            gathered: list[Any] = [None] * self.here.size
            dist.gather_object((sent, error), gathered, dst=0)
        except Exception as exc:  # a rank died or hung: the group cannot be trusted any more
            self.broken = _one_line(exc)
            raise RanksLost(f"the ranks stopped answering ({self.broken[:300]}); no row of this run was "
                            "stored: run the command again (stored rows are skipped)") from None
        errors = [(r, e) for r, (_, e) in enumerate(gathered) if e]
        if errors:
            rank, first = errors[0]
            more = f" ({len(errors) - 1} more ranks failed)" if len(errors) > 1 else ""
            raise LmmsqueezeError(f"rank {rank} of {self.here.size}: {first}{more}")
        parts = [part if r == 0 else p for r, (p, _) in enumerate(gathered)]
        if on_progress:
            on_progress(n, n)
        return summarize(part, parts, task)


def follow(here: World, load: Callable[[], tuple[Any, Any]]) -> None:
    """A rank other than 0: run the shards rank 0 asks for until it says stop. ``load()`` gives (model,
    processor), called on the first run. Rank 0 gone (killed, or past :func:`timeout`) is one
    :class:`LmmsqueezeError`."""
    loaded: list[Any] = []
    while True:
        try:
            box: list[Any] = [None]
            dist.broadcast_object_list(box, src=0)
            command = box[0]
            if command is None:
                return
            part, error = _shard(command, here, loaded, load, _Counter(command["run"], here))
            sent = None if part is None else {k: v for k, v in part.items() if k != "costs"}
            dist.gather_object((sent, error), None, dst=0)
        except Exception as exc:  # noqa: BLE001 - a collective failed: rank 0 is gone
            raise LmmsqueezeError(f"rank {here.rank} of {here.size}: rank 0 stopped answering "
                                  f"({_one_line(exc)[:300]}); nothing of this run was stored") from None


def run_sweep_ranks(grid: Any, store_path: str | Path, batch_size: int = 1, device: str | None = None,
                    on_event: Callable[[str, dict[str, Any]], None] | None = None, remeasure: bool = False,
                    retry_failed: bool = False, load_options: dict[str, Any] | None = None) -> list[dict]:
    """:func:`~lmmsqueeze.evaluation.sweep.run_sweep` on the ranks a launcher started (a single process:
    ``run_sweep`` itself). Rank 0 runs the sweep, writes the store and returns its results; every other
    rank answers its shards and returns []. ``load_options`` (``device_map``, ``max_memory``,
    ``offload_folder``) go to :func:`~lmmsqueeze.runtime.loading.load_model`: a dispatched model spans
    the devices, so it runs in one process."""
    here = world()
    options = dict(load_options or {})
    if here is not None and options.get("device_map") is not None:
        raise LmmsqueezeError("--device-map spreads one model over the devices and runs in one process; "
                              "drop --processes (or accelerate launch / torchrun), or drop --device-map")
    dev = device if here is None else rank_device(device, here)

    def load() -> tuple[Any, Any]:
        return loading.load_model(grid.model, device=dev, **options)

    kwargs = {"batch_size": batch_size, "device": dev, "remeasure": remeasure, "retry_failed": retry_failed}
    if here is None:
        return run_sweep(grid, store_path, on_event=on_event, load=load, **kwargs)
    init(here, dev)
    if not here.main:
        follow(here, load)
        return []
    with Leader(here) as leader:
        try:
            return run_sweep(grid, store_path, on_event=on_event, load=load, evaluator=leader.evaluate,
                             **kwargs)
        except RanksLost as exc:
            raise LmmsqueezeError(str(exc)) from None
