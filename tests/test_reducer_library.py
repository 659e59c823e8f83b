"""The reducer library: plans of every method's defaults, hand-checked rules of the parameters the
released code does not have (budgets per crop, multi-round ToMe, PruMerge+'s fixed count, the
bilinear formula), every reducer end to end on a tiny LLaVA at every placement it declares, and every
ordered pair of reducers either run end to end or refused in one line. Each method's defaults are
checked against a transcription of its released code in ``test_fidelity*.py``."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import lmmsqueeze
from lmmsqueeze import PipelineError
from lmmsqueeze.cli import app
from lmmsqueeze.reducers import Signals, TokenState, create_reducer, get_reducer, list_reducers
from lmmsqueeze.reducers._common import GRAM_BLOCK, gram, gram_macs
from lmmsqueeze.testing import flop_counter, random_signals, tiny_inputs, tiny_llava, tokens_per_layer_as_run

#: the token reducers of the library (the registry also holds ProxyV, which is tested on its own)
REDUCERS = [n for n in list_reducers() if get_reducer(n).family in ("pruning", "merging", "pooling")]

# ----------------------------------------------------------------------------- helpers


def _state(n, d=4, seed=0, grid=None):
    g = torch.Generator().manual_seed(seed)
    return TokenState.initial(torch.randn(n, d, generator=g), grids=(grid,) if grid else None)


def _cos(a, b):
    return float(F.cosine_similarity(a.double()[None], b.double()[None])[0])


def _members(out, slot):
    return sorted(torch.nonzero(out.assign == slot).flatten().tolist())


# ----------------------------------------------------------------------------- the registry


def test_at_least_15_reducers_across_the_three_families():
    names = REDUCERS
    assert len(names) >= 15
    assert {get_reducer(n).family for n in names} == {"pruning", "merging", "pooling"}
    result = CliRunner().invoke(app, ["reducers", "--json"])
    rows = [r for r in json.loads(result.stdout) if r["name"] in names]
    assert len(rows) >= 15 and all(r["cite"] and r["summary"] for r in rows)


def test_paper_default_plans_on_llava_1_5_7b():
    def per_layer(p):
        return lmmsqueeze.compile(p).tokens_per_layer()

    # PyramidDrop: lambda = 0.5 at layers 8, 16, 24
    assert per_layer("pdrop") == [576] * 8 + [288] * 8 + [144] * 8 + [72] * 8
    # SparseVLM prunes the outputs of layers 2, 6, 15 (the inputs of 3, 7, 16) to the released counts
    assert per_layer("sparsevlm(budget=64, recycle=false)") == [576] * 3 + [66] * 4 + [30] * 9 + [17] * 16
    # recycling adds int(m / 10) + 1 merged tokens, m = int(0.3 * dropped) + 1:
    # 276 -> 83 -> 9, 109 -> 33 -> 4, ...
    assert per_layer("sparsevlm") == [576] * 3 + [309] * 4 + [204] * 9 + [113] * 16
    released = {192: [300, 200, 110], 128: [303, 110, 36], 96: [238, 48, 26], 64: [66, 30, 17]}
    for budget, kept in released.items():  # SparseVLM v1, score.py's sparse_token_dict
        counts = lmmsqueeze.compile(f"sparsevlm(budget={budget}, recycle=false)").tokens_per_layer()
        assert [counts[3], counts[7], counts[16]] == kept, budget
    assert per_layer("visionzip") == [64] * 32  # [CLS] + 53 dominant + 10 contextual
    assert per_layer("dart") == [576] * 2 + [132] * 30  # 4 image pivots + 8 pivots x (128 // 8)
    assert per_layer("divprune") == [56] * 32  # round(0.098 * 576)
    assert per_layer("bilinear") == [144] * 32 and per_layer("stride") == [144] * 32
    assert per_layer("pool") == [144] * 32 and per_layer("tome") == [288] * 32
    assert per_layer("fastervlm") == [58] * 32 and per_layer("vispruner") == [58] * 32
    assert lmmsqueeze.compile("prumerge").stages[0].adaptive  # IQR outliers: the count depends on the image
    assert per_layer("prumerge(keep=144)") == [145] * 32  # 144 + the summary of the pruned tokens


@pytest.mark.parametrize("name", REDUCERS)
def test_every_reducer_runs_in_bfloat16(name):
    state = TokenState.initial(torch.randn(36, 8).bfloat16(), grids=((6, 6),))
    reducer = create_reducer(name, **SMALL.get(name, {}))
    out = reducer.reduce(state, random_signals(36, width=8, seed=1, dtype=torch.bfloat16))
    assert out.hidden.dtype == torch.bfloat16 and out.n == reducer.output_count(36, state.grids)


# ----------------------------------------------------------------------------- pruning


def test_fastervlm_keeps_the_top_cls_attention_in_order():
    state = _state(6)
    cls = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.02, 0.13])
    out = create_reducer("fastervlm", keep=3).reduce(state, Signals(cls_attention=cls))
    assert out.index.tolist() == [1, 3, 5]  # 0.4, 0.3, 0.13


def test_budgets_are_apportioned_by_crop_size():
    from lmmsqueeze.reducers.base import apportion

    assert apportion(5, [4, 16]) == [1, 4]  # exact 1.0 and 4.0
    assert apportion(3, [4, 16]) == [1, 2]  # 0.6 and 2.4: the larger remainder (0.6) gets the spare token
    assert apportion(4, [1, 1, 1, 1, 1]) == [1, 1, 1, 1, 0]  # equal remainders: earlier groups first
    assert apportion(20, [4, 16]) == [4, 16] and apportion(0, [4, 16]) == [0, 0]


def test_fastervlm_and_visionzip_keep_their_share_in_every_crop():
    """A 2x2 base crop and a 4x4 sub-crop grid whose [CLS] attentions are all higher: a global
    top-5 would take sub-crop tokens only; per crop, the base crop keeps its share (1 of 5)."""
    g = torch.Generator().manual_seed(0)
    crops = torch.tensor([0] * 4 + [1] * 16)
    state = TokenState.initial(torch.randn(20, 4, generator=g), grids=((2, 2), (4, 4)), crop_ids=crops)
    cls = torch.cat([torch.tensor([0.01, 0.04, 0.03, 0.02]), 0.1 + torch.arange(16.0) / 100])
    out = create_reducer("fastervlm", keep=5).reduce(state, Signals(cls_attention=cls))
    assert out.index.tolist() == [1, 16, 17, 18, 19]  # base: its top (0.04); sub-grid: its top 4
    keys = torch.randn(20, 8, generator=g)
    zipped = create_reducer("visionzip", dominant=5, contextual=2).reduce(
        state, Signals(cls_attention=cls, vision_keys=keys))
    assert zipped.index[:5].tolist() == [1, 16, 17, 18, 19]
    single = _state(20)  # one crop: the plain global top-k
    assert create_reducer("fastervlm", keep=5).reduce(single, Signals(cls_attention=cls)).index.tolist() == [
        15, 16, 17, 18, 19]


def test_pdrop_is_fastv_repeated_at_each_stage():
    state = _state(16)
    att = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.8, 0.2, 0.7, 0.05,
                        0.6, 0.4, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65])
    reducer = create_reducer("pdrop", keep=0.5, layer=2, step=3, stages=3)
    assert [p.layer for p in reducer.substages()] == [2, 5, 8]
    out = reducer.reduce(state, Signals(input_text_attention=att))
    # 16 -> 8 -> 4 -> 2; with one score per token every stage keeps the overall best: 0.9 (0) and 0.8 (4)
    assert out.index.tolist() == [0, 4]
    plan = lmmsqueeze.compile("pdrop(layer=2, step=3, stages=3)")
    assert [(s.layer, s.tokens_out, s.part) for s in plan.stages] == [(2, 288, (1, 3)), (5, 144, (2, 3)),
                                                                       (8, 72, (3, 3))]


def test_divprune_matches_a_naive_greedy_loop():
    state = _state(25, d=4, seed=7)
    out = create_reducer("divprune", keep=6).reduce(state, Signals())
    x = state.hidden
    dist = [[1 - _cos(x[i], x[j]) for j in range(25)] for i in range(25)]
    first = max(range(25), key=lambda i: min(dist[i][j] for j in range(25) if j != i))
    picked = [first]
    while len(picked) < 6:
        picked.append(max((i for i in range(25) if i not in picked),
                          key=lambda i: min(dist[i][s] for s in picked)))
    assert out.index.tolist() == sorted(picked)


# ----------------------------------------------------------------------------- merging


def test_visionzip_dominant_and_contextual_by_hand():
    hidden = torch.arange(8, dtype=torch.float32)[:, None].repeat(1, 2)  # token i holds [i, i]
    state = TokenState.initial(hidden)
    cls = torch.tensor([0.30, 0.01, 0.02, 0.25, 0.03, 0.04, 0.20, 0.05])
    # dominant = 0, 3, 6; the rest is 1, 2, 4, 5, 7 -> targets 1 and 4 (step 5 // 2 = 2)
    keys = torch.tensor([[1.0, 0], [1, 0], [0, 1], [1, 0], [0, 1], [0.9, 0.1], [1, 0], [0.1, 0.9]])
    out = create_reducer("visionzip", dominant=3, contextual=2).reduce(
        state, Signals(cls_attention=cls, vision_keys=keys))
    assert out.index.tolist() == [0, 3, 6, 1, 4]
    # target 1 takes 5 (keys close to [1, 0]); target 4 takes 2 and 7
    assert _members(out, 3) == [1, 5] and _members(out, 4) == [2, 4, 7]
    assert out.hidden[3].tolist() == [1 + 5, 1 + 5]  # target + mean of assigned
    assert out.hidden[4].tolist() == [4 + 4.5, 4 + 4.5]
    assert out.sizes.tolist() == [1, 1, 1, 2, 3]
    dominant_only = create_reducer("visionzip", dominant=3, contextual=0).reduce(
        state, Signals(cls_attention=cls, vision_keys=keys))
    assert dominant_only.index.tolist() == [0, 3, 6] and (dominant_only.assign >= 0).sum() == 3


def _tome_round_reference(hidden, metric, sizes, r):
    """One bipartite round written as loops over pairs; output [unmerged A (best match first), B]."""
    n = len(hidden)
    a_side, b_side = list(range(0, n, 2)), list(range(1, n, 2))
    matches = []
    for a in a_side:
        sims = [_cos(metric[a], metric[b]) for b in b_side]
        j = max(range(len(b_side)), key=lambda t: (sims[t], -t))
        matches.append((sims[j], a, b_side[j]))
    order = sorted(range(len(matches)), key=lambda t: -matches[t][0])
    dest = list(range(n))
    for t in order[:r]:
        dest[matches[t][1]] = matches[t][2]
    survivors = [matches[t][1] for t in order[r:]] + b_side
    groups = [[i for i in range(n) if dest[i] == s] for s in survivors]
    w = [sum(float(sizes[i]) for i in g) for g in groups]
    merged = torch.stack([sum(hidden[i].double() * float(sizes[i]) for i in g) / wt
                          for g, wt in zip(groups, w, strict=True)])
    merged_metric = torch.stack([sum(metric[i].double() * float(sizes[i]) for i in g) / wt
                                 for g, wt in zip(groups, w, strict=True)])
    return survivors, groups, merged, merged_metric


@pytest.mark.parametrize("keep", [9, 4])  # one round (13 -> 9), then three rounds (13 -> 7 -> 4)
def test_tome_matches_brute_force_bipartite_matching_with_sizes(keep):
    base = _state(16, d=3, seed=11)
    # start from uneven sizes: originals (0, 1), (2, 3), (4, 5) already merged
    target = torch.tensor([0, 0, 1, 1, 2, 2, *range(3, 13)])
    state = base.regroup(target, torch.randn(13, 3, generator=torch.Generator().manual_seed(12)),
                         torch.tensor([0, 2, 4, *range(6, 16)]))
    keys = torch.randn(13, 5, generator=torch.Generator().manual_seed(13))
    out = create_reducer("tome", keep=keep).reduce(state, Signals(vision_keys=keys))
    hidden, metric, sizes = state.hidden, keys, state.sizes
    index = state.index.tolist()
    n = 13
    while n > keep:
        r = min(n - keep, n // 2)
        survivors, groups, hidden, metric = _tome_round_reference(hidden, metric, sizes, r)
        sizes = torch.tensor([sum(float(sizes[i]) for i in g) for g in groups])
        index = [index[s] for s in survivors]
        n = len(survivors)
    assert out.n == keep and out.index.tolist() == index
    assert torch.allclose(out.hidden.double(), hidden, atol=1e-5)
    assert out.sizes.tolist() == sizes.tolist()


def test_prumerge_with_a_fixed_count_by_hand():
    """keep=6 (a departure from the adaptive count): the 2 outliers best first, 4 evenly spaced others,
    each plus the attention-weighted sum of its 3 nearest keys; the pruned tokens' summary comes last."""
    state = _state(30, d=3, seed=14)
    g = torch.Generator().manual_seed(15)
    cls = torch.rand(30, generator=g) * 0.02
    cls[[4, 17]] = torch.tensor([0.3, 0.4])  # two clear outliers, 17 the larger
    keys = torch.randn(30, 4, generator=g)
    out = create_reducer("prumerge", keep=6, neighbors=3).reduce(
        state, Signals(last_cls_attention=cls, last_vision_keys=keys))
    q1, q3 = np.percentile(cls.numpy(), [25, 75])
    assert [i for i in range(30) if cls[i] > q3 + 1.5 * (q3 - q1)] == [4, 17]
    rest = [i for i in range(30) if i not in (4, 17)]
    kept = [17, 4] + [rest[(2 * t + 1) * len(rest) // (2 * 4)] for t in range(4)]
    assert out.index.tolist() == [*kept, -1]
    for slot, i in enumerate(kept):
        others = sorted((j for j in range(30) if j != i), key=lambda j: -_cos(keys[i], keys[j]))[:3]
        expected = state.hidden[i] + sum(cls[j] * state.hidden[j] for j in others)
        assert torch.allclose(out.hidden[slot], expected, atol=1e-6)
    pruned = [i for i in range(30) if i not in kept]
    assert torch.allclose(out.hidden[6], sum(cls[j] * state.hidden[j] for j in pruned), atol=1e-6)
    assert _members(out, 6) == pruned and out.sizes[6] == 24


# ----------------------------------------------------------------------------- pooling


def _bilinear_reference(grid, oh, ow):
    """Half-pixel-centre bilinear resize of an [h, w, D] grid, written out."""
    h, w, _ = grid.shape
    out = torch.zeros(oh, ow, grid.shape[2], dtype=torch.float64)
    for i in range(oh):
        for j in range(ow):
            y = max((i + 0.5) * h / oh - 0.5, 0.0)
            x = max((j + 0.5) * w / ow - 0.5, 0.0)
            y0, x0 = int(y), int(x)
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            wy, wx = y - y0, x - x0
            out[i, j] = ((1 - wy) * (1 - wx) * grid[y0, x0] + (1 - wy) * wx * grid[y0, x1]
                         + wy * (1 - wx) * grid[y1, x0] + wy * wx * grid[y1, x1])
    return out


@pytest.mark.parametrize("params, out_grid", [({}, (3, 3)), ({"side": 4}, (4, 4)), ({"scale": 0.34}, (3, 3))])
def test_bilinear_matches_the_written_out_formula(params, out_grid):
    state = _state(36, d=2, seed=16, grid=(6, 6))
    out = create_reducer("bilinear", **params).reduce(state, Signals())
    expected = _bilinear_reference(state.hidden.double().view(6, 6, 2), *out_grid).view(-1, 2)
    assert out.grids == (out_grid,)
    assert torch.allclose(out.hidden.double(), expected, atol=1e-6)
    oh, ow = out_grid
    for i in range(36):  # groups: floor(r * oh / 6), floor(c * ow / 6)
        r, c = divmod(i, 6)
        assert int(out.assign[i]) == (r * oh // 6) * ow + c * ow // 6


def test_bilinear_halving_an_even_grid_is_2x2_averaging():
    state = _state(16, d=2, seed=17, grid=(4, 4))
    out = create_reducer("bilinear").reduce(state, Signals())
    pooled = create_reducer("pool").reduce(state, Signals())
    assert torch.allclose(out.hidden, pooled.hidden, atol=1e-6) and torch.equal(out.assign, pooled.assign)


def test_stride_by_hand():
    state = _state(25, grid=(5, 5))
    out = create_reducer("stride").reduce(state, Signals())
    assert out.index.tolist() == [0, 2, 4, 10, 12, 14, 20, 22, 24] and out.grids == ((3, 3),)
    assert (out.assign >= 0).sum() == 9
    assert create_reducer("stride", stride=3).reduce(state, Signals()).index.tolist() == [0, 3, 15, 18]


def test_maxpool_by_hand_on_a_4x3_grid_with_ragged_border():
    hidden = torch.tensor([[5.0, 0], [1, 7], [2, 2], [0, 9], [3, 3], [4, 1],
                           [8, 0], [6, 6], [1, 5], [0, 1], [7, 2], [9, 9]])
    out = create_reducer("maxpool").reduce(TokenState.initial(hidden, grids=((4, 3),)), Signals())
    # windows {0,1,3,4} {6,7,9,10}; the last column (2, 5, 8, 11) fills no whole window
    assert out.hidden.tolist() == [[5, 9], [8, 6]]
    assert out.index.tolist() == [0, 6] and out.sizes.tolist() == [4, 4]


# ----------------------------------------------------------------------------- costs


@pytest.mark.parametrize("name, params", [
    ("divprune", {"keep": 5}), ("tome", {"keep": 7}), ("visionzip", {"dominant": 4, "contextual": 3}),
    ("vispruner", {"keep": 8, "r": 2}),  # many rounds: one similarity matrix
    ("vispruner", {"keep": 20, "r": 8}),  # two rounds: their own products
    ("dart", {"keep": 9}), ("prumerge", {"keep": 6, "neighbors": 3}),
    ("sparsevlm", {"layer": 1, "more_layers": "2"}),
])
def test_cost_macs_equals_the_flop_counter(name, params):
    """The declared matmul MACs equal what torch's flop counter sees (FLOPs = 2 x MACs; SparseVLM's
    distances are one float64 matrix product)."""
    n, d = 30, 8
    state = _state(n, d=d, seed=18)
    reducer = create_reducer(name, **params)
    with flop_counter() as counter:
        reducer.reduce(state, random_signals(n, width=d, seed=19, keys=d))
    assert counter.get_total_flops() == 2 * reducer.cost_macs(n, d, None) > 0


@pytest.mark.parametrize("n", [1, 127, 128, 300])
def test_blocked_gram_is_the_full_product_at_about_half_the_macs(n):
    """The similarity matrix that DivPrune, VisPruner and SparseVLM share: ``x @ x.T`` (float64
    reference), exactly symmetric, with the multiply-adds :func:`gram_macs` declares as torch counts them."""
    x = torch.randn(n, 6, generator=torch.Generator().manual_seed(n))
    with flop_counter() as counter:
        got = gram(x)
    assert torch.allclose(got.double(), x.double() @ x.double().T, atol=1e-5) and torch.equal(got, got.T)
    assert counter.get_total_flops() == 2 * gram_macs(n, 6)
    # row i is multiplied by every row from the start of its block on
    assert gram_macs(n, 6) == 6 * sum(n - i // GRAM_BLOCK * GRAM_BLOCK for i in range(n))
    assert n < 200 or gram_macs(n, 6) < 0.7 * n * n * 6


def test_similarity_reducers_select_from_states_that_carry_gradients():
    """A reducer after a trainable stage (ProxyV adapters in training) gets hidden states that require
    grad; its similarity matrix is for selection and must not refuse them (``mm(out=...)`` would)."""
    hidden = torch.randn(300, 8, generator=torch.Generator().manual_seed(5)).requires_grad_()
    for name in ("divprune", "vispruner"):
        state = TokenState.initial(hidden, grids=None)
        signals = random_signals(300, width=8, seed=6, keys=8)
        out = create_reducer(name, keep=40).reduce(state, signals)
        assert out.n == 40 and out.hidden.requires_grad


# ----------------------------------------------------------------------------- end to end

#: parameters that fit the tiny model's 36 image tokens (6x6) and 6 decoder layers
SMALL = {
    "fastv": {"keep": 0.5},
    "random": {"keep": 0.5, "seed": 1},
    "visionzip": {"dominant": 0.3, "contextual": 0.1},
    "fastervlm": {"keep": 0.3},
    "vispruner": {"keep": 0.3},
    "dart": {"keep": 0.3},
    "divprune": {"keep": 0.3},
    "tome": {"keep": 0.5},
    "prumerge": {"keep": 0.25, "neighbors": 4},
}


def _default_placement(name):
    cls = get_reducer(name)
    return next((p for p in cls.placements if p != "llm"), "llm")


def _stage(name, placement, start):
    """Pipeline text of ``name`` at ``placement`` (llm stages from layer ``start``) and the next free
    layer."""
    params = dict(SMALL.get(name, {}))
    used = 0
    if placement == "llm":
        if name == "pdrop":
            params.update(layer=start, step=1, stages=2)
            used = 2
        elif name == "sparsevlm":
            params.update(layer=start, more_layers=str(start + 1), budget=64)
            used = 2
        else:
            params["layer"] = start
            used = 1
    elif placement != _default_placement(name):
        params["at"] = placement  # a second pre-LLM placement is chosen with `at`
    text = ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={str(v).lower()}"
                     for k, v in params.items())
    return (f"{name}({text})" if text else name), start + used


def _options(name):
    default = _default_placement(name)
    extra = ["llm"] if default != "llm" and "llm" in get_reducer(name).placements else []
    return [default, *extra]


@pytest.fixture(scope="module")
def tiny6():
    model, processor = tiny_llava(layers=6)
    return model, processor, tiny_inputs(processor, 1), tiny_inputs(processor, 2)


def _check_run_matches_plan(model, pipeline, inputs, generate):
    plan = lmmsqueeze.compile(pipeline, model)
    with torch.no_grad(), lmmsqueeze.apply(model, plan) as run:
        if generate:
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
        else:
            model(**inputs)
    assert run.image_tokens_per_layer == tokens_per_layer_as_run(run), pipeline
    batch = inputs["input_ids"].shape[0]
    for i, stage in enumerate(plan.stages):
        if not stage.adaptive:
            assert [t.numel() for t in run.trace[i]] == [stage.tokens_out] * batch, (pipeline, stage.label())
    return plan, run


CASES = [(n, p) for n in REDUCERS for p in get_reducer(n).placements]


@pytest.mark.parametrize("name, placement", CASES, ids=[f"{n}@{p}" for n, p in CASES])
def test_every_reducer_generates_at_every_placement_it_declares(tiny6, name, placement):
    model, _, _, inputs2 = tiny6
    pipeline, _ = _stage(name, placement, 1)
    plan, run = _check_run_matches_plan(model, pipeline, inputs2, generate=True)
    assert {s.placement for s in plan.stages} == {placement}
    assert run.image_tokens_per_layer[-1] < 36  # it did reduce something


PAIRS = [((a, pa), (b, pb)) for a, b in itertools.product(REDUCERS, repeat=2)
         for pa in _options(a) for pb in _options(b)]


@pytest.mark.parametrize("first, second", PAIRS, ids=[f"{a}@{pa}|{b}@{pb}" for (a, pa), (b, pb) in PAIRS])
def test_every_pair_runs_or_is_refused_in_one_line(tiny6, first, second):
    model, _, inputs1, _ = tiny6
    text_a, free = _stage(*first, 1)
    text_b, _ = _stage(*second, free)
    pipeline = f"{text_a} | {text_b}"
    try:
        lmmsqueeze.compile(pipeline, model)
    except PipelineError as exc:
        message = str(exc)
        assert message and "\n" not in message, message
        assert "stage 2" in message or "stage 1" in message
        return
    generate = PAIRS.index((first, second)) % 10 == 0
    _check_run_matches_plan(model, pipeline, inputs1, generate)


def test_the_refused_pairs_are_the_expected_ones(tiny6):
    """Refusals come from the rules, not from a reducer: grid readers after grid breakers, and a
    pre-LLM stage after an llm one."""
    model = tiny6[0]
    refused = []
    for (a, pa), (b, pb) in PAIRS:
        text_a, free = _stage(a, pa, 1)
        text_b, _ = _stage(b, pb, free)
        try:
            lmmsqueeze.compile(f"{text_a} | {text_b}", model)
        except PipelineError as exc:
            refused.append((a, pa, b, pb, str(exc)))
    rank = {"vision": 0, "projector": 1, "llm": 2}
    for a, pa, b, pb, message in refused:
        breaks = not get_reducer(a).keeps_grid
        needs_grid = getattr(get_reducer(b), "requires_grid", False)
        if rank[pb] < rank[pa]:
            assert "cannot follow" in message
        else:
            assert breaks and needs_grid and "needs the token grid" in message, message
    # and every pair the rules forbid is refused: nothing slips through
    predicted = {(a, pa, b, pb) for (a, pa), (b, pb) in PAIRS
                 if rank[pb] < rank[pa]
                 or (not get_reducer(a).keeps_grid and getattr(get_reducer(b), "requires_grid", False))}
    assert predicted and {r[:4] for r in refused} == predicted
