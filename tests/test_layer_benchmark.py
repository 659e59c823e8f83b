"""``benchmarks/layers.py`` splits a prefill's decoder time by layer: every layer is timed, including the
stand-ins a pipeline swaps in for the duration of a run, the layers' times fit inside the decoder's, and
no hook stays behind."""

from __future__ import annotations

import pytest
import torch

from benchmarks.layers import timed_prefill
from lmmsqueeze.runtime import count_hooks
from lmmsqueeze.runtime.run import prepare
from lmmsqueeze.testing import tiny_inputs, tiny_llava

PIPELINES = ["none", "fastv(layer=2, keep=0.5)", "proxyv(layer=2, factor=2, untrained=true)"]


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_every_layer_is_timed_and_no_hook_stays(pipeline):
    model, processor = tiny_llava()
    inputs = dict(tiny_inputs(processor))
    prepared = prepare(model, pipeline)
    with torch.no_grad():
        model(**inputs)  # transformers installs its own output-capturing hooks at the first forward
        before = count_hooks(model)
        per_layer, decoder, _, run = timed_prefill(prepared, inputs)
    assert len(per_layer) == len(model.model.language_model.layers)
    assert all(ms > 0 for ms in per_layer) and sum(per_layer) <= decoder
    assert run.plan is prepared.plan
    assert count_hooks(model) == before
