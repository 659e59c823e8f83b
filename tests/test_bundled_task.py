"""Tests of the synthetic benchmark the bundled model is trained and scored on."""

from __future__ import annotations

import numpy as np
import pytest

from lmmsqueeze.evaluation.tasks import bundled as task


def _pixels(sample: task.Sample) -> np.ndarray:
    return np.asarray(sample.image)


def _scene_of(split: str, i: int, seed: int = 0) -> task.Scene:
    return task.random_scene(task.scene_rng(split, i, seed))


def test_samples_are_deterministic_by_seed() -> None:
    a = task.samples("train", 20, seed=3)
    b = task.samples("train", 20, seed=3)
    c = task.samples("train", 20, seed=4)
    assert [(s.question, s.answer, s.uid) for s in a] == [(s.question, s.answer, s.uid) for s in b]
    assert all(np.array_equal(_pixels(x), _pixels(y)) for x, y in zip(a, b, strict=True))
    assert any(not np.array_equal(_pixels(x), _pixels(y)) for x, y in zip(a, c, strict=True))


def test_prefix_property_and_test_size() -> None:
    assert [s.uid for s in task.samples("test", 5)] == [s.uid for s in task.samples("test", 10)[:5]]
    with pytest.raises(ValueError, match="1000"):
        task.samples("test", task.TEST_SIZE + 1)
    with pytest.raises(ValueError, match="unknown split"):
        task.samples("dev", 1)


def test_splits_share_no_image() -> None:
    images = {
        split: {_pixels(s).tobytes() for s in task.samples(split, 300)} for split in ("train", "val", "test")
    }
    assert not images["train"] & images["test"]
    assert not images["train"] & images["val"]
    assert not images["val"] & images["test"]


def test_answers_are_valid_and_types_balanced() -> None:
    rows = task.samples("test", 100)
    assert [s.qtype for s in rows[:4]] == list(task.QUESTION_TYPES)
    vocab = set(task.vocabulary())
    for s in rows:
        assert s.image.size == (task.IMAGE_SIZE, task.IMAGE_SIZE) and s.image.mode == "RGB"
        assert len(s.answer.split()) == 1 and s.answer in vocab
        assert set(s.question.split()) <= vocab
        allowed = {
            "color": set(task.COLORS),
            "exists": {"yes", "no"},
            "row": {str(i) for i in range(1, 13)},
            "column": set("abcdefghijkl"),
        }[s.qtype]
        assert s.answer in allowed


def test_image_shows_what_the_answer_says() -> None:
    for s in task.samples("test", 60):
        img = _pixels(s).astype(int)
        last = s.question.split()[-1]
        if s.qtype in ("color", "row", "column") or (s.qtype == "exists" and s.answer == "yes"):
            glyph = task.GLYPHS[last]
            # locate the glyph: exactly one cell whose 6x6 centre has ink exactly where the glyph has
            hits = []
            for r in range(task.GRID):
                for c in range(task.GRID):
                    inner = img[r * 8 + 1 : r * 8 + 7, c * 8 + 1 : c * 8 + 7]
                    if np.array_equal((inner == task.INK).all(-1), glyph):
                        hits.append((r, c))
            assert len(hits) == 1, s
            r, c = hits[0]
            corner = tuple(img[r * 8, c * 8])  # the cell's border pixel shows its colour
            if s.qtype == "color":
                assert corner == task.COLORS[s.answer]
            elif s.qtype == "row":
                assert r + 1 == int(s.answer)
            elif s.qtype == "column":
                assert "abcdefghijkl"[c] == s.answer
        else:  # "exists", answer "no": no cell shows the glyph
            cells = img.reshape(12, 8, 12, 8, 3)
            inks = [(cells[r, 1:7, c, 1:7] == task.INK).all(-1) for r in range(12) for c in range(12)]
            assert not any(np.array_equal(ink, task.GLYPHS[last]) for ink in inks)


def test_hand_checked_scene() -> None:
    scene = task.Scene(
        colors=tuple(
            tuple(
                "red" if (r, c) in {(0, 0), (11, 11)} else "blue" if (r, c) == (5, 3) else None
                for c in range(12)
            )
            for r in range(12)
        ),
        symbols={"ring": (5, 3), "dot": (0, 0)},
    )
    img = task.render(scene)
    assert tuple(img[5 * 8, 3 * 8]) == task.COLORS["blue"]
    assert tuple(img[5 * 8 + 1, 3 * 8 + 1]) == task.INK  # ring's top-left corner
    assert tuple(img[3, 3]) == task.INK  # the dot's centre in cell (0, 0)
    assert tuple(img[50, 90]) == task.BACKGROUND
    rng = np.random.default_rng(0)
    answers = {}
    for _ in range(50):
        q, a = task.ask(scene, "color", rng)
        answers[q.split()[-1]] = a
    assert answers == {"ring": "blue", "dot": "red"}
    assert task.ask(scene, "row", np.random.default_rng(1))[1] in {"6", "1"}
    assert task.ask(scene, "column", np.random.default_rng(1))[1] in {"d", "a"}


def test_score_and_summarize() -> None:
    assert task.score(" Red\n", "red") == 1.0
    assert task.score("red blue", "red") == 0.0
    assert task.score("", "no") == 0.0
    rows = [("color", 1.0), ("color", 0.0), ("exists", 1.0), ("row", 0.0)]
    out = task.summarize(rows)
    assert out["overall"] == pytest.approx(2 / 4)  # 2 correct of 4
    assert out["per_type"] == {"color": 0.5, "exists": 1.0, "row": 0.0}
    assert out["n"] == 4
    assert task.summarize([])["overall"] == 0.0
