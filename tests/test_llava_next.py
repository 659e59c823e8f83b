"""LLaVA-NeXT (anyres crops + newline tokens) on tiny random models: identity, cache consistency,
every reducer, newline tokens, per-crop grids, ProxyV and its cost."""

from __future__ import annotations

import pytest
import torch

import lmmsqueeze
from lmmsqueeze.proxyv.stage import proxyv_stage
from lmmsqueeze.models import geometry_from_config
from lmmsqueeze.models import preset
from lmmsqueeze.models import family_for
from lmmsqueeze.runtime import count_hooks
from lmmsqueeze.reducers import list_reducers
from lmmsqueeze.testing import (
    assert_steps_match,
    count_flops,
    noise_image,
    padded_positions,
    tiny_llava_next,
    tiny_next_inputs,
    tiny_pipeline,
    to_device,
    tokens_per_layer_as_run,
)

pytestmark = pytest.mark.usefixtures("no_grad")

#: a 64x64 image: 4x4 base crop + 8x8 sub-crop grid (80 image tokens) + 8 newline tokens
SQUARE = ((64, 64),)
#: a 64x48 image (w x h): the sub-crop grid is unpadded to 6x8 (64 image tokens) + 6 newline tokens
WIDE = ((64, 48),)


@pytest.fixture(scope="module")
def next_sdpa(device):
    model, processor = tiny_llava_next(attn="sdpa")
    return model.to(device), processor


def _inputs(model, processor, batch=1, sizes=SQUARE):
    return to_device(tiny_next_inputs(processor, batch, sizes), model.device)


@pytest.fixture(scope="module")
def next_eager():
    return tiny_llava_next(attn="eager")




class _Embeds:
    """Captures the embeddings entering the decoder at prefill and finds the newline rows."""

    def __init__(self, model):
        self.model, self.rows = model, []

    def __enter__(self):
        def grab(module, args, kwargs):
            emb = kwargs.get("inputs_embeds")
            if emb is not None and emb.shape[1] > 1:
                self.rows.append(emb)

        self.handle = self.model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def newlines(self, i: int = 0) -> torch.Tensor:
        """``[B, L]`` True where the prefill's embedding is the image_newline vector."""
        newline = self.model.model.image_newline.to(self.rows[i].dtype)
        return (self.rows[i] == newline).all(-1)


def test_adapter_and_geometry(next_sdpa):
    model, _ = next_sdpa
    adapter = family_for(model)
    assert type(adapter).__name__ == "LlavaNextFamily" and adapter.packs_features
    g = adapter.geometry
    assert g.family == "llava_next" and g.image_tokens == 80 and g.grids == ((4, 4), (8, 8))
    assert geometry_from_config(model.config).vision_crops == 5
    big = preset("llava-next-7b")
    assert big.image_tokens == 2880 and big.grids == ((24, 24), (48, 48)) and big.num_layers == 32


def test_layouts_match_the_models_packing(next_sdpa):
    model, processor = next_sdpa
    inputs = _inputs(model, processor, 2, SQUARE + WIDE)
    layouts = family_for(model).layouts(inputs["image_sizes"], "default")
    assert [lay.grids for lay in layouts] == [((4, 4), (8, 8)), ((4, 4), (6, 8))]
    assert [int(lay.separators.sum()) for lay in layouts] == [8, 6]
    packed = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                                            return_dict=True).pooler_output
    crops = model.model.multi_modal_projector(
        model.model.vision_tower(inputs["pixel_values"].flatten(0, 1), output_hidden_states=True)
        .hidden_states[-2][:, 1:])
    start = 0
    for run, lay in zip(packed, layouts):
        flat = crops[start:start + lay.crops].flatten(0, 1)
        tokens = ~lay.separators
        assert torch.allclose(run[tokens], flat[lay.source[tokens]], atol=1e-6)
        assert (run[lay.separators] == model.model.image_newline).all()
        start += lay.crops


def test_image_geometries_follow_each_images_crops(next_sdpa):
    """Costs use each image's own token count and grids (newlines are text), not the plan's 5-crop square."""
    model, processor = next_sdpa
    inputs = _inputs(model, processor, 2, SQUARE + WIDE)
    geometries = family_for(model).image_geometries(inputs)
    assert [(g.image_tokens, g.grids, g.vision_crops) for g in geometries] == [
        (80, ((4, 4), (8, 8)), 5), (64, ((4, 4), (6, 8)), 5)]  # 64x48 still encodes a 2x2 crop grid


@pytest.mark.parametrize("pipeline", ["", "none", "random(keep=1.0)", "random(keep=1.0, layer=1)",
                                      "tome(keep=1.0)", "proxyv(layer=4)"])
