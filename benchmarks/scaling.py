"""Realized savings as image tokens grow: measured decoder-time saving over analytic FLOPs saving.

A LLaVA-1.5-shaped random LlavaForConditionalGeneration (patch 14, hidden 1024, 8 layers, SwiGLU
2816, ~60 text tokens) built at several image sizes, so that the image is ``--tokens`` tokens (a
square grid: 144 = 12x12 at 168 px, 576 at 336, 1156 at 476, 2916 at 756). For each size:

- time: :func:`lmmsqueeze.runtime.scaling.scaling` times every pipeline interleaved with vanilla
  (``--runs`` rounds after a warm-up); per pipeline the decoder time, measured and analytic saving,
  ``realized`` (median, and its min-max over the rounds, each round against the same round's
  vanilla), and the overhead (time inside the pipeline's hooks over its prefill) beside the share of
  the pipeline's prefill FLOPs that its stages' own arithmetic takes (probes, scoring, the released
  selection: ``cost_macs``), the part of the overhead that no runtime can remove;
- memory: in a child process started with ``MALLOC_MMAP_THRESHOLD_=65536`` (so freed blocks leave
  the resident set at once), each pipeline's peak of live tensor bytes and peak RSS above its
  prefill's start;
- peer (``--peer-tokens``): FastV done the way its reference repositories do it (``benchmarks/peers.py``:
  eager layer K-1 with the full attention matrix, as the toolkits hook it; and eager attention in every
  layer, as FastV's own transformers fork runs) against our ``fastv`` (one-query probe, sdpa),
  interleaved, with the kept sets compared.

The JSON records how busy the machine was over each size; run it on an idle machine:

    python benchmarks/scaling.py [--tokens 144,576,1156,2916] [--runs 3] [--threads 1] [--batch 1] \\
        [--out benchmarks/results/scaling-cpu.json]

Profile one reduced prefill (where the time goes) with torch.profiler: ``benchmarks/profiles.py``
(its docstring gives the command of the committed before/after tables).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from lmmsqueeze.machine import LoadMeter
from lmmsqueeze.runtime.loading import build_prompt, model_inputs
from lmmsqueeze.runtime.measure import peak_memory_bytes, peak_prefill_memory, peak_prefill_rss, rotated
from lmmsqueeze.runtime.run import prepare
from lmmsqueeze.runtime.scaling import scaling

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.peers import decoder_input, fastv_reference  # noqa: E402
from lmmsqueeze.testing import random_image, tiny_llava  # noqa: E402

# every built-in reducer once, at its own placement, set for the 8-layer model, and both ProxyV variants
PIPELINES = [
    "pool", "maxpool", "bilinear", "stride", "random(keep=0.5)", "tome(keep=0.5)",
    "visionzip(dominant=0.375, contextual=0.07)", "vispruner(keep=0.25)", "fastervlm(keep=0.25)",
    "prumerge", "divprune(keep=0.25)", "dart(layer=2, keep=0.25)", "fastv(layer=2, keep=0.5)",
    "pdrop(layer=2, step=2, stages=3)", "sparsevlm(layer=2, more_layers='', budget=192)",
    "proxyv(layer=3, untrained=true)", "proxyv(layer=3, variant=nonspatial, untrained=true)",
]
QUESTION = " ".join(["describe the colour of the cell at row one column two ."] * 5)
PATCH = 14


#: where and how the model runs: ``--device cuda --dtype bfloat16 --attn flash_attention_2`` on a GPU
TARGET = {"device": "cpu", "dtype": "float32", "attn": "sdpa"}


def model_for(tokens: int):
    """The benchmark model whose square image grid has ``tokens`` tokens, its processor and an image."""
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise SystemExit(f"--tokens {tokens} is not a square grid; give e.g. 144, 576, 1156, 2916")
    model, processor = tiny_llava(attn=TARGET["attn"], image_size=side * PATCH, patch_size=PATCH, hidden=1024,
                                  layers=8, heads=16, kv_heads=16, ffn=2816, vision_hidden=128,
                                  vision_layers=2)
    model = model.to(TARGET["device"], getattr(torch, TARGET["dtype"]))
    return model, processor, random_image(0, side * PATCH)


def inputs_for(model, processor, image, batch: int = 1):
    """The benchmark prompt about ``image``, ``batch`` copies of it, as the model takes them."""
    return model_inputs(processor, model, [image] * batch, [build_prompt(processor, QUESTION)] * batch)


def memory(tokens: int, pipelines: list[str], runs: int, batch: int = 1) -> list[dict]:
    """Peak tensor bytes and peak RSS of vanilla and each pipeline (run in the child process)."""
    model, processor, image = model_for(tokens)
    inputs = dict(inputs_for(model, processor, image, batch))
    prepared = [prepare(model, p) for p in ["none", *pipelines]]
    with torch.no_grad():
        model(**inputs, logits_to_keep=1, use_cache=True)  # warm-up: lazy buffers and one-time allocations
    rss = peak_prefill_rss(prepared, inputs, runs) if TARGET["device"] == "cpu" else [None] * len(prepared)
    return [{"pipeline": p.plan.canonical, "peak_memory_mb": peak_prefill_memory(p, inputs) / 2**20,
             "peak_rss_mb": None if r is None else r / 2**20} for p, r in zip(prepared, rss, strict=True)]


def memory_in_child(tokens: int, pipelines: list[str], runs: int, threads: int, batch: int = 1) -> list[dict]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, __file__, "--memory-child", str(tokens), "--runs", str(runs),
           "--threads", str(threads), "--batch", str(batch), "--pipelines", *pipelines]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def peer(tokens: int, runs: int) -> dict:
    """Decoder prefill time and peak tensor memory: our fastv against FastV's reference ways (eager
    layer K-1 as the toolkits do it, and eager attention in every layer as FastV's own fork has it)."""
    model, processor, image = model_for(tokens)
    inputs = inputs_for(model, processor, image)
    lm = model.model.language_model
    marks = {}
    device = next(model.parameters()).device

    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    pre = lm.register_forward_pre_hook(lambda m, a: marks.__setitem__("start", now()))
    post = lm.register_forward_hook(lambda m, a, o: marks.__setitem__("end", now()))
    times: dict[str, list[float]] = {"ours": [], "theirs": [], "fork": []}
    kept: dict[str, torch.Tensor] = {}
    prepared = prepare(model, "fastv(layer=2, keep=0.5)")

    def ours():
        with prepared.apply() as run:
            model(**inputs, logits_to_keep=1, use_cache=True)
        return run

    def reference(who: str):
        return fastv_reference(model, inputs, 2, 0.5, embeds=embeds, eager_everywhere=who == "fork")

    with torch.no_grad():
        embeds = decoder_input(model, inputs)  # vision tower and merge: outside the decoder's span, as ours
        order = list(times)
        for r in range(runs + 1):
            for who in (order[i] for i in rotated(len(order), r)):
                if who == "ours":
                    ours()
                    elapsed = marks["end"] - marks["start"]
                else:
                    start = now()
                    _, kept[who] = reference(who)
                    elapsed = now() - start
                if r:
                    times[who].append(1000 * elapsed)
        mine = torch.sort(ours().trace[0][0]).values
        peaks = {who: peak_memory_bytes(lambda who=who: reference(who), device) for who in ("theirs", "fork")}
        ours_peak = peak_prefill_memory(prepared, dict(inputs))
    pre.remove()
    post.remove()
    med = {who: statistics.median(t) for who, t in times.items()}
    return {"image_tokens": tokens, "ours_ms": med["ours"], "theirs_ms": med["theirs"],
            "fork_ms": med["fork"],
            "ratio": med["ours"] / med["theirs"],
            "ratio_runs": [o / t for o, t in zip(times["ours"], times["theirs"], strict=True)],
            "ratio_fork": med["ours"] / med["fork"],
            "ratio_fork_runs": [o / t for o, t in zip(times["ours"], times["fork"], strict=True)],
            "ours_peak_mb": ours_peak / 2**20, "theirs_peak_mb": peaks["theirs"] / 2**20,
            "fork_peak_mb": peaks["fork"] / 2**20,
            "same_kept_set": all(torch.equal(mine, k) for k in kept.values())}


