"""Qwen2-VL and Qwen2.5-VL (merged patch grid, 3-D M-RoPE) on tiny random models: layouts against the
model's own merger, the M-RoPE ids and rope deltas after a rewrite, [CLS]-free signals, ProxyV on the
merged grid, the CLI and eval costs. The contract every family keeps (identity, every reducer, cached
decoding, FLOPs, mixed batches) is in ``test_families.py``."""

from __future__ import annotations

import pytest
import torch

import lmmsqueeze
from lmmsqueeze.models import family_for
from lmmsqueeze.testing import (
    count_flops,
    noise_image,
    tiny_qwen2_vl,
    tiny_qwen_inputs,
    to_device,
)

pytestmark = pytest.mark.usefixtures("no_grad")

#: 168x168: a 12x12 patch grid, 6x6 = 36 image tokens; 112x168 (w x h): 12x8 patches, 6x4 = 24 tokens
SQUARE = ((168, 168),)
WIDE = ((112, 168),)
VERSIONS = ["2", "2.5"]


@pytest.fixture(scope="module", params=VERSIONS)
def qwen(request, device):
    model, processor = tiny_qwen2_vl(version=request.param)
    return model.to(device), processor


def _inputs(qwen, batch=1, sizes=SQUARE):
    model, processor = qwen
    return to_device(tiny_qwen_inputs(processor, batch, sizes), model.device)


def test_adapter_geometry_and_layouts(qwen):
    model, _ = qwen
    adapter = family_for(model)
    g = adapter.geometry
    assert type(adapter).__name__ == "QwenVLFamily" and adapter.packs_features and adapter.mrope
    assert g.family == model.config.model_type and g.cls_attention == "mean" and g.vision_merge == 4
    assert "cls_attention" in g.signals and g.image_tokens == 576 and g.grids == ((24, 24),)
    inputs = _inputs(qwen, 2, SQUARE + WIDE)
    layouts = adapter.layouts(inputs["image_grid_thw"])
    assert [lay.grids for lay in layouts] == [((6, 6),), ((6, 4),)]
    # the model's own output, against the merger applied to the layout's rows of the last block's output
    visual = model.model.visual
    out = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    rows = adapter.projector_rows(out.last_hidden_state)
    packed = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                            image_grid_thw=inputs["image_grid_thw"],
                                            return_dict=True).pooler_output
    start = 0
    for run, lay in zip(packed, layouts, strict=True):
        mine = rows[start:start + lay.crops].flatten(0, 1)[lay.source.to(rows.device)]
        assert torch.allclose(adapter.project(mine), run, atol=1e-5)
        start += lay.crops
    if model.config.model_type == "qwen2_5_vl":  # windows reorder the 6x6 grid: not the identity
        assert layouts[0].source.tolist() != list(range(36))


def _decoder_positions(model, inputs, pipeline):
    """The position ids the decoder receives for a prompt with ``pipeline`` applied, and the run."""
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["position_ids"]), with_kwargs=True)
    try:
        with lmmsqueeze.apply(model, pipeline) as run:
            model(**inputs)
    finally:
        hook.remove()
    return seen[0], run


def _represented_columns(model, inputs, run, b):
    """For each column of the shorter prompt of sample ``b``, the column of the full prompt whose token
    it is: text keeps its own, an image token is its representative's (first image column + trace)."""
    columns = run.output_positions[b].clone()
    image = torch.nonzero(inputs["input_ids"][b] == model.config.image_token_id).flatten()
    rows = torch.nonzero(torch.isin(columns, image)).flatten()  # the reduced image run, in sequence order
    columns[rows] = image[0] + run.trace[0][b].to(columns.device)
    return columns


def _full_rope_index(model, inputs):
    return model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                      image_grid_thw=inputs["image_grid_thw"],
                                      attention_mask=inputs["attention_mask"])[0]


@pytest.mark.parametrize("pipeline", ["pool(positions=keep)", "random(keep=20, seed=2, positions=keep)",
                                      "visionzip(dominant=10, contextual=4, positions=keep)"])
