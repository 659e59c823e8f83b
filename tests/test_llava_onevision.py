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
    noise_image,
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


@pytest.fixture(scope="module")
def with_video():
    """An image and a 3-frame video in one prompt. The video processor needs torchvision (never
    installed here), so the frames are random pixels and the prompt holds the video's placeholders as
    the processor writes them: 2x2 pooled tokens per frame (4x4 bilinear-pooled to 2x2) and one newline."""
    model, processor = tiny_onevision()
    tok = processor.tokenizer
    inputs = dict(processor(images=[noise_image(0, 64, 64)], text="USER: <image> describe ASSISTANT:",
                            return_tensors="pt"))
    ids = inputs["input_ids"][0].tolist()
    at = ids.index(tok.convert_tokens_to_ids("describe"))
    ids = ids[:at] + [model.config.video_token_id] * (3 * 4 + 1) + ids[at:]
    inputs["input_ids"] = torch.tensor([ids])
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["pixel_values_videos"] = torch.randn(1, 3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return model, inputs


@pytest.mark.parametrize("pipeline, kept", [("pool | random(layer=2, keep=0.5, seed=1)", 10),
                                            ("visionzip(dominant=10, contextual=4)", 14),
                                            ("proxyv(layer=2, factor=2)", 80)])
def test_a_video_in_the_prompt_is_left_as_the_model_encodes_it(with_video, pipeline, kept):
    """The stages reduce the image only; the video's placeholders get the model's own video features;
    cached decoding equals a no-cache forward of prompt and generated tokens."""
    model, inputs = with_video
    video = model.model.get_video_features(inputs["pixel_values_videos"], return_dict=True).pooler_output
    video_columns = inputs["input_ids"][0] == model.config.video_token_id
    seen = []

    def grab(module, args, kwargs):
        if kwargs["inputs_embeds"].shape[1] > 1:
            seen.append(kwargs["inputs_embeds"])

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with lmmsqueeze.apply(model, pipeline) as run:
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                                 output_logits=True, suppress_tokens=placeholder_ids(model))
            logits = model(**grown_inputs(inputs, out.sequences), use_cache=False).logits
            rows = run.output_positions
    finally:
        handle.remove()
    assert run.image_tokens_per_layer[-1] == kept
    # the prefill's rows of the video columns: the columns before them lost only image tokens
    dropped = inputs["input_ids"].shape[1] - seen[0].shape[1]
    embeds = seen[0][0][torch.nonzero(video_columns).flatten() - dropped]
    assert torch.equal(embeds, video.flatten(0, 1).to(embeds.dtype))
    assert_steps_match(out.logits, logits, rows, inputs["input_ids"].shape[1])
