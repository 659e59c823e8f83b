"""Qwen2-VL and Qwen2.5-VL (merged patch grid, 3-D M-RoPE) on tiny random models: identity, the
M-RoPE ids and rope deltas after a rewrite, cache consistency, every reducer, [CLS]-free signals,
ProxyV on the merged grid, multi-image prompts, mixed batches and costs against the counter."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lmmsqueeze
from lmmsqueeze.models import family_for
from lmmsqueeze.runtime import count_hooks
from lmmsqueeze.reducers import list_reducers
from lmmsqueeze.testing import (
    PROMPTS,
    assert_steps_match,
    count_flops,
    noise_image,
    qwen_prompt,
    tiny_pipeline,
    tiny_qwen2_vl,
    tiny_qwen_inputs,
    to_device,
    tokens_per_layer_as_run,
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


@pytest.fixture(scope="module", params=VERSIONS)
def qwen_eager(request):
    return tiny_qwen2_vl(attn="eager", version=request.param)


def _inputs(qwen, batch=1, sizes=SQUARE):
    model, processor = qwen
    return to_device(tiny_qwen_inputs(processor, batch, sizes), model.device)


def _grow(inputs, ids):
    """The prompt plus generated tokens, as a no-cache forward takes it."""
    extra = ids.shape[1] - inputs["input_ids"].shape[1]
    ones = torch.ones(ids.shape[0], extra, dtype=inputs["attention_mask"].dtype, device=ids.device)
    zeros = torch.zeros(ids.shape[0], extra, dtype=inputs["mm_token_type_ids"].dtype, device=ids.device)
    return {**inputs, "input_ids": ids, "attention_mask": torch.cat([inputs["attention_mask"], ones], 1),
            "mm_token_type_ids": torch.cat([inputs["mm_token_type_ids"], zeros], 1)}


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
                                            image_grid_thw=inputs["image_grid_thw"], return_dict=True).pooler_output
    start = 0
    for run, lay in zip(packed, layouts):
        mine = rows[start:start + lay.crops].flatten(0, 1)[lay.source.to(rows.device)]
        assert torch.allclose(adapter.project(mine), run, atol=1e-5)
        start += lay.crops
    if model.config.model_type == "qwen2_5_vl":  # windows reorder the 6x6 grid: not the identity
        assert layouts[0].source.tolist() != list(range(36))


@pytest.mark.parametrize("pipeline", ["", "none", "random(keep=1.0)", "random(keep=1.0, layer=1)",
                                      "tome(keep=1.0)", "proxyv(layer=4)"])
@pytest.mark.parametrize("sizes, batch", [(SQUARE, 1), (SQUARE + WIDE, 2)])
def test_identity_pipelines_are_bit_identical(qwen, pipeline, sizes, batch):
    model, _ = qwen
    inputs = _inputs(qwen, batch, sizes)
    reference = model(**inputs).logits
    before = count_hooks(model)
    with lmmsqueeze.apply(model, pipeline):
        logits = model(**inputs).logits
    assert torch.equal(logits, reference)
    assert count_hooks(model) == before and "get_image_features" not in vars(model.model)


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
    pooled = torch.cat([ids[:first], ids[first:first + 9], ids[first + 36:]])[None]  # 6x6 -> 3x3 merged tokens
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


@pytest.mark.parametrize("pipeline", ["pool", "visionzip(dominant=10, contextual=4)", "pool | random(layer=2, keep=4)",
                                      "random(keep=12, seed=3, positions=keep) | random(layer=2, keep=5, "
                                      "positions=renumber)"])
@pytest.mark.parametrize("sizes, batch", [(SQUARE, 1), (SQUARE + WIDE, 2)])
def test_projector_reduction_generate_equals_no_cache_forward_loop(qwen, pipeline, sizes, batch):
    """Cached generate (M-RoPE ids from generate's prefill positions) equals recomputing the whole
    prompt with the pipeline at every step, positions computed by the model from scratch."""
    model, _ = qwen
    inputs = _inputs(qwen, batch, sizes)
    steps = 4
    with lmmsqueeze.apply(model, pipeline):
        generated = model.generate(**inputs, max_new_tokens=steps, do_sample=False)
        ids = inputs["input_ids"]
        for _ in range(steps):
            logits = model(**_grow(inputs, ids), use_cache=False).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(generated, ids)


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


@pytest.mark.parametrize("pipeline", ["random(layer=2, keep=0.5, seed=3)", "divprune(layer=1, keep=10)",
                                      "proxyv(layer=2, factor=2)", "proxyv(layer=1, variant=nonspatial, proxies=4)",
                                      "pool | proxyv(layer=2, variant=nonspatial, proxies=3)"])
@pytest.mark.parametrize("batch", [1, 2])
def test_cached_generate_matches_no_cache_forward(qwen, pipeline, batch):
    model, _ = qwen
    inputs = _inputs(qwen, batch, SQUARE)
    steps = 3
    prompt = inputs["input_ids"].shape[1]
    with lmmsqueeze.apply(model, pipeline) as run:
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
        logits = model(**_grow(inputs, out.sequences), use_cache=False).logits
        rows = run.output_positions
    if pipeline.startswith("random"):
        full = prompt + steps - 1
        assert [out.cache.layers[i].keys.shape[-2] for i in range(4)] == [full] * 2 + [full - 18] * 2
    assert_steps_match(out.logits, logits, rows, prompt)



@pytest.mark.parametrize("name", list_reducers())
def test_every_reducer_runs_end_to_end(qwen, name):
    """Every layer's KV cache holds the prompt less the image tokens the plan (for this image's 6x6
    grid) says are gone by that layer."""
    model, _ = qwen
    inputs = _inputs(qwen, 2, SQUARE)
    geometry = family_for(model).image_geometries(inputs)[0]
    plan = lmmsqueeze.compile(tiny_pipeline(name), geometry)  # nothing is refused on Qwen2-VL
    with lmmsqueeze.apply(model, plan) as run:
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    prompt = inputs["input_ids"].shape[1]
    assert [layer.keys.shape[-2] for layer in out.cache.layers] == [
        prompt - (36 - tokens) + 1 for tokens in tokens_per_layer_as_run(run, geometry)]
    for stage_trace in run.trace:
        for b in range(2):
            assert stage_trace[b].numel() == 0 or int(stage_trace[b].max()) < 36
    assert run.image_tokens_per_layer[-1] == run.trace[-1][0].numel()


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
    for a, b in zip(bounds[:-1], bounds[1:]):
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


def test_multi_image_prompt(qwen):
    model, processor = qwen
    images = [noise_image(i, w, h)
              for i, (w, h) in enumerate(SQUARE + WIDE)]
    text = qwen_prompt("USER: <image> <image>\ndescribe ASSISTANT:")
    inputs = to_device(processor(images=images, text=text), model.device)
    assert int(inputs["mm_token_type_ids"].sum()) == 36 + 24
    reference = model(**inputs).logits
    with lmmsqueeze.apply(model, "random(keep=1.0)"):
        assert torch.equal(model(**inputs).logits, reference)
    for pipeline, image_tokens in [("pool", 9 + 6), ("random(layer=2, keep=0.5)", 30), ("proxyv(layer=2, factor=2)", 60),
                                   ("pool | proxyv(layer=2, variant=nonspatial)", 15)]:
        with lmmsqueeze.apply(model, pipeline) as run:
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                                 output_logits=True)
            logits = model(**_grow(inputs, out.sequences), use_cache=False).logits
            rows = run.output_positions
        assert run.image_tokens_per_layer[-1] == image_tokens
        assert_steps_match(out.logits, logits, rows, inputs["input_ids"].shape[1])
        if pipeline == "pool":  # one group per image, both merged grids
            assert run.prefill.samples[0].meta.grids == ((3, 3), (3, 2))


def test_batch_with_different_image_token_counts(qwen):
    """A 36-token and a 24-token sample: every kind of stage gives each sample what it gets alone."""
    model, processor = qwen
    inputs = _inputs(qwen, 2, SQUARE + WIDE)
    for pipeline in ["pool", "fastv(layer=2, keep=0.5)", "proxyv(layer=2, factor=2)",
                     "fastv(layer=1, keep=0.5) | proxyv(layer=2, variant=nonspatial, proxies=3)"]:
        with lmmsqueeze.apply(model, pipeline) as run:
            batched = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                                     output_logits=True)
        if pipeline.startswith("fastv(layer=2"):
            assert [t.numel() for t in run.trace[0]] == [18, 12]
        for b, (w, h) in enumerate(SQUARE + WIDE):
            image = noise_image(b, w, h)
            alone = to_device(processor(images=image, text=qwen_prompt(PROMPTS[b])), model.device)
            with lmmsqueeze.apply(model, pipeline):
                single = model.generate(**alone, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                                        output_logits=True)
            for step in range(3):
                assert (batched.logits[step][b] - single.logits[step][0]).abs().max() < 1e-4, (pipeline, b, step)



@pytest.mark.parametrize("pipeline", ["none", "proxyv(layer=2, factor=2)",
                                      "proxyv(layer=1, variant=nonspatial, proxies=4)",
                                      "pool | proxyv(layer=2, factor=1)", "fastv(layer=2, keep=0.5)",
                                      "visionzip(dominant=10, contextual=4)", "fastervlm(keep=9)"])
def test_analytic_prefill_flops_match_the_counter(qwen_eager, pipeline):
    """The vision tower and merger run as usual (vision stages merge their survivors again); the
    [CLS]-free probe computes all of the last block's Q K^T."""
    model, processor = qwen_eager
    inputs = tiny_qwen_inputs(processor, 1, SQUARE)
    g = dataclasses.replace(family_for(model).geometry, image_tokens=36, grids=((6, 6),), vision_tokens=144)
    plan = lmmsqueeze.compile(pipeline, g)
    text = inputs["input_ids"].shape[1] - 36
    with lmmsqueeze.apply(model, plan):
        total = count_flops(lambda: model(**inputs, logits_to_keep=1))
    vision = count_flops(lambda: model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]))
    unit, d = 4 * g.vision_hidden_size, g.hidden_size
    again = plan.at("vision")[-1].tokens_out if plan.at("vision") else 0
    cost = plan.cost(text_tokens=text)
    measured = total - vision - 2 * again * (unit * unit + unit * d) - 2 * cost.lm_head
    assert measured == cost.prefill_flops


