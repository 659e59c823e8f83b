"""The prefill runtime on LLaVA against independent references: eager attention weights, the pooled
features recomputed by hand, and each stage's choice replayed. The contract every family keeps
(identity, cached decoding, mixed batches, hooks) is in ``test_families.py``."""

from __future__ import annotations

import pytest
import torch

import lmmsqueeze
from lmmsqueeze.testing import tiny_inputs, to_device

pytestmark = pytest.mark.usefixtures("no_grad")


def make_inputs(processor, batch, model):
    return to_device(tiny_inputs(processor, batch), model.device)


@pytest.mark.parametrize("layer", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 2])
def test_fastv_keeps_top_k_of_eager_attention(tiny_dev, layer, batch):
    """The kept set equals the top-k of the head-mean last-token attention that an eager
    forward with output_attentions=True returns at layer K-1."""
    model, processor = tiny_dev
    inputs = make_inputs(processor, batch, model)
    keep = 9
    with lmmsqueeze.apply(model, f"fastv(layer={layer}, keep={keep})") as run:
        model(**inputs)
    original = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        attentions = model(**inputs, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(original)
    image = inputs["input_ids"] == model.config.image_token_id
    for b in range(batch):
        row = attentions[layer - 1][b, :, -1].mean(0)[image[b]]  # [36] over this sample's image tokens
        expected = torch.sort(torch.topk(row, keep).indices).values
        assert torch.equal(run.trace[0][b], expected)


def test_pool_trace_is_the_top_left_of_each_window(tiny_sdpa):
    model, processor = tiny_sdpa
    inputs = make_inputs(processor, 1, model)
    with lmmsqueeze.apply(model, "pool") as run:
        logits = model(**inputs).logits
    # 6x6 grid -> 3x3; window (r, c) starts at original row 2r, column 2c: index 12r + 2c
    assert run.trace[0][0].tolist() == [12 * r + 2 * c for r in range(3) for c in range(3)]
    assert run.groups[0][0].tolist() == [(i // 6 // 2) * 3 + (i % 6) // 2 for i in range(36)]
    # the prompt shrank by 27 placeholder tokens
    assert logits.shape[1] == inputs["input_ids"].shape[1] - 27
    assert run.image_tokens_per_layer == [9, 9, 9, 9]


def test_pooled_features_are_window_means(tiny_sdpa):
    """The LLM receives the mean of each 2x2 window of projected features (independent recompute)."""
    model, processor = tiny_sdpa
    inputs = make_inputs(processor, 1, model)
    feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]  # [36, D]
    grid = feats.view(3, 2, 3, 2, -1)
    expected = grid.mean(dim=(1, 3)).reshape(9, -1)
    captured = {}

    def grab(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"]

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with lmmsqueeze.apply(model, "pool"):
            model(**inputs)
    finally:
        handle.remove()
    ids = inputs["input_ids"][0]
    first = int(torch.nonzero(ids == model.config.image_token_id)[0])
    assert torch.allclose(captured["embeds"][0, first:first + 9], expected, atol=1e-6)


def test_stage_trace_composes_original_indices(tiny_sdpa):
    model, processor = tiny_sdpa
    inputs = make_inputs(processor, 1, model)
    with lmmsqueeze.apply(model, "random(keep=20, seed=5) | random(layer=1, keep=10, seed=2)") as run:
        model(**inputs)
    first, second = run.trace[0][0], run.trace[1][0]
    assert first.numel() == 20 and second.numel() == 10
    assert set(second.tolist()) <= set(first.tolist())
    # the second stage's choice, replayed by hand: the seed-2 top-10 of the 20 survivors
    scores = torch.rand(20, generator=torch.Generator().manual_seed(2))
    expected = torch.sort(first[torch.sort(scores, descending=True, stable=True).indices[:10]]).values
    assert torch.equal(second, expected)
