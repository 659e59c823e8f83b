"""Synthetic fine-detail benchmark for the bundled tiny LLaVA model.

Each image is a 96x96 picture of a 12x12 grid of 8-pixel cells on a light grey background.
A few cells are filled with one of six colours; some of those also carry a black 6x6 glyph
(a "symbol", each at most once per image), the others are plain distractors. Every question is
answered by one word and needs the content of one or a few small cells anywhere in the image, so
a reducer that drops or blurs image tokens loses the answer:

* ``color``  -- "what color is the cell with the ring"      -> ``blue``
* ``exists`` -- "is there a ring"                           -> ``yes`` / ``no``
* ``row``    -- "which row has the ring"                    -> ``1`` .. ``12`` (top to bottom)
* ``column`` -- "which column has the ring"                 -> ``a`` .. ``l`` (left to right)

The key word (the symbol) is always the last word of a question.

Generation is deterministic: sample ``i`` of split ``s`` with seed ``k`` is drawn from
``numpy.random.default_rng([SPLITS[s], k, i])``, so splits use disjoint seed streams and never
share an image (up to a collision of independent random scenes).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image

GRID = 12
CELL = 8
IMAGE_SIZE = GRID * CELL
TEST_SIZE = 1000
SPLITS: dict[str, int] = {"train": 0, "test": 1, "val": 2}
ROW_NAMES: tuple[str, ...] = tuple(str(i + 1) for i in range(GRID))
COLUMN_NAMES: tuple[str, ...] = tuple("abcdefghijkl"[:GRID])
QUESTION_TYPES: tuple[str, ...] = ("color", "exists", "row", "column")

BACKGROUND = (222, 222, 222)
INK = (20, 20, 20)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 205, 30),
    "purple": (150, 60, 190),
    "orange": (250, 140, 20),
}

_GLYPHS: dict[str, tuple[str, ...]] = {
    "plus": ("..##..", "..##..", "######", "######", "..##..", "..##.."),
    "cross": ("#....#", ".#..#.", "..##..", "..##..", ".#..#.", "#....#"),
    "dot": ("......", "......", "..##..", "..##..", "......", "......"),
    "ring": ("######", "#....#", "#....#", "#....#", "#....#", "######"),
    "bar": ("..##..", "..##..", "..##..", "..##..", "..##..", "..##.."),
    "dash": ("......", "......", "######", "######", "......", "......"),
    "slash": (".....#", "....#.", "...#..", "..#...", ".#....", "#....."),
    "corner": ("#.....", "#.....", "#.....", "#.....", "#.....", "######"),
    "tee": ("######", "######", "..##..", "..##..", "..##..", "..##.."),
    "box": ("......", ".####.", ".####.", ".####.", ".####.", "......"),
    "hook": ("#####.", "....#.", "....#.", "....#.", "#...#.", ".###.."),
    "steps": ("##....", ".##...", "..##..", "...##.", "....##", ".....#"),
    "arrow": ("..##..", ".####.", "######", "..##..", "..##..", "..##.."),
    "gate": ("######", "#....#", "#....#", "#....#", "#....#", "#....#"),
    "dice": ("##..##", "##..##", "......", "......", "##..##", "##..##"),
    "rails": ("#....#", "#....#", "#....#", "#....#", "#....#", "#....#"),
}
SYMBOLS: tuple[str, ...] = tuple(_GLYPHS)
GLYPHS: dict[str, np.ndarray] = {
    name: np.array([[c == "#" for c in row] for row in rows], dtype=bool) for name, rows in _GLYPHS.items()
}

MIN_SYMBOLS, MAX_SYMBOLS = 5, 9
MIN_PLAIN, MAX_PLAIN = 0, 6

_TEMPLATES: dict[str, str] = {
    "color": "what color is the cell with the {}",
    "exists": "is there a {}",
    "row": "which row has the {}",
    "column": "which column has the {}",
}


@dataclass(frozen=True)
class Sample:
    """One benchmark item: an image, a question about it and its one-word answer."""

    image: Image.Image
    question: str
    answer: str
    qtype: str
    uid: str


@dataclass(frozen=True)
class Scene:
    """The content of one image.

    ``colors[r][c]`` is the colour name of cell (r, c) or ``None`` for background;
    ``symbols`` maps each symbol present to its (row, column), 0-based.
    """

    colors: tuple[tuple[str | None, ...], ...]
    symbols: dict[str, tuple[int, int]]


def random_scene(rng: np.random.Generator) -> Scene:
    """Draw a scene: 5-9 coloured cells with distinct symbols plus 0-6 plain coloured cells."""
    n_sym = int(rng.integers(MIN_SYMBOLS, MAX_SYMBOLS + 1))
    n_plain = int(rng.integers(MIN_PLAIN, MAX_PLAIN + 1))
    cells = rng.choice(GRID * GRID, size=n_sym + n_plain, replace=False)
    names = list(COLORS)
    grid: list[list[str | None]] = [[None] * GRID for _ in range(GRID)]
    for cell in cells:
        grid[cell // GRID][cell % GRID] = names[int(rng.integers(len(names)))]
    picked = rng.choice(len(SYMBOLS), size=n_sym, replace=False)
    symbols = {SYMBOLS[s]: (int(cell // GRID), int(cell % GRID))
               for s, cell in zip(picked, cells[:n_sym], strict=True)}
    return Scene(colors=tuple(tuple(row) for row in grid), symbols=symbols)


def render(scene: Scene) -> np.ndarray:
    """Render a scene as a ``(96, 96, 3)`` uint8 array."""
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    for r, row in enumerate(scene.colors):
        for c, color in enumerate(row):
            if color is not None:
                img[r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL] = COLORS[color]
    for name, (r, c) in scene.symbols.items():
        patch = img[r * CELL + 1 : r * CELL + 7, c * CELL + 1 : c * CELL + 7]
        patch[GLYPHS[name]] = INK
    return img


def draw(scene: Scene) -> Image.Image:
    """Render a scene as an RGB PIL image."""
    return Image.fromarray(render(scene), mode="RGB")


def ask(scene: Scene, qtype: str, rng: np.random.Generator) -> tuple[str, str]:
    """Draw a question of type ``qtype`` about ``scene``; return ``(question, answer)``.

    ``exists`` questions are positive with probability 1/2; the others ask about a symbol that
    is present.
    """
    present = sorted(scene.symbols)
    if qtype == "exists":
        positive = bool(rng.integers(2))
        pool = present if positive else [s for s in SYMBOLS if s not in scene.symbols]
        return _TEMPLATES[qtype].format(pool[int(rng.integers(len(pool)))]), "yes" if positive else "no"
    if qtype not in _TEMPLATES:
        raise ValueError(f"unknown question type {qtype!r}; expected one of {QUESTION_TYPES}")
    symbol = present[int(rng.integers(len(present)))]
    r, c = scene.symbols[symbol]
    answer = {"color": scene.colors[r][c], "row": ROW_NAMES[r], "column": COLUMN_NAMES[c]}[qtype]
    return _TEMPLATES[qtype].format(symbol), str(answer)


def scene_rng(split: str, index: int, seed: int = 0) -> np.random.Generator:
    """The random generator of item ``index`` of ``split``: one disjoint stream per split."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    return np.random.default_rng([SPLITS[split], seed, index])


