"""Decoder-side reducers (FastV, PyramidDrop, DART) at their default parameters against transcriptions
of their released code.

Each test drives the miniature's 32-layer decoder (eager) the way the released forward does, with the
rank & drop steps of ``tests/released``, and compares the kept original image indices of every stage
and the logits of the pruned decoder with lmmsqueeze's run (sdpa, same weights).
"""

from __future__ import annotations

import pytest
import torch
from released import eager as E
from released.dart import DART_K, dart_keep_indexs, dart_retained_image_tokens
from released.fastv import fastv_keep_indexs
from released.pdrop import LAYER_LIST, pdrop_rank_drop, stage_counts

import lmmsqueeze

pytestmark = pytest.mark.usefixtures("no_grad")

#: the smallest score gap at a ranking cut for the comparison to be meaningful (no near-ties)
MARGIN = 1e-9


@pytest.fixture(scope="module")
def embeds(miniature):
    """The decoder's input embeddings for the miniature's prompt (eager), shared by the tests."""
    with torch.no_grad():
        return E.llm_inputs(miniature.eager, miniature.inputs)


def _image_span(mini):
    return E.image_span(mini.inputs["input_ids"], mini.model.config.image_token_id)


def _run(mini, pipeline):
    with lmmsqueeze.apply(mini.model, pipeline) as run:
        logits = mini.model(**mini.inputs).logits
    return run, logits


def _check_logits(logits, expected):
    assert logits.shape == expected.shape, (tuple(logits.shape), tuple(expected.shape))
    last = (logits[:, -1] - expected[:, -1]).abs().max()
    assert torch.allclose(logits[:, -1], expected[:, -1], atol=1e-6), f"last row differs by {float(last)}"
    assert torch.allclose(logits, expected, atol=1e-6), float((logits - expected).abs().max())


def test_pdrop(miniature, embeds):
    """PyramidDrop at layers 8, 16, 24, lambda 0.5: 576 -> 288 -> 144 -> 72 image tokens, ranked by the
    last instruction token with the rank layer's own projections; positions renumbered after each drop."""
    mini = miniature
    lm = mini.eager.model.language_model
    start, length = _image_span(mini)
    hidden = embeds
    prompt_len = hidden.shape[1] - length  # the released prompt_len: text tokens, image placeholder excluded
    positions = torch.arange(hidden.shape[1])[None]
    origin = torch.arange(length)  # original patch index of each image token in the sequence
    stages = []
    for layer_idx in range(32):
        hidden = E.run_layer(mini.eager, layer_idx, hidden, positions).hidden
        rank_layer = layer_idx + 1
        if rank_layer in LAYER_LIST:
            stage = LAYER_LIST.index(rank_layer)
            image_tokens, keep_length = stage_counts(stage, n0=length)
            assert image_tokens == origin.numel()
            step = pdrop_rank_drop(lm.layers[rank_layer], lm.rotary_emb, hidden, positions, start, prompt_len,
                                   image_tokens, keep_length)
            assert step.margin > MARGIN, f"near-tie at the cut of stage {stage}: {step.margin}"
            hidden, positions = step.hidden, step.position_ids
            origin = origin[step.kept]
            stages.append(origin)
    expected = E.logits_of(mini.eager, hidden)
    assert [s.numel() for s in stages] == [288, 144, 72]
    assert hidden.shape[1] == prompt_len + 72

    run, logits = _run(mini, "pdrop")
    assert len(run.trace) == len(stages), f"{len(run.trace)} stages traced, the released code drops 3 times"
    for s, want in enumerate(stages):
        got = run.trace[s][0]
        assert torch.equal(got.cpu(), want), (
            f"stage {s} (layer {LAYER_LIST[s]}): {got.numel()} vs {want.numel()} kept, "
            f"{len(set(got.tolist()) ^ set(want.tolist()))} differ")
    _check_logits(logits, expected)


def test_dart(miniature, embeds):
    """DART K=2, 128 budget, 4 image + 4 text pivots: 132 image tokens kept (the pivots' 8 x 16 picks and
    the 4 image pivots), pivots picking in Python set order; kept tokens keep their positions."""
    mini = miniature
    lm = mini.eager.model.language_model
    start, length = _image_span(mini)
    hidden = embeds
    seq_length = hidden.shape[1]
    positions = torch.arange(seq_length)[None]
    for i in range(DART_K):
        out = E.run_layer(mini.eager, i, hidden, positions)
        hidden = out.hidden
    margins: list[float] = []
    retained = dart_retained_image_tokens(lm.norm(hidden), out.keys, start, length, margins=margins)
    assert min(margins) > MARGIN, f"near-tie at a ranking cut: {min(margins)}"
    keep = dart_keep_indexs(retained, start, length, seq_length)
    hidden, positions = hidden[:, keep], keep[None]
    for i in range(DART_K, 32):
        hidden = E.run_layer(mini.eager, i, hidden, positions).hidden
    expected = E.logits_of(mini.eager, hidden)
    kept = keep[(keep >= start) & (keep < start + length)] - start
    assert kept.numel() == 132

    run, logits = _run(mini, "dart")
    assert len(run.trace) == 1
    got = run.trace[0][0]
    assert torch.equal(got.cpu(), kept), f"{got.numel()} vs {kept.numel()} kept, " \
        f"{len(set(got.tolist()) ^ set(kept.tolist()))} differ"
    _check_logits(logits, expected)


def test_fastv(miniature, embeds):
    """FastV K=2, R=50%: the kept set, and the logits of the pruned decoder with kept positions."""
    mini = miniature
    start, length = _image_span(mini)
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
    _check_logits(logits, expected)
