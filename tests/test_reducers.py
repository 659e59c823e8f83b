"""Reducers and TokenState against hand-computed selections; parametrised over the registry."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lmmsqueeze
from lmmsqueeze.reducers import Signals, TokenState, create_reducer, list_reducers, reducer_params
from lmmsqueeze.reducers.base import resolve_keep
from lmmsqueeze.testing import random_signals


def _state(n=16, d=4, grid=(4, 4)):
    hidden = torch.arange(n * d, dtype=torch.float32).view(n, d)
    return TokenState.initial(hidden, grids=(grid,) if grid else None)


@pytest.mark.parametrize("name", list_reducers())
def test_every_reducer_honours_its_declared_count_and_grid(name):
    """Whatever a reducer does, it returns output_count tokens (unless its count is adaptive), valid
    indices (-1 for a token made from no single one) and consistent groups."""
    state = _state()
    reducer = create_reducer(name, **({"keep": 5} if name == "dart" else {}))
    out = reducer.reduce(state, random_signals(state.n))
    if not reducer.adaptive:
        assert out.n == reducer.output_count(state.n, state.grids)
    assert out.hidden.shape == (out.n, 4)
    assert ((out.index >= -1) & (out.index < 16)).all()
    assert (out.grids is not None) == reducer.keeps_grid
    # every output token's group contains its representative, and sizes count the group members
    real = out.index >= 0
    assert torch.equal(out.assign[out.index[real]], torch.arange(out.n)[real])
    members = torch.bincount(out.assign[out.assign >= 0], minlength=out.n).float()
    assert torch.equal(members[real], out.sizes[real]) and bool((out.sizes[~real] >= members[~real]).all())


@pytest.mark.parametrize("name", list_reducers())
def test_every_reducer_is_a_frozen_dataclass_with_defaults(name):
    reducer = create_reducer(name)
    assert dataclasses.is_dataclass(reducer)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(reducer, next(iter(reducer_params(name))), 1)
    assert reducer.cite and (type(reducer).__doc__ or "").strip()


def test_fastv_keeps_highest_attention_in_original_order():
    state = _state(6, grid=None)
    att = torch.tensor([0.1, 0.5, 0.05, 0.3, 0.02, 0.03])
    out = create_reducer("fastv", keep=3).reduce(state, Signals(text_attention=att))
    assert out.index.tolist() == [0, 1, 3]
    assert torch.equal(out.hidden, state.hidden[[0, 1, 3]])


def test_random_is_seeded_and_uniform():
    state = _state(100, grid=None)
    a = create_reducer("random", keep=0.3, seed=7).reduce(state, Signals())
    b = create_reducer("random", keep=0.3, seed=7).reduce(state, Signals())
    c = create_reducer("random", keep=0.3, seed=8).reduce(state, Signals())
    assert torch.equal(a.index, b.index) and not torch.equal(a.index, c.index)
    assert a.n == 30 and a.index.unique().numel() == 30
    # chi-square-ish sanity: over many seeds every token is kept about 30% of the time
    counts = torch.zeros(100)
    for seed in range(300):
        counts[create_reducer("random", keep=30, seed=seed).reduce(state, Signals()).index] += 1
    assert counts.min() > 50 and counts.max() < 130


def test_pool_hand_computed_on_a_4x3_grid_with_ragged_border():
    hidden = torch.arange(12, dtype=torch.float32).view(12, 1)
    state = TokenState.initial(hidden, grids=((4, 3),))
    out = create_reducer("pool").reduce(state, Signals())
    # windows {0,1,3,4} and {6,7,9,10}; the third column (2, 5, 8, 11) fills no whole window: dropped
    assert out.hidden.flatten().tolist() == [2.0, 8.0]
    assert out.index.tolist() == [0, 6] and out.sizes.tolist() == [4, 4] and out.grids == ((2, 1),)
    assert out.assign.tolist() == [0, 0, -1, 0, 0, -1, 1, 1, -1, 1, 1, -1]


def test_keep_resolution():
    assert resolve_keep(0.5, 576) == 288
    assert resolve_keep(0.25, 10) == 2  # 2.5 rounds to even, as Python's round
    assert resolve_keep(0.35, 10) == 4  # 3.5 too
    assert resolve_keep(1.0, 7) == 7
    assert resolve_keep(64, 576) == 64
    assert resolve_keep(0.001, 10) == 1


def test_select_and_regroup_compose_original_indices():
    state = _state(8, grid=None)
    first = state.select(torch.tensor([6, 1, 3, 7]))
    assert first.index.tolist() == [1, 3, 6, 7]
    # merge slots {0,1} -> new 0 (represented by slot 1), drop slot 2, keep slot 3 as new 1
    merged = first.regroup(torch.tensor([0, 0, -1, 1]), torch.zeros(2, 4), torch.tensor([1, 3]))
    assert merged.index.tolist() == [3, 7]
    assert merged.assign.tolist() == [-1, 0, -1, 0, -1, -1, -1, 1]
    assert merged.sizes.tolist() == [2, 1]


def test_public_api_names_the_registry():
    assert {"fastv", "pool", "random"} <= set(lmmsqueeze.list_reducers())
    assert lmmsqueeze.get_reducer("fastv").family == "pruning"


def test_states_of_several_images_concatenate_with_offsets():
    """Image A: 4 tokens, tokens 1 and 2 merged into slot 1, token 3 dropped; image B: 2 untouched
    tokens in 2 crops. As one sample: B's original indices start at 4, its slots at 2, its crops at 1."""
    a = TokenState(torch.zeros(2, 3), torch.tensor([0, 1]), torch.tensor([1.0, 2.0]), torch.tensor([0, 0]),
                   None, torch.tensor([0, 1, 1, -1]))
    b = TokenState.initial(torch.ones(2, 3), grids=((1, 1), (1, 1)), crop_ids=torch.tensor([0, 1]))
    s = TokenState.concat([a, b], crops=[1, 2])
    assert s.index.tolist() == [0, 1, 4, 5] and s.assign.tolist() == [0, 1, 1, -1, 2, 3]
    assert s.crop_ids.tolist() == [0, 0, 1, 2] and s.sizes.tolist() == [1, 2, 1, 1] and s.grids is None
    assert s.hidden.shape == (4, 3) and TokenState.concat([b, b], crops=[2, 2]).grids == ((1, 1),) * 4


BUILT_IN = [n for n in list_reducers()
            if lmmsqueeze.get_reducer(n).__module__.startswith("lmmsqueeze.reducers.")]


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_built_in_reducer_names_its_released_code_and_has_a_fidelity_test(name):
    """A built-in method says which released code its defaults reproduce and how faithfully, and a test
    in tests/test_fidelity*.py runs it against a transcription of that code (baselines: their definition)."""
    from pathlib import Path

    from lmmsqueeze.reducers import reducer_info

    info = reducer_info(name)
    assert info["fidelity"].startswith(("exact", "approx: ", "baseline: ")), info["fidelity"]
    assert info["code"] or info["fidelity"].startswith("baseline: ")
    tests = "".join(p.read_text() for p in Path(__file__).parent.glob("test_fidelity*.py"))
    assert f"def test_{name}(" in tests or f'"{name}"' in tests