def test_explain_preset_qwen2_vl_notes_the_cls_stand_in():
    import json

    from typer.testing import CliRunner

    from lmmsqueeze.cli import app

    result = CliRunner().invoke(app, ["explain", "visionzip", "--model-config", "qwen2-vl-7b"])
    assert result.exit_code == 0, result.output
    assert "note: visionzip: qwen2-vl-7b has no [CLS] token" in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["explain", "proxyv(layer=14)", "--model-config", "qwen2-vl-7b", "--json"])
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

    result = CliRunner().invoke(app, ["run", "-m", str(qwen_dir / "m"), "-i", str(qwen_dir / "i.png"), "--prompt",
                                      "what ?", "-p", "pool | fastv(layer=2, keep=0.5)", "--max-new-tokens", "2",
                                      "--json"])
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
    model, processor = tiny_qwen2_vl(attn="eager", version="2.5")  # the saved model's shapes; eager: countable
    sample = get_task("bundled").samples("test", 1, 0)[0]
    inputs = processor(images=sample.image, text=build_prompt(processor, sample.question))
    assert int(inputs["mm_token_type_ids"].sum()) == 9
    text_config = model.config.text_config
    lm_head = 2 * text_config.hidden_size * text_config.vocab_size  # the last position's logits
    vision = count_flops(lambda: model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]))
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
    result = CliRunner().invoke(app, ["show", "-m", str(qwen_dir / "m"), "-i", str(qwen_dir / "i.png"), "--prompt",
                                      "what ?", "-p", "pool", "--out", str(out), "--panel-size", "96", "--json"])
    assert result.exit_code == 0, result.output
    assert [s["tokens"] for s in json.loads(result.stdout)["stages"]] == [6]
    # the 6x4 merged grid of a 112x168 image: 64x96 panels
    assert Image.open(out).size == (2 * (64 + MARGIN) + MARGIN, TITLE_HEIGHT + MARGIN + 96 + MARGIN)


