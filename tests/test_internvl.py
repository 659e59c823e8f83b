"""InternVL on a tiny random model, where it differs from the other families: an image is several tiles
(plus a thumbnail), each one image to the stages before the LLM and all of a sample's tiles one set of
tokens to the stages inside it; vision signals are averaged over each pixel-shuffle unit, whose patches
are checked against the model's own shuffle of real features. The contract every family keeps is in
``test_families.py``."""

from __future__ import annotations

import pytest
import torch

import lmmsqueeze
from lmmsqueeze.models import family_for
from lmmsqueeze.testing import (
    assert_steps_match,
    grown_inputs,
    placeholder_ids,
    tiny_internvl,
    tiny_internvl_inputs,
)

pytestmark = pytest.mark.usefixtures("no_grad")


@pytest.fixture(scope="module")
def tiled():
    """A 192x96 image: 2 tiles side by side and a thumbnail, 36 tokens each (108)."""
    model, processor = tiny_internvl()
    inputs = tiny_internvl_inputs(processor, 1, ((192, 96),))
    assert inputs["pixel_values"].shape[0] == 3
    return model, inputs


@pytest.mark.parametrize("pipeline, last", [
    ("pool", 3 * 9),  # every tile's 6x6 grid pooled 2x2
    ("random(keep=10, seed=1)", 3 * 10),  # a pre-LLM budget is per tile
    # inside the LLM: the sample's 108 tokens together (a signal-free stage: the no-cache forward's
    # last query is a generated token, so attention-ranked stages would pick other tokens there)
    ("random(layer=2, keep=0.5, seed=2)", 54),
    ("pool | random(layer=2, keep=9, seed=2)", 9),
])
def test_tiles_before_the_llm_and_the_sample_inside_it(tiled, pipeline, last):
    model, inputs = tiled
    assert [g.image_tokens for g in family_for(model).image_geometries(inputs)] == [36] * 3
    with lmmsqueeze.apply(model, pipeline) as run:
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                             output_logits=True, suppress_tokens=placeholder_ids(model))
        logits = model(**grown_inputs(inputs, out.sequences), use_cache=False).logits
        rows = run.output_positions
    assert run.image_tokens_per_layer[-1] == last
    assert_steps_match(out.logits, logits, rows, inputs["input_ids"].shape[1])


def test_shuffle_units_are_the_patches_the_model_shuffles_together(tiled):
    """Each token's projector input is its unit's four patch features side by side (the model's pixel
    shuffle of the tower's output); the family's units name those patches."""
    model, inputs = tiled
    family = family_for(model)
    patches = model.model.vision_tower(pixel_values=inputs["pixel_values"]).last_hidden_state[:, 1:]
    tiles, n, width = patches.shape
    side = int(n ** 0.5)
    shuffled = model.model.pixel_shuffle(patches.reshape(tiles, side, side, width),
                                         scale_factor=model.config.downsample_ratio)
    shuffled = shuffled.reshape(tiles, -1, shuffled.shape[-1])  # [tiles, tokens, 4 x width]
    units = family._units(n)  # [tokens, 4] patch indices (raster order)
    assert units.shape == (36, 4) and sorted(units.flatten().tolist()) == list(range(n))
    for t in range(units.shape[0]):
        mine = shuffled[:, t].reshape(tiles, -1, width)  # the four patches' features it concatenates
        assert torch.equal(mine, patches[:, units[t]])
