"""Every built-in reducer at its default parameters against a transcription of its released code.

The transcriptions (``tests/released``) read what the released code reads from the miniature LLaVA
run in eager mode; lmmsqueeze runs the same weights under sdpa through ``lmmsqueeze.apply``. Kept
original indices, merge groups and merged values must agree, and where the released code drives the
decoder (positions after a drop), so must the logits.
"""

from __future__ import annotations

import pytest
import torch
from released import eager as E
from released.fastv import fastv_keep_indexs

import lmmsqueeze

pytestmark = pytest.mark.usefixtures("no_grad")


def _image_span(mini):
    return E.image_span(mini.inputs["input_ids"], mini.model.config.image_token_id)


def _run(mini, pipeline):
    with lmmsqueeze.apply(mini.model, pipeline) as run:
        logits = mini.model(**mini.inputs).logits
    return run, logits


def test_fastv(miniature):
    """FastV K=2, R=50%: the kept set, and the logits of the pruned decoder with kept positions."""
    mini = miniature
    start, length = _image_span(mini)
    embeds = E.llm_inputs(mini.eager, mini.inputs)
    positions = torch.arange(embeds.shape[1])[None]
    hidden = embeds
    for i in range(2):
        out = E.run_layer(mini.eager, i, hidden, positions)
        hidden = out.hidden
    keep = fastv_keep_indexs(out.attention, start, length, fastv_r=0.5)
    hidden, positions = hidden[:, keep], keep[None]
    for i in range(2, 32):
        hidden = E.run_layer(mini.eager, i, hidden, positions).hidden
    expected = E.logits_of(mini.eager, hidden)

    run, logits = _run(mini, "fastv")
    kept = keep[(keep >= start) & (keep < start + length)] - start
    assert torch.equal(run.trace[0][0], kept)
    assert torch.allclose(logits, expected, atol=1e-6), float((logits - expected).abs().max())
