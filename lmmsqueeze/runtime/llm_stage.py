"""One ``llm`` stage at the input of decoder layer K: reduce each sample's image tokens, lay the shorter
sequence out and number it.

The image tokens take the columns of their representatives (sorted), filled in the order the reducer
returned them; text columns stay. A sample that keeps fewer tokens than another is filled up with
some of its dropped columns, masked out everywhere (keys, probes, decode), so the batch stays
rectangular and each sample computes exactly what it would alone. Positions follow the stage's
policy (:mod:`.positions`); the segment's cos/sin are computed from them once.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

from ..compose.plan import PlannedStage
from ..errors import ModelError
from ..reducers.base import LLM_SIGNALS, Signals, TokenState
from .llm_signals import input_signals, reuses_keys, signals_of, stage_signals
from .positions import next_position, renumber
from .records import Segment, rows_of


def text_columns(sample: Any, padding: Tensor) -> Tensor:
    """The columns of a sample's prompt tokens after its last image token (real ones only)."""
    first = int(sample.slots.max()) + 1 if sample.slots.numel() else 0
    cols = torch.arange(first, padding.shape[0], device=padding.device)
    return cols[padding[cols]]


def segment_rope(family: Any, hidden: Tensor, seg: Segment) -> tuple[Tensor, Tensor]:
    """cos/sin of a segment's position ids (M-RoPE ids are three rows)."""
    return family.rotary(hidden, seg.ids if family.mrope else seg.ids[0])


