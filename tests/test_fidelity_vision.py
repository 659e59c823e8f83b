"""VisionZip and PruMerge+ at their defaults against transcriptions of their released code.

The transcriptions (``tests/released``) read the miniature's CLIP tower run in eager mode (attention
maps, hidden states, hooked q_proj/k_proj outputs) and pass their reduced features through the
projector; lmmsqueeze runs the same weights under sdpa through ``lmmsqueeze.apply``. The kept tokens
(in sequence order, -1 for a token that stands for no single patch), the merge groups and the
projected values at the decoder input must agree.
"""

from __future__ import annotations

import pytest
import torch
from released import eager as E
from released.prumerge import prumerge_plus_features
from released.visionzip import head_mean_keys, visionzip_features

import lmmsqueeze

pytestmark = pytest.mark.usefixtures("no_grad")

#: a ranking cut or an argmax closer than this could be flipped by eager-vs-sdpa noise
MARGIN = 1e-8


def _image_start(mini):
    return E.image_span(mini.inputs["input_ids"], mini.model.config.image_token_id)[0]


def _ours(mini, pipeline):
    """lmmsqueeze's trace, groups and image-run decoder inputs for a one-stage vision pipeline."""
    with lmmsqueeze.apply(mini.model, pipeline) as run:
        embeds = E.llm_inputs(mini.model, mini.inputs)
    kept = run.trace[0][0]
    start = _image_start(mini)
    return kept, run.groups[0][0], embeds[0, start:start + kept.numel()]


def _differ(ours, released):
    """A short message: the lengths and the first position where two index lists part."""
    ours, released = ours.tolist(), released.tolist()
    # the lists may differ in length: compare the common prefix, else they part where the shorter ends
    at = next((i for i, (a, b) in enumerate(zip(ours, released, strict=False)) if a != b),
              min(len(ours), len(released)))
    return (f"ours {len(ours)} vs released {len(released)}; first difference at {at}: "
            f"ours {ours[at:at + 8]} vs released {released[at:at + 8]}")


def _vision(mini, hooked):
    return E.vision_run(mini.eager, mini.inputs["pixel_values"], hooked=hooked)


def _project(mini, features):
    return mini.eager.model.multi_modal_projector(features)[0]


def test_visionzip(miniature):
    """VisionZip 54 + 10 (released call ``visionzip(model, dominant=54, contextual=10)``): [CLS], 53 dominant
    patches in order, 10 contextual tokens in target order; every patch in a group."""
    mini = miniature
    # the metric layer: the one whose output is hidden_states[-2] (released r = [0] * 22 + [1] + [0])
    metric_layer = mini.eager.config.vision_config.num_hidden_layers - 2
    vision = _vision(mini, hooked=(metric_layer,))
    heads = mini.eager.config.vision_config.num_attention_heads
    released = visionzip_features(vision.attentions[-2], vision.hidden_states[-2],
                                  head_mean_keys(vision.k[metric_layer], heads), dominant=54, contextual=10)
    n_patches = vision.hidden_states[-2].shape[1] - 1
    assert released.features.shape[1] == 64
    assert released.dominant.numel() == 54 and released.targets.numel() == 10

    # no near-ties: the 53rd/54th [CLS]-attention scores, and each merged token's best/second-best target
    ranked = released.cls_scores.sort(descending=True).values
    assert float(ranked[52] - ranked[53]) > MARGIN
    best_two = released.similarity.topk(2, dim=1).values
    assert float((best_two[:, 0] - best_two[:, 1]).min()) > MARGIN

    # trace: [CLS] (-1), dominant patches ascending, contextual targets; indices over the patches
    expected_kept = torch.cat([torch.tensor([-1]), released.dominant[1:] - 1, released.targets - 1])
    n_dom = released.dominant.numel()
    expected_groups = torch.full((n_patches,), -1, dtype=torch.long)
    expected_groups[released.dominant[1:] - 1] = torch.arange(1, n_dom)
    expected_groups[released.targets - 1] = n_dom + torch.arange(released.targets.numel())
    expected_groups[released.merged - 1] = n_dom + released.slot
    assert (expected_groups >= 0).all()

    kept, groups, values = _ours(mini, "visionzip")
    assert torch.equal(kept.cpu(), expected_kept), "trace: " + _differ(kept.cpu(), expected_kept)
    assert torch.equal(groups.cpu(), expected_groups), "groups: " + _differ(groups.cpu(), expected_groups)
    expected = _project(mini, released.features)
    assert values.shape == expected.shape, (values.shape, expected.shape)
    assert torch.allclose(values, expected, atol=1e-5), float((values - expected).abs().max())


def test_prumerge(miniature):
    """PruMerge+ (adaptive, as the released ``forward`` calls it): IQR outliers by score, then spatial
    samples, each enriched by its 32 nearest-key tokens, then one extra token summarising the rest."""
    mini = miniature
    last = mini.eager.config.vision_config.num_hidden_layers - 1  # the released hooks sit on layers[23]
    vision = _vision(mini, hooked=(last,))
    released = prumerge_plus_features(vision.hidden_states[-2], vision.q[last], vision.k[last])
    n_patches = vision.hidden_states[-2].shape[1] - 1
    n_kept = released.idx.numel()
    assert 0 < released.outliers < n_kept < n_patches
    assert released.features.shape[1] == n_kept + 1
    assert torch.unique(released.idx).numel() == n_kept

    # no near-ties: scores against the outlier bound, the outliers' order, the 32nd/33rd neighbour
    assert float((released.cls_attn.double() - released.upper_bound).abs().min()) > MARGIN
    outlier_scores = released.cls_attn[released.idx[:released.outliers]]
    assert float((outlier_scores[:-1] - outlier_scores[1:]).min()) > MARGIN
    sims = released.neighbour_sims
    assert float((sims[:, 31] - sims[:, 32]).min()) > MARGIN

    expected_kept = torch.cat([released.idx, torch.tensor([-1])])
    expected_groups = torch.full((n_patches,), n_kept, dtype=torch.long)  # the extra token holds the rest
    expected_groups[released.idx] = torch.arange(n_kept)

    kept, groups, values = _ours(mini, "prumerge")
    assert torch.equal(kept.cpu(), expected_kept), "trace: " + _differ(kept.cpu(), expected_kept)
    assert torch.equal(groups.cpu(), expected_groups), "groups: " + _differ(groups.cpu(), expected_groups)
    expected = _project(mini, released.features)
    assert values.shape == expected.shape, (values.shape, expected.shape)
    assert torch.allclose(values, expected, atol=1e-5), float((values - expected).abs().max())