def summary(result: dict, *updates: dict, take: list[str] | None = None) -> str:
    """The README's table from a results JSON: per pipeline, realized at each size (median and the
    rounds' min-max), the largest overhead, and the largest tensor-peak and RSS-peak ratios to vanilla.
    A pipeline measured again in an ``update`` (a later run, against its own vanilla) takes that run's
    numbers, marked ``†`` (only the reducers named in ``take``, when given)."""
    sizes = result["sizes"]
    for update in updates:
        for size in update["sizes"]:
            mine = next(s for s in sizes if s["image_tokens"] == size["image_tokens"])
            base = size["rows"][0]
            for row in size["rows"][1:]:
                if take is not None and row["pipeline"].split("(")[0] not in take:
                    continue
                i = next(i for i, r in enumerate(mine["rows"]) if r["pipeline"] == row["pipeline"])
                ratio = {k: row[k] / base[k] * mine["rows"][0][k] for k in ("peak_memory_mb", "peak_rss_mb")
                         if row.get(k) is not None and base.get(k)}
                mine["rows"][i] = {**row, **ratio, "pipeline": row["pipeline"] + " †"}
    head = " | ".join(f"{s['image_tokens']}{' !' if s['machine']['busy'] else ''}" for s in sizes)
    lines = [f"| pipeline | {head} | overhead (max) [own FLOPs there] | tensor peak / vanilla (max) | "
             "RSS peak / vanilla (max) |",
             "|---|" + "---|" * (len(sizes) + 3)]
    for i, row in enumerate(sizes[0]["rows"][1:], start=1):
        cells, overhead, own, tensor, rss = [], 0.0, None, 0.0, 0.0
        for s in sizes:
            r, base = s["rows"][i], s["rows"][0]
            runs = r.get("realized_runs")
            spread = "-" if not runs else f"{r['realized_fraction']:.2f} ({min(runs):.2f}-{max(runs):.2f})"
            cells.append(spread)
            if (r["overhead_fraction"] or 0.0) >= overhead:
                overhead, own = r["overhead_fraction"] or 0.0, r.get("analytic_overhead_fraction")
            tensor = max(tensor, r["peak_memory_mb"] / base["peak_memory_mb"])
            if r.get("peak_rss_mb") is not None and base.get("peak_rss_mb"):
                rss = max(rss, r["peak_rss_mb"] / base["peak_rss_mb"])
        own_cell = "" if own is None else f" [{100 * own:.1f}%]"
        lines.append(f"| `{row['pipeline']}` | " + " | ".join(cells)
                     + f" | {100 * overhead:.1f}%{own_cell} | {tensor:.2f} | {rss:.2f} |")
    return "\n".join(lines)