def test_projector_reduction_keeps_every_tokens_original_mrope_ids(qwen, pipeline):
    """positions=keep: the prompt shrinks; each kept column (text, and every surviving image token)
    enters the decoder with the M-RoPE ids the model gives it in the full prompt; rope deltas match
    the shorter prompt."""
    model, _ = qwen
    inputs = _inputs(qwen, 2, SQUARE + WIDE)
    full = _full_rope_index(model, inputs)
    pos, run = _decoder_positions(model, inputs, pipeline)
    assert pos.shape[0] == 4
    columns = run.output_positions
    real = columns >= 0
    for b in range(2):
        represented = _represented_columns(model, inputs, run, b)
        assert torch.equal(pos[1:, b][:, real[b]], full[:, b, represented[real[b]]])
        # deltas as get_rope_index defines them, over the shorter prompt's real tokens
        tokens = real[b] & (inputs["attention_mask"][b][columns[b].clamp(min=0)] == 1)
        removed = int(inputs["mm_token_type_ids"][b].sum()) - run.trace[0][b].numel()
        assert int(tokens.sum()) == int(inputs["attention_mask"][b].sum()) - removed
        assert int(model.model.rope_deltas[b]) == int(pos[1:, b][:, tokens].max()) + 1 - int(tokens.sum())
    assert pos.shape[-1] < inputs["input_ids"].shape[1]


def test_pooling_renumbers_as_the_model_numbers_the_pooled_image(qwen):
    """positions=renumber (pool's default): the pooled image is numbered as the model numbers an image
    of the pooled grid (its own get_rope_index on a prompt with that many placeholders and that grid)."""
    model, processor = qwen
    inputs = _inputs(qwen, 1, SQUARE)
    pos, run = _decoder_positions(model, inputs, "pool")
    ids = inputs["input_ids"][0]
    image = ids == model.config.image_token_id
    first = int(torch.nonzero(image)[0])
    # 6x6 -> 3x3 merged tokens
    pooled = torch.cat([ids[:first], ids[first:first + 9], ids[first + 36:]])[None]
    types = (pooled == model.config.image_token_id).long()
    expected, _ = model.model.get_rope_index(pooled, mm_token_type_ids=types,
                                             image_grid_thw=torch.tensor([[1, 6, 6]], device=ids.device))
    assert torch.equal(pos[1:, 0], expected[:, 0])


def test_pruning_renumbers_by_the_models_rule(qwen):
    """positions=renumber after a pruner (no grid left): each kept image token keeps its (row, column)
    offset in its image, and the text after the image follows the largest kept offset, as the model's
    own rule would number the shorter prompt (a plain loop over the columns)."""
    model, _ = qwen
    inputs = _inputs(qwen, 1, SQUARE)
    full = _full_rope_index(model, inputs)[:, 0]
    pos, run = _decoder_positions(model, inputs, "random(keep=12, seed=3)")
    columns = _represented_columns(model, inputs, run, 0).tolist()
    image = (inputs["input_ids"][0] == model.config.image_token_id).tolist()
    start = full[0, image.index(True)]
    expected, nxt, offsets = [], 0, []
    for col in columns:
        if image[col]:
            offsets.append(full[:, col] - start)
            continue
        if offsets:  # the image run just ended: it took its kept offsets from nxt on
            expected += [nxt + o for o in offsets]
            nxt = nxt + int(torch.stack(offsets).max()) + 1
            offsets = []
        expected.append(torch.full((3,), nxt))
        nxt += 1
    assert torch.equal(pos[1:, 0], torch.stack(expected, 1).to(pos.dtype))


def test_manual_decode_without_position_ids_uses_consistent_rope_deltas(qwen):
    """A decode loop that passes no position ids gets them from the model's rope deltas, which the
    rewrite keeps consistent with the shorter cache: the same logits as generate. (Steps pass no
    attention mask: with one, transformers 5.24 builds full-length ids and fails even without lmmsqueeze.)"""
    model, _ = qwen
    inputs = _inputs(qwen, 1, SQUARE)
    steps = 3
    with lmmsqueeze.apply(model, "pool"):
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
        step = model(**inputs, use_cache=True)
        cache = step.cache
        for i in range(steps):
            assert (step.logits[:, -1] - out.logits[i]).abs().max() < 1e-4
            nxt = step.logits[:, -1].argmax(-1, keepdim=True)
            step = model(input_ids=nxt, cache=cache, use_cache=True)
            cache = step.cache


