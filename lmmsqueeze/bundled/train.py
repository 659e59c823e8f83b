"""Train the bundled tiny LLaVA from scratch on the synthetic benchmark (CPU, a few hours).

    python -m lmmsqueeze.bundled.train [--seed 0] [--out DIR] [--threads N] [--steps N]

Recipe (see results/bundled/EXPERIMENTS.md for what each part buys):

* Multi-query sequences: one image followed by many question/answer turns
  (``<s> <image>x144 q1 a1 </s> q2 a2 </s> ...``), loss on every answer and end token; the
  first turn has exactly the single-question test layout.
* Per-cell probe loss: linear heads on the projector output predict each cell's colour,
  symbol, row and column (the heads are not part of the saved model).
* "Say" loss: the decoder's own LM head, at each image-token position, predicts the words
  for that cell's colour, symbol, row and column, so cell content lives in the word space the
  answers are read from (without it the answer readout sits on the prior for thousands of steps).
* Attention supervision: a few heads of one decoder layer are trained to attend, from each
  answer position, to the cell of the question's symbol (``<s>`` when the symbol is absent).
* AdamW with linear warmup and cosine decay.

The data side (per-cell and attention targets, the multi-turn batches) is in ``train_data.py``;
this module holds the losses, the evaluation and the training loop.

Held-out accuracy is the first-token greedy exact match on single-question prompts of the
"val" split; the best checkpoint so far is saved to ``--out`` and every evaluation is appended
to a jsonl log. All training-only signals act through hooks and extra losses: the saved model
is a plain ``LlavaForConditionalGeneration``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from lmmsqueeze.bundled import WEIGHTS_DIR
from lmmsqueeze.bundled.model import (
    BOS_ID,
    IMAGE_ID,
    IMAGE_TOKENS,
    PAD_ID,
    TinyConfig,
    build_model,
    build_processor,
    pixels,
)
from lmmsqueeze.bundled.train_data import Batch, Batches, attention_targets, cell_targets, say_table
from lmmsqueeze.evaluation.tasks.bundled import (
    COLORS,
    GRID,
    QUESTION_TYPES,
    SYMBOLS,
    ask,
    random_scene,
    render,
    scene_rng,
    summarize,
)

# the batching half of the recipe lives in train_data.py; its names stay importable from here
__all__ = [
    "AttentionProbe",
    "AuxHead",
    "Batch",
    "Batches",
    "Evaluator",
    "TrainConfig",
    "attention_targets",
    "cell_targets",
    "hidden_states",
    "lr_at",
    "main",
    "say_table",
    "train",
]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (the model sizes live in ``TinyConfig``)."""

    steps: int = 6000
    stop_at: int = 0  # stop after this many steps (0: run all); the schedule still spans `steps`
    batch: int = 16
    turns: int = 24
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup: int = 200
    weight_decay: float = 0.01
    aux_weight: float = 0.5
    say_weight: float = 1.0
    attn_weight: float = 0.5
    attn_layer: int = 2
    attn_heads: int = 2
    eval_every: int = 100
    eval_size: int = 500
    seed: int = 0


class AuxHead(torch.nn.Module):
    """Linear probes on each image token: cell colour, symbol, row and column."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.color = torch.nn.Linear(dim, len(COLORS) + 1)
        self.symbol = torch.nn.Linear(dim, len(SYMBOLS) + 1)
        self.row = torch.nn.Linear(dim, GRID)
        self.column = torch.nn.Linear(dim, GRID)

    def loss(self, feats: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the four probes; ``targets`` is ``(B, 144, 4)``."""
        heads = (self.color, self.symbol, self.row, self.column)
        return (
            sum(
                F.cross_entropy(h(feats).flatten(0, 1), targets[..., i].flatten())
                for i, h in enumerate(heads)
            )
            / 4
        )


