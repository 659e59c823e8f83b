"""Training ProxyV's parameters (and optionally the LLM) on a task's training split.

The pipeline runs exactly as at inference (any reducers before ProxyV included); the loss is the
next-token cross-entropy of the answer (and end-of-sequence) tokens, read from the logits rows
that survive the pipeline. Checkpoints (adapter, optimizer, step) are written every
``save_every`` steps, so a stopped run resumes where it left off.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..errors import LmmsqueezeError
from ..pipelines.loading import build_prompt
from ..pipelines.runtime import apply, compile_for
from .attach import config_for
from .modules import ProxyVAdapter

CHECKPOINT = "checkpoint.pt"
LOG = "train_log.jsonl"


@dataclass
class TrainSettings:
    steps: int = 500
    batch: int = 16
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.0
    full: bool = False  # also train the LLM (and save the whole model)
    llm_lr: float = 1e-4
    seed: int = 0
    save_every: int = 100
    eval_every: int = 100
    eval_size: int = 100  # held-out (validation split) samples scored every eval_every steps; 0: none
    eval_batch: int = 16


def _batch(processor: Any, items: list[Any], device: torch.device, dtype: torch.dtype) -> tuple[dict, torch.Tensor]:
    """Inputs with the answer appended, and labels: -100 everywhere but the answer and end tokens."""
    tok = processor.tokenizer
    prompts = [build_prompt(processor, item.question) for item in items]
    full = [f"{p} {item.answer} {tok.eos_token}" for p, item in zip(prompts, items)]
    inputs = processor(images=[i.image for i in items], text=full, return_tensors="pt", padding=True)
    prompt_ids = processor(images=[i.image for i in items], text=prompts, return_tensors="pt", padding=True)
    labels = torch.full_like(inputs["input_ids"], -100)
    lengths = inputs["attention_mask"].sum(1)
    prompt_lengths = prompt_ids["attention_mask"].sum(1)
    width = inputs["input_ids"].shape[1]
    for b in range(len(items)):
        start = width - int(lengths[b]) + int(prompt_lengths[b])  # left padding
        labels[b, start:] = inputs["input_ids"][b, start:]
    inputs = inputs.to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return dict(inputs), labels.to(device)


def answer_loss(logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of next-token predictions, mapping each logits row to the input column it came from."""
    nxt = positions + 1
    valid = (positions >= 0) & (nxt < labels.shape[1])
    targets = torch.where(valid, labels.gather(1, nxt.clamp(max=labels.shape[1] - 1)), torch.full_like(nxt, -100))
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def train_proxyv(
    model: Any,
    processor: Any,
    pipeline: str,
    task: Any,
    out: str | Path,
    settings: TrainSettings,
    adapter: ProxyVAdapter | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> ProxyVAdapter:
    """Train (or resume training) a ProxyV adapter for ``pipeline`` on ``task``'s train split, scoring
    ``settings.eval_size`` validation samples every ``settings.eval_every`` steps (in the log)."""
    from ..evaluation.runner import evaluate

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan, _ = compile_for(model, pipeline)
    if plan.proxyv is None:
        raise LmmsqueezeError(f"pipeline {plan.canonical!r} has no proxyv stage before the last layer to train")
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    torch.manual_seed(settings.seed)
    adapter = adapter or ProxyVAdapter(config_for(model, plan))
    adapter = adapter.to(device=device, dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(settings.full)
    groups = [{"params": list(adapter.parameters()), "lr": settings.lr}]
    if settings.full:
        groups.append({"params": [p for p in model.parameters()], "lr": settings.llm_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
    base_lrs = [g["lr"] for g in groups]
    step = 0
    ckpt = out / CHECKPOINT
    if ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        if state.get("pipeline") != plan.canonical:
            raise LmmsqueezeError(f"{str(out)!r} holds a run of {state.get('pipeline')!r}, not {plan.canonical!r}; "
                                  "use another --out")
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
            inputs, labels = _batch(processor, items, device, dtype)
            scale = min(1.0, (step + 1) / max(1, settings.warmup))
            scale *= 0.5 * (1 + math.cos(math.pi * step / max(1, settings.steps)))
            for g, lr in zip(optimizer.param_groups, base_lrs):
                g["lr"] = lr * max(scale, 0.05)
            with apply(model, plan, adapter=adapter) as run:
                logits = model(**inputs).logits
                loss = answer_loss(logits, labels, run.output_positions)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
            optimizer.step()
            step += 1
            record: dict[str, Any] = {"step": step, "loss": loss.item(), "elapsed_s": round(time.time() - start, 1)}
            if settings.eval_size and (step % settings.eval_every == 0 or step == settings.steps):
                model.eval()
                record["val_accuracy"] = evaluate(model, processor, plan, task, limit=settings.eval_size,
                                                  adapter=adapter, batch_size=settings.eval_batch,
                                                  measure_memory=False, split="val")["accuracy"]
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
        for p in model.parameters():
            p.requires_grad_(True)
    adapter.save(out / "adapter")
    return adapter
