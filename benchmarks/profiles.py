"""Where a reduced prefill's time goes: torch.profiler's operator table for the scaling benchmark's model.

The model of ``benchmarks/scaling.py`` (LLaVA-1.5-shaped, hidden 1024, 8 layers) at ``--tokens`` image
tokens, one warm-up prefill, then one profiled prefill per pipeline (1 thread). Only stable public
names are used (``lmmsqueeze.apply``, ``lmmsqueeze.testing``), so the same file profiles an older
checkout too (``PYTHONPATH=<old checkout> python benchmarks/profiles.py ...``): the before/after
tables of issue 16 in ``benchmarks/results/profile-2916-*.txt`` were made that way:

    python benchmarks/profiles.py --tokens 2916 -p none -p "proxyv(layer=3, untrained=true)" \\
        -p "pdrop(layer=2, step=2, stages=3)" > benchmarks/results/profile-2916-after.txt
"""

from __future__ import annotations

import argparse
import contextlib
import math

import torch

import lmmsqueeze
from lmmsqueeze.runtime.loading import build_prompt, model_inputs
from lmmsqueeze.testing import random_image, tiny_llava

QUESTION = " ".join(["describe the colour of the cell at row one column two ."] * 5)
PATCH = 14


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2916)
    parser.add_argument("-p", "--pipeline", action="append", default=None)
    parser.add_argument("--rows", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    side = math.isqrt(args.tokens)
    model, processor = tiny_llava(attn="sdpa", image_size=side * PATCH, patch_size=PATCH, hidden=1024,
                                  layers=8, heads=16, kv_heads=16, ffn=2816, vision_hidden=128,
                                  vision_layers=2)
    image, prompt = random_image(0, side * PATCH), build_prompt(processor, QUESTION)
    inputs = model_inputs(processor, model, [image], [prompt])
    for pipeline in args.pipeline or ["none"]:
        installed = (contextlib.nullcontext() if pipeline == "none"
                     else lmmsqueeze.apply(model, pipeline))
        with torch.no_grad(), installed:
            model(**inputs, logits_to_keep=1, use_cache=True)  # warm-up
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                model(**inputs, logits_to_keep=1, use_cache=True)
        averages = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in averages) / 1000
        print(f"## {pipeline} at {args.tokens} image tokens: {total:.0f} ms self CPU in all\n")
        print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
