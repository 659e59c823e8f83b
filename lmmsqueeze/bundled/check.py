"""Score the bundled model on the test split, as is and with image tokens reduced before the LLM.

    python -m lmmsqueeze.bundled.check [--weights DIR] [--n 1000] [--threads N]

Prints one json line per setting: ``vanilla`` (processor + ``generate``, the runtime's path),
``identity``, ``random75`` (a random 25% of the 144 image tokens kept, in order) and ``pool2x2``
(2x2 average pooling of the 12x12 token grid to 6x6). The reduced settings compute the image
features, reduce them, shrink the ``<image>`` run accordingly and decode greedily from
``inputs_embeds``. This is a sanity check of the shipped weights, not the project's reducers.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from lmmsqueeze.bundled import WEIGHTS_DIR, load_bundled, prompt
from lmmsqueeze.bundled.model import BOS_ID, IMAGE_ID, PAD_ID
from lmmsqueeze.evaluation.tasks.bundled import GRID, Sample, samples, score, summarize

Reduce = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def keep_random(fraction: float) -> Reduce:
    """Keep a random ``fraction`` of the ``(N, D)`` tokens, in their original order."""

    def reduce(feats: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        keep = torch.randperm(feats.shape[0], generator=gen)[: round(feats.shape[0] * fraction)]
        return feats[keep.sort().values]

    return reduce


def pool2x2(feats: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """2x2 average pooling of the ``(144, D)`` token grid to ``(36, D)``."""
    grid = feats.T.reshape(1, -1, GRID, GRID)
    return F.avg_pool2d(grid, 2).flatten(2)[0].T


REDUCTIONS: dict[str, Reduce] = {
    "identity": lambda feats, gen: feats,
    "random75": keep_random(0.25),
    "pool2x2": pool2x2,
}


@torch.no_grad()
def run_vanilla(model, processor, items: list[Sample], batch: int = 50) -> list[str]:
    """Greedy answers through ``processor(...)`` and ``model.generate`` with left padding."""
    processor.tokenizer.padding_side = "left"
    answers = []
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        inputs = processor(
            images=[s.image for s in chunk],
            text=[prompt(s.question) for s in chunk],
            padding=True,
            return_tensors="pt",
        )
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        answers += processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return answers


@torch.no_grad()
def run_reduced(
    model, processor, items: list[Sample], reduce: Reduce, batch: int = 50, seed: int = 0
) -> list[str]:
    """Greedy answers with the image features passed through ``reduce`` before the decoder."""
    gen = torch.Generator().manual_seed(seed)
    vocab = processor.tokenizer.get_vocab()
    embed = model.get_input_embeddings()
    answers = []
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        pv = processor.image_processor([s.image for s in chunk], return_tensors="pt")["pixel_values"]
        enc = model.model.get_image_features(
            pixel_values=pv,
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        )
        feats = [reduce(f, gen) for f in enc.pooler_output]
        seqs = [
            [BOS_ID] + [IMAGE_ID] * len(f) + [vocab[w] for w in s.question.split()]
            for f, s in zip(feats, chunk, strict=True)
        ]
        length = max(map(len, seqs))
        ids = torch.tensor([[PAD_ID] * (length - len(s)) + s for s in seqs])
        mask = (ids != PAD_ID).long()
        embeds = embed(ids).masked_scatter((ids == IMAGE_ID).unsqueeze(-1), torch.cat(feats))
        out = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=3, do_sample=False)
        answers += processor.batch_decode(out, skip_special_tokens=True)
    return answers


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, processor = load_bundled(path=args.weights)
    items = samples("test", args.n)
    runs = {"vanilla": lambda: run_vanilla(model, processor, items)}
    runs |= {name: (lambda r=r: run_reduced(model, processor, items, r)) for name, r in REDUCTIONS.items()}
    for name, run in runs.items():
        predictions = run()
        result = summarize((s.qtype, score(p, s.answer)) for p, s in zip(predictions, items, strict=True))
        print(json.dumps({"setting": name, **result}))


if __name__ == "__main__":
    main()
