"""Per decoder layer: wall time and FLOP rate of vanilla and of each pipeline, interleaved.

Where ``benchmarks/scaling.py`` gives one ``realized`` per pipeline (measured decoder-time saving over the
analytic FLOPs saving), this splits it by layer: each layer's median wall time over ``--runs`` rounds
(after a warm-up, pipelines in a rotating order), its analytic FLOPs from the cost model (the plan's
cost, an adaptive stage's count as the run kept it: the numbers ``realized`` uses) and so its GFLOP/s. A
layer a pipeline changes that runs at a lower rate than vanilla's layers is where a saving is lost; one
at the same rate turns its FLOPs saving into time in full. Time outside the layers (embedding, vision
tower, final norm) is the rest of the decoder's span. Each prefill's minor page faults are counted too
(glibc returns large freed blocks to the kernel, so a prefill that allocates fresh memory pays for
zeroed pages; ``ru_minflt``).

The model is ``benchmarks/scaling.py``'s (LLaVA-1.5-shaped, hidden 1024, 8 layers) at ``--tokens``
image tokens, on the CPU (wall clock: no device synchronisation), 1 thread; run it on an idle machine:

    python benchmarks/layers.py --tokens 1156 --runs 5 -p "proxyv(layer=3, untrained=true)" \\
        [--out benchmarks/results/layers-1156.json]

A pipeline's stages that run in hooks at a layer's input or output (a reducer's selection) count in
that layer's time, as their FLOPs (``overhead``) count in its FLOPs.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.scaling import inputs_for, model_for  # noqa: E402
from lmmsqueeze.machine import LoadMeter  # noqa: E402
from lmmsqueeze.runtime.measure import rotated  # noqa: E402
from lmmsqueeze.runtime.run import prepare  # noqa: E402
from lmmsqueeze.testing import plan_as_run  # noqa: E402


def timed_prefill(prepared, inputs: dict) -> tuple[list[float], float, int, Any]:
    """One prefill: each decoder layer's wall time (ms), the decoder's (ms), the minor page faults and
    the pipeline's run (what its adaptive stages kept)."""
    layers = prepared.model.model.language_model.layers
    decoder = prepared.model.model.language_model
    marks: dict = {}
    with prepared.apply() as run:  # hooks go on the layers as they are now (a pipeline may have swapped some)
        handles = [
            decoder.register_forward_pre_hook(lambda m, a: marks.__setitem__("start", time.perf_counter())),
            decoder.register_forward_hook(lambda m, a, o: marks.__setitem__("end", time.perf_counter()))]
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(  # first: a stage's pre-hook counts in the layer
                lambda m, a, i=i: marks.__setitem__(("in", i), time.perf_counter()), prepend=True))
            handles.append(layer.register_forward_hook(
                lambda m, a, o, i=i: marks.__setitem__(("out", i), time.perf_counter())))
        try:
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            prepared.model(**inputs, logits_to_keep=1, use_cache=True)
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        finally:
            for handle in handles:
                handle.remove()
    per_layer = [1000 * (marks[("out", i)] - marks[("in", i)]) for i in range(len(layers))]
    return per_layer, 1000 * (marks["end"] - marks["start"]), faults, run


def measure(tokens: int, pipelines: list[str], runs: int) -> dict:
    model, processor, image = model_for(tokens)
    inputs = dict(inputs_for(model, processor, image))
    prepared = [prepare(model, p) for p in ["none", *pipelines]]
    geometry = prepared[0].family.image_geometries(inputs)[0]
    image_tokens = prepared[0].family.count_image_tokens(inputs)
    text_tokens = inputs["input_ids"].shape[1] - image_tokens
    seen = [{"layers": [], "decoder": [], "faults": []} for _ in prepared]
    ran = [None] * len(prepared)
    with torch.no_grad(), LoadMeter(torch.get_num_threads()) as meter:
        for r in range(runs + 1):
            for i in rotated(len(prepared), r):
                per_layer, decoder, faults, ran[i] = timed_prefill(prepared[i], inputs)
                if r:  # the first round warms up
                    seen[i]["layers"].append(per_layer)
                    seen[i]["decoder"].append(decoder)
                    seen[i]["faults"].append(faults)
    rows = []
    for p, s, run in zip(prepared, seen, ran, strict=True):
        cost = plan_as_run(run, geometry).cost(text_tokens=text_tokens)  # an adaptive stage: what it kept
        layer_ms = [statistics.median(run[i] for run in s["layers"]) for i in range(len(cost.layers))]
        rows.append({"pipeline": p.plan.canonical,
                     "decoder_ms": statistics.median(s["decoder"]),
                     "layer_ms": layer_ms,
                     "layer_gflop": [c.flops / 1e9 for c in cost.layers],
                     "layer_gflops_per_s": [c.flops / 1e6 / ms
                                            for c, ms in zip(cost.layers, layer_ms, strict=True)],
                     "outside_layers_ms": statistics.median(d - sum(run) for d, run in
                                                            zip(s["decoder"], s["layers"], strict=True)),
                     "minor_faults": statistics.median(s["faults"]),
                     "minor_faults_runs": s["faults"]})
    return {"image_tokens": tokens, "text_tokens": text_tokens, "runs": runs, "machine": meter.metrics(),
            "rows": rows}


def table(result: dict) -> str:
    base = result["rows"][0]
    lines = [f"## {result['image_tokens']} image tokens, {result['text_tokens']} other tokens, "
             f"median of {result['runs']} rounds{' (busy!)' if result['machine']['busy'] else ''}", "",
             "| pipeline | layer | ms | GFLOP | GFLOP/s | time / vanilla's | FLOPs / vanilla's |",
             "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        for i, (ms, gf, rate) in enumerate(zip(row["layer_ms"], row["layer_gflop"], row["layer_gflops_per_s"],
                                              strict=True)):
            lines.append(f"| `{row['pipeline']}` | {i} | {ms:.1f} | {gf:.2f} | {rate:.0f} | "
                         f"{ms / base['layer_ms'][i]:.3f} | {gf / base['layer_gflop'][i]:.3f} |")
        lines.append(f"| `{row['pipeline']}` | outside | {row['outside_layers_ms']:.1f} | | | | |")
    lines += ["", "| pipeline | decoder ms | minor page faults per prefill (median, rounds) |",
              "|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| `{row['pipeline']}` | {row['decoder_ms']:.0f} | {row['minor_faults']:.0f} "
                     f"({', '.join(str(f) for f in row['minor_faults_runs'])}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1156", help="image-token counts, comma-separated (square grids)")
    parser.add_argument("-p", "--pipeline", action="append", required=True)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for tokens in [int(t) for t in args.tokens.split(",") if t]:
        results.append(measure(tokens, args.pipeline, args.runs))
        print(table(results[-1]) + "\n", flush=True)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"command": " ".join(sys.argv), "threads": args.threads,
                                            "torch": torch.__version__, "sizes": results}, indent=2))


if __name__ == "__main__":
    main()
