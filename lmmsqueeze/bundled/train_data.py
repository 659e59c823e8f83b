"""Training data for the bundled tiny LLaVA: the per-cell and attention targets of a scene, and the
endless stream of multi-turn batches from the synthetic "train" split that ``train.py`` trains on.

Each batch holds ``batch`` images with ``turns`` question/answer turns each
(``<s> <image>x144 q1 a1 </s> q2 a2 </s> ...``, right-padded); labels cover every answer and end
token, and each answer position records the prefix cells its attention is supervised towards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmmsqueeze.bundled.model import BOS_ID, EOS_ID, IMAGE_ID, IMAGE_TOKENS, PAD_ID, pixels
from lmmsqueeze.evaluation.tasks.bundled import (
    COLORS,
    COLUMN_NAMES,
    GRID,
    QUESTION_TYPES,
    ROW_NAMES,
    SYMBOLS,
    Scene,
    ask,
    random_scene,
    render,
    scene_rng,
)


def say_table(vocab: dict[str, int]) -> torch.Tensor:
    """``(4, 18)`` word ids for the ``cell_targets`` classes (colour, symbol, row, column); -100 = no word."""
    table = torch.full((4, 1 + max(len(SYMBOLS), GRID)), -100)
    table[0, 1 : 1 + len(COLORS)] = torch.tensor([vocab[w] for w in COLORS])
    table[1, 1 : 1 + len(SYMBOLS)] = torch.tensor([vocab[w] for w in SYMBOLS])
    table[2, :GRID] = torch.tensor([vocab[w] for w in ROW_NAMES])
    table[3, :GRID] = torch.tensor([vocab[w] for w in COLUMN_NAMES])
    return table


def cell_targets(scene: Scene) -> np.ndarray:
    """``(144, 4)`` per-cell targets: colour index (0 = none), symbol index (0 = none), row, column."""
    names = list(COLORS)
    out = np.zeros((GRID, GRID, 4), dtype=np.int64)
    out[..., 2] = np.arange(GRID)[:, None]
    out[..., 3] = np.arange(GRID)[None, :]
    for r, row in enumerate(scene.colors):
        for c, color in enumerate(row):
            out[r, c, 0] = 0 if color is None else names.index(color) + 1
    for name, (r, c) in scene.symbols.items():
        out[r, c, 1] = SYMBOLS.index(name) + 1
    return out.reshape(GRID * GRID, 4)


def attention_targets(scene: Scene, key: str) -> list[int]:
    """Prefix positions a question about symbol ``key`` should attend to: ``[1 + cell]``, or ``[0]``
    (``<s>``) if absent."""
    if key in scene.symbols:
        r, c = scene.symbols[key]
        return [1 + r * GRID + c]
    return [0]


@dataclass
class Batch:
    """One training batch; ``query_*`` and ``attn_target`` describe where each answer should look."""

    pixel_values: torch.Tensor
    input_ids: torch.Tensor
    labels: torch.Tensor
    aux_targets: torch.Tensor
    query_rows: torch.Tensor
    query_pos: torch.Tensor
    attn_target: torch.Tensor


class Batches:
    """Endless stream of multi-turn training batches from the "train" split."""

    def __init__(self, vocab: dict[str, int], batch: int, turns: int, seed: int) -> None:
        self.vocab = vocab
        self.batch, self.turns, self.seed = batch, turns, seed
        self.index = 0

    def words(self, text: str) -> list[int]:
        """Token ids of a whitespace-separated string."""
        return [self.vocab[w] for w in text.split()]

    def next(self) -> Batch:
        """The next batch of ``batch`` images with ``turns`` question/answer turns each."""
        images, seqs, labels, aux, where = [], [], [], [], []
        for b in range(self.batch):
            rng = scene_rng("train", self.index, self.seed)
            self.index += 1
            scene = random_scene(rng)
            ids = [BOS_ID] + [IMAGE_ID] * IMAGE_TOKENS
            lab = [-100] * len(ids)
            for _ in range(self.turns):
                qtype = QUESTION_TYPES[int(rng.integers(len(QUESTION_TYPES)))]
                question, answer = ask(scene, qtype, rng)
                q = self.words(question)
                a = self.vocab[answer]
                cells = attention_targets(scene, question.split()[-1])
                where.append((b, len(ids) + len(q) - 1, cells))
                ids += q + [a, EOS_ID]
                lab += [-100] * (len(q) - 1) + [a, EOS_ID, -100]
            images.append(render(scene))
            seqs.append(ids)
            labels.append(lab)
            aux.append(cell_targets(scene))
        length = max(map(len, seqs))
        input_ids = torch.full((len(seqs), length), PAD_ID)
        label_ids = torch.full((len(seqs), length), -100)
        for i, (s, lab) in enumerate(zip(seqs, labels, strict=True)):
            input_ids[i, : len(s)] = torch.tensor(s)
            label_ids[i, : len(lab)] = torch.tensor(lab)
        attn_target = torch.zeros(len(where), 1 + IMAGE_TOKENS)
        for i, (_, _, cells) in enumerate(where):
            attn_target[i, cells] = 1.0 / len(cells)
        return Batch(
            pixel_values=pixels(np.stack(images)),
            input_ids=input_ids,
            labels=label_ids,
            aux_targets=torch.from_numpy(np.stack(aux)),
            query_rows=torch.tensor([w[0] for w in where], dtype=torch.long),
            query_pos=torch.tensor([w[1] for w in where], dtype=torch.long),
            attn_target=attn_target,
        )
