"""The `tune` command: search the composition space for the best pipeline under a cost budget."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from ..errors import LmmsqueezeError
from .common import DEFAULT_RESULTS, DeviceOpt, JsonOpt, ResultsOpt, console, emit, err_console, user_errors

app = typer.Typer()


def _rungs(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise LmmsqueezeError(f"--rungs {text!r} must be comma-separated sample counts, e.g. 50,150,450"
                              ) from None


@app.command("tune")
def tune_cmd(
    model: Annotated[str, typer.Option("--model", "-m",
                                       help="A local model directory, or `bundled`.")] = "bundled",
    task: Annotated[str, typer.Option(help="Task name.")] = "bundled",
    budget: Annotated[float, typer.Option(
        help="The most a pipeline may cost, as a fraction of the vanilla model (0, 1].")] = 0.3,
    metric: Annotated[str, typer.Option(
        help="What the budget bounds: flops (analytic, priced before running) or latency (measured).")
    ] = "flops",
    trials: Annotated[int, typer.Option(help="Candidates to evaluate (rejected ones do not count).")] = 40,
    space: Annotated[Path | None, typer.Option(
        "--space", help="YAML: reducers and ranges, max_stages, placements, adapters.")] = None,
    workers: Annotated[int, typer.Option(help="Processes on the same study.")] = 1,
    seed: Annotated[int, typer.Option(help="Sampler and sample seed.")] = 0,
    rungs: Annotated[str, typer.Option(
        help="Sample counts of the rungs before the full split, comma-separated.")] = "50,150,450",
    limit: Annotated[int | None, typer.Option(
        help="Samples of the last rung (default: the whole split).")] = None,
    results: ResultsOpt = DEFAULT_RESULTS,
    storage: Annotated[str | None, typer.Option(
        help="Optuna storage URL (default: sqlite beside --results); an RDB URL shares a study across "
             "machines.")
    ] = None,
    warm: Annotated[bool, typer.Option(
        "--warm-start/--cold-start", help="Try the default sweep grid's pipelines first.")] = True,
    grid_samples: Annotated[int, typer.Option(
        min=1, help="Grid points drawn to estimate how many of the grid's candidates would run.")] = 1000,
    plot_file: Annotated[Path | None, typer.Option(
        "--plot", help="Pareto plot of the candidates that reached the last rung.")] = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Search pipelines (reducers, placements, parameters, ProxyV) for the most accurate one whose cost is at
    most --budget x vanilla: candidates are priced before they run, accuracy is estimated on growing rungs
    of samples (each a normal row of the results store), and only the best third goes on. Resumable."""
    with user_errors():
        from ..evaluation.pareto import check_plot_path
        from ..runtime.loading import pick_device

        rung_list = _rungs(rungs)
        try:
            from ..tuning import make_config, tune
        except ImportError as exc:
            raise LmmsqueezeError(f"`lmmsqueeze tune` needs Optuna ({exc.name or exc}): pip install "
                                  "'lmmsqueeze[tune]'") from None
        config = make_config(model=model, task=task, budget=budget, metric=metric, trials=trials, space=space,
                             workers=workers, seed=seed, results=results, storage=storage, rungs=rung_list,
                             device=device, limit=limit, warm=warm)
        if plot_file is not None:
            check_plot_path(plot_file)
        pick_device(device)
        with err_console.status("tuning") as status:
            def on_event(kind: str, info: dict) -> None:
                if kind == "start":
                    status.update(Text(f"tuning: {info['item']} on {info['samples']} samples"))

            out = tune(config, on_event=on_event, grid_samples=grid_samples)
        if out["best_pipeline"] is None:
            raise LmmsqueezeError(f"no candidate within the budget reached the last rung in {out['trials']} "
                                  f"trials ({out['rejected']} rejected unrun: {out['rejected_why']}); give "
                                  "more --trials, a larger --budget or a wider --space (the study resumes)")
        if plot_file is not None:
            from ..evaluation.pareto import plot, plot_title

            plot(out["pareto"], str(plot_file), "latency" if metric == "latency" else "flops",
                 title="tune: " + plot_title(model, task, config.full, seed))
            out["plot"] = str(plot_file)
    emit(out, as_json, _render)


def _render(out: dict) -> None:
    from ..evaluation.pareto import HEADERS, TERMINAL, label, table_cell

    adapter = f" (adapter {out['adapter']})" if out["adapter"] else ""
    console.print(Text(f"best: {out['best_pipeline']}{adapter}", style="bold"), highlight=False)
    vanilla = 100 * (out["vanilla_accuracy"] or 0)
    console.print(Text(f"accuracy {100 * out['accuracy']:.1f}% on {out['rungs'][-1]} samples (vanilla "
                       f"{vanilla:.1f}%), FLOPs saved {100 * out['saving']:.1f}%, cost "
                       f"{100 * out['cost']:.1f}% of vanilla ({out['metric']}; budget "
                       f"{100 * out['budget']:g}%)"),
                  highlight=False)
    console.print(Text(f"trials: {out['trials']} evaluated ({out['completed']} reached the last rung, "
                       f"{out['stopped_early']} stopped early), {out['rejected']} rejected unrun "
                       f"{out['rejected_why']}; rungs {out['rungs']}"), highlight=False)
    share = out["sample_evaluations"] / max(1, out["grid_sample_evaluations"])
    console.print(Text(f"sample-evaluations: {out['sample_evaluations']:,} ({out['evaluated_now']:,} now) vs "
                       f"{out['grid_sample_evaluations']:,} for the grid over the same space "
                       f"(~{out['grid_feasible']:,} runnable of {out['grid_candidates']:,} candidates; "
                       f"{100 * share:.2g}%)"), highlight=False)
    table = Table(title=Text(f"candidates on {out['rungs'][-1]} samples; * = Pareto frontier"))
    for c in TERMINAL:
        table.add_column(HEADERS[c], overflow="fold", ratio=4 if c == "pipeline" else None)
    for r in out["pareto"]:
        cells = [table_cell(r, c) for c in TERMINAL]
        cells[1] = label(r) + (f" [{r['adapter']}]" if r.get("adapter") else "")
        table.add_row(*(Text(c) for c in cells), style="bold" if r["pareto"] else None)
    console.print(table)
    if out.get("plot"):
        console.print(Text(f"wrote {out['plot']}"), highlight=False)
