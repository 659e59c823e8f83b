"""Analytic prefill costs of the images a run actually sees."""

from __future__ import annotations

from typing import Any

from ..compose.plan import Plan, compile_pipeline
from ..models import Family


class InputCosts:
    """Analytic prefill costs for the images a run actually sees.

    A plan is compiled against the model's reference geometry; LLaVA-NeXT and Qwen2-VL images give
    as many tokens (and such grids) as their size says, and an adaptive stage (PruMerge+) keeps as
    many tokens as the image's data says. :meth:`add` counts the images of a batch, :meth:`observe`
    takes what a run's adaptive stages kept; each distinct (geometry, kept counts) is compiled once
    (a refusal, e.g. ``keep`` above a small image's token count, raises before the batch runs), and
    :meth:`cost` averages.
    """

    def __init__(self, plan: Plan, family: Family):
        self.plan, self.family = plan, family
        self._plans: dict[Any, Plan] = {(plan.geometry, ()): plan}
        self._counts: dict[Any, int] = {}
        self._pending: list[Any] = []
        self._adaptive = [s.index for s in plan.stages if s.adaptive]

    def add(self, inputs: Any) -> list[Any]:
        """Count the images of a batch; returns their geometries."""
        geometries = self.family.image_geometries(inputs)
        for g in geometries:
            self._plan_for(g, ())
        if self._adaptive:  # counted once the run says what the adaptive stages kept
            self._pending = geometries
        else:
            for g in geometries:
                self._counts[(g, ())] = self._counts.get((g, ()), 0) + 1
        return geometries

    def observe(self, run: Any) -> None:
        """After a batch ran: the tokens each image kept at every adaptive stage."""
        kept = run.observed_counts() if self._adaptive else []
        for g, counts in zip(self._pending, kept, strict=True):
            key = (g, tuple(counts[i] for i in self._adaptive))
            self._plan_for(*key)
            self._counts[key] = self._counts.get(key, 0) + 1
        self._pending = []

    def _plan_for(self, geometry: Any, observed: tuple[int, ...]) -> Plan:
        key = (geometry, observed)
        if key not in self._plans:
            # `observed` is () for a plan by sizes alone (before a run reports the adaptive stages' counts)
            at = dict(zip(self._adaptive, observed, strict=False)) or None
            self._plans[key] = compile_pipeline(self.plan.canonical, geometry, observed=at)
        return self._plans[key]

    def counts(self) -> dict[Any, int]:
        """The images seen, by (geometry, adaptive stages' kept counts): what :meth:`merge` takes."""
        return dict(self._counts)

    def merge(self, counts: dict[Any, int]) -> None:
        """Add the images another run of the same plan saw (its :meth:`counts`; data-parallel shards)."""
        for key, n in counts.items():
            self._plan_for(*key)
            self._counts[key] = self._counts.get(key, 0) + n

    def tokens_per_layer(self) -> list[float]:
        """Image tokens entering each decoder layer, per image, averaged over the images seen."""
        counts = self._counts or {(self.plan.geometry, ()): 1}
        total = sum(counts.values())
        per_layer = [0.0] * self.plan.geometry.num_layers
        for key, n in counts.items():
            for i, t in enumerate(self._plans[key].tokens_per_layer()):
                per_layer[i] += t * n / total
        return [int(t) if float(t).is_integer() else round(t, 2) for t in per_layer]

    def cost(self, text_tokens: int) -> dict[str, float]:
        """``prefill_flops``, ``vanilla_prefill_flops``, ``overhead_flops`` (the stages' own work: probes,
        scoring, selection, ProxyV's light MLPs; means over the images seen) and ``saving``."""
        counts = self._counts or {(self.plan.geometry, ()): 1}
        total = sum(counts.values())
        costs = [(self._plans[key].cost(text_tokens=text_tokens), n) for key, n in counts.items()]
        prefill = sum(c.prefill_flops * n for c, n in costs) / total
        vanilla = sum(c.vanilla_prefill_flops * n for c, n in costs) / total
        overhead = sum(2 * c.parts()["overhead"] * n for c, n in costs) / total
        return {"prefill_flops": round(prefill), "vanilla_prefill_flops": round(vanilla),
                "overhead_flops": round(overhead),
                "saving": 1.0 - prefill / vanilla if vanilla else 0.0}