class AttentionProbe:
    """Recomputes the attention of a few heads of one decoder layer from the answer positions.

    A forward hook on the layer's ``self_attn`` reads its (normed) input and rotary embeddings;
    ``loss`` is the cross-entropy between those heads' attention over the prefix and the
    target cells (attention supervision, a training-only signal).
    """

    def __init__(self, model, layer: int, heads: int) -> None:
        self.attn = model.model.language_model.layers[layer].self_attn
        self.heads = heads
        self.inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.attn.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cos, sin = kwargs["position_embeddings"]
        self.inputs = (hidden, cos, sin)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def loss(self, batch: Batch) -> torch.Tensor:
        """Mean cross-entropy of the probed heads' attention against ``batch.attn_target``."""
        hidden, cos, sin = self.inputs
        cos, sin = cos.expand(hidden.shape[0], -1, -1), sin.expand(hidden.shape[0], -1, -1)
        rows, pos = batch.query_rows, batch.query_pos
        d = self.attn.head_dim
        q = self.attn.q_proj(hidden[rows, pos])[:, : self.heads * d].view(len(rows), self.heads, d)
        q = self._rotate(q, cos[rows, pos].unsqueeze(1), sin[rows, pos].unsqueeze(1))
        k = self.attn.k_proj(hidden)[..., : self.heads * d].view(*hidden.shape[:2], self.heads, d)
        k = self._rotate(k, cos.unsqueeze(2), sin.unsqueeze(2))[rows]
        logits = torch.einsum("nhd,nlhd->nhl", q, k) * self.attn.scaling
        future = torch.arange(hidden.shape[1]).unsqueeze(0) > pos.unsqueeze(1)
        logp = logits.masked_fill(future.unsqueeze(1), float("-inf")).log_softmax(-1)
        prefix = logp[:, :, : 1 + IMAGE_TOKENS]
        return -(prefix * batch.attn_target.unsqueeze(1)).sum(-1).mean()