def samples(split: str, n: int, seed: int = 0) -> list[Sample]:
    """The first ``n`` samples of ``split`` ("train", "val" or "test").

    Question types cycle through ``QUESTION_TYPES``, so any prefix is balanced across types.
    The test split is the fixed first ``TEST_SIZE`` items of the seed-0 test stream.
    """
    if split == "test" and n > TEST_SIZE:
        raise ValueError(f"the test split has {TEST_SIZE} samples, asked for n={n}")
    out = []
    for i in range(n):
        rng = scene_rng(split, i, seed)
        scene = random_scene(rng)
        qtype = QUESTION_TYPES[i % len(QUESTION_TYPES)]
        question, answer = ask(scene, qtype, rng)
        out.append(Sample(draw(scene), question, answer, qtype, f"{split}-{seed}-{i}"))
    return out


def vocabulary() -> list[str]:
    """Every word that can occur in a question or an answer, in a fixed order."""
    words: list[str] = []
    for template in _TEMPLATES.values():
        words += template.format("").split()
    words += list(COLORS) + list(SYMBOLS) + ["yes", "no"] + list(ROW_NAMES) + list(COLUMN_NAMES)
    return list(dict.fromkeys(words))


def score(prediction: str, answer: str) -> float:
    """Exact match after stripping whitespace and lowercasing: 1.0 or 0.0."""
    return float(prediction.strip().lower() == answer.strip().lower())


def summarize(rows: Iterable[tuple[str, float]]) -> dict:
    """Aggregate ``(qtype, score)`` rows into ``{"overall", "per_type", "n"}`` accuracies."""
    by_type: dict[str, list[float]] = defaultdict(list)
    for qtype, value in rows:
        by_type[qtype].append(float(value))
    total = [v for values in by_type.values() for v in values]
    return {
        "overall": sum(total) / len(total) if total else 0.0,
        "per_type": {t: sum(v) / len(v) for t, v in sorted(by_type.items())},
        "n": len(total),
    }
