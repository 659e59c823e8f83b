"""Position policies (``positions=keep|renumber``) in every family, before and inside the LLM: the
positions the decoder receives against the definition written out, and cached decoding against a
no-cache forward of the whole sequence under both policies."""

from __future__ import annotations

import pytest
import torch

import lmmsqueeze
from lmmsqueeze.testing import (
    TINY_FAMILIES,
    assert_steps_match,
    grown_inputs,
    placeholder_ids,
    tiny_inputs,
    tiny_llava,
)

pytestmark = pytest.mark.usefixtures("no_grad")

#: every combination of a policy before the LLM and one inside it
PIPELINES = [
    "random(keep=12, seed=1, positions=keep)",
    "random(keep=12, seed=1, positions=renumber)",
    "random(layer=2, keep=0.5, seed=3, positions=keep)",
    "random(layer=2, keep=0.5, seed=3, positions=renumber)",
    "random(keep=20, seed=1, positions=keep) | random(layer=1, keep=9, seed=2, positions=renumber) | "
    "random(layer=3, keep=5, seed=4, positions=keep)",
    "random(keep=20, seed=1, positions=renumber) | random(layer=2, keep=9, seed=2, positions=keep)",
]


@pytest.fixture(scope="module", params=list(TINY_FAMILIES))
def family(request):
    """A row of the family table: its name, model, processor, and a batch of its square-image inputs."""
    row = TINY_FAMILIES[request.param]
    model, processor = row.build()
    return row.name, model, processor, lambda processor, batch: row.inputs(processor, batch, row.sizes[:1])


@pytest.mark.parametrize("pipeline", PIPELINES)
@pytest.mark.parametrize("batch", [1, 2])
def test_cached_decoding_equals_a_no_cache_forward(family, pipeline, batch):
    """Every generated step's logits equal the row of a no-cache forward over prompt + generated tokens
    that predicts it (the same stages, positions and policies over the longer prompt)."""
    _, model, processor, make = family
    inputs = make(processor, batch)
    prompt, steps = inputs["input_ids"].shape[1], 4
    with lmmsqueeze.apply(model, pipeline):
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, return_dict_in_generate=True,
                             output_logits=True, suppress_tokens=placeholder_ids(model))
    with lmmsqueeze.apply(model, pipeline) as run:
        logits = model(**grown_inputs(inputs, out.sequences), use_cache=False).logits
    assert_steps_match(out.logits, logits, run.output_positions, prompt)


def _layer_positions(model, inputs, pipeline, layer):
    """The position ids decoder layer ``layer`` receives (the text row of M-RoPE families), and the run."""
    seen = []
    with lmmsqueeze.apply(model, pipeline) as run:  # registered after the run's hooks: runs after them
        handle = model.model.language_model.layers[layer].register_forward_pre_hook(
            lambda m, a, kw: seen.append(kw["position_ids"]), with_kwargs=True)
        try:
            model(**inputs)
        finally:
            handle.remove()
    return seen[0], run


@pytest.mark.parametrize("placement", ["", "layer=2, "])
def test_keep_gives_every_survivor_its_position_and_renumber_counts_them(placement):
    """LLaVA (1-D RoPE): with keep, each token after the stage sits at its own original position (an image
    token: the run's first position + its original index; text after the image: where it was); with
    renumber the positions are 0, 1, 2, ... (one sample, no padding)."""
    model, processor = tiny_llava()
    inputs = tiny_inputs(processor, 1)
    ids = inputs["input_ids"][0]
    first = int(torch.nonzero(ids == model.config.image_token_id)[0])
    kept = f"random({placement}keep=12, seed=5, positions=keep)"
    pos, run = _layer_positions(model, inputs, kept, 3)
    columns = run.output_positions[0]
    image = (columns >= first) & (columns < first + 36)
    expected = columns.clone()
    expected[image] = first + run.trace[0][0]
    assert torch.equal(pos[0], expected)
    pos, _ = _layer_positions(model, inputs, kept.replace("keep)", "renumber)"), 3)
    assert torch.equal(pos[0], torch.arange(pos.shape[1]))
