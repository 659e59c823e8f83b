"""Command `train-proxyv`: train a ProxyV adapter (and, with --full, the LLM)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..errors import LmmsqueezeError
from .common import DeviceOpt, console, err_console, user_errors

app = typer.Typer()


@app.command("train-proxyv")
def train_proxyv_cmd(
    model: Annotated[str, typer.Option("--model", "-m", help="A local model directory, or `bundled`.")],
    pipeline: Annotated[str, typer.Option(
        "--pipeline", "-p", help='Pipeline ending in proxyv, e.g. "proxyv(layer=1)".')],
    out: Annotated[Path, typer.Option(help="Output directory (checkpoints, log, adapter/).")],
    data: Annotated[str, typer.Option(help="Task whose train split is used.")] = "bundled",
    steps: Annotated[int, typer.Option(min=1)] = 400,
    batch: Annotated[int, typer.Option(min=1)] = 16,
    lr: Annotated[float, typer.Option(help="Learning rate of the ProxyV parameters.")] = 2e-3,
    objective: Annotated[str, typer.Option(
        help="distill: imitate the frozen vanilla model on unlabelled image + question pairs (no labels); "
             "task: the answers' cross-entropy.")] = "distill",
    hidden_weight: Annotated[float, typer.Option(help="distill: weight of an MSE between the last hidden "
                                                 "states.")] = 0.0,
    control: Annotated[bool, typer.Option("--control", help="With --objective task: also train the "
                                          "parameter-matched control (OUT/control) the same way.")] = False,
    full: Annotated[bool, typer.Option("--full", help="Also fine-tune the LLM and projector (never the "
                                       "vision tower); saves the whole model too.")] = False,
    llm_lr: Annotated[float, typer.Option(help="Learning rate of the LLM with --full.")] = 1e-4,
    seed: Annotated[int, typer.Option()] = 0,
    eval_every: Annotated[int, typer.Option(min=1, help="Held-out accuracy every N steps.")] = 100,
    eval_size: Annotated[int, typer.Option(min=1, help="Held-out samples (validation split).")] = 100,
    save_every: Annotated[int, typer.Option(min=1)] = 100,
    device: DeviceOpt = None,
) -> None:
    """Train ProxyV (VisionMLPs, proxy initializer) with the LLM frozen, or the LLM too with --full.

    By default the adapter learns to reproduce the vanilla model (--objective distill); --objective task
    trains on the answers, and --control trains the control that measures what task training alone
    brings. Resumes from OUT/checkpoint.pt when it exists; writes OUT/adapter (adapter.safetensors +
    adapter_config.json), with --control OUT/control/adapter, and with --full the models too.
    """
    from ..compose import compile_pipeline
    from ..evaluation.runner import validator
    from ..evaluation.tasks import get_task
    from ..models import geometry_from_path
    from ..proxyv.train import TrainSettings, check_trainable, train_proxyv, train_with_control
    from ..runtime.loading import load_model, model_dir, pick_device

    with user_errors():
        settings = TrainSettings(steps=steps, batch=batch, lr=lr, objective=objective,
                                 hidden_weight=hidden_weight, full=full, llm_lr=llm_lr, seed=seed,
                                 save_every=save_every, eval_every=eval_every, eval_size=eval_size)
        if control and objective != "task":
            raise LmmsqueezeError("--control trains the yardstick of task training: "
                                  "give --objective task with it")
        if out.exists() and not out.is_dir():
            raise LmmsqueezeError(f"--out {str(out)!r} is a file; give a directory (it is created if "
                                  "missing)")
        task = get_task(data)
        pick_device(device)  # bad devices and pipelines are refused before the model loads
        check_trainable(compile_pipeline(pipeline, geometry_from_path(model_dir(model))))
        loaded, processor = load_model(model, device=device)
        with Progress(TextColumn("train-proxyv"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(),
                      console=err_console) as progress:
            bar = progress.add_task("train", total=steps, loss=float("nan"))
            validate = validator(processor, task, eval_size, settings.eval_batch)

            def on_step(s: int, loss: float) -> None:
                progress.update(bar, completed=s, loss=loss)

            if control:
                adapter, _ = train_with_control(loaded, processor, pipeline, task, out, settings,
                                                on_step=on_step, validate=validate)
            else:
                adapter = train_proxyv(loaded, processor, pipeline, task, out, settings, on_step=on_step,
                                       validate=validate)
                if full:
                    loaded.save_pretrained(out / "model")
        if full:
            processor.save_pretrained(out / "model")
    console.print(f"wrote {out / 'adapter'}" + (f" and {out / 'control' / 'adapter'}" if control else "")
                  + (f" (and the models: {out / 'model'})" if full else "")
                  + f" (pipeline {adapter.config.pipeline})", highlight=False)
