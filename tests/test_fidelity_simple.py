"""DivPrune and the grid baselines (pool, maxpool, bilinear, stride, random) at their default parameters
against transcriptions of their released code (``tests/released``) or, where none was released, against
the plain definition.

All of them run before the decoder, on the projected features (the decoder's input embeddings of the
image span). The released side reads those embeddings from the eager miniature without any reduction,
reduces them and splices the result back into the prompt; lmmsqueeze's decoder input under
``lmmsqueeze.apply`` must then be that same sequence, its trace and merge groups must match, and the
logits of the shorter prompt, numbered consecutively, must agree with an eager decoder loop.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from released import eager as E
from released.divprune import divprune_sequence
from released.pooling import get_2dpool, output_grid, pool_groups

import lmmsqueeze
from lmmsqueeze import Signals, TokenState

pytestmark = pytest.mark.usefixtures("no_grad")

GRID = (24, 24)
#: room for float32 rounding on lmmsqueeze's side (it pools in float32): the miniature's projected
#: features are at most about 0.05 in size; a wrong window or token would be off by ~1e-2
VALUES = {"rtol": 0.0, "atol": 1e-7}


def _image_span(mini):
    return E.image_span(mini.inputs["input_ids"], mini.model.config.image_token_id)


def _ours(mini, pipeline):
    """lmmsqueeze's run, the decoder input embeddings under it and the logits, from one forward."""
    caught = {}

    def grab(module, args, kwargs):
        caught["embeds"] = kwargs["inputs_embeds"]

    handle = mini.model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with lmmsqueeze.apply(mini.model, pipeline) as run:
            logits = mini.model(**mini.inputs).logits
    finally:
        handle.remove()
    return run, caught["embeds"], logits


@pytest.fixture(scope="module")
def unreduced(miniature):
    """(start, length, embeds): the image span and the eager miniature's decoder input, no reduction."""
    with torch.no_grad():
        embeds = E.llm_inputs(miniature.eager, miniature.inputs)
    return (*_image_span(miniature), embeds)


def _decode(mini, embeds):
    """Logits of an eager decoder loop over ``embeds`` at consecutive positions (a shorter prompt after a
    pre-LLM reduction is numbered 0..L'-1 in the released LLaVA code)."""
    hidden = embeds
    positions = torch.arange(embeds.shape[1])[None]
    for i in range(len(mini.eager.model.language_model.layers)):
        hidden = E.run_layer(mini.eager, i, hidden, positions).hidden
    return E.logits_of(mini.eager, hidden)


def _splice(embeds, start, length, image):
    """The prompt with its image span replaced by ``image`` (``[M, D]``)."""
    return torch.cat((embeds[:, :start], image[None], embeds[:, start + length:]), dim=1)


def _groups_from_trace(trace, n=576):
    """Merge groups of a plain selection: a kept patch's position in the trace, -1 for a dropped one."""
    groups = torch.full((n,), -1, dtype=torch.long)
    groups[trace] = torch.arange(trace.numel())
    return groups


def _check(mini, name, trace, groups, image, start, length, embeds):
    run, ours, logits = _ours(mini, name)
    assert torch.equal(run.trace[0][0], trace), name
    assert torch.equal(run.groups[0][0], groups), name
    expected = _splice(embeds, start, length, image)
    assert ours.shape == expected.shape, (ours.shape, expected.shape)
    assert torch.allclose(ours, expected, **VALUES), float((ours - expected).abs().max())
    want = _decode(mini, expected)
    assert torch.allclose(logits, want, atol=1e-6), float((logits - want).abs().max())


def test_divprune(miniature, unreduced):
    """DivPrune, SUBSET_RATIO=0.098: 56 of 576 tokens by greedy max-min cosine distance on the projected
    features, kept in sequence order, the shorter prompt renumbered."""
    mini = miniature
    start, length, embeds = unreduced
    keep, gaps = divprune_sequence(embeds, start, length, ratio=0.098)
    # every greedy step is decided by a margin far above float32 noise in the cosines
    assert float(gaps.min()) > 1e-5, float(gaps.min())
    picked = keep[(keep >= start) & (keep < start + length)] - start
    assert picked.numel() == 56
    _check(mini, "divprune", picked, _groups_from_trace(picked), embeds[0, keep[start:start + 56]],
           start, length, embeds)


