"""The GPU path: bf16 models with flash-attn on CUDA. Skipped without CUDA (and flash-attn).

The rest of the suite runs its model tests on CUDA as well through the ``device`` fixture; this
file covers what only exists there: loading in bf16 with ``flash_attention_2``, and every probe
and reducer under flash-attn (whose layers get a 2-D padding mask, and no attention weights)."""

from __future__ import annotations

import pytest
import torch

import lmmsqueeze
from lmmsqueeze.reducers import list_reducers
from lmmsqueeze.testing import (
    TINY_FAMILIES,
    assert_steps_match,
    grown_inputs,
    tiny_llava,
    tiny_pipeline,
    to_device,
)


def _flash_available() -> bool:
    from transformers.utils import is_flash_attn_2_available

    return torch.cuda.is_available() and is_flash_attn_2_available()


pytestmark = [pytest.mark.skipif(not _flash_available(), reason="needs CUDA and flash-attn"),
              pytest.mark.usefixtures("no_grad")]

@pytest.fixture(scope="module", params=list(TINY_FAMILIES))
def flash(request):
    """A row of the family table in bf16 with flash-attn; ``inputs(batch)``: images of both its sizes."""
    row = TINY_FAMILIES[request.param]
    model, processor = row.build(attn="flash_attention_2")
    model = model.to("cuda", torch.bfloat16)

    def inputs(batch):
        x = to_device(row.inputs(processor, batch, row.sizes), model.device)
        x["pixel_values"] = x["pixel_values"].to(torch.bfloat16)
        return x

    return model, inputs


def test_load_model_picks_bf16_and_flash_attention(saved_tiny):
    from lmmsqueeze.runtime.loading import load_model

    model, _ = load_model(saved_tiny[0])
    assert model.device.type == "cuda" and model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "flash_attention_2"


@pytest.mark.parametrize("pipeline", ["random(keep=1.0)", "random(keep=1.0, layer=1)", "proxyv(layer=4)"])
def test_identity_pipelines_are_bit_identical_under_flash(flash, pipeline):
    model, inputs = flash
    x = inputs(2)
    reference = model(**x).logits
    with lmmsqueeze.apply(model, pipeline):
        assert torch.equal(model(**x).logits, reference)



@pytest.mark.parametrize("name", list_reducers())
def test_every_reducer_and_probe_runs_under_flash(flash, name):
    model, inputs = flash
    x = inputs(2)
    try:
        plan = lmmsqueeze.compile(tiny_pipeline(name), model)
    except lmmsqueeze.PipelineError as exc:
        pytest.skip(f"refused on this family: {exc}")
    with lmmsqueeze.apply(model, plan) as run:
        out = model.generate(**x, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == x["input_ids"].shape[1] + 3
    assert model.config.get_text_config()._attn_implementation == "flash_attention_2"
    assert run.image_tokens_per_layer


@pytest.mark.parametrize("pipeline", ["random(layer=2, keep=0.5, seed=3)", "fastv(layer=2, keep=0.5)",
                                      "proxyv(layer=2, factor=2)"])
def test_cached_generate_matches_no_cache_forward_under_flash(flash, pipeline):
    """bf16: the same kept tokens, logits within bf16 noise of the no-cache forward."""
    model, inputs = flash
    x = inputs(2)
    steps, prompt = 3, x["input_ids"].shape[1]
    with lmmsqueeze.apply(model, pipeline) as run:
        out = model.generate(**x, max_new_tokens=steps, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
        first = [t.clone() for t in run.trace[0]]
        logits = model(**grown_inputs(x, out.sequences), use_cache=False).logits
        rows = run.output_positions
    if not pipeline.startswith("fastv"):  # fastv's no-cache query is another token
        assert all(torch.equal(a, b) for a, b in zip(first, run.trace[0], strict=True))
        assert_steps_match(out.logits, logits, rows, prompt, atol=5e-2)


def test_filler_columns_under_flash_give_each_sample_its_own_result():
    """One image in sample 0, two in sample 1: an llm stage keeps different counts per sample, and the
    filler columns reach flash-attn layers as a 2-D padding mask."""
    from lmmsqueeze.testing import random_image

    model, processor = tiny_llava(attn="flash_attention_2")
    model = model.to("cuda", torch.bfloat16)
    texts = ["USER: <image>\nwhat is the colour ? ASSISTANT:",
             "USER: <image>\n<image>\nhow many ? ASSISTANT:"]
    images = [random_image(0), random_image(1), random_image(2)]

    def prepared(x):
        x = to_device(x, model.device)
        x["pixel_values"] = x["pixel_values"].to(torch.bfloat16)
        return x

    batch = prepared(processor(images=images, text=texts, return_tensors="pt", padding=True))
    pipeline = "random(layer=1, keep=0.5, seed=1)"
    with lmmsqueeze.apply(model, pipeline) as run:
        batched = model.generate(**batch, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                                 output_logits=True)
    assert [t.numel() for t in run.trace[0]] == [18, 36]
    for b, pictures in enumerate([images[:1], images[1:]]):
        alone = prepared(processor(images=pictures if len(pictures) > 1 else pictures[0], text=texts[b],
                                   return_tensors="pt"))
        with lmmsqueeze.apply(model, pipeline):
            single = model.generate(**alone, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                                    output_logits=True)
        for step in range(3):
            assert (batched.logits[step][b].float() - single.logits[step][0].float()).abs().max() < 5e-2
