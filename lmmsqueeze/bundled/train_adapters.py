"""Train the ProxyV adapters shipped with the bundled model, and measure them.

    python -m lmmsqueeze.bundled.train_adapters              # the shipped adapters, as they were made
    python -m lmmsqueeze.bundled.train_adapters --task-control --seeds 0,1,2

The first trains, with the LLM frozen and by distillation from the vanilla model (no labels), (1) a
spatial adapter starting at layer 1 of 4 and (2) a non-spatial adapter after VisionZip, writes them to
``lmmsqueeze/bundled/adapters/{proxyv-spatial,proxyv-nonspatial}`` (addressable as
``bundled:proxyv-spatial`` / ``bundled:proxyv-nonspatial``), then evaluates vanilla, the reducer alone
and both adapters on the test split (accuracy and loyalty to vanilla) and writes the table to
``results/bundled/adapters.json``. Its defaults are the settings the shipped adapters were trained with.

The second trains the spatial pipeline on the task's answers together with its trained control
(same start, data, seed, steps and schedule) for every seed and writes the accuracies, with their
mean and standard error, to ``results/bundled/task-vs-control.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from ..evaluation.runner import evaluate, loyalty, validator
from ..evaluation.tasks import get_task
from ..proxyv.attach import adapter_path
from ..proxyv.train import TrainSettings, control_pipeline, train_proxyv, train_with_control
from ..runtime.loading import load_model

SPATIAL = "proxyv(layer=1, factor=3)"
REDUCER = "visionzip(dominant=27, contextual=5)"
NONSPATIAL = f"{REDUCER} | proxyv(layer=1, variant=nonspatial, proxies=16)"
RESULTS = Path(__file__).resolve().parents[2] / "results" / "bundled"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--limit", type=int, default=1000, help="test samples for the final table")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("runs/bundled-adapters"),
                        help="checkpoints and logs")
    parser.add_argument("--only", choices=("spatial", "nonspatial"), default=None)
    parser.add_argument("--task-control", action="store_true", help="task training and its control, per seed")
    parser.add_argument("--seeds", default="0,1,2", help="with --task-control")
    return parser


def settings_of(args: argparse.Namespace) -> TrainSettings:
    """The training settings of the command line (the shipped adapters': its defaults)."""
    return TrainSettings(steps=args.steps, batch=args.batch, lr=args.lr, eval_every=max(1, args.steps // 4),
                         save_every=50, eval_size=200, eval_batch=50)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    torch.manual_seed(0)
    model, processor = load_model("bundled", device="cpu")
    torch.set_num_threads(args.threads)  # after loading, which picks 1 thread for a tiny model
    task = get_task("bundled")
    settings = settings_of(args)
    if args.task_control:
        _task_control(model, processor, task, settings, args, argv)
        return
    for name, pipeline in (("proxyv-spatial", SPATIAL), ("proxyv-nonspatial", NONSPATIAL)):
        if args.only and not name.endswith(args.only):
            continue
        work = args.work / name
        adapter = train_proxyv(model, processor, pipeline, task, work, settings,
                               validate=validator(processor, task, settings.eval_size, settings.eval_batch))
        target = adapter_path(f"bundled:{name}")
        if target.exists():
            shutil.rmtree(target)
        adapter.save(target)
        shutil.copy(work / "train_log.jsonl", RESULTS / f"{name}-train.jsonl")
        print(f"wrote {target}")
    vanilla = _measure(model, processor, task, "none", None, args.limit)
    table = [_row(vanilla, vanilla)]
    for pipeline, adapter in ((REDUCER, None), (SPATIAL, "bundled:proxyv-spatial"),
                              (NONSPATIAL, "bundled:proxyv-nonspatial")):
        if adapter and not (adapter_path(adapter) / "adapter_config.json").is_file():
            continue
        table.append(_row(_measure(model, processor, task, pipeline, adapter, args.limit), vanilla, adapter))
    report = {"command": "python -m lmmsqueeze.bundled.train_adapters" + _flags(argv),
              "settings": asdict(settings), "rows": table}
    (RESULTS / "adapters.json").write_text(json.dumps(report, indent=2) + "\n")


def _measure(model, processor, task, pipeline, adapter, limit):
    return evaluate(model, processor, pipeline, task, limit=limit, adapter=adapter, batch_size=50,
                    measure_memory=False)


def _row(row: dict, vanilla: dict, adapter: str | None = None) -> dict:
    out = {"pipeline": row["pipeline"], "adapter": adapter, "accuracy": row["accuracy"],
           "loyalty": loyalty(row["answers"], vanilla["answers"]), "saving": row["saving"], "n": row["n"],
           "per_type": row["per_type"]}
    print(f"{row['pipeline']:<70} {adapter or '':<26} acc {100 * out['accuracy']:.1f}%  "
          f"loyalty {100 * out['loyalty']:.1f}%  saving {100 * row['saving']:.1f}%")
    return out


def _task_control(model, processor, task, settings: TrainSettings, args, argv) -> None:
    """Per seed: the spatial pipeline trained on the answers, and its control, both measured."""
    vanilla = _measure(model, processor, task, "none", None, args.limit)
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        seeded = TrainSettings(**{**asdict(settings), "objective": "task", "seed": seed})
        out = args.work / f"task-seed{seed}"
        train_with_control(model, processor, SPATIAL, task, out, seeded,
                           validate=validator(processor, task, seeded.eval_size, seeded.eval_batch))
        proxyv = _row(_measure(model, processor, task, SPATIAL, str(out / "adapter"), args.limit), vanilla)
        control = _row(_measure(model, processor, task, control_pipeline(SPATIAL),
                                str(out / "control" / "adapter"), args.limit), vanilla)
        runs.append({"seed": seed, "proxyv": proxyv, "control": control})

    def summary(key: str) -> dict:
        values = [r[key]["accuracy"] for r in runs]
        error = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
        return {"mean": statistics.mean(values), "standard_error": error, "values": values}

    report = {"command": "python -m lmmsqueeze.bundled.train_adapters" + _flags(argv),
              "vanilla_accuracy": vanilla["accuracy"], "proxyv_task": summary("proxyv"),
              "control": summary("control"), "delta": summary_delta(runs), "runs": runs}
    (RESULTS / "task-vs-control.json").write_text(json.dumps(report, indent=2) + "\n")


def summary_delta(runs: list[dict]) -> dict:
    """ProxyV minus its control, per seed, with mean and standard error."""
    values = [r["proxyv"]["accuracy"] - r["control"]["accuracy"] for r in runs]
    error = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return {"mean": statistics.mean(values), "standard_error": error, "values": values}


def _flags(argv: list[str] | None) -> str:
    given = sys.argv[1:] if argv is None else argv
    return (" " + " ".join(given)) if given else ""


if __name__ == "__main__":
    main()
