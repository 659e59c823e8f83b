"""Train the ProxyV adapters shipped with the bundled model, and measure them.

    python -m lmmsqueeze.bundled.train_adapters [--steps 600] [--limit 1000]

Trains, with the LLM frozen, (1) a spatial adapter starting at layer 1 of 4 (about a third of the
layers) and (2) a non-spatial adapter after VisionZip, writes them to
``lmmsqueeze/bundled/adapters/{proxyv-spatial,proxyv-nonspatial}`` (addressable as
``bundled:proxyv-spatial`` / ``bundled:proxyv-nonspatial``), then evaluates vanilla, the reducer
alone and both adapters on the test split and writes the table to ``results/bundled/adapters.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from ..evaluation.runner import evaluate
from ..evaluation.tasks import get_task
from ..pipelines.loading import load_model
from ..proxyv.attach import adapter_path
from ..proxyv.train import TrainSettings, train_proxyv

SPATIAL = "proxyv(layer=1, factor=3)"
REDUCER = "visionzip(dominant=27, contextual=5)"
NONSPATIAL = f"{REDUCER} | proxyv(layer=1, variant=nonspatial, proxies=16)"
RESULTS = Path(__file__).resolve().parents[2] / "results" / "bundled"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--limit", type=int, default=1000, help="test samples for the final table")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work", type=Path, default=Path("runs/bundled-adapters"), help="checkpoints and logs")
    parser.add_argument("--only", choices=("spatial", "nonspatial"), default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = load_model("bundled", device="cpu")
    task = get_task("bundled")
    settings = TrainSettings(steps=args.steps, batch=args.batch, lr=args.lr, eval_every=max(1, args.steps // 6),
                             save_every=50, eval_size=200, eval_batch=50)

    table = []
    for name, pipeline in (("proxyv-spatial", SPATIAL), ("proxyv-nonspatial", NONSPATIAL)):
        if args.only and not name.endswith(args.only):
            continue
        work = args.work / name
        adapter = train_proxyv(model, processor, pipeline, task, work, settings)
        target = adapter_path(f"bundled:{name}")
        if target.exists():
            shutil.rmtree(target)
        adapter.save(target)
        shutil.copy(work / "train_log.jsonl", RESULTS / f"{name}-train.jsonl")
        print(f"wrote {target}")
    for pipeline, adapter in (("none", None), (REDUCER, None), (SPATIAL, "bundled:proxyv-spatial"),
                              (NONSPATIAL, "bundled:proxyv-nonspatial")):
        if adapter and not (adapter_path(adapter) / "adapter_config.json").is_file():
            continue
        row = evaluate(model, processor, pipeline, task, limit=args.limit, adapter=adapter, batch_size=50,
                       measure_memory=False)
        row.pop("answers")
        table.append({"pipeline": row["pipeline"], "adapter": adapter, "accuracy": row["accuracy"],
                      "per_type": row["per_type"], "saving": row["saving"], "n": row["n"]})
        print(f"{row['pipeline']:<70} {adapter or '':<26} acc {100 * row['accuracy']:.1f}%  "
              f"saving {100 * row['saving']:.1f}%")
    (RESULTS / "adapters.json").write_text(json.dumps(table, indent=2) + "\n")


if __name__ == "__main__":
    main()
