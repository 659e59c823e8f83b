"""SparseVLM (v1, RETAIN_TOKN=192) at its defaults against a transcription of its released code.

The released ``LlamaDynamicvitModel.forward`` runs the sparse layers 2, 6 and 15 at full length with
their own attention and prunes their outputs; lmmsqueeze's ``sparsevlm`` runs the same three stages
at the inputs of layers 3, 7 and 16 with the attention of layers 2, 6 and 15. Per stage the image
tokens (kept ones and merged ones, as sets of original patches, in sequence order) must agree; the
recycled tokens' values entering layer 3 and the final logits (renumbered positions) too.

The released DPC-kNN adds ``torch.rand(m) * 1e-6`` (the hidden states' dtype) to the densities. On
this miniature the densities of the recycled tokens lie within ~1e-7 of one another (the hidden
states are close together), so a draw can decide a centre: at layer 6 about 44% of draws pick
recycled token 5 instead of 9 (0-based, in score order). Both sides are seeded with
``torch.manual_seed(SEED)`` right before their forward; the released loop draws from torch's global
CPU generator, one ``torch.rand`` of the density's shape per sparse layer, in layer order (nothing
else draws in between). With SEED = 0 that draw gives the same clusters as no noise at all at every
layer (asserted), so lmmsqueeze agrees whether it adds no noise or draws exactly as released; any
other draw may not.
"""

from __future__ import annotations

import pytest
import torch
from released import eager as E
from released.sparsevlm import PRUNING_LOC, SCHEDULE_192, Stage, cluster_and_merge, sparse_stage, text_raters

import lmmsqueeze
from lmmsqueeze.reducers.sparsevlm import pairwise_distances

pytestmark = pytest.mark.usefixtures("no_grad")

SEED = 0
N_LAYERS = 32
MERGED = (9, 4, 3)  # cluster_num at each sparse layer: int((int(dropped * 0.3) + 1) / 10) + 1


def _released(mini) -> tuple[list[Stage], torch.Tensor]:
    """Drive the eager decoder as ``LlamaDynamicvitModel.forward`` does; the stages and the logits."""
    start, length = E.image_span(mini.inputs["input_ids"], mini.model.config.image_token_id)
    embeds = E.llm_inputs(mini.eager, mini.inputs)
    raters, relevance = text_raters(embeds[0], start, length)
    assert 0 < raters.numel() < relevance.numel()
    assert float((relevance - relevance.mean()).abs().min()) > 1e-9, "a text token sits on the rater cut"
    hidden, positions = embeds, torch.arange(embeds.shape[1])[None]
    origins = [frozenset({i}) for i in range(length)]
    v_num, stages = length, []
    torch.manual_seed(SEED)
    for i in range(N_LAYERS):
        out = E.run_layer(mini.eager, i, hidden, positions)
        hidden = out.hidden
        if i in PRUNING_LOC:
            count = SCHEDULE_192[len(stages)]
            stage = sparse_stage(hidden, out.attention, start, v_num, raters, count, origins)
            stages.append(stage)
            hidden, v_num, origins = stage.hidden, stage.v_num, stage.origins
            positions = torch.arange(hidden.shape[1])[None]  # position_ids[:, :L']: renumbered
    return stages, E.logits_of(mini.eager, hidden)


def _check_margins(stage: Stage, count: int) -> None:
    """No decision of the released side is a near-tie (given the noise draw)."""
    ranked = stage.scores.sort(descending=True).values
    k = stage.kept.numel()
    assert k == count
    assert float(ranked[k - 1] - ranked[k]) > 1e-8, "the keep cut is a near-tie"
    dropped = stage.scores[stage.dropped].sort(descending=True).values
    m = stage.recycled.numel()
    assert m == int(stage.dropped.numel() * 0.3) + 1
    if m < dropped.numel():
        assert float(dropped[m - 1] - dropped[m]) > 1e-8, "the recycling cut is a near-tie"
    cl = stage.clustering
    c = cl.centres.numel()
    assert c == int(m / 10) + 1
    if c < m:
        score = cl.score.sort(descending=True).values
        assert float(score[c - 1] - score[c]) > 1e-9, "the centre cut is a near-tie"
        nearest = cl.dist[cl.centres].sort(dim=0).values
        others = torch.ones(m, dtype=torch.bool)
        others[cl.centres] = False
        assert float((nearest[1] - nearest[0])[others].min()) > 1e-9, "a token is equidistant to two centres"
    plain = cluster_and_merge(cl.x, c, noise=False)
    assert torch.equal(plain.centres, cl.centres) and torch.equal(plain.assign, cl.assign), \
        "the seeded density noise changed the clusters: lmmsqueeze cannot be expected to draw the same"


