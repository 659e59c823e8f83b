"""CLI command `train-proxyv` (registered on the main app)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .cli import DeviceOpt, app, console, err_console, user_errors


@app.command("train-proxyv")
def train_proxyv_cmd(
    model: Annotated[str, typer.Option("--model", "-m", help="A local model directory, or `bundled`.")],
    pipeline: Annotated[str, typer.Option("--pipeline", "-p", help='Pipeline ending in proxyv, e.g. "proxyv(layer=1)".')],
    out: Annotated[Path, typer.Option(help="Output directory (checkpoints, log, adapter/).")],
    data: Annotated[str, typer.Option(help="Task whose train split is used.")] = "bundled",
    steps: Annotated[int, typer.Option(min=1)] = 500,
    batch: Annotated[int, typer.Option(min=1)] = 16,
    lr: Annotated[float, typer.Option(help="Learning rate of the ProxyV parameters.")] = 1e-3,
    full: Annotated[bool, typer.Option("--full", help="Also fine-tune the LLM; saves the whole model too.")] = False,
    llm_lr: Annotated[float, typer.Option(help="Learning rate of the LLM with --full.")] = 1e-4,
    seed: Annotated[int, typer.Option()] = 0,
    eval_every: Annotated[int, typer.Option(min=1, help="Held-out accuracy every N steps.")] = 100,
    eval_size: Annotated[int, typer.Option(min=1, help="Held-out samples (validation split).")] = 100,
    save_every: Annotated[int, typer.Option(min=1)] = 100,
    device: DeviceOpt = None,
) -> None:
    """Train ProxyV (VisionMLPs, proxy initializer) with the LLM frozen, or everything with --full.

    Resumes from OUT/checkpoint.pt when it exists; writes OUT/adapter (adapter.safetensors +
    adapter_config.json) and, with --full, OUT/model.
    """
    from .evaluation.tasks import get_task
    from .pipelines.loading import load_model
    from .proxyv.train import TrainSettings, train_proxyv

    with user_errors():
        task = get_task(data)
        loaded, processor = load_model(model, device=device)
        settings = TrainSettings(steps=steps, batch=batch, lr=lr, full=full, llm_lr=llm_lr, seed=seed,
                                 save_every=save_every, eval_every=eval_every, eval_size=eval_size)

        with Progress(TextColumn("train-proxyv"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.3f}"),
                      TimeElapsedColumn(), console=err_console) as progress:
            bar = progress.add_task("train", total=steps, loss=float("nan"))
            adapter = train_proxyv(loaded, processor, pipeline, task, out, settings,
                                   on_step=lambda s, loss: progress.update(bar, completed=s, loss=loss))
        if full:
            loaded.save_pretrained(out / "model")
            processor.save_pretrained(out / "model")
    console.print(f"wrote {out / 'adapter'}" + (f" and {out / 'model'}" if full else "")
                  + f" (pipeline {adapter.config.pipeline})", highlight=False)
