"""Models larger than one device: the tiny LLaVA's decoder layers dispatched by accelerate (CPU and a disk
offload folder) answer as the undispatched model with pipelines at every placement, and load_model's
``device_map`` path (accelerate's big-model inference) gives the same answers."""

from __future__ import annotations

import copy

import pytest

from lmmsqueeze.errors import LmmsqueezeError
from lmmsqueeze.evaluation.runner import evaluate
from lmmsqueeze.evaluation.tasks import get_task
from lmmsqueeze.runtime.dispatch import input_device, load_options, parse_max_memory
from lmmsqueeze.runtime.loading import load_model

accelerate = pytest.importorskip("accelerate")

#: an llm reducer after a projector one, a vision reducer, and a ProxyV adapter whose layer is offloaded
PIPELINES = [("pool | fastv(layer=2, keep=0.5)", None), ("visionzip(dominant=27, contextual=5)", None),
             ("proxyv(factor=3, layer=1)", "bundled:proxyv-spatial")]
LIMIT = 6


@pytest.fixture(scope="module")
def bundled():
    return load_model("bundled", device="cpu")


@pytest.fixture(scope="module")
def reference(bundled):
    model, processor = bundled
    task = get_task("bundled")
    return {p: evaluate(model, processor, p, task, limit=LIMIT, adapter=a, measure_memory=False)
            for p, a in PIPELINES}


def _same(row, ref):
    assert [a["prediction"] for a in row["answers"]] == [a["prediction"] for a in ref["answers"]]
    for field in ("accuracy", "prefill_flops", "saving", "image_tokens_per_layer"):
        assert row[field] == ref[field], field


def test_layers_dispatched_to_cpu_and_disk_answer_as_the_undispatched_model(bundled, reference, tmp_path):
    model, processor = bundled
    layers = {f"model.language_model.layers.{i}": "disk" if i in (1, 2) else "cpu" for i in range(4)}
    device_map = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu",
                  "model.language_model.embed_tokens": "cpu", **layers, "model.language_model.norm": "cpu",
                  "model.language_model.rotary_emb": "cpu", "lm_head": "cpu"}
    dispatched = accelerate.dispatch_model(copy.deepcopy(model), device_map, offload_dir=str(tmp_path))
    offloaded = dict(dispatched.named_parameters())["model.language_model.layers.1.self_attn.q_proj.weight"]
    assert offloaded.device.type == "meta" and any(tmp_path.iterdir())  # really on disk
    assert input_device(dispatched).type == "cpu"
    for pipeline, adapter in PIPELINES:
        row = evaluate(dispatched, processor, pipeline, get_task("bundled"), limit=LIMIT, adapter=adapter,
                       measure_memory=False)
        _same(row, reference[pipeline])


def test_load_model_with_a_device_map_and_max_memory_offloads_and_answers_the_same(reference, tmp_path):
    model, processor = load_model("bundled", device="cpu", device_map="auto", max_memory={"cpu": "3MB"},
                                  offload_folder=tmp_path / "offload")
    assert "disk" in set(model.hf_device_map.values())  # 3 MB of CPU memory do not hold the 8 MB model
    for pipeline, adapter in PIPELINES[:1] + PIPELINES[2:]:
        row = evaluate(model, processor, pipeline, get_task("bundled"), limit=LIMIT, adapter=adapter,
                       measure_memory=False)
        _same(row, reference[pipeline])


@pytest.mark.parametrize("kwargs, message", [
    ({"device_map": "everywhere"}, "is not one of auto"),
    ({"max_memory": "0=1GiB"}, "go with --device-map"),
    ({"device_map": "auto", "max_memory": "0=lots"}, "is not DEVICE=SIZE"),
])
def test_bad_dispatch_options_are_one_line(kwargs, message):
    with pytest.raises(LmmsqueezeError, match=message):
        load_options(**kwargs)


def test_max_memory_parses_devices_and_sizes():
    assert parse_max_memory("0=20GiB, 1=20GiB,cpu=64GB") == {0: "20GiB", 1: "20GiB", "cpu": "64GB"}
