"""Training ProxyV's parameters (and optionally the LLM) on a task's training split.

The pipeline runs exactly as at inference (any reducers before ProxyV included); what the
parameters learn is the objective's (:mod:`.objectives`: distillation from the vanilla model by
default, or the task's answers). Checkpoints (adapter, optimizer, step) are written every
``save_every`` steps, so a stopped run resumes where it left off. Every parameter's
``requires_grad`` is what the caller had when training returns; the vision tower is never trained.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..compose.plan import compile_pipeline
from ..compose.spec import PipelineSpec, StageSpec, parse_pipeline
from ..errors import LmmsqueezeError
from ..models import family_for
from ..runtime.run import prepare
from .attach import config_for
from .modules import ProxyVAdapter
from .objectives import OBJECTIVES, answer_loss, distill_batch, distill_loss, task_batch
from .stage import proxyv_stage

#: scores an adapter on held-out data: ``validate(model, plan, adapter) -> accuracy``
Validator = Callable[[Any, Any, ProxyVAdapter], float]

CHECKPOINT = "checkpoint.pt"
LOG = "train_log.jsonl"


@dataclass
class TrainSettings:
    steps: int = 400
    batch: int = 16
    lr: float = 2e-3
    warmup: int = 20
    weight_decay: float = 0.0
    objective: str = "distill"  # distill | task (see .objectives)
    hidden_weight: float = 0.0  # distill: weight of the last hidden states' MSE
    # also train the LLM and the projector (and save the whole model); never the vision tower
    full: bool = False
    llm_lr: float = 1e-4
    seed: int = 0
    save_every: int = 100
    eval_every: int = 100
    eval_size: int = 100  # held-out (validation split) samples scored every eval_every steps; 0: none
    eval_batch: int = 16

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise LmmsqueezeError(f"objective {self.objective!r} is not one of {', '.join(OBJECTIVES)}")


def control_pipeline(pipeline: str) -> str:
    """The trained control of a ProxyV pipeline: the same stages, the proxyv stage made ``variant=control``
    at the same layer (what the extra parameters and task training bring, with nothing saved)."""
    spec = parse_pipeline(pipeline)
    stages = []
    for stage in spec.stages:
        if stage.name == "proxyv":
            kept = {k: v for k, v in stage.params.items() if k in ("layer", "mlp_hidden")}
            stage = StageSpec("proxyv", kept | {"variant": "control"})
        stages.append(stage)
    return PipelineSpec(tuple(stages)).format()


def _vision_parameters(model: Any) -> set[int]:
    base = model.model
    tower = getattr(base, "vision_tower", None) or getattr(base, "visual", None)
    return {id(p) for p in tower.parameters()} if tower is not None else set()


def train_proxyv(
    model: Any,
    processor: Any,
    pipeline: str,
    task: Any,
    out: str | Path,
    settings: TrainSettings,
    adapter: ProxyVAdapter | None = None,
    on_step: Callable[[int, float], None] | None = None,
    validate: Validator | None = None,
) -> ProxyVAdapter:
    """Train (or resume training) a ProxyV adapter for ``pipeline`` on ``task``'s train split; with
    ``validate`` (e.g. :func:`lmmsqueeze.evaluation.runner.validator`), its held-out score every
    ``settings.eval_every`` steps goes to the log."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = check_trainable(compile_pipeline(pipeline, family_for(model).geometry))  # the adapter: built here
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    torch.manual_seed(settings.seed)
    config = replace(config_for(model, plan), objective=settings.objective, training=asdict(settings))
    adapter = adapter or ProxyVAdapter(config)
    adapter = adapter.to(device=device, dtype=dtype)
    before = [(p, p.requires_grad) for p in model.parameters()]
    vision = _vision_parameters(model)
    trainable = [p for p in model.parameters() if id(p) not in vision] if settings.full else []
    teacher = copy.deepcopy(model).eval() if settings.full and settings.objective == "distill" else model
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    groups = [{"params": list(adapter.parameters()), "lr": settings.lr}]
    if trainable:
        groups.append({"params": trainable, "lr": settings.llm_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
    base_lrs = [g["lr"] for g in groups]
    step = 0
    ckpt = out / CHECKPOINT
    if ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        if state.get("pipeline") != plan.canonical:
            raise LmmsqueezeError(f"{str(out)!r} holds a run of {state.get('pipeline')!r}, not "
                                  f"{plan.canonical!r}; use another --out")
        adapter.load_state_dict(state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        if settings.full and "model" in state:
            model.load_state_dict(state["model"])
        step = state["step"]

    def save() -> None:
        state = {"adapter": adapter.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                 "pipeline": plan.canonical, "settings": asdict(settings)}
        if settings.full:
            state["model"] = model.state_dict()
        torch.save(state, out / (CHECKPOINT + ".tmp"))
        (out / (CHECKPOINT + ".tmp")).replace(ckpt)  # atomic: a stop never leaves a half-written checkpoint

    model.train(settings.full)
    log = (out / LOG).open("a")
    start = time.time()
    try:
        while step < settings.steps:
            items = task.samples("train", settings.batch, settings.seed * 1_000_003 + step)
            scale = min(1.0, (step + 1) / max(1, settings.warmup))
            scale *= 0.5 * (1 + math.cos(math.pi * step / max(1, settings.steps)))
            for g, lr in zip(optimizer.param_groups, base_lrs, strict=True):
                g["lr"] = lr * max(scale, 0.05)
            loss = _loss(model, teacher, processor, plan, adapter, items, task, settings, device, dtype)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
            optimizer.step()
            step += 1
            record: dict[str, Any] = {"step": step, "loss": loss.item(),
                                      "elapsed_s": round(time.time() - start, 1)}
            if validate is not None and settings.eval_size and (step % settings.eval_every == 0
                                                                 or step == settings.steps):
                model.eval()
                record["val_accuracy"] = validate(model, plan, adapter)
                model.train(settings.full)
            log.write(json.dumps(record) + "\n")
            log.flush()
            if on_step:
                on_step(step, loss.item())
            if step % settings.save_every == 0 or step == settings.steps:
                save()
    finally:
        log.close()
        model.eval()
        for p, grad in before:
            p.requires_grad_(grad)
    adapter.save(out / "adapter")
    return adapter


def _loss(model: Any, teacher: Any, processor: Any, plan: Any, adapter: ProxyVAdapter, items: list[Any],
          task: Any, settings: TrainSettings, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """One batch's loss under the objective, the pipeline installed on ``model``."""
    if settings.objective == "task":
        inputs, labels = task_batch(processor, items, device, dtype)
        with prepare(model, plan, adapter).apply() as run:
            logits = model(**inputs).logits
            return answer_loss(logits, labels, run.output_positions)
    was_training = teacher.training
    teacher.eval()
    inputs, where = distill_batch(teacher, processor, items, device, dtype, model.config.image_token_id,
                                  task.max_new_tokens)
    hidden = bool(settings.hidden_weight)
    with torch.no_grad():
        target = teacher(**inputs, output_hidden_states=hidden)
    teacher.train(was_training)
    with prepare(model, plan, adapter).apply() as run:
        student = model(**inputs, output_hidden_states=hidden)
        return distill_loss(student.logits, run.output_positions, target.logits, where,
                            student.hidden_states[-1] if hidden else None,
                            target.hidden_states[-1] if hidden else None, settings.hidden_weight)


def check_trainable(plan: Any) -> Any:
    """``plan``, when it has a ProxyV stage to train (before the last layer, not ``untrained=true``)."""
    if proxyv_stage(plan) is None:
        raise LmmsqueezeError(
            f"pipeline {plan.canonical!r} has no proxyv stage before the last layer to train"
        )
    if proxyv_stage(plan).reducer.untrained:
        raise LmmsqueezeError("train-proxyv trains fresh ProxyV modules itself; remove untrained=true from "
                              "the proxyv stage")
    return plan


def train_with_control(model: Any, processor: Any, pipeline: str, task: Any, out: str | Path,
                       settings: TrainSettings, on_step: Callable[[int, float], None] | None = None,
                       validate: Validator | None = None) -> tuple[ProxyVAdapter, ProxyVAdapter]:
    """Task training and its control: the adapter (``OUT/adapter``) and the parameter-matched control
    (``OUT/control/adapter``, see :func:`control_pipeline`) from the same start checkpoint, with the same
    data stream, seed, steps and schedule; the adapter's config names its control. With ``full`` each
    run's whole model is saved beside its adapter (``model/``) and the caller's model is restored."""
    if settings.objective != "task":
        raise LmmsqueezeError("a trained control is the yardstick of task training: use it with "
                              "--objective task (a distilled adapter is compared with the vanilla model "
                              "itself)")
    out = Path(out)
    start = copy.deepcopy(model.state_dict()) if settings.full else None
    adapter = train_proxyv(model, processor, pipeline, task, out, settings, on_step=on_step,
                           validate=validate)
    if start is not None:
        model.save_pretrained(out / "model")
        model.load_state_dict(start)
    control = train_proxyv(model, processor, control_pipeline(pipeline), task, out / "control", settings,
                           on_step=on_step, validate=validate)
    if start is not None:
        model.save_pretrained(out / "control" / "model")
        model.load_state_dict(start)
    adapter.config = replace(adapter.config, control="../control/adapter")
    adapter.save(out / "adapter")
    return adapter, control
