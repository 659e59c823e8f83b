"""Commands of the evaluation product: `eval`, `export-lmms-task`, `sweep` and `pareto`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from ..errors import LmmsqueezeError
from . import scale
from .common import (
    DEFAULT_RESULTS,
    AdapterOpt,
    DeviceOpt,
    JsonOpt,
    ResultsOpt,
    console,
    emit,
    err_console,
    si,
    user_errors,
)

app = typer.Typer()


def _progress(transient: bool = False) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err_console, transient=transient)


def grid_worker(grid: Any, results: Path, batch_size: int, device: str | None, remeasure: bool,
                retry_failed: bool, single: bool) -> tuple[int, list[dict]]:
    """One rank of ``--processes N`` (run by the elastic launcher): the grid as the command runs it; returns
    (exit code, rank 0's results). A bad input is this rank's one error line and exit code 2."""
    try:
        with user_errors():
            return 0, _run_grid(grid, results, batch_size, device, remeasure, retry_failed, single)
    except typer.Exit as exc:
        return exc.exit_code, []


def _run_grid(grid: Any, results: Path, batch_size: int, device: str | None,
              remeasure: bool = False, retry_failed: bool = False, single: bool = False,
              how: scale.Scale | None = None) -> list[dict]:
    """Run a grid under a progress display. ``single`` (eval): the display goes when done, and failures
    and reused rows are left to the caller's row or one-line error. ``how``: ranks and device map
    (cli/scale.py); every rank runs this, rank 0 alone shows progress and writes the store."""
    from ..evaluation.distributed import run_sweep_ranks
    from ..evaluation.store import ResultStore
    from ..evaluation.sweep import check_sweep
    from ..runtime.loading import pick_device

    # refuse a bad grid, task, pipeline, device or results file before the progress display starts
    total = len(grid.tasks) * len(check_sweep(grid))
    pick_device(device)
    how = how or scale.Scale()
    options = how.check()
    if not scale.is_main():  # another rank: rank 0 reads and writes the store and shows the progress
        return run_sweep_ranks(grid, results, batch_size=batch_size, device=device)
    ResultStore(results).close()
    if how.spawns:
        return scale.spawn(how, grid_worker, grid, results, batch_size, device, remeasure, retry_failed,
                           single)
    with _progress(transient=single) as progress:
        overall = progress.add_task("sweep", total=total)
        current = progress.add_task("", total=1, visible=False)

        def on_event(kind: str, info: dict) -> None:
            label = escape(f"{info['task']}: {info['item']}")  # items may hold [brackets] (adapter paths)
            if kind == "start":
                progress.reset(current, total=info["samples"], description=label, visible=True)
            elif kind == "progress":
                progress.update(current, completed=info["done"])
            elif kind in ("done", "skip", "failed"):
                progress.advance(overall)
                if kind == "failed" and not single:
                    kept = " (the earlier successful row is kept)" if info.get("kept") else ""
                    progress.console.print(f"[red]failed[/] {label}: {escape(str(info['error']))}{kept}",
                                           highlight=False)
                if kind == "skip" and single:  # eval: its row (or its one-line error) says what was reused
                    pass
                elif kind == "skip" and info.get("status") == "failed":
                    progress.console.print(f"[dim]failed before, skipped (--retry-failed runs it again)[/] "
                                           f"{label}", highlight=False)
                elif kind == "skip":
                    progress.console.print(f"[dim]stored already[/] {label}", highlight=False)

        return run_sweep_ranks(grid, results, batch_size=batch_size, device=device, on_event=on_event,
                               remeasure=remeasure, retry_failed=retry_failed, load_options=options)


RetryOpt = Annotated[bool, typer.Option(
    "--retry-failed", help="Run rows stored as failed again (a failed re-run never replaces a good row).")]
LimitOpt = Annotated[int | None, typer.Option(help="Samples per run: the first N test samples.")]


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Option("--model", "-m",
                                       help="A local model directory, or `bundled`.")] = "bundled",
    pipeline: Annotated[str, typer.Option("--pipeline", "-p", help="The pipeline to evaluate.")] = "none",
    task: Annotated[str, typer.Option(help="Task name.")] = "bundled",
    adapter: AdapterOpt = None,
    limit: LimitOpt = None,
    seed: Annotated[int, typer.Option(help="Sample seed.")] = 0,
    results: ResultsOpt = DEFAULT_RESULTS,
    batch_size: Annotated[int, typer.Option(min=1)] = 1,
    device: DeviceOpt = None,
    include_path: Annotated[str | None, typer.Option(help="Task folder for --task lmms:TASK.")] = None,
    retry_failed: RetryOpt = False,
    as_json: JsonOpt = False,
    processes: scale.ProcessesOpt = 1,
    device_map: scale.DeviceMapOpt = None,
    max_memory: scale.MaxMemoryOpt = None,
    offload_folder: scale.OffloadOpt = None,
) -> None:
    """Evaluate one pipeline (and the vanilla model, for loyalty) and store the row.

    The pipeline is measured again even when stored; a failed run keeps an earlier successful row
    (and exits 2). A stored vanilla row is reused (a failed one runs again with --retry-failed).
    `--task lmms:TASK` runs an lmms-eval task through lmms-eval (the `eval` extra) instead.
    """
    from ..compose import compile_pipeline
    from ..evaluation.store import Key, ResultStore
    from ..evaluation.sweep import Grid, GridItem, check_limit
    from ..evaluation.tasks import get_task
    from ..models import geometry_from_path
    from ..proxyv.attach import pipeline_for
    from ..runtime.loading import model_dir

    with user_errors():
        if limit is not None:
            check_limit(limit, "--limit")
        if task.startswith("lmms:") and (processes != 1 or device_map):
            raise LmmsqueezeError(f"--task {task}: lmms-eval tasks run on several processes through "
                                  "lmms-eval's own launcher (accelerate launch -m lmms_eval; see the "
                                  "README); drop --processes/--device-map")
        if task.startswith("lmms:"):
            row = _eval_lmms(model, pipeline, task, adapter, include_path, limit, seed, results)
            emit(row, as_json, lambda r: console.print(
                f"{r['task']} {r['metric']}: {100 * r['accuracy']:.1f}% with {r['pipeline']} "
                f"({r['n']} samples, stored in {results})", highlight=False))
            return
        t = get_task(task)
        pipeline = pipeline_for(pipeline, adapter)
        n = min(limit or t.size, t.size)
        grid = Grid(model=model, tasks=[task], limit=n, seed=seed, items=[GridItem(pipeline, adapter)])
        canonical = compile_pipeline(pipeline, geometry_from_path(model_dir(model))).canonical
        key = Key(model, canonical, adapter or "", task, n, seed)
        # eval re-measures the pipeline asked for
        ran = _run_grid(grid, results, batch_size, device, remeasure=True, retry_failed=retry_failed,
                        single=True, how=scale.Scale(processes, device_map, max_memory, offload_folder))
        if not scale.is_main():
            return
        mine = next((r for r in ran if r["key"] == key), None)
        if mine is not None and mine["error"]:
            kept = "; the earlier successful row is kept" if mine["kept"] else ""
            raise LmmsqueezeError(f"evaluation of {canonical!r} failed: {mine['error']}{kept}")
        with ResultStore(results, readonly=True) as store:
            row = store.row(key)
        if row is None or row["status"] != "ok":
            error = row["error"] if row else "not stored"
            raise LmmsqueezeError(f"the stored row of {canonical!r} failed ({error}); --retry-failed runs it "
                                  "again")

    def render(r: dict) -> None:
        table = Table(title=Text(f"{r['pipeline']} on {r['model']} / {r['task']} ({r['n']} samples)"),
                      show_header=False)
        table.add_column("metric")
        table.add_column("value")
        table.add_row("accuracy", f"{100 * r['accuracy']:.1f}%")
        for q, acc in r["per_type"].items():
            table.add_row(f"  {q}", f"{100 * acc:.1f}%")
        table.add_row("loyalty", "-" if r["loyalty"] is None else f"{100 * r['loyalty']:.1f}%")
        table.add_row("prefill FLOPs", f"{si(r['prefill_flops'])} (saving {100 * r['saving']:.1f}%)")
        table.add_row("latency (median/sample)", f"{r['latency_ms']:.2f} ms")
        table.add_row("peak memory", f"{r['peak_memory_mb']:.2f} MB")
        table.add_row("image tokens (layer avg)", f"{r['image_tokens_avg']:.1f}")
        console.print(table)

    emit(row, as_json, render)


def _eval_lmms(model: str, pipeline: str, task: str, adapter: str | None, include_path: str | None,
               limit: int | None, seed: int, results: Path) -> dict:
    from ..evaluation.lmms_bridge import run_lmms_task
    from ..evaluation.store import Key, ResultStore
    from ..evaluation.sweep import versions

    name = task.split(":", 1)[1]
    out = run_lmms_task(model, pipeline, adapter, name, include_path, limit)
    plan = out["plan"]
    cost = plan.cost()
    row = {"pipeline": plan.canonical, "task": task, "metric": out["metric"], "n": len(out["answers"]),
           "accuracy": out["accuracy"], "prefill_flops": cost.prefill_flops,
           "vanilla_prefill_flops": cost.vanilla_prefill_flops, "saving": cost.saving, "latency_ms": None,
           "peak_memory_mb": None, "loyalty": None, "image_tokens_avg": sum(plan.tokens_per_layer()) /
           max(1, len(plan.tokens_per_layer())), **versions()}
    with ResultStore(results) as store:
        store.put(Key(model, plan.canonical, adapter or "", task, limit or 0, seed), row, out["answers"])
    return row


@app.command("export-lmms-task")
def export_lmms_task_cmd(
    directory: Annotated[Path, typer.Argument(
        help="Folder to write (pass it to lmms-eval's --include_path).")],
    limit: Annotated[int | None, typer.Option(min=1, help="Export the first N test samples.")] = None,
) -> None:
    """Export the bundled benchmark as an lmms-eval task folder (parquet, YAML, utils.py)."""
    from ..evaluation.lmms_bridge import TASK_NAME, export_task

    with user_errors():
        path = export_task(directory, limit)
    console.print(f"wrote {path} (task {TASK_NAME}; lmms-eval --include_path {path} --tasks {TASK_NAME})",
                  highlight=False)


@app.command("sweep")
def sweep_cmd(
    pipeline: Annotated[list[str] | None, typer.Option(
        "--pipeline", "-p", help="A pipeline; list values expand (repeat the option).")] = None,
    grid_file: Annotated[Path | None, typer.Option("--grid", help="YAML/JSON grid file.")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model directory or `bundled`.")] = None,
    task: Annotated[list[str] | None, typer.Option("--task", help="Task name (repeat for several).")] = None,
    adapter: AdapterOpt = None,
    limit: Annotated[int | None, typer.Option(
        help="Samples per run (default: the whole test split, 1000).")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    results: ResultsOpt = DEFAULT_RESULTS,
    batch_size: Annotated[int, typer.Option(min=1)] = 1,
    device: DeviceOpt = None,
    plot_file: Annotated[Path | None, typer.Option(
        "--plot", help="Pareto plot to write after the sweep (.png, .pdf, .svg, ...).")] = None,
    retry_failed: RetryOpt = False,
    processes: scale.ProcessesOpt = 1,
    device_map: scale.DeviceMapOpt = None,
    max_memory: scale.MaxMemoryOpt = None,
    offload_folder: scale.OffloadOpt = None,
    shard: scale.ShardOpt = None,
) -> None:
    """Evaluate a grid of pipelines into the results store (resumable), then print the Pareto table
    of what it swept.

    Stored rows are skipped (failed ones too, unless --retry-failed). Every pipeline is compiled
    before anything runs: one the model cannot run refuses the sweep. With no arguments: the default
    grid on the bundled model, then `pareto.png`.
    """
    from ..evaluation.pareto import check_plot_path
    from ..evaluation.sweep import Grid, check_limit, default_items, expand_item, grid_groups, load_grid

    with user_errors():
        if limit is not None:
            check_limit(limit, "--limit")
        if grid_file is not None:
            grid = load_grid(grid_file)
        else:
            grid = Grid()
            items = [i for p in (pipeline or []) for i in expand_item(p, adapter)]
            grid.items = items if pipeline else default_items(model or "bundled")
            if plot_file is None and not pipeline:
                plot_file = Path("pareto.png")
        if model:
            grid.model = model
        if task:
            grid.tasks = list(task)
        if limit is not None:
            grid.limit = limit
        if seed is not None:
            grid.seed = seed
        if plot_file is not None:
            check_plot_path(plot_file)
        how = scale.Scale(processes, device_map, max_memory, offload_folder)
        parts = scale.shards(grid, shard)  # the whole grid, or one shard's grids (one per task)
        for part in parts:
            _run_grid(part, results, batch_size, device, retry_failed=retry_failed, how=how)
        if parts and scale.is_main():
            _show_pareto(results, "flops", "table", plot_file, groups=grid_groups(grid))


@app.command("pareto")
def pareto_cmd(
    results: ResultsOpt = DEFAULT_RESULTS,
    task: Annotated[str | None, typer.Option(help="Only this task.")] = None,
    x: Annotated[str, typer.Option("--x", help="Cost axis: flops or latency.")] = "flops",
    fmt: Annotated[str, typer.Option("--format", help="table, markdown, csv or json.")] = "table",
    plot_file: Annotated[Path | None, typer.Option(
        "--plot", help="Write a plot (.png, .pdf, .svg, ...); one file per group, numbered.")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Only this model.")] = None,
    limit: Annotated[int | None, typer.Option(help="Only rows of this many samples.")] = None,
    seed: Annotated[int | None, typer.Option(help="Only rows of this seed.")] = None,
) -> None:
    """The Pareto trade-off table (accuracy vs prefill cost) of the stored results (read only)."""
    from ..evaluation.pareto import check_plot_path

    with user_errors():
        if fmt not in ("table", "markdown", "csv", "json"):
            raise LmmsqueezeError(f"--format {fmt!r} must be one of table, markdown, csv, json")
        if x not in ("flops", "latency"):
            raise LmmsqueezeError(f"--x {x!r} must be one of flops, latency")
        if plot_file is not None:
            check_plot_path(plot_file)
        _show_pareto(results, x, fmt, plot_file, task=task, model=model, limit=limit, seed=seed)


def _show_pareto(results: Path, x: str, fmt: str, plot_file: Path | None, groups: list[tuple] | None = None,
                 task: str | None = None, model: str | None = None, limit: int | None = None,
                 seed: int | None = None) -> None:
    """Print (and plot) the Pareto groups of the store: the ``groups`` given (what a sweep swept), or
    every group that matches the filters. Every user string reaches rich as plain Text, never markup."""
    from ..evaluation.pareto import (
        BUSY_NOTE,
        HEADERS,
        TERMINAL,
        grouped,
        label,
        pareto_rows,
        plot,
        plot_paths,
        plot_title,
        table_cell,
        to_csv,
        to_json,
        to_markdown,
    )
    from ..evaluation.store import ResultStore

    with ResultStore(results, readonly=True) as store:
        rows = [r for r in store.rows(task=task, model=model)
                if (limit is None or r["limit"] == limit) and (seed is None or r["seed"] == seed)
                and (groups is None or (r["model"], r["task"], r["limit"], r["seed"]) in groups)]
    if not rows:
        what = " matching the filters" if any(v is not None for v in (task, model, limit, seed)) else ""
        raise LmmsqueezeError(f"no results{what} in {str(results)!r}; run `lmmsqueeze sweep` first")
    groups_rows = {k: pareto_rows(v, x) for k, v in grouped(rows).items()}
    failed = [r for r in rows if r["status"] != "ok"]
    written = []
    if plot_file is not None:
        plotted = {k: v for k, v in groups_rows.items() if v}
        for (key, best), path in zip(plotted.items(), plot_paths(plot_file, len(plotted)), strict=True):
            plot(best, str(path), x, title=plot_title(*key))
            written.append((path, key))
    if fmt == "json":
        sys.stdout.write(to_json([r for g in groups_rows.values() for r in g]) + "\n")
        return
    if fmt == "csv":
        sys.stdout.write(to_csv([r for g in groups_rows.values() for r in g]))
        return
    for (model_, task_, limit_, seed_), group in groups_rows.items():
        title = f"{task_} on {model_} ({limit_} samples, seed {seed_}); * = Pareto frontier, sorted by {x}"
        if fmt == "markdown":
            sys.stdout.write(f"**{title}**\n\n{to_markdown(group)}\n\n")
            continue
        table = Table(title=Text(title))
        for c in TERMINAL:
            table.add_column(HEADERS[c], overflow="fold", ratio=4 if c == "pipeline" else None,
                             min_width=24 if c == "pipeline" else None)
        for r in group:
            cells = [table_cell(r, c) for c in TERMINAL]
            cells[1] = label(r) + (f" [{r['adapter']}]" if r.get("adapter") else "")
            table.add_row(*(Text(c) for c in cells), style="bold" if r["pareto"] else None)
        if any(r.get("busy") for r in group):
            table.caption = Text(BUSY_NOTE)
        console.print(table)
    for r in failed:
        err_console.print(Text(f"failed: {r['pipeline']} ({r['task']}): {r['error']}", style="red"),
                          highlight=False)
    for path, (model_, task_, limit_, seed_) in written:
        console.print(Text(f"wrote {path} ({task_} on {model_}, {limit_} samples, seed {seed_})"),
                      highlight=False)