@pytest.mark.parametrize("pipeline", ["pool", "fastv(layer=2, keep=0.5)", "pool | random(layer=1, keep=3)",
                                      "proxyv(layer=2, factor=2)", "pool | proxyv(layer=1, variant=nonspatial, proxies=2)"])
def test_a_text_only_sample_in_the_batch_is_left_alone(qwen, pipeline):
    model, processor = qwen
    texts = [qwen_prompt(PROMPTS[0]), "USER: how many ? ASSISTANT:"]
    batch = to_device(processor(images=[noise_image(0, 168, 168)], text=texts, padding=True), model.device)
    with lmmsqueeze.apply(model, pipeline) as run:
        out = model.generate(**batch, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
    assert run.trace[0][1].numel() == 0
    with lmmsqueeze.apply(model, pipeline):
        first = model.generate(**to_device(processor(images=noise_image(0, 168, 168), text=texts[0]), model.device),
                               max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True)
    second = model.generate(**to_device(processor(text=texts[1]), model.device), max_new_tokens=3, do_sample=False,
                            return_dict_in_generate=True, output_logits=True)
    for step in range(3):
        assert (out.logits[step][0] - first.logits[step][0]).abs().max() < 1e-4
        assert (out.logits[step][1] - second.logits[step][0]).abs().max() < 1e-4
