"""What ProxyV's parameters are trained to do.

* ``distill`` (the default for adapters): reproduce the frozen vanilla model. Unlabelled image +
  question pairs; the vanilla model answers them greedily, and the adapter is trained so that the
  pipeline's next-token distributions match the vanilla model's (KL) at every text position from the
  first image token on, prompt and answer, optionally with an MSE between their last hidden states.
  No label is read, so the adapter cannot learn the task, only to stand in for the full computation.
* ``task``: the cross-entropy of the task's answers (labelled data), as the paper fine-tunes. Its
  results mix ProxyV with task training: compare them with the trained control (``--control``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from ..runtime.loading import build_prompt

OBJECTIVES = ("distill", "task")


@contextlib.contextmanager
def left_padding(processor: Any) -> Iterator[None]:
    """Batches are built left-padded (what decoder-only generation and the labels below assume),
    whatever the processor's tokenizer was set to; its setting is restored after."""
    tok = getattr(processor, "tokenizer", processor)
    side = getattr(tok, "padding_side", "left")
    tok.padding_side = "left"
    try:
        yield
    finally:
        tok.padding_side = side


def _to(inputs: Any, device: torch.device, dtype: torch.dtype) -> dict:
    inputs = inputs.to(device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return dict(inputs)


def task_batch(
    processor: Any, items: list[Any], device: torch.device, dtype: torch.dtype
) -> tuple[dict, torch.Tensor]:
    """Inputs with the answer appended, and labels: -100 everywhere but the answer and end tokens."""
    tok = processor.tokenizer
    prompts = [build_prompt(processor, item.question) for item in items]
    full = [f"{p} {item.answer} {tok.eos_token}" for p, item in zip(prompts, items, strict=True)]
    images = [i.image for i in items]
    with left_padding(processor):
        inputs = processor(images=images, text=full, return_tensors="pt", padding=True)
        prompt_ids = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    labels = torch.full_like(inputs["input_ids"], -100)
    lengths = inputs["attention_mask"].sum(1)
    prompt_lengths = prompt_ids["attention_mask"].sum(1)
    width = inputs["input_ids"].shape[1]
    for b in range(len(items)):
        start = width - int(lengths[b]) + int(prompt_lengths[b])
        labels[b, start:] = inputs["input_ids"][b, start:]
    return _to(inputs, device, dtype), labels.to(device)


def answer_loss(logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of next-token predictions, mapping each logits row to the input column it came from."""
    nxt = positions + 1
    valid = (positions >= 0) & (nxt < labels.shape[1])
    targets = torch.where(valid, labels.gather(1, nxt.clamp(max=labels.shape[1] - 1)),
                          torch.full_like(nxt, -100))
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-100)


@torch.no_grad()
def distill_batch(teacher: Any, processor: Any, items: list[Any], device: torch.device, dtype: torch.dtype,
                  image_token_id: int, max_new_tokens: int) -> tuple[dict, torch.Tensor]:
    """The questions (no answers) followed by the vanilla model's greedy answers, and the positions to
    distil: ``[B, L]`` True at every real text token from the first image token on."""
    prompts = [build_prompt(processor, item.question) for item in items]
    with left_padding(processor):
        inputs = _to(processor(images=[i.image for i in items], text=prompts, return_tensors="pt",
                               padding=True), device, dtype)
    out = teacher.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1]:]
    eos = teacher.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    ended = (torch.isin(new, torch.tensor(eos, device=new.device)) if eos
             else torch.zeros_like(new, dtype=torch.bool))
    after_end = (torch.cumsum(ended.long(), 1) - ended.long()) > 0  # tokens after the first end token
    mask = torch.cat([inputs["attention_mask"], (~after_end).to(inputs["attention_mask"].dtype)], 1)
    grown = {**inputs, "input_ids": out, "attention_mask": mask}
    if "mm_token_type_ids" in inputs:
        grown["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(new)], 1)
    image = out == image_token_id
    started = torch.cumsum(image.long(), 1) > 0
    return grown, started & ~image & mask.bool()


def distill_loss(student_logits: torch.Tensor, rows: torch.Tensor, teacher_logits: torch.Tensor,
                 where: torch.Tensor, student_hidden: torch.Tensor | None = None,
                 teacher_hidden: torch.Tensor | None = None, hidden_weight: float = 0.0) -> torch.Tensor:
    """KL(vanilla || pipeline) of the next-token distributions at the positions ``where`` (``[B, L]``)
    that survive the pipeline (``rows``: the input column of each student row, -1 for padding), plus
    ``hidden_weight`` x the MSE of the last hidden states there."""
    cols = rows.clamp(min=0)
    valid = (rows >= 0) & where.gather(1, cols)

    def at_rows(x: torch.Tensor) -> torch.Tensor:
        return x.gather(1, cols[..., None].expand(-1, -1, x.shape[-1]))

    teacher = F.log_softmax(at_rows(teacher_logits).float(), dim=-1)
    student = F.log_softmax(student_logits.float(), dim=-1)
    kl = (teacher.exp() * (teacher - student)).sum(-1)
    loss = kl[valid].mean()
    if hidden_weight:
        diff = (student_hidden.float() - at_rows(teacher_hidden).float()).pow(2).mean(-1)
        loss = loss + hidden_weight * diff[valid].mean()
    return loss
