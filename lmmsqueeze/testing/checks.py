"""Independent references that tests compare a run against: torch's flop counter, a no-cache forward's
logits, and a run's plan with what its adaptive stages actually kept."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..compose.plan import compile_pipeline


def _cdist_flop(x1_shape, x2_shape, *args, **kwargs) -> int:
    """torch's counter has no formula for ``cdist``: its m x n distances over d dimensions are m*n*d
    multiply-adds, like the matrix product it replaces (2 FLOPs each)."""
    *_, m, d = x1_shape
    return 2 * m * x2_shape[-2] * d


def flop_counter():
    """``torch.utils.flop_counter.FlopCounterMode`` that also counts ``cdist`` (SparseVLM's clustering on
    devices without float64, where it takes the place of the distance matrix product)."""
    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten._cdist_forward: _cdist_flop})


def count_flops(fn) -> int:
    """FLOPs of ``fn()`` as ``torch.utils.flop_counter`` counts them (no autograd; ``cdist`` counted)."""
    with torch.no_grad(), flop_counter() as counter:
        fn()
    return counter.get_total_flops()


def assert_steps_match(step_logits, logits, rows, prompt: int, atol: float = 1e-4) -> None:
    """Each generated step's logits (``step_logits[step][b]``) equal the no-cache forward's row that
    predicts it: the row whose input column (``rows``, a run's ``output_positions``) is
    ``prompt + step - 1``."""
    for step, expected in enumerate(step_logits):
        for b in range(expected.shape[0]):
            row = int(torch.nonzero(rows[b] == prompt + step - 1))
            diff = float((logits[b, row].float() - expected[b].float()).abs().max())
            assert diff < atol, (step, b, diff)


def plan_as_run(run, geometry=None, image: int = 0):
    """The run's plan (compiled for ``geometry``) with every adaptive stage's count the one image
    ``image`` of the last prefill kept."""
    plan = run.plan
    kept = run.observed_counts()[image] if run.observed_counts() else []
    observed = {s.index: kept[s.index] for s in plan.stages if s.adaptive}
    return compile_pipeline(plan.canonical, geometry or plan.geometry, observed=observed or None)


def tokens_per_layer_as_run(run, geometry=None) -> list[int]:
    """The image tokens entering each layer by the plan, with every adaptive stage's count the one the
    run's images kept (the largest over the batch's images: what sets the cache length)."""
    images = range(max(1, len(run.observed_counts())))
    per_image = [plan_as_run(run, geometry, i).tokens_per_layer() for i in images]
    return [max(layer) for layer in zip(*per_image, strict=True)]


def assert_cache_follows_plan(cache, run, geometry, prompt: int, steps: int) -> None:
    """Every decoder layer's KV cache after ``steps`` generated tokens holds the ``prompt`` columns less
    the image tokens the plan (for ``geometry``: one image of the batch, all alike) says are gone by
    that layer, plus the ``steps - 1`` decoded tokens: ``prompt - (image_tokens - tokens) + steps - 1``."""
    lengths = [layer.keys.shape[-2] for layer in cache.layers]
    expected = [prompt - (geometry.image_tokens - tokens) + steps - 1
                for tokens in tokens_per_layer_as_run(run, geometry)]
    assert lengths == expected, (run.plan.canonical, lengths, expected)


class DecoderInputs:
    """``with DecoderInputs(model) as seen``: the embeddings entering the decoder at every prefill (calls
    with more than one column), in ``seen.rows``."""

    def __init__(self, model):
        self.model, self.rows = model, []

    def __enter__(self):
        def grab(module, args, kwargs):
            emb = kwargs.get("inputs_embeds")
            if emb is not None and emb.shape[1] > 1:
                self.rows.append(emb)

        self.handle = self.model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def equal_to(self, vector: torch.Tensor, i: int = 0) -> torch.Tensor:
        """``[B, L]`` True where prefill ``i``'s embedding is ``vector`` (e.g. an ``image_newline``)."""
        emb = self.rows[i]
        return (emb == vector.to(emb.dtype)).all(-1)