def _sets(groups: torch.Tensor, n: int) -> list[frozenset[int]]:
    """Per output token (0..n-1): the original patches it stands for, from ``run.groups``."""
    members: list[set[int]] = [set() for _ in range(n)]
    for original, slot in enumerate(groups.tolist()):
        if slot >= 0:
            members[slot].add(original)
    return [frozenset(s) for s in members]


def test_sparsevlm(miniature):
    """SparseVLM defaults: 576 -> 300+9 -> 200+4 -> 110+3 image tokens (kept + merged), renumbered."""
    mini = miniature
    start, _ = E.image_span(mini.inputs["input_ids"], mini.model.config.image_token_id)
    stages, expected = _released(mini)
    assert [s.v_num for s in stages] == [n + c for n, c in zip(SCHEDULE_192, MERGED, strict=True)]
    for stage, count in zip(stages, SCHEDULE_192, strict=True):
        _check_margins(stage, count)
        assert sum(map(len, stage.origins)) == len(frozenset().union(*stage.origins)), "overlapping groups"
    assert sum(len(o) for o in stages[0].origins) == 300 + stages[0].recycled.numel()

    caught = {}

    def grab(module, args, kwargs):
        caught["hidden"] = args[0] if args else kwargs["hidden_states"]

    torch.manual_seed(SEED)
    with lmmsqueeze.apply(mini.model, "sparsevlm") as run:
        handle = mini.model.model.language_model.layers[3].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            logits = mini.model(**mini.inputs).logits
        finally:
            handle.remove()

    assert len(run.trace) == len(stages), f"{len(run.trace)} stages, expected {len(stages)}"
    for s, stage in enumerate(stages):
        trace, groups = run.trace[s][0].cpu(), run.groups[s][0].cpu()
        assert trace.numel() == stage.v_num, \
            f"stage {s}: {trace.numel()} image tokens, expected {stage.v_num}"
        ours = _sets(groups, trace.numel())
        bad = [p for p, (a, b) in enumerate(zip(ours, stage.origins, strict=True)) if a != b]
        assert not bad, \
            f"stage {s} (after layer {PRUNING_LOC[s]}): {len(bad)} tokens differ, first at {bad[:5]}"
        for p, members in enumerate(stage.origins):
            assert int(trace[p]) in members, f"stage {s}, token {p}: index {int(trace[p])} not in its group"

    first = stages[0]
    k = first.kept.numel()
    got = caught["hidden"][0, start + k:start + first.v_num].cpu()
    want = first.hidden[0, start + k:start + first.v_num]
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
    got, want = caught["hidden"][0].cpu(), first.hidden[0]
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)

    assert logits.shape == expected.shape, f"{tuple(logits.shape)} logits, expected {tuple(expected.shape)}"
    assert torch.allclose(logits[:, -1], expected[:, -1], atol=1e-6), float((logits - expected).abs().max())
    assert torch.allclose(logits, expected, atol=1e-6), float((logits - expected).abs().max())


def test_recycled_distances_as_exact_as_the_released_differences():
    """DPC-kNN's distances (``|a|^2 + |b|^2 - 2 a.b`` in float64) are at least as close to the exact
    distances as the released pairwise differences in float32 (``(x1 - x2).norm(dim=-1)`` of
    ``utils.py::cluster_and_merge``), here with one dimension in the hundreds as LLM hidden states have."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 256, generator=g) * 2.0
    x[:, 7] += 400.0
    exact = (x.double()[:, None] - x.double()[None]).norm(dim=-1)
    released = (x[:, None] - x[None]).norm(dim=-1)
    ours = pairwise_distances(x)
    assert ours.dtype == torch.float32 and torch.equal(ours.diagonal(), torch.zeros(200))
    assert float((ours.double() - exact).abs().max()) <= float((released.double() - exact).abs().max())
