"""ProxyV training: distillation reads no label, the control starts as the vanilla model and is trained
like the adapter, training leaves the caller's parameters as it found them (the vision tower never
trains), right-padded processors are handled, and the same seed gives the same adapter."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

import lmmsqueeze
from lmmsqueeze.cli import app
from lmmsqueeze.evaluation.tasks import get_task
from lmmsqueeze.proxyv import ProxyVAdapter
from lmmsqueeze.proxyv.attach import config_for
from lmmsqueeze.proxyv.objectives import distill_batch
from lmmsqueeze.proxyv.train import TrainSettings, control_pipeline, train_proxyv, train_with_control
from lmmsqueeze.testing import tiny_inputs, tiny_llava

PIPELINE = "pool | proxyv(layer=2, variant=nonspatial, proxies=3)"
SETTINGS = dict(steps=2, batch=3, eval_size=0, save_every=2)


class WrongAnswers:
    """The bundled task with every answer replaced: what labels would teach is gone."""

    def __init__(self, task):
        self.task = task

    def __getattr__(self, name):
        return getattr(self.task, name)

    def samples(self, split, n, seed):
        return [dataclasses.replace(item, answer="zzz") for item in self.task.samples(split, n, seed)]


@pytest.fixture
def tiny():
    return tiny_llava()


def _weights(adapter):
    return {k: v.clone() for k, v in adapter.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_distillation_reads_no_label_and_task_training_does(tiny, tmp_path):
    """The same seed on the task and on the task with every answer replaced: distillation trains the same
    adapter (it never reads an answer), task training a different one."""
    model, processor = tiny
    task = get_task("bundled")
    runs = {}
    for objective in ("distill", "task"):
        for name, data in (("right", task), ("wrong", WrongAnswers(task))):
            settings = TrainSettings(objective=objective, **SETTINGS)
            adapter = train_proxyv(model, processor, PIPELINE, data, tmp_path / f"{objective}-{name}",
                                   settings)
            runs[objective, name] = _weights(adapter)
    assert _same(runs["distill", "right"], runs["distill", "wrong"])
    assert not _same(runs["task", "right"], runs["task", "wrong"])


def test_distillation_targets_the_vanilla_models_own_answers(tiny):
    """The distilled sequence is the prompt plus the vanilla model's greedy answer, and the positions
    distilled are the real text tokens from the first image token on."""
    model, processor = tiny
    items = get_task("bundled").samples("train", 2, 0)
    inputs, where = distill_batch(model, processor, items, torch.device("cpu"), torch.float32,
                                  model.config.image_token_id, max_new_tokens=3)
    prompt = tiny_inputs(processor, 1)  # shapes only
    assert inputs["input_ids"].shape[1] > prompt["input_ids"].shape[1] - 10
    with torch.no_grad():
        greedy = model.generate(**{k: v for k, v in inputs.items() if k != "input_ids"},
                                input_ids=inputs["input_ids"][:, :-3], max_new_tokens=3, do_sample=False)
    assert torch.equal(greedy, inputs["input_ids"])
    image = inputs["input_ids"] == model.config.image_token_id
    for b in range(2):
        first = int(torch.nonzero(image[b])[0])
        expected = (torch.arange(image.shape[1]) > first) & ~image[b] & inputs["attention_mask"][b].bool()
        assert torch.equal(where[b], expected)


def test_the_control_starts_as_the_vanilla_model_and_saves_nothing(tiny):
    model, processor = tiny
    inputs = tiny_inputs(processor, 2)
    pipeline = control_pipeline("proxyv(layer=2, factor=2)")
    assert pipeline == "proxyv(layer=2, variant=control)"
    plan = lmmsqueeze.compile(pipeline, model)
    adapter = ProxyVAdapter(config_for(model, plan))
    spatial = ProxyVAdapter(config_for(model, lmmsqueeze.compile("proxyv(layer=2, factor=2)", model)))
    assert sum(p.numel() for p in adapter.parameters()) == sum(p.numel() for p in spatial.parameters())
    with torch.no_grad():
        reference = model(**inputs).logits
        with lmmsqueeze.apply(model, plan, weights=adapter):
            assert torch.equal(model(**inputs).logits, reference)
    assert plan.cost(text_tokens=20).saving < 0


def test_task_training_with_its_control(tiny, tmp_path):
    """Both trained from the same start with the same settings; the adapter names its control, and the
    control, once trained, is no longer the vanilla model."""
    model, processor = tiny
    settings = TrainSettings(objective="task", **SETTINGS)
    adapter, control = train_with_control(model, processor, "proxyv(layer=2, factor=2)", get_task("bundled"),
                                          tmp_path, settings)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["objective"] == "task" and config["control"] == "../control/adapter"
    assert (tmp_path / "adapter" / config["control"] / "adapter_config.json").is_file()
    assert control.config.pipeline == lmmsqueeze.compile("proxyv(layer=2, variant=control)", model).canonical
    assert control.config.training == adapter.config.training
    assert any(m.out_proj.weight.abs().sum() > 0 for m in control.mlps)
    with pytest.raises(lmmsqueeze.LmmsqueezeError, match="use it with --objective task"):
        train_with_control(model, processor, "proxyv(layer=2)", get_task("bundled"), tmp_path / "x",
                           TrainSettings(objective="distill", **SETTINGS))


def test_training_restores_requires_grad_and_never_trains_the_vision_tower(tiny, tmp_path):
    model, processor = tiny
    flags = {name: i % 3 != 0 for i, (name, _) in enumerate(model.named_parameters())}
    for name, p in model.named_parameters():
        p.requires_grad_(flags[name])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = TrainSettings(objective="task", full=True, **SETTINGS)
    train_proxyv(model, processor, "proxyv(layer=2, factor=2)", get_task("bundled"), tmp_path, settings)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    after = model.state_dict()
    vision = [k for k in after if "vision_tower" in k]
    llm = [k for k in after if "language_model.layers" in k]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)
    assert any(not torch.equal(before[k], after[k]) for k in llm)
    model.load_state_dict(before)


def test_a_right_padded_processor_trains_as_a_left_padded_one(tiny, tmp_path):
    model, processor = tiny
    task = get_task("bundled")
    weights = []
    for side in ("left", "right"):
        processor.tokenizer.padding_side = side
        adapter = train_proxyv(model, processor, PIPELINE, task, tmp_path / side, TrainSettings(**SETTINGS))
        weights.append(_weights(adapter))
        assert processor.tokenizer.padding_side == side  # restored
    processor.tokenizer.padding_side = "left"
    assert _same(*weights)


def test_the_same_seed_trains_the_same_adapter(tiny, tmp_path):
    model, processor = tiny
    task = get_task("bundled")
    runs = [_weights(train_proxyv(model, processor, PIPELINE, task, tmp_path / str(i),
                                  TrainSettings(**SETTINGS)))
            for i in range(2)]
    other = _weights(train_proxyv(model, processor, PIPELINE, task, tmp_path / "seed1",
                                  TrainSettings(seed=1, **SETTINGS)))
    assert _same(*runs) and not _same(runs[0], other)


def test_control_needs_task_training_on_the_command_line(tmp_path):
    result = CliRunner().invoke(app, ["train-proxyv", "-m", "bundled", "-p", "proxyv(layer=1)", "--out",
                                      str(tmp_path), "--control"])
    assert result.exit_code == 2 and "--objective task" in result.stderr and "Traceback" not in result.output


def test_the_shipped_adapters_were_trained_with_the_scripts_defaults():
    """`python -m lmmsqueeze.bundled.train_adapters` with its defaults is how the shipped adapters were
    made: each adapter recorded exactly the settings the script's defaults give, for the script's
    pipeline (and the same seed trains the same adapter: test_the_same_seed_trains_the_same_adapter)."""
    from dataclasses import asdict

    from lmmsqueeze.bundled import WEIGHTS_DIR, train_adapters
    from lmmsqueeze.models import geometry_from_path
    from lmmsqueeze.proxyv.attach import adapter_path

    settings = asdict(train_adapters.settings_of(train_adapters.build_parser().parse_args([])))
    bundled = geometry_from_path(WEIGHTS_DIR)
    for name, pipeline in (("proxyv-spatial", train_adapters.SPATIAL),
                           ("proxyv-nonspatial", train_adapters.NONSPATIAL)):
        config = json.loads((adapter_path(f"bundled:{name}") / "adapter_config.json").read_text())
        assert config["objective"] == "distill" and config["training"] == settings
        assert config["pipeline"] == lmmsqueeze.compile(pipeline, bundled).canonical
