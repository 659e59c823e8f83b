"""Scale-out options of `eval` and `sweep` (--processes, --device-map, --max-memory, --offload-folder,
--shard), the local launch of data-parallel ranks, and the `results merge` command.

``--processes N`` starts N local ranks through torch's elastic launcher (what ``torchrun`` runs); each rank
runs the command's grid (the worker it is given), rank 0 shows the progress and writes the store, and this
process then renders the stored rows as a single process would. Under ``torchrun`` or ``accelerate
launch`` every rank runs the whole command instead and only rank 0 prints.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from ..errors import LmmsqueezeError
from .common import console, err_console, user_errors

app = typer.Typer(help="Results stores: merge the stores of sharded sweeps.", no_args_is_help=True)

ProcessesOpt = Annotated[int, typer.Option(
    "--processes", help="Data-parallel ranks on this machine (torch.distributed; gloo on CPU, nccl on CUDA, "
                        "one GPU each): rows equal a single process's, answer by answer.")]
DeviceMapOpt = Annotated[str | None, typer.Option(
    "--device-map", help="Load the model across devices with accelerate (auto, balanced, sequential; the "
                         "`dist` extra).")]
MaxMemoryOpt = Annotated[str | None, typer.Option(
    "--max-memory", help="With --device-map: memory per device, e.g. '0=20GiB,1=20GiB,cpu=64GiB'.")]
OffloadOpt = Annotated[Path | None, typer.Option(
    "--offload-folder", help="With --device-map: folder for weights offloaded to disk.")]
ShardOpt = Annotated[str | None, typer.Option(
    "--shard", metavar="I/N", help="Run only shard I of N (1 <= I <= N) of the grid's (pipeline, task) rows; "
                                   "merge the shards' stores with `lmmsqueeze results merge`.")]


@dataclass(frozen=True)
class Scale:
    """How a command runs: ranks to start here, and where the model's weights go."""

    processes: int = 1
    device_map: str | None = None
    max_memory: str | None = None
    offload_folder: Path | None = None

    def check(self) -> dict[str, Any]:
        """Refuse bad values in one line before anything runs; returns load_model's dispatch options."""
        from ..runtime.dispatch import load_options

        if self.processes < 1:
            raise LmmsqueezeError(f"--processes {self.processes} must be an integer >= 1 (data-parallel "
                                  "ranks on this machine); give e.g. --processes 2")
        options = load_options(self.device_map, self.max_memory, self.offload_folder)
        if options and (self.processes > 1 or in_ranks()):
            raise LmmsqueezeError("--device-map spreads one model over the devices and runs in one process; "
                                  "drop --processes (or accelerate launch / torchrun), or drop --device-map")
        return options

    @property
    def spawns(self) -> bool:
        """Whether this process starts the ranks (not when a launcher started it as one)."""
        return self.processes > 1 and not in_ranks()


def in_ranks() -> bool:
    """Started by a launcher as one of several ranks (``WORLD_SIZE`` > 1)."""
    text = os.environ.get("WORLD_SIZE", "1").strip()
    return text.isdigit() and int(text) > 1


def is_main() -> bool:
    """Whether this process prints: a single process, or rank 0 of the ranks."""
    return not in_ranks() or os.environ.get("RANK", "0").strip() in ("", "0")


def spawn(scale: Scale, worker: Callable[..., tuple[int, list[dict]]], *args: Any) -> list[dict]:
    """Run ``worker(*args)`` (a module-level function returning (exit code, results): the command's grid)
    on ``scale.processes`` local ranks; rank 0's results. A rank's own error line stands for it (exit 2);
    a rank that died is one line here."""
    from ..evaluation.launch import launch

    codes = launch(scale.processes, worker, *args)
    failed = [code for code, _ in codes.values() if code]
    if failed:
        raise typer.Exit(failed[0])
    return codes[0][1]


def shards(grid: Any, shard: str | None) -> list[Any]:
    """``[grid]``, or with ``--shard I/N`` the grids of its shard (checked before anything runs)."""
    if shard is None:
        return [grid]
    from ..evaluation.shards import parse_shard, shard_grids

    parts = shard_grids(grid, *parse_shard(shard))
    if not parts and is_main():
        err_console.print(f"shard {shard} holds none of this grid's rows (fewer rows than shards); nothing "
                          "to run", highlight=False)
    return parts


@app.command("merge")
def merge_cmd(
    sources: Annotated[list[Path], typer.Argument(help="Results files to merge (the shards' stores).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The merged results file (created or added "
                                                                "to).")],
) -> None:
    """Merge results stores idempotently: same key = same row; an ok row beats a failed one; ok rows that
    differ (beyond timings and machine load) are conflicts, reported (exit 1), and the first is kept."""
    from ..evaluation.shards import merge_stores

    with user_errors():
        report = merge_stores(list(sources), output)
    for key, source, fields in report.conflicts:
        err_console.print(Text(f"conflict: {key.pipeline} ({key.task}, {key.limit} samples, seed {key.seed}"
                               f"{', ' + key.adapter if key.adapter else ''}) in {source} differs in "
                               f"{', '.join(fields)}; the row in {output} is kept"), highlight=False,
                          soft_wrap=True)
    console.print(Text(f"{output}: {report.added} added, {report.replaced} failed rows replaced by ok ones, "
                       f"{report.same} already there, {report.kept} failed rows not copied, "
                       f"{len(report.conflicts)} conflicts"), highlight=False, soft_wrap=True)
    if report.conflicts:
        raise typer.Exit(1)