@pytest.mark.parametrize("sizes, batch", [(SQUARE, 1), (WIDE, 1), (SQUARE + WIDE, 2)])
def test_identity_pipelines_are_bit_identical(next_sdpa, pipeline, sizes, batch):
    model, processor = next_sdpa
    inputs = _inputs(model, processor, batch, sizes)
    reference = model(**inputs).logits
    before = count_hooks(model)
    with lmmsqueeze.apply(model, pipeline):
        logits = model(**inputs).logits
    assert torch.equal(logits, reference)
    assert count_hooks(model) == before and "get_image_features" not in vars(model.model)


def test_pool_is_per_crop_and_newlines_keep_their_rows(next_sdpa):
    model, processor = next_sdpa
    inputs = _inputs(model, processor, 1, SQUARE)
    packed = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                                            return_dict=True).pooler_output[0]
    base = packed[:16].view(2, 2, 2, 2, -1).mean(dim=(1, 3)).reshape(4, -1)
    sub = packed[16:].view(8, 9, -1)[:, :8].reshape(4, 2, 4, 2, -1).mean(dim=(1, 3)).reshape(16, -1)
    with _Embeds(model) as seen, lmmsqueeze.apply(model, "pool") as run:
        logits = model(**inputs).logits
    ids = inputs["input_ids"][0]
    first = int(torch.nonzero(ids == model.config.image_token_id)[0])
    embeds = seen.rows[0][0]
    newline = seen.newlines()[0]
    assert logits.shape[1] == ids.numel() - 60 and run.image_tokens_per_layer == [20] * 4
    # the run: 4 pooled base tokens, then per pooled row 4 tokens and the newlines of its two rows
    expected = [False] * 4 + ([False] * 4 + [True, True]) * 4
    assert newline[first:first + 28].tolist() == expected and int(newline.sum()) == 8
    image = embeds[first:first + 28][~newline[first:first + 28]]
    assert torch.allclose(image, torch.cat([base, sub]), atol=1e-6)
    # trace: the top-left token of each window, base crop first (indices over the 80 image tokens)
    assert run.trace[0][0].tolist() == [0, 2, 8, 10] + [16 + 16 * r + 2 * c for r in range(4) for c in range(4)]


def test_fastervlm_keeps_its_share_of_every_crop(next_sdpa):
    """keep=0.25 of 80 tokens: 4 of the base crop's 16 and 16 of the sub-crop grid's 64."""
    model, processor = next_sdpa
    inputs = _inputs(model, processor, 1, SQUARE)
    with lmmsqueeze.apply(model, "fastervlm(keep=0.25)") as run:
        model(**inputs)
    kept = run.trace[0][0]
    assert kept.numel() == 20 and int((kept < 16).sum()) == 4



@pytest.mark.parametrize("name", list_reducers())
def test_every_reducer_runs_and_keeps_every_newline(next_sdpa, name):
    """Every layer's KV cache holds the prompt less the image tokens the plan (for this image's
    crops) says are gone by that layer; the 8 newline tokens always stay."""
    model, processor = next_sdpa
    inputs = _inputs(model, processor, 2, SQUARE)
    geometry = family_for(model).image_geometries(inputs)[0]
    plan = lmmsqueeze.compile(tiny_pipeline(name), geometry)  # nothing is refused on LLaVA-NeXT
    with _Embeds(model) as seen, lmmsqueeze.apply(model, plan) as run:
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    prompt = inputs["input_ids"].shape[1]
    assert [layer.keys.shape[-2] for layer in out.cache.layers] == [
        prompt - (80 - tokens) + 1 for tokens in tokens_per_layer_as_run(run, geometry)]
    newline = seen.newlines()
    assert newline.sum(1).tolist() == [8, 8]
    prefill = run.prefill
    everything = torch.arange(newline.shape[1], device=newline.device).expand(2, -1)
    kept = prefill.segments[-1].keep if prefill.segments else everything
    for b in range(2):
        # every newline reaches the last layer; the image tokens there are the reducer's survivors
        assert bool(newline[b].gather(0, kept[b]).sum() == 8)
        for stage_trace in run.trace:
            assert stage_trace[b].numel() == 0 or int(stage_trace[b].max()) < 80
    assert run.image_tokens_per_layer[-1] == run.trace[-1][0].numel()


@pytest.mark.parametrize("batch", [1, 2])
def test_cached_generate_matches_no_cache_forward_after_llm_reduction(next_sdpa, batch):
    model, processor = next_sdpa
    inputs = _inputs(model, processor, batch, SQUARE)
    pipeline, layer, steps = "random(layer=2, keep=0.5, seed=3)", 2, 4
    prompt = inputs["input_ids"].shape[1]
    with lmmsqueeze.apply(model, pipeline) as run:
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
    assert run.trace[0][0].numel() == 40
    full = prompt + steps - 1
    assert [out.cache.layers[i].keys.shape[-2] for i in range(4)] == [full] * layer + [full - 40] * (4 - layer)
    mask = torch.cat([inputs["attention_mask"], torch.ones(batch, steps, dtype=torch.long, device=model.device)], 1)
    with lmmsqueeze.apply(model, pipeline) as ref_run:
        logits = model(input_ids=out.sequences, pixel_values=inputs["pixel_values"],
                       image_sizes=inputs["image_sizes"], attention_mask=mask, position_ids=padded_positions(mask),
                       use_cache=False).logits
    rows = ref_run.output_positions
    for b in range(batch):
        assert torch.equal(ref_run.trace[0][b], run.trace[0][b])
    assert_steps_match(out.logits, logits, rows, prompt)


