"""LLaVA-NeXT (anyres crops + newline tokens) on tiny random models: the layout against the model's own
packing, per-crop pooling and budgets, newline rows, per-crop ProxyV proxies. The contract every family
keeps (identity, every reducer, cached decoding, FLOPs, mixed batches) is in ``test_families.py``."""

from __future__ import annotations

import pytest
import torch

import lmmsqueeze
from lmmsqueeze.models import family_for, geometry_from_config, preset
from lmmsqueeze.proxyv.stage import proxyv_stage
from lmmsqueeze.testing import (
    DecoderInputs,
    noise_image,
    tiny_llava_next,
    tiny_next_inputs,
    to_device,
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
    packed = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                            image_sizes=inputs["image_sizes"], return_dict=True).pooler_output
    crops = model.model.multi_modal_projector(
        model.model.vision_tower(inputs["pixel_values"].flatten(0, 1), output_hidden_states=True)
        .hidden_states[-2][:, 1:])
    start = 0
    for run, lay in zip(packed, layouts, strict=True):
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


def test_pool_is_per_crop_and_newlines_keep_their_rows(next_sdpa):
    model, processor = next_sdpa
    inputs = _inputs(model, processor, 1, SQUARE)
    packed = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                            image_sizes=inputs["image_sizes"],
                                            return_dict=True).pooler_output[0]
    base = packed[:16].view(2, 2, 2, 2, -1).mean(dim=(1, 3)).reshape(4, -1)
    sub = packed[16:].view(8, 9, -1)[:, :8].reshape(4, 2, 4, 2, -1).mean(dim=(1, 3)).reshape(16, -1)
    with DecoderInputs(model) as seen, lmmsqueeze.apply(model, "pool") as run:
        logits = model(**inputs).logits
    ids = inputs["input_ids"][0]
    first = int(torch.nonzero(ids == model.config.image_token_id)[0])
    embeds = seen.rows[0][0]
    newline = seen.equal_to(model.model.image_newline)[0]
    assert logits.shape[1] == ids.numel() - 60 and run.image_tokens_per_layer == [20] * 4
    # the run: 4 pooled base tokens, then per pooled row 4 tokens and the newlines of its two rows
    expected = [False] * 4 + ([False] * 4 + [True, True]) * 4
    assert newline[first:first + 28].tolist() == expected and int(newline.sum()) == 8
    image = embeds[first:first + 28][~newline[first:first + 28]]
    assert torch.allclose(image, torch.cat([base, sub]), atol=1e-6)
    # trace: the top-left token of each window, base crop first (indices over the 80 image tokens)
    sub_windows = [16 + 16 * r + 2 * c for r in range(4) for c in range(4)]
    assert run.trace[0][0].tolist() == [0, 2, 8, 10] + sub_windows


def test_fastervlm_keeps_its_share_of_every_crop(next_sdpa):
    """keep=0.25 of 80 tokens: 4 of the base crop's 16 and 16 of the sub-crop grid's 64."""
    model, processor = next_sdpa
    inputs = _inputs(model, processor, 1, SQUARE)
    with lmmsqueeze.apply(model, "fastervlm(keep=0.25)") as run:
        model(**inputs)
    kept = run.trace[0][0]
    assert kept.numel() == 20 and int((kept < 16).sum()) == 4


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


def test_spatial_proxyv_on_the_preset_is_per_crop():
    """LLaVA-NeXT-7B: factor 4 on the 24x24 base crop and the 48x48 sub-crop grid."""
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
    result = CliRunner().invoke(app, ["run", "-m", str(tmp_path / "m"), "-i", str(tmp_path / "i.png"),
                                      "--prompt", "what ?", "-p", "pool | fastv(layer=2, keep=0.5)",
                                      "--max-new-tokens", "2", "--json"])
    assert result.exit_code == 0, result.output
    # a 64x48 image: 4x4 base + 6x8 sub-crop grid -> pooled 2x2 + 3x4 = 16 -> 8 from layer 2
    assert json.loads(result.stdout)["image_tokens_per_layer"] == [16, 16, 8, 8]