def repeated(result: dict, *repeats: dict) -> dict:
    """``result`` with each pipeline's realized at each size taken over ``repeats`` too (whole runs of
    the same command on the same commit): the median of the runs' medians, and as its spread the
    runs' medians themselves (sizes a repeat lacks keep ``result``'s rounds). Overhead and memory stay
    ``result``'s."""
    merged = copy.deepcopy(result)
    for size in merged["sizes"]:
        others = [next((s for s in r["sizes"] if s["image_tokens"] == size["image_tokens"]), None)
                  for r in repeats]
        others = [s for s in others if s is not None]
        if not others:
            continue
        for row in size["rows"][1:]:
            values = [row["realized_fraction"]]
            for other in others:
                match = next((r for r in other["rows"] if r["pipeline"] == row["pipeline"]), None)
                if match is not None and match["realized_fraction"] is not None:
                    values.append(match["realized_fraction"])
            if row["realized_fraction"] is not None and len(values) > 1:
                row["realized_fraction"], row["realized_runs"] = statistics.median(values), values
    return merged


def load_update(group: str) -> dict:
    """An ``--update`` argument: one results JSON, or several joined by commas (repeats of one command on
    one commit), merged by :func:`repeated`."""
    return repeated(*(json.loads(Path(path).read_text()) for path in group.split(",")))


