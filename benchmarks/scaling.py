"""Realized savings as image tokens grow: measured decoder-time saving over analytic FLOPs saving.

The model of `prefill_realized.py` (a LLaVA-1.5-shaped random LlavaForConditionalGeneration: patch 14,
hidden 1024, 8 layers, SwiGLU 2816, ~60 text tokens) built at several image sizes, so that the image is
`--tokens` tokens (a square grid: 144 = 12x12 at 168 px, 576 at 336, 1156 at 476, 2916 at 756). For each
size, `lmmsqueeze.runtime.measure.bench` times every pipeline interleaved with the vanilla model; the
table gives the decoder time, the measured and analytic savings and their ratio (`realized`), and the
JSON records how busy the machine was before and after each size (run it on an idle machine).

    python benchmarks/scaling.py [--tokens 144,576,1156,2916] [--runs 3] [--threads 1] \
        [--out benchmarks/results/scaling-cpu.json]

Profile one reduced prefill (where the time goes) with torch.profiler, e.g.:

    python -c "import torch, benchmarks.scaling as s; s.profile('fastv(layer=2, keep=0.5)', 2916)"
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from pathlib import Path

import torch

import lmmsqueeze
from lmmsqueeze.machine import cores_in_use, loadavg
from lmmsqueeze.runtime.loading import build_prompt, model_inputs
from lmmsqueeze.runtime.measure import bench
from lmmsqueeze.testing import random_image, tiny_llava

PIPELINES = ["fastv(layer=2, keep=0.5)", "visionzip(dominant=0.375, contextual=0.07)",
             "proxyv(layer=3, untrained=true)"]
QUESTION = " ".join(["describe the colour of the cell at row one column two ."] * 5)
PATCH = 14


def model_for(tokens: int):
    """The benchmark model whose square image grid has ``tokens`` tokens, and its processor."""
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise SystemExit(f"--tokens {tokens} is not a square grid; give e.g. 144, 576, 1156, 2916")
    return tiny_llava(attn="sdpa", image_size=side * PATCH, patch_size=PATCH, hidden=1024, layers=8, heads=16,
                      kv_heads=16, ffn=2816, vision_hidden=128, vision_layers=2)


def profile(pipeline: str, tokens: int, rows: int = 25) -> None:
    """Print torch.profiler's table of one prefill of ``pipeline`` at ``tokens`` image tokens."""
    model, processor = model_for(tokens)
    side = math.isqrt(tokens) * PATCH
    inputs = model_inputs(processor, model, [random_image(0, side)], [build_prompt(processor, QUESTION)])
    with torch.no_grad(), lmmsqueeze.apply(model, pipeline):
        model(**inputs)  # warm-up
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model(**inputs)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="144,576,1156,2916")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--pipelines", nargs="*", default=PIPELINES)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scaling-cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(t) for t in args.tokens.split(",")]
    cpu = platform.processor() or platform.machine()
    machine = f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    results = []
    print("| image tokens | pipeline | decoder ms | measured saving | analytic saving | realized |"
          f"  ({machine})")
    print("|---|---|---|---|---|---|")
    for tokens in sizes:
        model, processor = model_for(tokens)
        before = {"others_cpu": cores_in_use(), "loadavg": loadavg()}
        side = math.isqrt(tokens) * PATCH
        rows = bench(model, processor, args.pipelines, random_image(0, side), QUESTION, runs=args.runs,
                     warmup=args.warmup)
        after = {"others_cpu": cores_in_use(), "loadavg": loadavg()}
        results.append({"image_tokens": tokens, "machine_before": before, "machine_after": after,
                        "rows": rows})
        for r in rows:
            realized = "-" if r["realized_fraction"] is None else f"{r['realized_fraction']:.2f}"
            print(f"| {tokens} | `{r['pipeline']}` | {r['decoder_ms']:.0f} | "
                  f"{100 * r['measured_saving']:.1f}% | {100 * r['analytic_saving']:.1f}% | {realized} |",
                  flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine, "runs": args.runs, "sizes": results}, indent=2))


if __name__ == "__main__":
    main()
