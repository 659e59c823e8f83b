"""The prefill runtime against independent references: the unmodified model, eager attention
weights, and no-cache forwards over the same kept tokens."""

from __future__ import annotations

import pytest
import torch

import lmmsqueeze
from lmmsqueeze.runtime import count_hooks
from lmmsqueeze.testing import assert_steps_match, padded_positions, tiny_inputs, to_device

pytestmark = pytest.mark.usefixtures("no_grad")


def make_inputs(processor, batch, model):
    return to_device(tiny_inputs(processor, batch), model.device)


@pytest.mark.parametrize("pipeline", ["", "none", "random(keep=1.0)", "random(keep=1.0, layer=1)",
                                      "random(keep=1.0, layer=3)"])
@pytest.mark.parametrize("batch", [1, 2])
def test_identity_pipelines_are_bit_identical(tiny_dev, pipeline, batch):
    model, processor = tiny_dev
    inputs = make_inputs(processor, batch, model)
    reference = model(**inputs).logits
    with lmmsqueeze.apply(model, pipeline):
        logits = model(**inputs).logits
    assert torch.equal(logits, reference)


def test_hooks_are_removed_even_on_error(tiny_sdpa):
    model, processor = tiny_sdpa
    before = count_hooks(model)
    with pytest.raises(RuntimeError, match="boom"):
        with lmmsqueeze.apply(model, "pool | fastv(layer=2, keep=0.5)"):
            assert count_hooks(model) > before
            raise RuntimeError("boom")
    assert count_hooks(model) == before


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




@pytest.mark.parametrize("batch", [1, 2])
def test_cached_generate_matches_no_cache_forward_after_llm_reduction(tiny_dev, batch):
    model, processor = tiny_dev
    inputs = make_inputs(processor, batch, model)
    pipeline, layer, new_tokens = "random(layer=2, keep=0.5, seed=3)", 2, 5
    prompt_len = inputs["input_ids"].shape[1]
    with lmmsqueeze.apply(model, pipeline) as run:
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False,
                             return_dict_in_generate=True, output_logits=True)
    dropped = 18  # keep=0.5 of 36
    assert run.trace[0][0].numel() == 36 - dropped
    # per-layer KV cache: full prompt below layer K, the kept tokens from K on (+ generated tokens)
    lengths = [out.cache.layers[i].keys.shape[-2] for i in range(4)]
    full = prompt_len + new_tokens - 1
    assert lengths == [full] * layer + [full - dropped] * (4 - layer)

    sequences = out.sequences
    generated = torch.ones(batch, new_tokens, dtype=torch.long, device=model.device)
    mask = torch.cat([inputs["attention_mask"], generated], 1)
    with lmmsqueeze.apply(model, pipeline) as ref_run:
        logits = model(input_ids=sequences, pixel_values=inputs["pixel_values"], attention_mask=mask,
                       position_ids=padded_positions(mask), use_cache=False).logits
    for b in range(batch):
        assert torch.equal(ref_run.trace[0][b], run.trace[0][b])
    rows = ref_run.output_positions
    assert_steps_match(out.logits, logits, rows, prompt_len)


@pytest.mark.parametrize("pipeline", ["pool", "random(keep=10, seed=1)", "pool | random(layer=2, keep=4)"])
@pytest.mark.parametrize("batch", [1, 2])
def test_projector_reduction_generate_equals_forward_loop(tiny_dev, pipeline, batch):
    model, processor = tiny_dev
    inputs = make_inputs(processor, batch, model)
    steps = 5
    with lmmsqueeze.apply(model, pipeline):
        generated = model.generate(**inputs, max_new_tokens=steps, do_sample=False)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        for _ in range(steps):
            logits = model(input_ids=ids, pixel_values=inputs["pixel_values"], attention_mask=mask,
                           position_ids=padded_positions(mask), use_cache=False).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    assert torch.equal(generated, ids)


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


@pytest.mark.parametrize("pipeline", ["random(layer=2, keep=0.5, seed=3)",
                                      "fastv(layer=1, keep=0.5) | random(layer=3, keep=5)",
                                      "proxyv(layer=2, factor=2)",
                                      "fastv(layer=1, keep=0.5) | proxyv(layer=2, variant=nonspatial, proxies=4)"])
def test_samples_with_different_image_counts_compute_what_they_compute_alone(tiny_dev, pipeline):
    """One image in sample 0, two in sample 1: llm stages keep different numbers of tokens per sample
    and ProxyV sees different grids; the batched generate must give each sample the logits it gets alone."""
    from lmmsqueeze.testing import random_image

    model, processor = tiny_dev
    texts = ["USER: <image>\nwhat is the colour ? ASSISTANT:", "USER: <image>\n<image>\nhow many ? ASSISTANT:"]
    images = [random_image(0), random_image(1), random_image(2)]
    inputs = to_device(processor(images=images, text=texts, return_tensors="pt", padding=True), model.device)
    with lmmsqueeze.apply(model, pipeline) as run:
        batched = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                                 output_logits=True)
    halves = [t.numel() for t in run.trace[0]]
    assert halves == ([36, 72] if pipeline.startswith("proxyv") else [18, 36])  # all, or half of 36 and of 72
    for b, pictures in enumerate([images[:1], images[1:]]):
        alone = to_device(processor(images=pictures if len(pictures) > 1 else pictures[0], text=texts[b],
                                    return_tensors="pt"), model.device)
        with lmmsqueeze.apply(model, pipeline) as single_run:
            single = model.generate(**alone, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                                    output_logits=True)
        assert torch.equal(single_run.trace[-1][0], run.trace[-1][b])
        for step in range(4):
            assert (batched.logits[step][b] - single.logits[step][0]).abs().max() < 1e-4


@pytest.mark.parametrize("pipeline", ["pool", "fastv(layer=2, keep=0.5)", "pool | random(layer=1, keep=3)",
                                      "proxyv(layer=2, factor=2)", "pool | proxyv(layer=1, variant=nonspatial, proxies=2)"])
def test_a_text_only_sample_in_the_batch_is_left_alone(tiny_dev, pipeline):
    """Sample 1 has no image: it computes what it computes alone; sample 0 what it gets alone."""
    from lmmsqueeze.testing import random_image

    model, processor = tiny_dev
    texts = ["USER: <image>\nwhat is the colour ? ASSISTANT:", "USER: how many ? ASSISTANT:"]
    batch = to_device(processor(images=[random_image(0)], text=texts, return_tensors="pt", padding=True),
                      model.device)
    with lmmsqueeze.apply(model, pipeline) as run:
        out = model.generate(**batch, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
    assert run.trace[0][1].numel() == 0
    image_alone = to_device(processor(images=random_image(0), text=texts[0], return_tensors="pt"), model.device)
    text_alone = to_device(processor(text=texts[1], return_tensors="pt"), model.device)
    with lmmsqueeze.apply(model, pipeline):
        first = model.generate(**image_alone, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                               output_logits=True)
    second = model.generate(**text_alone, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                            output_logits=True)
    for step in range(3):
        assert (out.logits[step][0] - first.logits[step][0]).abs().max() < 1e-4
        assert (out.logits[step][1] - second.logits[step][0]).abs().max() < 1e-4