@pytest.mark.parametrize("pipeline", ["pool", "random(keep=30, seed=1)", "visionzip(dominant=20, contextual=4)",
                                      "pool | random(layer=2, keep=8)"])
@pytest.mark.parametrize("sizes, batch", [(SQUARE, 1), (SQUARE + WIDE, 2)])
def test_projector_reduction_generate_equals_forward_loop(next_sdpa, pipeline, sizes, batch):
    model, processor = next_sdpa
    inputs = _inputs(model, processor, batch, sizes)
    steps = 4
    with lmmsqueeze.apply(model, pipeline):
        generated = model.generate(**inputs, max_new_tokens=steps, do_sample=False)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        for _ in range(steps):
            logits = model(input_ids=ids, pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                           attention_mask=mask, position_ids=padded_positions(mask), use_cache=False).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    assert torch.equal(generated, ids)


@pytest.mark.parametrize("pipeline", ["proxyv(layer=2, factor=2)", "proxyv(layer=1, variant=nonspatial, proxies=4)",
                                      "random(keep=0.5) | proxyv(layer=2, variant=nonspatial, proxies=3)"])
@pytest.mark.parametrize("batch", [1, 2])
def test_proxyv_cached_generate_matches_no_cache_reference(next_sdpa, pipeline, batch):
    model, processor = next_sdpa
    inputs = _inputs(model, processor, batch, SQUARE)
    steps = 3
    with lmmsqueeze.apply(model, pipeline) as run:
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
        mask = torch.cat([inputs["attention_mask"], torch.ones(batch, steps, dtype=torch.long, device=model.device)], 1)
        logits = model(input_ids=out.sequences, pixel_values=inputs["pixel_values"],
                       image_sizes=inputs["image_sizes"], attention_mask=mask, position_ids=padded_positions(mask),
                       use_cache=False).logits
        rows = run.output_positions
    prompt = inputs["input_ids"].shape[1]
    assert_steps_match(out.logits, logits, rows, prompt)


def test_spatial_proxyv_proxies_are_per_crop(next_sdpa):
    """Spatial proxies resize each crop's grid: 4x4 -> 2x2 and 8x8 -> 4x4 (20 proxies); newline
    tokens are queries like text."""
    from lmmsqueeze.proxyv import state as proxyv_layer

    model, processor = next_sdpa
    inputs = _inputs(model, processor, 1, SQUARE)
    seen = {}
    real = proxyv_layer.make_proxies

    def spy(stage, adapter, image, grids, groups):
        seen["grids"], seen["n"] = grids, image.shape[1]
        out = real(stage, adapter, image, grids, groups)
        seen["proxies"] = out[0].shape[1]
        return out

    proxyv_layer.make_proxies = spy
    try:
        with lmmsqueeze.apply(model, "proxyv(layer=2, factor=2)") as run:
            model(**inputs)
    finally:
        proxyv_layer.make_proxies = real
    assert seen == {"grids": ((4, 4), (8, 8)), "n": 80, "proxies": 20}
    assert run.scratch[proxyv_layer.SCRATCH_KEY].others.shape[1] == inputs["input_ids"].shape[1] - 80


def test_multi_image_prompt(next_sdpa):

    model, processor = next_sdpa

    images = [noise_image(i, w, h)
              for i, (w, h) in enumerate([(64, 64), (64, 48)])]
    inputs = to_device(processor(images=images, text="USER: <image> <image>\ndescribe ASSISTANT:",
                                 return_tensors="pt"), model.device)
    assert int((inputs["input_ids"] == 4).sum()) == 88 + 70
    reference = model(**inputs).logits
    with lmmsqueeze.apply(model, "random(keep=1.0)"):
        assert torch.equal(model(**inputs).logits, reference)
    for pipeline, image_tokens in [("pool", 20 + 16), ("random(layer=2, keep=0.5)", 72),
                                   ("proxyv(layer=2, factor=2)", 144)]:
        with _Embeds(model) as seen, lmmsqueeze.apply(model, pipeline) as run:
            out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 2
        assert int(seen.newlines().sum()) == 14
        assert run.image_tokens_per_layer[-1] == image_tokens
        if pipeline == "pool":  # one crop id per crop of every image, grids of both images
            assert run.prefill.samples[0].meta.grids == ((2, 2), (4, 4), (2, 2), (3, 4))
            assert run.prefill.samples[0].meta.crop_ids.unique().tolist() == [0, 1, 2, 3]