@pytest.mark.parametrize("name, mode", [("pool", "average"), ("maxpool", "max"), ("bilinear", "bilinear")])
def test_pooling(miniature, unreduced, name, mode):
    """LLaVA-NeXT's get_2dPool with stride 2 on the projected 24 x 24 grid: 144 tokens, each at the
    top-left patch of its window."""
    mini = miniature
    start, length, embeds = unreduced
    image = embeds[0, start:start + length]
    pooled = get_2dpool(image, GRID, mode)
    groups, representative = pool_groups(GRID, mode)
    assert pooled.shape[0] == representative.numel() == 144
    _check(mini, name, representative, groups, pooled, start, length, embeds)


def test_stride(miniature, unreduced):
    """stride (no released code; the plain definition): the patches at rows and columns 0, 2, 4, ... of
    the grid, i.e. ``grid[::2, ::2]`` of the projected features, 144 of 576."""
    mini = miniature
    start, length, embeds = unreduced
    grid = embeds[0, start:start + length].reshape(*GRID, -1)
    kept = grid[::2, ::2].reshape(-1, grid.shape[-1])
    trace = torch.arange(length).reshape(GRID)[::2, ::2].flatten()
    _check(mini, "stride", trace, _groups_from_trace(trace), kept, start, length, embeds)


def test_random(miniature, unreduced):
    """random is a baseline with no released code: a uniform subset drawn from a seed. Checked: the
    default keeps round(0.5 * 576) = 288 distinct patches in sequence order, the same set for the same
    seed, another set for another seed, and the decoder input holds exactly the kept projected features."""
    mini = miniature
    start, length, embeds = unreduced
    run, ours, _ = _ours(mini, "random")
    trace = run.trace[0][0]
    assert trace.numel() == 288
    assert torch.equal(trace, trace.unique())  # distinct and sorted
    assert torch.equal(run.groups[0][0], _groups_from_trace(trace))
    expected = _splice(embeds, start, length, embeds[0, start + trace])
    assert torch.allclose(ours, expected, **VALUES)
    again, _, _ = _ours(mini, "random(seed=0)")
    other, _, _ = _ours(mini, "random(seed=1)")
    assert torch.equal(again.trace[0][0], trace)
    assert not torch.equal(other.trace[0][0], trace)
    assert other.trace[0][0].numel() == 288


@pytest.mark.parametrize("name, mode", [("pool", "average"), ("maxpool", "max"), ("bilinear", "bilinear")])
def test_pooling_odd_grid(name, mode):
    """On a 27 x 27 grid (LLaVA-OneVision's SigLIP side) the released windows are floor windows: 13 x 13
    = 169 tokens for average and max pooling (the last row and column are dropped), while bilinear
    resizes to ceil(27 / 2) = 14 x 14 = 196. The reducers are called directly on a plain tensor."""
    grid = (27, 27)
    features = torch.randn(27 * 27, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = get_2dpool(features, grid, mode)
    groups, representative = pool_groups(grid, mode)
    assert expected.shape[0] == {"average": 169, "max": 169, "bilinear": 196}[mode]
    assert output_grid(grid, mode) == ((13, 13) if mode != "bilinear" else (14, 14))
    if mode == "average":  # the floor windows are exactly F.avg_pool2d's
        windows = F.avg_pool2d(features.T.reshape(1, 16, 27, 27), 2)
        assert torch.equal(windows[0].flatten(1).T, expected)
    state = lmmsqueeze.create_reducer(name).reduce(TokenState.initial(features, grids=(grid,)), Signals())
    assert state.n == expected.shape[0], (name, state.n)
    assert torch.equal(state.index, representative)
    assert torch.equal(state.assign, groups)
    assert state.grids == (output_grid(grid, mode),)
    # float32 arithmetic on standard normal features (bilinear weights are float32 too): ~4e-6 at most
    assert torch.allclose(state.hidden, expected, rtol=0.0, atol=1e-5), \
        float((state.hidden - expected).abs().max())
