"""LLaVA-OneVision on a tiny random model, where it differs from LLaVA-NeXT: an image whose sub-crop grid
exceeds ``anyres_max_N`` is downsampled after the projector (its tokens are blends), so vision-placement
stages are refused for it while projector and LLM stages run; an image in a sample with several images
is its base crop. The contract every family keeps is in ``test_families.py``."""

from __future__ import annotations

import pytest
import torch

import lmmsqueeze
from lmmsqueeze.errors import ModelError
from lmmsqueeze.models import family_for
from lmmsqueeze.testing import (
    assert_steps_match,
    grown_inputs,
    placeholder_ids,
    tiny_onevision,
    tiny_onevision_inputs,
)

pytestmark = pytest.mark.usefixtures("no_grad")


@pytest.fixture(scope="module")
def blended():
    """``anyres_max_1``: a 64x64 image's 8x8 sub-crop grid (64 > 1.1 x 16 tokens) is resized to 4x4."""
    model, processor = tiny_onevision(aspect="anyres_max_1")
    return model, tiny_onevision_inputs(processor, 1, ((64, 64),))


def test_a_blended_image_has_the_downsampled_token_count(blended):
    model, inputs = blended
    (geometry,) = family_for(model).image_geometries(inputs)
    # the 4x4 base grid and the 4x4 downsampled sub-crop grid, and 4 newlines after its rows
    assert geometry.image_tokens == 32
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 36


@pytest.mark.parametrize("pipeline", ["fastervlm(keep=10)", "visionzip(dominant=8, contextual=2)"])
def test_vision_stages_are_refused_for_a_blended_image(blended, pipeline):
    model, inputs = blended
    with pytest.raises(ModelError, match="blends this image's tokens.*use a stage at the projector"):
        with lmmsqueeze.apply(model, pipeline):
            model(**inputs)


@pytest.mark.parametrize("pipeline, kept", [("random(keep=0.5, seed=1)", 16), ("pool", 8),
                                            ("random(layer=1, keep=12, seed=2)", 12)])
def test_projector_and_llm_stages_run_on_a_blended_image(blended, pipeline, kept):
    """Cached decoding equals a no-cache forward of prompt and generated tokens; ``pool`` pools both 4x4
    grids."""
    model, inputs = blended
    with lmmsqueeze.apply(model, pipeline) as run:
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                             output_logits=True, suppress_tokens=placeholder_ids(model))
        logits = model(**grown_inputs(inputs, out.sequences), use_cache=False).logits
        rows = run.output_positions
    assert run.trace[0][0].numel() == kept
    assert_steps_match(out.logits, logits, rows, inputs["input_ids"].shape[1])


def test_identity_is_bit_identical_on_a_blended_image(blended):
    model, inputs = blended
    reference = model(**inputs).logits
    with lmmsqueeze.apply(model, "random(keep=1.0)"):
        assert torch.equal(model(**inputs).logits, reference)
