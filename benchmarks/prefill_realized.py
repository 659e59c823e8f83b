"""Realized fraction of analytic FLOPs savings on a LLaVA-1.5-shaped random model, on CPU.

A random LlavaForConditionalGeneration with LLaVA-1.5's token geometry (336 px, patch 14: 576
image tokens; ~60 text tokens) and a decoder scaled to run on 2 CPU cores (hidden 1024, 8
layers, SwiGLU 2816). For each pipeline, `lmmsqueeze.runtime.measure.bench` times the prefill
interleaved with the vanilla model and reports the measured decoder-time saving over the
analytic FLOPs saving (the realized fraction; target >= 0.9).

    python benchmarks/prefill_realized.py [--runs 7] [--out benchmarks/results/prefill-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from lmmsqueeze.runtime.measure import bench
from lmmsqueeze.testing import random_image, tiny_llava

PIPELINES = ["fastv(layer=2, keep=0.5)", "pool", "random(keep=0.5)", "proxyv(layer=3, untrained=true)"]
QUESTION = " ".join(["describe the colour of the cell at row one column two ."] * 5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--pipelines", nargs="*", default=PIPELINES)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "prefill-cpu.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, processor = tiny_llava(attn="sdpa", image_size=336, patch_size=14, hidden=1024, layers=8, heads=16,
                                  kv_heads=16, ffn=2816, vision_hidden=128, vision_layers=2)
    rows = bench(model, processor, args.pipelines, random_image(0, 336), QUESTION, runs=args.runs,
                 warmup=args.warmup)
    cpu = platform.processor() or platform.machine()
    machine = f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "runs": args.runs, "rows": rows}, indent=2))
    print(f"| pipeline | decoder ms (median) | measured saving | analytic saving | realized |  ({machine})")
    print("|---|---|---|---|---|")
    for r in rows:
        realized = "-" if r["realized_fraction"] is None else f"{r['realized_fraction']:.2f}"
        print(f"| `{r['pipeline']}` | {r['decoder_ms']:.0f} | {100 * r['measured_saving']:.1f}% | "
              f"{100 * r['analytic_saving']:.1f}% | {realized} |")


if __name__ == "__main__":
    main()