def _reference_received_attention(model, inputs, per_patch=False):
    """Mean attention each merged token (or patch) receives in the last vision block: the full
    attention matrix per image, written out with the model's own RoPE function; and the block's inputs."""
    attn = model.model.visual.blocks[-1].attn
    captured = {}
    handle = attn.register_forward_pre_hook(
        lambda m, a, kw: captured.update(kw, hidden_states=kw.get("hidden_states", a[0] if a else None)),
        with_kwargs=True)
    try:
        model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    finally:
        handle.remove()
    module = __import__(type(attn).__module__, fromlist=["apply_rotary_pos_emb_vision"])
    hidden = captured["hidden_states"]
    s = hidden.shape[0]
    q, k, _ = attn.qkv(hidden).reshape(s, 3, attn.num_heads, -1).unbind(1)
    cos, sin = captured["position_embeddings"]
    q, k = module.apply_rotary_pos_emb_vision(q, k, cos, sin)
    bounds = captured["cu_seqlens"].tolist()
    out = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        weights = torch.softmax(torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]) * attn.scaling, dim=-1)
        out.append(weights.mean(dim=(0, 1)))
    received = torch.cat(out)
    return (received, captured) if per_patch else received.view(-1, 4).mean(1)


def test_mean_received_attention_in_chunks_equals_the_full_matrix(qwen):
    from lmmsqueeze.attention import mean_received_attention

    model, _ = qwen
    inputs = _inputs(qwen, 2, SQUARE + WIDE)  # two images: two segments
    received, captured = _reference_received_attention(model, inputs, per_patch=True)
    attn = model.model.visual.blocks[-1].attn
    for budget in (2 ** 26, 7 * attn.num_heads * 144):  # one chunk; chunks of 7 queries
        ours = mean_received_attention(attn, captured["hidden_states"], captured["cu_seqlens"],
                                       captured["position_embeddings"], budget=budget)
        assert torch.allclose(ours, received, atol=1e-6)


def test_cls_reducers_read_the_mean_received_attention(qwen):
    model, _ = qwen
    inputs = _inputs(qwen, 1, SQUARE)
    adapter = family_for(model)
    received = _reference_received_attention(model, inputs)
    raster = received[adapter.layouts(inputs["image_grid_thw"])[0].source.to(received.device)]
    with lmmsqueeze.apply(model, "fastervlm(keep=9)") as run:
        model(**inputs)
    assert run.trace[0][0].tolist() == sorted(torch.topk(raster, 9).indices.tolist())
    plan = lmmsqueeze.compile("fastervlm(keep=9)", model)
    assert "mean attention each image token receives" in plan.notes()[0]


def test_spatial_proxies_sit_on_the_merged_grid(qwen):
    """factor=2 on a 6x6 grid: 3x3 proxies whose M-RoPE ids are (s, s + row, s + column) from the
    image's first id s, as Qwen2-VL lays out an image."""
    model, _ = qwen
    inputs = _inputs(qwen, 1, SQUARE)
    full, _ = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                         image_grid_thw=inputs["image_grid_thw"])
    first = int(torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id)[0])
    s = int(full[0, 0, first])
    with lmmsqueeze.apply(model, "proxyv(layer=2, factor=2)") as run:
        model(**inputs)
    state = run.scratch["proxyv"]
    assert state.proxies.shape[1] == 9
    ids = torch.tensor([[s] * 9, [s + r for r in range(3) for _ in range(3)],
                        [s + c for _ in range(3) for c in range(3)]], device=model.device)[:, None]
    cos, sin = model.model.language_model.rotary_emb(state.proxies, ids)
    assert torch.allclose(state.proxy_rope[0], cos) and torch.allclose(state.proxy_rope[1], sin)


def test_explain_preset_qwen2_vl_notes_the_cls_stand_in():
    import json

    from typer.testing import CliRunner

    from lmmsqueeze.cli import app

    result = CliRunner().invoke(app, ["explain", "visionzip", "--model-config", "qwen2-vl-7b"])
    assert result.exit_code == 0, result.output
    assert "note: visionzip: qwen2-vl-7b has no [CLS] token" in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["explain", "proxyv(layer=14)", "--model-config", "qwen2-vl-7b",
                                      "--json"])
    data = json.loads(result.stdout)
    assert data["image_tokens"] == 576 and data["notes"] == []


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen")
    model, processor = tiny_qwen2_vl(version="2.5")
    model.save_pretrained(path / "m")
    processor.save_pretrained(path / "m")
    noise_image(0, 112, 168).save(path / "i.png")
    return path


