"""ToMe, VisPruner and FasterVLM at their default parameters against transcriptions of their released code.

All three act on the vision features LLaVA feeds its projector (``hidden_states[-2][:, 1:]`` of the
CLIP tower: the output of layer 22 of 24, [CLS] dropped). The transcriptions (``tests/released``) read
the eager tower's hidden states, attentions and hooked key projections; lmmsqueeze runs the same
weights under sdpa. The kept original indices in sequence order, the merge groups and the values at
the decoder input (the reduced features through the projector) must agree.

Margins: the eager CLIP softmax runs in float32, so the eager [CLS] attention differs from a float64
one by ~3e-10 and the eager features' cosine similarities by ~1e-8 (keys: ~3e-8) on the miniature;
every ranking cut and every order the released code carries forward is asserted to be wider than
that, so a failure means disagreement, not noise.
"""

from __future__ import annotations

import pytest
import torch
from released import eager as E
from released.fastervlm import fastervlm_mask
from released.tome import bipartite_soft_matching, head_mean_keys, merge_source, merge_wavg
from released.vispruner import vispruner_select

import lmmsqueeze

pytestmark = pytest.mark.usefixtures("no_grad")

#: ``hidden_states[-2]`` of the 24-layer tower is the output of encoder layer 22
FEATURE_LAYER = 22
ATTENTION_MARGIN = 3e-9
COSINE_MARGIN = 5e-8


def _image_span(mini):
    return E.image_span(mini.inputs["input_ids"], mini.model.config.image_token_id)


def _ours(mini, pipeline):
    """lmmsqueeze's run record and the decoder input embeddings of the reduced prompt."""
    with lmmsqueeze.apply(mini.model, pipeline) as run:
        embeds = E.llm_inputs(mini.model, mini.inputs)
    return run, embeds


def _features(mini, hooked=()):
    vision = E.vision_run(mini.eager, mini.inputs["pixel_values"], hooked)
    return vision, vision.hidden_states[-2][:, 1:]


def _pruned_groups(kept, length):
    groups = torch.full((length,), -1, dtype=torch.long)
    groups[kept] = torch.arange(kept.numel())
    return groups


def _descending_gaps(scores, first):
    """Gaps between neighbours of ``scores`` sorted descending, from rank ``first - 1`` on."""
    ordered = scores.sort(descending=True).values
    return ordered[first - 1:-1] - ordered[first:]


def test_tome(miniature):
    """ToMe keep=0.5: one bipartite round, r = 288, metric = head-mean keys of the feature layer."""
    mini = miniature
    start, length = _image_span(mini)
    vision, features = _features(mini, hooked=(FEATURE_LAYER,))
    heads = mini.eager.config.vision_config.num_attention_heads
    metric = head_mean_keys(vision.k[FEATURE_LAYER], heads)[:, 1:]  # LLaVA's features carry no [CLS]
    matching = bipartite_soft_matching(metric, r=length - round(length * 0.5))
    assert matching.r == 288 and matching.stay.shape[1] == 0  # every A token merges at the default
    top2 = matching.scores[0].topk(2, dim=-1).values
    assert float((top2[:, 0] - top2[:, 1]).min()) > COSINE_MARGIN  # every A token's partner is clear
    if matching.stay.shape[1]:  # the staying A tokens' ranked order reaches the output
        assert float(_descending_gaps(matching.best[0], matching.r).min()) > COSINE_MARGIN

    merged, size = merge_wavg(matching, features)
    source = merge_source(matching, features)[0]
    assert torch.equal(source.sum(dim=0), torch.ones(length, dtype=source.dtype))
    assert float(size.sum()) == length
    slots = matching.output_slots(length)[0]  # [staying A (ranked), B 1, 3, ..., 575]
    groups = source.argmax(dim=0)
    expected = mini.eager.model.multi_modal_projector(merged)[0]

    run, embeds = _ours(mini, "tome")
    assert torch.equal(run.trace[0][0], slots), run.trace[0][0][:12]
    assert torch.equal(run.groups[0][0], groups), (run.groups[0][0] != groups).nonzero().flatten()[:12]
    got = embeds[0, start:start + slots.numel()]
    assert torch.allclose(got, expected, atol=1e-5), float((got - expected).abs().max())