def hidden_states(
    model, pixel_values: torch.Tensor, input_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder output ``(B, L, D)`` and projected image features ``(B, 144, D)``.

    Sequences are right-padded, so causal attention alone keeps padding out of real positions.
    """
    cfg = model.config
    enc = model.model.get_image_features(
        pixel_values=pixel_values,
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
    )
    feats = torch.stack(list(enc.pooler_output))
    embeds = model.get_input_embeddings()(input_ids)
    mask = (input_ids == IMAGE_ID).unsqueeze(-1)
    embeds = embeds.masked_scatter(mask, feats.to(embeds.dtype))
    out = model.model.language_model(inputs_embeds=embeds, use_cache=False)
    return out.last_hidden_state, feats


class Evaluator:
    """First-token greedy accuracy on single-question prompts of the "val" split."""

    def __init__(self, processor, size: int, batch: int = 50) -> None:
        vocab = processor.tokenizer.get_vocab()
        self.items = []
        for i in range(size):
            rng = scene_rng("val", i)
            scene = random_scene(rng)
            qtype = QUESTION_TYPES[i % len(QUESTION_TYPES)]
            question, answer = ask(scene, qtype, rng)
            ids = [BOS_ID] + [IMAGE_ID] * IMAGE_TOKENS + [vocab[w] for w in question.split()]
            self.items.append((render(scene), ids, vocab[answer], qtype))
        self.batch = batch

    @torch.no_grad()
    def __call__(self, model) -> dict:
        """``summarize`` of the val split: overall and per-type accuracy."""
        model.eval()
        rows = []
        for start in range(0, len(self.items), self.batch):
            chunk = self.items[start : start + self.batch]
            length = max(len(ids) for _, ids, _, _ in chunk)
            input_ids = torch.full((len(chunk), length), PAD_ID)
            for i, (_, ids, _, _) in enumerate(chunk):
                input_ids[i, : len(ids)] = torch.tensor(ids)
            hidden, _ = hidden_states(model, pixels(np.stack([img for img, *_ in chunk])), input_ids)
            last = torch.tensor([len(ids) - 1 for _, ids, _, _ in chunk])
            pred = model.lm_head(hidden[torch.arange(len(chunk)), last]).argmax(-1)
            rows += [(qtype, float(p == a)) for p, (_, _, a, qtype) in zip(pred.tolist(), chunk, strict=True)]
        model.train()
        return summarize(rows)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def train(cfg: TrainConfig, model_cfg: TinyConfig, out: Path, log: Path, quiet: bool = False) -> dict:
    """Run training; save the best checkpoint (by val accuracy) to ``out``; return the best summary."""
    if cfg.attn_weight > 0 and not (
        0 <= cfg.attn_layer < model_cfg.text_layers and cfg.attn_heads <= model_cfg.text_heads
    ):
        raise ValueError(
            f"attention supervision needs attn_layer < text_layers={model_cfg.text_layers} and attn_heads <= "
            f"text_heads={model_cfg.text_heads}, got attn_layer={cfg.attn_layer}, attn_heads={cfg.attn_heads}"
        )
    processor = build_processor()
    model = build_model(model_cfg, seed=cfg.seed)
    aux = AuxHead(model_cfg.text_hidden)
    params = list(model.parameters()) + list(aux.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    batches = Batches(processor.tokenizer.get_vocab(), cfg.batch, cfg.turns, cfg.seed)
    say_words = say_table(processor.tokenizer.get_vocab())
    probe = AttentionProbe(model, cfg.attn_layer, cfg.attn_heads) if cfg.attn_weight > 0 else None
    evaluate = Evaluator(processor, cfg.eval_size)
    out.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    best: dict = {"overall": -1.0}
    start = time.time()
    sums = {"loss": 0.0, "aux": 0.0, "attn": 0.0, "n": 0}
    columns = (
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(
            "loss {task.fields[loss]:.3f} aux {task.fields[aux]:.3f} "
            "val {task.fields[val]:.3f} best {task.fields[best]:.3f}"
        ),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    model.train()
    with Progress(*columns, disable=quiet) as bar:
        task = bar.add_task("train", total=cfg.steps, loss=0.0, aux=0.0, val=0.0, best=0.0)
        for step in range(min(cfg.steps, cfg.stop_at) if cfg.stop_at else cfg.steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            batch = batches.next()
            hidden, feats = hidden_states(model, batch.pixel_values, batch.input_ids)
            keep = batch.labels != -100
            loss = F.cross_entropy(model.lm_head(hidden[keep]), batch.labels[keep])
            aux_loss = aux.loss(feats, batch.aux_targets)
            total = loss + cfg.aux_weight * aux_loss
            if cfg.say_weight > 0:
                say = say_words[torch.arange(4), batch.aux_targets]  # (B, 144, 4) word ids, -100 = nothing
                logp = model.lm_head(hidden[:, 1 : 1 + IMAGE_TOKENS]).log_softmax(-1)
                said = say != -100
                say_loss = -logp.gather(-1, say.clamp(min=0))[said].mean()
                total = total + cfg.say_weight * say_loss
            if probe is not None:
                attn_loss = probe.loss(batch)
                total = total + cfg.attn_weight * attn_loss
                sums["attn"] += attn_loss.item()
            opt.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sums["loss"] += loss.item()
            sums["aux"] += aux_loss.item()
            sums["n"] += 1
            bar.update(task, advance=1, loss=loss.item(), aux=aux_loss.item())
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                result = evaluate(model)
                record = {
                    "step": step + 1,
                    "images": batches.index,
                    "answers": batches.index * cfg.turns,
                    "loss": sums["loss"] / sums["n"],
                    "aux_loss": sums["aux"] / sums["n"],
                    "attn_loss": sums["attn"] / sums["n"],
                    "lr": lr_at(step, cfg),
                    "val": result["overall"],
                    "val_per_type": result["per_type"],
                    "elapsed_s": round(time.time() - start, 1),
                }
                sums = {"loss": 0.0, "aux": 0.0, "attn": 0.0, "n": 0}
                if result["overall"] > best["overall"]:
                    best = {**result, "step": step + 1}
                    model.save_pretrained(out)
                    processor.save_pretrained(out)
                    (out / "training.json").write_text(
                        json.dumps({"train": asdict(cfg), "model": asdict(model_cfg), "best": best}, indent=2)
                    )
                    record["saved"] = True
                with log.open("a") as fh:
                    fh.write(json.dumps(record) + "\n")
                bar.update(task, val=result["overall"], best=best["overall"])
                if not quiet:
                    per_type = " ".join(f"{k} {v:.2f}" for k, v in result["per_type"].items())
                    bar.console.log(
                        f"step {step + 1} images {batches.index} val {result['overall']:.3f} ({per_type})"
                    )
    return best


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="checkpoint directory (best so far)")
    parser.add_argument(
        "--log", type=Path, default=None, help="jsonl log (default: results/bundled/train-seed<seed>.jsonl)"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    defaults_t, defaults_m = TrainConfig(), TinyConfig()
    for name, value in [*asdict(defaults_t).items(), *asdict(defaults_m).items()]:
        if name != "seed":
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(**{k: getattr(args, k) for k in asdict(defaults_t)})
    model_cfg = TinyConfig(**{k: getattr(args, k) for k in asdict(defaults_m)})
    log = args.log or Path("results/bundled") / f"train-seed{args.seed}.jsonl"
    best = train(cfg, model_cfg, args.out, log, quiet=args.quiet)
    print(json.dumps({"best": best, "out": str(args.out), "log": str(log)}))


if __name__ == "__main__":
    main()
