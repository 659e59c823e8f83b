"""Signal probes against eager attention weights, and signals delivered to reducers at run time."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaConfig, LlamaRotaryEmbedding, rotate_half

import lmmsqueeze
from lmmsqueeze import PipelineError, ScoredPruner, register_reducer
from lmmsqueeze.attention import apply_rope, cls_query_attention
from lmmsqueeze.models import preset
from lmmsqueeze.reducers import unregister_reducer
from lmmsqueeze.reducers.base import SIGNALS
from lmmsqueeze.testing import tiny_inputs

pytestmark = pytest.mark.usefixtures("no_grad")


@pytest.fixture(scope="module")
def cls_pruner():
    @register_reducer("test_cls_top", family="pruning", placements=("projector", "llm"),
                      needs=("cls_attention",), keeps_grid=False, cite="test")
    @dataclass(frozen=True)
    class ClsTop(ScoredPruner):
        """Keep the tokens the [CLS] token attends to most."""

        keep: int | float = 0.5
        layer: int | None = None

        def score(self, state, signals):
            return signals.require("cls_attention")

    yield "test_cls_top"
    unregister_reducer("test_cls_top")


def _eager_vision_cls_row(model, pixel_values):
    vision = model.model.vision_tower
    original = vision.config._attn_implementation
    vision.set_attn_implementation("eager")
    try:
        out = vision(pixel_values, output_attentions=True, output_hidden_states=True)
    finally:
        vision.set_attn_implementation(original)
    # vision_feature_layer=-2 on a 2-layer tower selects hidden_states[1], the output of layers[0]
    return out.attentions[0][:, :, 0].mean(1)  # [images, 1 + patches]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rope_is_llamas_formula_to_the_bit(dtype):
    """``apply_rope`` (halves updated in place) equals transformers' ``q * cos + rotate_half(q) * sin``
    bit for bit, on Llama's own cos/sin, for a transposed [B, H, N, hd] view as the layers pass it; its
    gradient agrees too."""
    config = LlamaConfig(hidden_size=128, num_attention_heads=2, rope_theta=10000.0)
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(2, 37, 2, 64, generator=generator).mul(30).to(dtype).transpose(1, 2)
    cos, sin = LlamaRotaryEmbedding(config)(x, torch.arange(37)[None].expand(2, -1) * 7)
    expected = x * cos[:, None] + rotate_half(x) * sin[:, None]
    assert torch.equal(apply_rope(x, cos, sin), expected)
    leaf = x.float().detach().requires_grad_()
    weights = torch.randn(leaf.shape, generator=generator)
    with torch.enable_grad():  # the module's tests run under no_grad
        (apply_rope(leaf, cos.float(), sin.float()) * weights).sum().backward()
        ours, leaf.grad = leaf.grad, None
        ((leaf * cos.float()[:, None] + rotate_half(leaf) * sin.float()[:, None]) * weights).sum().backward()
    assert torch.allclose(ours, leaf.grad, atol=1e-5)


def test_cls_probe_matches_eager_weights(tiny_sdpa):
    model, processor = tiny_sdpa
    inputs = tiny_inputs(processor, 2)
    layer = model.model.vision_tower.encoder.layers[0]
    captured = {}

    def grab(module, args, kwargs, output):
        captured["h"] = kwargs["hidden_states"]

    handle = layer.self_attn.register_forward_hook(grab, with_kwargs=True)
    try:
        model.model.vision_tower(inputs["pixel_values"])
    finally:
        handle.remove()
    probe = cls_query_attention(layer.self_attn, captured["h"])
    assert torch.allclose(probe, _eager_vision_cls_row(model, inputs["pixel_values"]), atol=1e-6)


@pytest.mark.parametrize("placement", ["", ", layer=2"])
def test_cls_attention_reaches_reducers_at_every_placement(tiny, cls_pruner, placement):
    model, processor = tiny
    inputs = tiny_inputs(processor, 2)
    with lmmsqueeze.apply(model, f"{cls_pruner}(keep=7{placement})") as run:
        model(**inputs)
    rows = _eager_vision_cls_row(model, inputs["pixel_values"])[:, 1:]  # drop [CLS] itself
    for b in range(2):
        expected = torch.sort(torch.topk(rows[b], 7).indices).values
        assert torch.equal(run.trace[0][b], expected)


def test_tiny_llava_provides_both_signals(tiny_sdpa):
    from lmmsqueeze.models import family_for

    adapter = family_for(tiny_sdpa[0])
    assert {"text_attention", "cls_attention", "vision_keys", "llm_keys"} <= adapter.geometry.signals
    assert adapter.vision_attention is tiny_sdpa[0].model.vision_tower.encoder.layers[0].self_attn


def test_a_need_the_model_cannot_provide_is_refused(cls_pruner):
    geometry = dataclasses.replace(preset("llava-1.5-7b"), name="siglip-llava",
                                   signals=frozenset({"text_attention"}))
    with pytest.raises(PipelineError, match="needs cls_attention, which siglip-llava cannot provide"):
        lmmsqueeze.compile(f"{cls_pruner}(keep=0.5)", geometry)


RECORDED: list = []


@pytest.fixture(scope="module")
def recorder():
    @register_reducer("test_recorder", family="pruning", placements=("projector", "llm"),
                      needs=tuple(set(SIGNALS) - {"cls_hidden"}), keeps_grid=True, cite="test")
    @dataclass(frozen=True)
    class Recorder(ScoredPruner):
        """Keep everything; record the signals."""

        keep: int | float = 1.0
        layer: int | None = 2

        def score(self, state, signals):
            RECORDED.append(signals)
            return torch.zeros(state.n)

    yield "test_recorder"
    unregister_reducer("test_recorder")


def test_every_signal_matches_an_independent_recomputation(tiny_sdpa, recorder):
    """Each signal an llm stage at layer 2 receives, against what the model itself computes in eager mode
    (attention maps, the KV cache, hidden states) or the signal's formula on the model's own tensors."""
    model, processor = tiny_sdpa
    inputs = tiny_inputs(processor, 2)
    RECORDED.clear()
    captured = {}
    vision = model.model.vision_tower.encoder.layers

    def keep_first(name):
        def hook(module, args, output):
            if name not in captured:  # the first call is the full-length prefill
                captured[name] = output.detach().clone()

        return hook

    handles = [vision[0].self_attn.k_proj.register_forward_hook(keep_first("vk")),
               vision[1].self_attn.q_proj.register_forward_hook(keep_first("nq")),
               vision[1].self_attn.k_proj.register_forward_hook(keep_first("nk"))]
    try:
        with lmmsqueeze.apply(model, f"{recorder}(layer=2, keep=35)"):  # < 36, so score() runs
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    model.set_attn_implementation("eager")
    try:
        out = model(**inputs, output_attentions=True, output_hidden_states=True, use_cache=True)
    finally:
        model.set_attn_implementation("sdpa")
    before, at = out.attentions[1].mean(1), out.attentions[2].mean(1)  # layers K-1 and K, [B, L, L]
    keys = out.cache.layers[1].keys.transpose(1, 2).flatten(2)  # layer K-1's cache: [B, L, d_kv]
    normed = model.model.language_model.norm(out.hidden_states[2])  # the input of layer K
    embeds = out.hidden_states[0]
    heads = model.config.vision_config.num_attention_heads
    image = inputs["input_ids"] == model.config.image_token_id
    assert len(RECORDED) == 2
    for b, signals in enumerate(RECORDED):
        cols = torch.nonzero(image[b]).flatten()
        after = torch.arange(int(cols.max()) + 1, image.shape[1])
        pad = int((inputs["attention_mask"][b] == 0).sum())
        assert torch.allclose(signals.text_image_attention, before[b][after][:, cols], atol=1e-6)
        assert torch.allclose(signals.text_attention, before[b, -1, cols], atol=1e-6)
        assert torch.allclose(signals.input_text_attention, at[b, -1, cols], atol=1e-6)
        assert torch.allclose(signals.llm_keys, keys[b, cols], atol=1e-5)
        assert torch.allclose(signals.text_keys, keys[b, after], atol=1e-5)
        assert torch.allclose(signals.normed_hidden, normed[b, cols], atol=1e-5)
        assert torch.allclose(signals.text_normed_hidden, normed[b, after], atol=1e-5)
        assert torch.equal(signals.sequence_index, cols - pad)
        assert torch.equal(signals.text_sequence_index, after - pad)
        relevance = (embeds[b, cols] @ embeds[b, after].T).softmax(-1).mean(0)  # SparseVLM's rater formula
        assert torch.allclose(signals.text_relevance, relevance, atol=1e-6)
        vk = captured["vk"][b, 1:]
        assert torch.allclose(signals.vision_keys, vk.view(36, heads, -1).mean(1), atol=1e-6)
        width = captured["nk"].shape[-1]
        cls = (captured["nq"][b, :1] @ captured["nk"][b].T / width ** 0.5).softmax(-1)[0, 1:]
        assert torch.allclose(signals.last_cls_attention, cls, atol=1e-6)
        assert torch.allclose(signals.last_vision_keys, captured["nk"][b, 1:], atol=1e-6)


def test_llm_signals_are_refused_before_the_llm():
    @register_reducer("test_text_scorer", family="pruning", placements=("projector", "llm"),
                      needs=("text_attention",), keeps_grid=False, cite="test")
    @dataclass(frozen=True)
    class TextScorer(ScoredPruner):
        """Reads text attention."""

        layer: int | None = None

    try:
        assert lmmsqueeze.compile("test_text_scorer(layer=3)").stages[0].placement == "llm"
        with pytest.raises(PipelineError, match="reads text_attention, which exists only inside the LLM"):
            lmmsqueeze.compile("test_text_scorer")
    finally:
        unregister_reducer("test_text_scorer")