def _commit() -> str | None:
    """The checked-out commit (``+dirty`` when the code run differs from it: the package, the benchmarks and
    pyproject.toml, results aside), None outside a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "lmmsqueeze",
                                "benchmarks", ":!benchmarks/results", "pyproject.toml"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def _realized_runs(row: dict, base: dict) -> list[float] | None:
    if not row["analytic_saving"] > 0:
        return None
    return [(1 - d / b) / row["analytic_saving"]
            for d, b in zip(row["decoder_runs_ms"], base["decoder_runs_ms"], strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="144,576,1156,2916")
    parser.add_argument("--peer-tokens", default="576,2916")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--pipelines", nargs="*", default=PIPELINES)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1, help="copies of the sample prefilled as one batch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "flash_attention_2", "eager"])
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--summary", type=Path, nargs="+", default=None,
                        help="print the summary of a results JSON (later files: pipelines measured again)")
    parser.add_argument("--take", nargs="+", default=None, help="--summary: reducers taken from later files")
    parser.add_argument("--repeats", action="store_true",
                        help="--summary: later files are repeats of the first run; realized is the median of "
                             "the runs' medians, its spread the runs' medians")
    parser.add_argument("--update", nargs="+", default=[],
                        help="--summary: runs whose --take reducers replace those rows (†); paths joined by "
                             "commas are repeats of one command, merged as --repeats merges")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scaling-cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    TARGET.update(device=args.device, attn=args.attn, dtype=args.dtype or ("bfloat16" if cuda else "float32"))
    if args.summary is not None:
        results = [json.loads(path.read_text()) for path in args.summary]
        updates = [load_update(group) for group in args.update]
        print(summary(repeated(*results), *updates, take=args.take) if args.repeats
              else summary(*results, take=args.take))
        return
    if args.memory_child is not None:
        print(json.dumps(memory(args.memory_child, args.pipelines, args.runs, args.batch)))
        return
    sizes = [int(t) for t in args.tokens.split(",") if t]
    cpu = platform.processor() or platform.machine()
    machine = (f"{torch.cuda.get_device_name(args.device)}, {TARGET['dtype']}, {args.attn}" if cuda
               else f"{cpu}, {torch.get_num_threads()} threads") + f", torch {torch.__version__}"
    started = time.perf_counter()
    result = {"machine": machine, "runs": args.runs, "batch": args.batch, "command": " ".join(sys.argv),
              "commit": _commit(), "sizes": [], "peer": []}
    print(f"| image tokens | pipeline | decoder ms | measured | analytic | realized (min-max) | overhead "
          f"[own FLOPs] | tensor peak MB | RSS peak MB |  ({machine})")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in scaling(model_for, sizes, args.pipelines, QUESTION, runs=args.runs, warmup=args.warmup,
                        rss_runs=0, batch=args.batch):
        tokens = size["image_tokens"]
        mem = (memory(tokens, args.pipelines, 1, args.batch) if cuda  # CUDA: the allocator's peak, no RSS
               else memory_in_child(tokens, args.pipelines, args.runs, args.threads, args.batch))
        base = size["rows"][0]
        for row, m in zip(size["rows"], mem, strict=True):
            row.update(peak_memory_mb=m["peak_memory_mb"], peak_rss_mb=m["peak_rss_mb"],
                       realized_runs=_realized_runs(row, base))
            runs = row["realized_runs"]
            spread = ("-" if runs is None
                      else f"{row['realized_fraction']:.2f} ({min(runs):.2f}-{max(runs):.2f})")
            overhead = ("-" if row["overhead_fraction"] is None else f"{100 * row['overhead_fraction']:.1f}% "
                        f"[{100 * row['analytic_overhead_fraction']:.1f}%]")
            busy = " !" if size["machine"]["busy"] else ""
            print(f"| {size['image_tokens']}{busy} | `{row['pipeline']}` | {row['decoder_ms']:.0f} | "
                  f"{100 * row['measured_saving']:.1f}% | {100 * row['analytic_saving']:.1f}% | {spread} | "
                  f"{overhead} | {row['peak_memory_mb']:.1f} | {row['peak_rss_mb'] or 0:.1f} |", flush=True)
        result["sizes"].append(size)
        result["wall_s"] = round(time.perf_counter() - started)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    print("\n| image tokens | ours (sdpa, one-query probe) ms | eager layer K-1 ms | ratio | "
          "eager every layer (FastV's fork) ms | ratio | peak MB ours / K-1 / fork | same kept set |")
    print("|---|---|---|---|---|---|---|---|")
    for tokens in [int(t) for t in args.peer_tokens.split(",") if t]:
        with LoadMeter(torch.get_num_threads()) as meter:
            p = peer(tokens, args.runs)
        p["machine"] = meter.metrics()
        result["peer"].append(p)
        result["wall_s"] = round(time.perf_counter() - started)
        busy = " !" if p["machine"]["busy"] else ""
        print(f"| {tokens}{busy} | {p['ours_ms']:.0f} | {p['theirs_ms']:.0f} | "
              f"{p['ratio']:.2f} ({min(p['ratio_runs']):.2f}-{max(p['ratio_runs']):.2f}) | "
              f"{p['fork_ms']:.0f} | "
              f"{p['ratio_fork']:.2f} ({min(p['ratio_fork_runs']):.2f}-{max(p['ratio_fork_runs']):.2f}) | "
              f"{p['ours_peak_mb']:.0f} / {p['theirs_peak_mb']:.0f} / {p['fork_peak_mb']:.0f} | "
              f"{p['same_kept_set']} |", flush=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