def test_cli_runs_a_local_qwen_directory(qwen_dir):
    """Loaded offline (the image-only processor stands in for Qwen2VLProcessor, which needs torchvision)."""
    import json

    from typer.testing import CliRunner

    from lmmsqueeze.cli import app

    result = CliRunner().invoke(app, ["run", "-m", str(qwen_dir / "m"), "-i", str(qwen_dir / "i.png"),
                                      "--prompt", "what ?", "-p", "pool | fastv(layer=2, keep=0.5)",
                                      "--max-new-tokens", "2", "--json"])
    assert result.exit_code == 0, result.output
    # a 112x168 (w x h) image: 12x8 patches, a 6x4 merged grid -> pooled 3x2 = 6 -> 3 from layer 2
    assert json.loads(result.stdout)["image_tokens_per_layer"] == [6, 6, 3, 3]


def test_image_geometries_follow_each_images_grid(qwen):
    model, _ = qwen
    adapter = family_for(model)
    inputs = _inputs(qwen, 2, SQUARE + WIDE)
    assert [(g.image_tokens, g.grids, g.vision_tokens) for g in adapter.image_geometries(inputs)] == [
        (36, ((6, 6),), 144), (24, ((6, 4),), 96)]


def test_eval_costs_use_the_real_image_grid(qwen_dir, tmp_path):
    """The bundled task's images give 3x3 merged grids on this model: the row's FLOPs are what
    torch's counter measures on that sample's prefill (decoder only), not the reference 24x24 grid's."""
    import json

    from typer.testing import CliRunner

    from lmmsqueeze.cli import app
    from lmmsqueeze.evaluation.tasks import get_task
    from lmmsqueeze.runtime.loading import build_prompt

    result = CliRunner().invoke(app, ["eval", "-m", str(qwen_dir / "m"), "-p", "pool(size=3)", "--limit", "1",
                                      "--results", str(tmp_path / "r.db"), "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    assert row["image_tokens_per_layer"] == [1, 1, 1, 1]
    # the saved model's shapes; eager: countable
    model, processor = tiny_qwen2_vl(attn="eager", version="2.5")
    sample = get_task("bundled").samples("test", 1, 0)[0]
    inputs = processor(images=sample.image, text=build_prompt(processor, sample.question),
                       return_tensors="pt")
    assert int(inputs["mm_token_type_ids"].sum()) == 9
    text_config = model.config.text_config
    lm_head = 2 * text_config.hidden_size * text_config.vocab_size  # the last position's logits
    vision = count_flops(lambda: model.model.visual(inputs["pixel_values"],
                                                    grid_thw=inputs["image_grid_thw"]))
    vanilla = count_flops(lambda: model(**inputs, logits_to_keep=1)) - vision - lm_head
    with lmmsqueeze.apply(model, "pool(size=3)"):
        pooled = count_flops(lambda: model(**inputs, logits_to_keep=1)) - vision - lm_head
    assert (row["vanilla_prefill_flops"], row["prefill_flops"]) == (vanilla, pooled)


def test_show_draws_the_merged_grid_over_the_whole_image(qwen_dir, tmp_path):
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from lmmsqueeze.cli import app
    from lmmsqueeze.visualize import MARGIN, TITLE_HEIGHT

    out = tmp_path / "show.png"
    result = CliRunner().invoke(app, ["show", "-m", str(qwen_dir / "m"), "-i", str(qwen_dir / "i.png"),
                                      "--prompt", "what ?", "-p", "pool", "--out", str(out),
                                      "--panel-size", "96", "--json"])
    assert result.exit_code == 0, result.output
    assert [s["tokens"] for s in json.loads(result.stdout)["stages"]] == [6]
    # the 6x4 merged grid of a 112x168 image: 64x96 panels
    assert Image.open(out).size == (2 * (64 + MARGIN) + MARGIN, TITLE_HEIGHT + MARGIN + 96 + MARGIN)