def test_batch_with_different_image_token_counts(next_sdpa):
    """Samples with different numbers of image tokens: pre-LLM stages, llm stages (the shorter rows are
    filled with masked-out columns) and ProxyV (run sample by sample) give each sample what it gets alone."""

    from lmmsqueeze.testing import PROMPTS

    model, processor = next_sdpa
    inputs = _inputs(model, processor, 2, SQUARE + WIDE)
    with lmmsqueeze.apply(model, "pool") as run:
        model(**inputs)
    assert [t.numel() for t in run.trace[0]] == [20, 16]
    for pipeline in ["fastv(layer=2, keep=0.5)", "proxyv(layer=2, factor=2)",
                     "fastv(layer=1, keep=0.5) | proxyv(layer=2, variant=nonspatial, proxies=3)"]:
        with torch.no_grad(), lmmsqueeze.apply(model, pipeline) as run:
            batched = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                                     output_logits=True)
        if pipeline.startswith("fastv(layer=2"):
            assert [t.numel() for t in run.trace[0]] == [40, 32]
        for b, (w, h) in enumerate(SQUARE + WIDE):  # each sample alone, with its own prompt and image
            image = noise_image(b, w, h)
            alone = to_device(processor(images=image, text=PROMPTS[b], return_tensors="pt"), model.device)
            with torch.no_grad(), lmmsqueeze.apply(model, pipeline):
                single = model.generate(**alone, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                                        output_logits=True)
            for step in range(3):
                assert (batched.logits[step][b] - single.logits[step][0]).abs().max() < 1e-4, (pipeline, b, step)



@pytest.mark.parametrize("pipeline", ["none", "proxyv(layer=2, factor=2)",
                                      "proxyv(layer=1, variant=nonspatial, proxies=4)",
                                      "pool | proxyv(layer=2, factor=2)", "fastv(layer=2, keep=0.5)",
                                      "visionzip(dominant=20, contextual=4)"])
def test_analytic_prefill_flops_match_the_counter(next_eager, pipeline):
    """Newline tokens count as text; the vision tower and projector run on all 5 crops (and vision
    stages project their survivors again)."""
    model, processor = next_eager
    inputs = tiny_next_inputs(processor, 1, SQUARE)
    plan = lmmsqueeze.compile(pipeline, model)
    g = family_for(model).geometry
    text = inputs["input_ids"].shape[1] - g.image_tokens  # 12 text + 8 newline tokens
    with lmmsqueeze.apply(model, plan):
        total = count_flops(lambda: model(**inputs, logits_to_keep=1))
    vision = count_flops(lambda: model.model.vision_tower(inputs["pixel_values"][0]))
    dv, d = g.vision_hidden_size, g.hidden_size
    projected = 5 * 16 + (plan.at("vision")[-1].tokens_out if plan.at("vision") else 0)
    projector = 2 * projected * (dv * d + d * d)
    cost = plan.cost(text_tokens=text)
    measured = total - vision - projector - 2 * cost.lm_head
    assert measured == cost.prefill_flops


def test_explain_preset_llava_next():
    from typer.testing import CliRunner

    from lmmsqueeze.cli import app

    result = CliRunner().invoke(app, ["explain", "proxyv(layer=12)", "--model-config", "llava-next-7b", "--json"])
    assert result.exit_code == 0, result.output
    import json

    data = json.loads(result.stdout)
    assert data["image_tokens"] == 2880 and data["model"] == "llava-next-7b"
    plan = lmmsqueeze.compile("proxyv(layer=12)", "llava-next-7b")
    assert proxyv_stage(plan).reducer.proxy_count(2880, proxyv_stage(plan).grids_in) == 180  # 6x6 + 12x12


def test_cli_runs_a_local_llava_next_directory(tmp_path):
    import json

    from typer.testing import CliRunner

    from lmmsqueeze.cli import app

    model, processor = tiny_llava_next()
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    noise_image(0, 64, 48).save(tmp_path / "i.png")
    result = CliRunner().invoke(app, ["run", "-m", str(tmp_path / "m"), "-i", str(tmp_path / "i.png"), "--prompt",
                                      "what ?", "-p", "pool | fastv(layer=2, keep=0.5)", "--max-new-tokens", "2",
                                      "--json"])
    assert result.exit_code == 0, result.output
    # a 64x48 image: 4x4 base + 6x8 sub-crop grid -> pooled 2x2 + 3x4 = 16 -> 8 from layer 2
    assert json.loads(result.stdout)["image_tokens_per_layer"] == [16, 16, 8, 8]
