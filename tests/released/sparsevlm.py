"""SparseVLM (v1), transcribed from its released code (plain torch).

Released code: Gumpest/SparseVLMs, with the repository defaults ``USE_VERSION=1_0`` and
``RETAIN_TOKN=192``:

- ``llava/model/language_model/modelling_sparse_llama.py``, ``LlamaDynamicvitModel.forward``: the text
  raters are picked once, from the decoder's input embeddings, before layer 0; the sparse layers
  ``pruning_loc = [2, 6, 15]`` run at full length and return their own attention probabilities, and
  it is their OUTPUT that is pruned (so the next layer sees the reduced sequence); the best-scored
  dropped tokens are clustered and merged ("recycled"); ``position_ids`` is truncated to the new
  length, i.e. the reduced sequence is renumbered 0..L'-1.
- ``llava/model/language_model/score.py``, ``attn_postprocess_topk``: head-mean attention, rows of
  the raters, columns of the current image tokens, mean over the raters, ``topk(min(count,
  v_token_num - 1))`` with ``count`` from ``sparse_token_dict[192] = [300, 200, 110]``
  (``layer_dict = {2: 0, 6: 1, 15: 2}``).
- ``llava/model/language_model/utils.py``, ``cluster_and_merge`` (DPC-kNN) and ``batch_index_select``.

Quirks reproduced:

- raters: ``softmax`` over the text of (image embeddings @ text embeddings^T), mean over the image
  tokens; the text tokens scoring above their mean are raters. "Text" is everything after the image
  run (the question and the trailing ``ASSISTANT:``). Their offsets from the text start are fixed;
  at later layers they are re-based on the shorter image run.
- recycling: ``int(dropped * 0.3) + 1`` dropped tokens, taken in descending score order (the order of
  ``topk``), ``cluster_num = int(m / 10) + 1`` centres; merged tokens are inserted right after the
  kept image tokens and count as image tokens at the next sparse layer (they may be kept, or dropped
  and recycled again).
- ``cluster_and_merge``: the density uses the ``cluster_num`` nearest neighbours INCLUDING the token
  itself (distance 0); ``torch.rand * 1e-6`` noise is added to the density (call ``torch.manual_seed``
  first for a reproducible draw; ``noise=False`` leaves it out); the densest token's distance is the
  GLOBAL maximum distance; centres are the top-``cluster_num`` of ``distance * density`` and the merged
  tokens come out in that (descending) order; every token joins its nearest centre (first centre on a
  tie); the merge is a mean computed as ``sum(x / (count + 1e-6))``.
- ties in ``topk``/``argmin`` follow torch; the tests check that no cut is a near-tie.

Beside the tensors the released code produces, every image token carries the set of original patch
indices it stands for (a merged token: the union of what its members stood for).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

PRUNING_LOC = (2, 6, 15)  # decoder layers whose outputs are pruned
SCHEDULE_192 = (300, 200, 110)  # image tokens kept at each of them (RETAIN_TOKN=192, v1)


def text_raters(embeds: Tensor, v_start: int, v_num: int) -> tuple[Tensor, Tensor]:
    """Rater offsets (from the first text token after the image) and the relevance of every text token.

    Args:
        embeds: ``[L, D]`` the decoder's input embeddings of one sample.
    """
    image = embeds[v_start:v_start + v_num]
    text = embeds[v_start + v_num:]
    relevance = (image @ text.T).softmax(dim=1).mean(dim=0)  # [T]
    return torch.nonzero(relevance > relevance.mean()).flatten(), relevance


def rater_scores(attention: Tensor, v_start: int, v_num: int, raters: Tensor) -> Tensor:
    """``[v_num]`` the raters' head-mean attention on each current image token, averaged over raters.

    Args:
        attention: ``[1, H, L, L]`` the sparse layer's attention probabilities.
    """
    head_mean = attention[0].mean(dim=0)
    rows = raters + v_start + v_num
    return head_mean[rows][:, v_start:v_start + v_num].mean(dim=0)


@dataclass
class Clustering:
    """What ``cluster_and_merge`` computes for one set of recycled tokens."""

    x: Tensor  # [m, D] the recycled tokens (the input), in descending rater-score order
    merged: Tensor  # [c, D] the merged tokens, in centre order
    centres: Tensor  # [c] rows of the input that are centres, by descending density * distance
    assign: Tensor  # [m] the centre (0..c-1) each input row joins
    density: Tensor  # [m] before the noise
    score: Tensor  # [m] density * distance to the nearest denser token (noise included)
    dist: Tensor  # [m, m] pairwise distances over sqrt(width)


def cluster_and_merge(x: Tensor, cluster_num: int, noise: bool = True) -> Clustering:
    """DPC-kNN clustering of the rows of ``x`` (``[m, D]``) into ``cluster_num`` merged tokens."""
    m, width = x.shape
    dist = (x[:, None, :] - x[None, :, :]).norm(p=2, dim=-1) / width ** 0.5
    nearest = dist.topk(cluster_num, dim=-1, largest=False).values  # the token itself included
    density = (-(nearest ** 2).mean(dim=-1)).exp()
    noisy = density + torch.rand(density.shape, dtype=density.dtype) * 1e-6 if noise else density
    denser = noisy[None, :] > noisy[:, None]  # [i, j]: j is denser than i
    global_max = dist.max()
    to_denser = torch.where(denser, dist, global_max).min(dim=-1).values
    score = to_denser * noisy
    centres = score.topk(cluster_num).indices
    assign = dist[centres].argmin(dim=0)
    assign[centres] = torch.arange(cluster_num)
    count = torch.zeros(cluster_num, dtype=x.dtype).index_add_(0, assign, torch.ones(m, dtype=x.dtype))
    merged = torch.zeros(cluster_num, width, dtype=x.dtype)
    merged.index_add_(0, assign, x / (count + 1e-6)[assign, None])
    return Clustering(x, merged, centres, assign, density, score, dist)


@dataclass
class Stage:
    """One sparse layer: the reduced sequence and what was decided on the way."""

    hidden: Tensor  # [1, L', D] the layer's output, pruned and with the merged tokens inserted
    v_num: int  # image tokens in it: kept + merged
    origins: list[frozenset[int]]  # per image token, in sequence order: the original patches it stands for
    scores: Tensor  # [v_num before] the rater scores
    kept: Tensor  # image-relative indices kept, in sequence order
    dropped: Tensor  # image-relative indices dropped, in sequence order
    recycled: Tensor  # image-relative indices recycled, in descending score order
    clustering: Clustering


def sparse_stage(output: Tensor, attention: Tensor, v_start: int, v_num: int, raters: Tensor, count: int,
                 origins: list[frozenset[int]], noise: bool = True) -> Stage:
    """Prune the output of a sparse layer as ``LlamaDynamicvitModel.forward`` does (v1, with merging).

    Args:
        output: ``[1, L, D]`` the sparse layer's output hidden states.
        attention: ``[1, H, L, L]`` its attention probabilities.
        count: the schedule's count for this layer.
        origins: the original patches of each of the ``v_num`` current image tokens.
    """
    scores = rater_scores(attention, v_start, v_num, raters)
    chosen = torch.zeros(v_num, dtype=torch.bool)
    chosen[scores.topk(min(count, v_num - 1)).indices] = True
    kept = torch.nonzero(chosen).flatten()
    dropped = torch.nonzero(~chosen).flatten()
    # recycling: the best-scored 30% (+1) of the dropped tokens, in topk order
    n_recycled = int(dropped.numel() * 0.3) + 1
    recycled = dropped[scores[dropped].topk(n_recycled).indices]
    cluster_num = int(n_recycled / 10) + 1
    image = output[0, v_start:v_start + v_num]
    clustering = cluster_and_merge(image[recycled], cluster_num, noise=noise)
    hidden = torch.cat((output[:, :v_start], image[kept][None], clustering.merged[None],
                        output[:, v_start + v_num:]), dim=1)
    new_origins = [origins[int(i)] for i in kept]
    for c in range(cluster_num):
        members = recycled[clustering.assign == c]
        new_origins.append(frozenset().union(*(origins[int(i)] for i in members)))
    return Stage(hidden, kept.numel() + cluster_num, new_origins, scores, kept, dropped, recycled, clustering)
