"""Qwen3-VL's DeepStack under reduction, on a tiny random model: the features DeepStack adds after the
first decoder layers follow every reduction (a kept token keeps its own, a merged token takes its
group's mean, a dropped token none). References: the vanilla model with the dropped image columns
masked out of attention from the reducing layer on (the tokens stay, so DeepStack adds to every one
of them as the model does), and 2x2 window means written out by hand. The contract every family
keeps is in ``test_families.py``."""

from __future__ import annotations

import contextlib

import pytest
import torch

import lmmsqueeze
from lmmsqueeze.models import family_for
from lmmsqueeze.testing import tiny_qwen3_vl, tiny_qwen_inputs

pytestmark = pytest.mark.usefixtures("no_grad")

#: 192x192: 12x12 patches of 16 px, merged 2x2 into a 6x6 grid of 36 image tokens
SQUARE = ((192, 192),)


@pytest.fixture(scope="module")
def qwen3():
    model, processor = tiny_qwen3_vl(attn="sdpa")
    reference, _ = tiny_qwen3_vl(attn="eager")  # the same seed: the same weights
    return model, reference, tiny_qwen_inputs(processor, 1, SQUARE)


@contextlib.contextmanager
def _hidden_columns(model, columns: torch.Tensor, from_layer: int, length: int):
    """Every decoder layer from ``from_layer`` on attends causally but never to ``columns`` (an additive
    mask for eager attention; the earlier layers keep the plain causal mask)."""
    neg = torch.finfo(torch.float32).min
    causal = torch.full((length, length), neg).triu(1)
    hidden = causal.clone()
    hidden[:, columns] = neg
    hidden.fill_diagonal_(0)  # a hidden token still attends to itself (its row is never read)
    handles = []
    for i, layer in enumerate(model.model.language_model.layers):
        mask = (hidden if i >= from_layer else causal)[None, None]

        def swap(module, args, kwargs, mask=mask):
            return args, {**kwargs, "attention_mask": mask}

        handles.append(layer.register_forward_pre_hook(swap, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _dropped_columns(model, inputs, kept: torch.Tensor) -> torch.Tensor:
    """Prompt columns of the image tokens not in ``kept`` (indices into the image's tokens)."""
    columns = torch.nonzero(inputs["input_ids"][0] == family_for(model).image_token_id).flatten()
    gone = torch.ones(columns.numel(), dtype=torch.bool)
    gone[kept.cpu()] = False
    return columns[gone]


@pytest.mark.parametrize("pipeline, from_layer", [
    ("random(keep=0.5, seed=1)", 0),  # at the projector: DeepStack adds to the survivors only
    ("random(keep=0.5, seed=1, layer=1)", 1),  # after layer 0, before DeepStack's second addition
    ("fastv(layer=1, keep=10)", 1),
    ("fastervlm(keep=12)", 0),  # before the merger: every DeepStack level reduced alike
    ("divprune(keep=12)", 0),
])
def test_deepstack_follows_pruning(qwen3, pipeline, from_layer):
    """The text rows after the image are what the vanilla model computes when the dropped image tokens
    are hidden from every layer the plan drops them at (their positions and DeepStack's additions to
    the kept tokens unchanged)."""
    model, reference, inputs = qwen3
    with lmmsqueeze.apply(model, pipeline) as run:
        logits = model(**inputs).logits
    kept = run.trace[0][0]
    assert 0 < kept.numel() < 36
    columns = _dropped_columns(model, inputs, kept)
    last_image = int(torch.nonzero(inputs["input_ids"][0] == family_for(model).image_token_id).max())
    length = inputs["input_ids"].shape[1]
    with _hidden_columns(reference, columns, from_layer, length):
        expected = reference(**inputs).logits
    after = slice(last_image + 1 - length, None)  # the text rows after the image (fewer rows before them)
    assert torch.allclose(logits[0, after], expected[0, after], atol=1e-5)
    vanilla = reference(**inputs).logits
    assert not torch.allclose(vanilla[0, after], expected[0, after], atol=1e-3)  # the masking mattered


def _deepstack_inputs(model, inputs) -> list[torch.Tensor]:
    """The DeepStack features the decoder receives (one ``[image tokens, d]`` tensor per level)."""
    seen = []

    def grab(module, args, kwargs):
        seen.append(kwargs["deepstack_visual_embeds"])

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(**inputs)
    finally:
        handle.remove()
    return seen[0]


def _window_means(feats: torch.Tensor, side: int) -> torch.Tensor:
    """The mean of each 2x2 window of a ``side x side`` raster grid of features, windows in raster order."""
    out = []
    for i in range(0, side, 2):
        for j in range(0, side, 2):
            cells = [(i + a) * side + (j + b) for a in (0, 1) for b in (0, 1)]
            out.append(feats[cells].mean(0))
    return torch.stack(out)


def test_deepstack_features_of_a_pooled_token_are_its_window_mean(qwen3):
    model, _, inputs = qwen3
    vanilla = _deepstack_inputs(model, inputs)
    with lmmsqueeze.apply(model, "pool"):
        pooled = _deepstack_inputs(model, inputs)
    assert len(pooled) == len(vanilla) == len(model.config.vision_config.deepstack_visual_indexes)
    for mine, full in zip(pooled, vanilla, strict=True):
        assert mine.shape == (9, full.shape[-1])
        assert torch.allclose(mine, _window_means(full, 6), atol=1e-6)


def test_deepstack_after_an_llm_stage_at_a_later_layer_is_untouched(qwen3):
    """A stage at layer 2, after the last DeepStack addition (layer 1's output): DeepStack adds to every
    image token as in the vanilla model, so the reference hides the dropped tokens from layer 2 on."""
    model, reference, inputs = qwen3
    with lmmsqueeze.apply(model, "random(keep=0.25, seed=2, layer=2)") as run:
        logits = model(**inputs).logits
    columns = _dropped_columns(model, inputs, run.trace[0][0])
    with _hidden_columns(reference, columns, 2, inputs["input_ids"].shape[1]):
        expected = reference(**inputs).logits
    assert torch.allclose(logits[0, -1], expected[0, -1], atol=1e-5)