def run_llm_stage(run: Any, stage: PlannedStage, hidden: Tensor, layer: nn.Module,
                  rope: tuple[Tensor, Tensor], prev: Segment | None) -> tuple[Segment, Tensor, Tensor | None]:
    """Run ``stage`` on every sample at layer ``stage.layer``; returns the new segment, the rows of the
    shorter sequence (``[B, n, D]``) and, when scoring projected layer K's keys and the stage kept its
    rows unchanged (pruning), the key projection of those rows (``[B, n, d_kv]``) for layer K to reuse."""
    p = run.prefill
    batch, length, _ = hidden.shape
    device = hidden.device
    padding = p.current_padding(stage.layer - 1)
    ids = prev.ids if prev is not None else p.ids
    needs = stage.reducer.needs | (stage.reducer.optional & run.plan.geometry.signals)
    measured = dict(p.llm_signals.pop(stage.layer, {}))  # read once: freed with the stage
    incoming, rope = rope, tuple(t.expand(batch, -1, -1) for t in rope)
    start = time.perf_counter()
    with run.model_work():  # what layer K reuses of it is the layer's work; the rest is charged below
        measured.update(input_signals(layer, run.family.final_norm, hidden, rope, padding, needs))
    reading = time.perf_counter() - start
    columns = torch.cumsum(padding.long(), 1) - 1  # each column's place in its sample's own sequence
    projected = measured.pop("k_proj", None)  # layer K's keys, projected for scoring
    if not reuses_keys(stage.reducer):
        projected = None
    keeps, sources, owners, fills = [], [], [], []
    for b, sample in enumerate(p.samples):
        if not sample.slots.numel():
            keeps.append(torch.arange(length, device=device))
            sources.append(keeps[-1])
            owners.append(torch.full((length,), -1, dtype=torch.long, device=device))
            fills.append((None, None))
            run.record(stage, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))
            continue
        state = sample.meta.with_hidden(hidden[b, sample.slots])
        text = text_columns(sample, padding[b])
        signals = _signals(stage, needs, state, sample, measured, b, text, columns[b], p.relevance)
        new = stage.reducer.reduce(state, signals)
        expected = stage.reducer.output_count(state.n, state.grids)
        if new.n != expected and not stage.adaptive:
            raise ModelError(
                f"{stage.name} returned {new.n} tokens, but its output_count promises {expected}"
            )
        src = new.sources()
        if bool((src < 0).any()):
            raise ModelError(f"{stage.name}: inside the LLM every output token needs a representative "
                             "among its input tokens")
        rep_cols = sample.slots[src]  # in the reducer's order
        if projected is not None and not torch.equal(new.hidden, hidden[b, rep_cols]):
            projected = None  # the stage changed rows: their keys must be projected anew
        image_cols = torch.sort(rep_cols).values  # the columns the image tokens take, filled in that order
        is_text = torch.ones(length, dtype=torch.bool, device=device)
        is_text[sample.slots] = False
        keep = torch.sort(torch.cat([torch.nonzero(is_text).flatten(), image_cols])).values
        at = torch.searchsorted(keep, image_cols)
        source = keep.clone()
        source[at] = rep_cols  # the column whose position each image token takes
        owner = torch.full((keep.numel(),), -1, dtype=torch.long, device=device)
        owner[at] = new.crop_ids
        keeps.append(keep)
        sources.append(source)
        owners.append(owner)
        fills.append((at, new.hidden))
        sample.slots = at
        sample.meta = new.with_hidden(torch.empty(new.n, 0, device=device))
        run.record(stage, new.index, new.assign)
    longest = max(int(k.numel()) for k in keeps)
    rows, alive_rows = [], []
    for b, (keep, (at, values)) in enumerate(zip(keeps, fills, strict=True)):
        alive = torch.ones(longest, dtype=torch.bool, device=device)
        if keep.numel() < longest:  # filler: dropped columns, masked out everywhere
            spare = torch.ones(length, dtype=torch.bool, device=device)
            spare[keep] = False
            filler = torch.nonzero(spare).flatten()[: longest - keep.numel()]
            order = torch.argsort(torch.cat([keep, filler]))
            keep = torch.cat([keep, filler])[order]
            sources[b] = torch.cat([sources[b], filler])[order]
            owners[b] = torch.cat([owners[b], torch.full_like(filler, -1)])[order]
            alive = ~torch.isin(keep, filler)
            keeps[b] = keep
            if at is not None:
                at = _relocate(at, order)
                p.samples[b].slots = at
        row = hidden[b, keep]  # a new tensor (index gather): written below without touching hidden
        if at is not None:
            row[at] = values.to(row.dtype)
        rows.append(row)
        alive_rows.append(alive)
    local_keep, local_source = torch.stack(keeps), torch.stack(sources)
    local_alive = torch.stack(alive_rows)
    keep = local_keep if prev is None else prev.keep.gather(1, local_keep)
    if prev is not None and prev.alive is not None:
        local_alive = local_alive & prev.alive.gather(1, local_keep)
    real = padding.gather(1, local_keep) & local_alive
    new_ids = ids.gather(2, local_source[None].expand(ids.shape[0], -1, -1))
    if stage.positions == "renumber":
        new_ids = renumber(new_ids, real, torch.stack(owners))
    delta = next_position(p.ids, p.padding) - next_position(new_ids, real)
    pos = prev.position_ids if prev is not None else None
    source = local_source if prev is None else prev.source.gather(1, local_source)
    seg = Segment(stage, keep, source, new_ids, delta, None if bool(local_alive.all()) else local_alive)
    if torch.equal(new_ids, ids):  # positions unchanged (e.g. as many tokens, renumbered): the same cos/sin
        seg.position_embeddings = incoming
    seg.position_ids = (new_ids[0] if ids.shape[0] == 1
                        else (None if pos is None else pos.gather(1, local_keep)))
    if projected is not None:
        projected = projected.gather(1, local_keep[..., None].expand(-1, -1, projected.shape[-1]))
        reading *= 1.0 - local_keep.shape[1] / length
    run.charge(reading)
    return seg, torch.stack(rows), projected


def _relocate(at: Tensor, order: Tensor) -> Tensor:
    """Where the entries at ``at`` went after a reordering by ``order``."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse[at]


def _signals(stage: PlannedStage, needs: frozenset[str], state: TokenState, sample: Any,
             measured: dict[str, Any], b: int, text: Tensor, columns: Tensor,
             relevance: list[Tensor] | None) -> Signals:
    """The signals a stage reads for sample ``b``, aligned with ``state``'s tokens."""
    values = stage_signals(needs & LLM_SIGNALS, measured, b, sample.slots, text, columns,
                           None if relevance is None else relevance[b])
    for name in needs & set(sample.vision):  # vision signals of the tokens' originals
        values[name] = rows_of(sample.vision[name], state.index)
    return signals_of(values)