def test_vispruner(miniature):
    """VisPruner keep=0.1 (58 tokens): 29 by [CLS] attention, 29 by iterative duplicate removal."""
    mini = miniature
    start, length = _image_span(mini)
    vision, features = _features(mini)
    total = round(length * 0.1)
    selection = vispruner_select(features, vision.attentions[-2][:, :, 0, 1:], visual_token_num=total)
    important = selection.important.shape[1]
    assert (total, important, selection.residual.shape[1]) == (58, 29, 29)
    assert len(selection.rounds) == 65 and selection.cuts[-1] == 6  # 547 -> 29: 64 rounds of 8, then 6
    # the cut between important and residual, and the residual's attention order (it drives the split)
    assert float(_descending_gaps(selection.attention[0], important).min()) > ATTENTION_MARGIN
    # each cut and the survivors' carried order
    for best, r in zip(selection.rounds, selection.cuts, strict=True):
        assert float(_descending_gaps(best[0], r).min()) > COSINE_MARGIN

    kept = torch.nonzero(selection.mask[0]).flatten()
    assert kept.numel() == total
    expected = mini.eager.model.multi_modal_projector(features[:, kept])[0]

    run, embeds = _ours(mini, "vispruner")
    assert torch.equal(run.trace[0][0], kept), (run.trace[0][0], kept)
    assert torch.equal(run.groups[0][0], _pruned_groups(kept, length))
    got = embeds[0, start:start + total]
    assert torch.allclose(got, expected, atol=1e-5), float((got - expected).abs().max())


@pytest.mark.parametrize("path, neighbours", [
    ("_by_products", None), ("_from_matrix", None),
    ("_from_neighbours", 16), ("_from_neighbours", 2), ("_from_neighbours", 1),  # 1: every row reads its row
])
def test_vispruner_rounds_follow_the_released_loop(path, neighbours, monkeypatch):
    """Each way of running the duplicate-removal rounds (per-round products; one matrix, on a device;
    one matrix with neighbour lists, on the host) leaves the released loop's residual, in its order,
    over 44 rounds of 400 float64 candidates with clusters of near-duplicates."""
    from lmmsqueeze.reducers import vispruner as module

    if neighbours is not None:
        monkeypatch.setattr(module, "NEIGHBOURS", neighbours)
    generator = torch.Generator().manual_seed(3)
    centres = torch.randn(50, 24, generator=generator, dtype=torch.float64)
    features = centres.repeat_interleave(9, 0)[:450] + 0.3 * torch.randn(450, 24, generator=generator,
                                                                            dtype=torch.float64)
    attention = torch.rand(1, 4, 450, generator=generator, dtype=torch.float64)
    selection = vispruner_select(features[None], attention, visual_token_num=100, important_ratio=0.5)
    assert len(selection.rounds) == 44 and selection.cuts[-1] == 6  # 400 -> 50: 43 rounds of 8, then 6
    ranked = attention.mean(dim=1)[0].argsort(descending=True)
    rest = ranked[50:]
    unit = features[rest] / features[rest].norm(dim=1, keepdim=True)
    drops = selection.cuts
    if path == "_by_products":
        order = module._by_products(unit, drops)
    elif path == "_from_matrix":
        order = module._from_matrix(unit @ unit.T, drops)
    else:
        order = torch.from_numpy(module._from_neighbours(unit @ unit.T, drops))
    assert torch.equal(rest[order], selection.residual[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vispruner_host_order_is_torchs_stable_descending_argsort(dtype):
    """The host path's ranking equals ``torch.argsort(descending=True, stable=True)``, ties (signed
    zeros, infinities, repeated values) in their original order."""
    from lmmsqueeze.reducers.vispruner import _descending

    generator = torch.Generator().manual_seed(5)
    pool = torch.tensor([-float("inf"), -2.5, -1e-30, -0.0, 0.0, 1e-30, 0.75, 1.0, float("inf")], dtype=dtype)
    for size in (1, 2, 7, 300, 1277):
        values = torch.cat([pool[torch.randint(len(pool), (size,), generator=generator)],
                            torch.randn(size, generator=generator, dtype=dtype)])[torch.randperm(2 * size,
                                                                                          generator=generator)]
        expected = torch.argsort(values, descending=True, stable=True)
        assert torch.equal(torch.from_numpy(_descending(values.numpy())).long(), expected), size


def test_fastervlm(miniature):
    """FasterVLM keep=0.1 (58 tokens): top [CLS] attention of the feature layer, spatial order."""
    mini = miniature
    start, length = _image_span(mini)
    vision, features = _features(mini)
    total = round(length * 0.1)
    mask, attention = fastervlm_mask(vision.attentions[-2][:, :, 0, 1:], visual_token_num=total)
    ordered = attention[0].sort(descending=True).values
    assert float(ordered[total - 1] - ordered[total]) > ATTENTION_MARGIN

    kept = torch.nonzero(mask[0]).flatten()
    assert kept.numel() == total == 58
    expected = mini.eager.model.multi_modal_projector(features[:, kept])[0]

    run, embeds = _ours(mini, "fastervlm")
    assert torch.equal(run.trace[0][0], kept), (run.trace[0][0], kept)
    assert torch.equal(run.groups[0][0], _pruned_groups(kept, length))
    got = embeds[0, start:start + total]
    assert torch.allclose(got, expected, atol=1e-5), float((got - expected).abs().max())
