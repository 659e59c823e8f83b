"""What `bench` measures beyond latency: the pipeline's overhead (time inside its hooks, the model's own
work excluded), peak RSS, and the scaling table over image-token counts (`bench --tokens`)."""

from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import lmmsqueeze
from lmmsqueeze.cli import app
from lmmsqueeze.runtime.hooks import HookSet, HookTimer
from lmmsqueeze.runtime.llm_signals import ReusedProjection
from lmmsqueeze.runtime.loading import build_prompt, load_model, model_inputs
from lmmsqueeze.runtime.measure import peak_rss_bytes
from lmmsqueeze.testing import random_image, tiny_inputs, tiny_qwen2_vl

runner = CliRunner()
PAUSE = 0.05


class Sleeper(nn.Module):
    """A module whose forward takes ``PAUSE`` seconds: the model's own work."""

    def forward(self, x):
        time.sleep(PAUSE)
        return x


def test_hook_timer_counts_hook_time_but_not_model_work_inside_a_hook():
    outer, inner, timer = nn.Identity(), Sleeper(), HookTimer()

    def runs_the_model(module, args, kwargs):  # like the prefill hook running the vision tower
        with timer.model_work():
            inner(args[0])

    def slow_hook(module, args, kwargs):  # a hook nested in that model work: counted again
        time.sleep(PAUSE)

    with HookSet(timer) as hooks:
        hooks.pre(outer, runs_the_model)
        hooks.pre(inner, slow_hook)
        start = time.perf_counter()
        outer(torch.zeros(1))
        wall = time.perf_counter() - start
    # the sleeper's own PAUSE is model work; the nested hook's PAUSE is overhead
    assert wall >= 2 * PAUSE
    assert PAUSE <= timer.seconds < PAUSE + 0.5 * PAUSE, (timer.seconds, wall)


def test_vanilla_has_no_overhead_and_a_pipeline_some(tiny_sdpa):
    model, processor = tiny_sdpa
    inputs = tiny_inputs(processor, 1)
    seen = {}
    with torch.no_grad():
        for pipeline in ("none", "fastv(layer=2, keep=4)"):
            timer = HookTimer()
            with lmmsqueeze.prepare(model, pipeline).apply(timer):
                model(**inputs)
            seen[pipeline] = timer.seconds
    assert seen["none"] == 0.0 and seen["fastv(layer=2, keep=4)"] > 0.0


def test_peak_rss_sees_memory_touched_during_the_call():
    pytest.importorskip("resource")
    if peak_rss_bytes(lambda: None) is None:
        pytest.skip("no /proc/self/statm")

    def touch():
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, written: resident
        time.sleep(0.02)  # a few samples while it lives
        del block

    assert peak_rss_bytes(touch) >= 48 * 2**20


def test_resized_llava_gives_the_image_tokens_asked_for(tiny_dir):
    for tokens in (16, 64):  # patch 8: a 4x4 grid at 32 px, 8x8 at 64 px
        model, processor = load_model(str(tiny_dir), image_tokens=tokens)
        side = model.config.vision_config.image_size
        inputs = model_inputs(processor, model, [random_image(0, 100)], [build_prompt(processor, "what?")])
        assert side == 8 * int(tokens**0.5)
        assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == tokens
        with torch.no_grad():
            assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


def test_bench_tokens_gives_a_row_per_size_and_pipeline(tiny_dir):
    result = runner.invoke(app, ["bench", "-m", str(tiny_dir), "-p", "pool", "-p", "divprune(keep=0.5)",
                                 "--tokens", "16,64", "--runs", "2", "--warmup", "0", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [(r["image_tokens"], r["pipeline"]) for r in rows] == [
        (16, "none"), (16, "pool(size=2)"), (16, "divprune(keep=0.5)"),
        (64, "none"), (64, "pool(size=2)"), (64, "divprune(keep=0.5)")]
    # the stages' own arithmetic: none for vanilla and pooling; DivPrune's N x N similarity grows faster
    # than the prefill it shortens
    assert [r["analytic_overhead_fraction"] for r in rows[:2] + rows[3:5]] == [0.0] * 4
    assert 0 < rows[2]["analytic_overhead_fraction"] < rows[5]["analytic_overhead_fraction"] < 1
    small, large = rows[1], rows[4]
    # pooling removes 3/4 of the image tokens: the larger the image's share of the prompt, the more it saves
    assert 0 < small["analytic_saving"] < large["analytic_saving"] < 0.75
    assert all(r["overhead_fraction"] is not None and 0 < r["overhead_fraction"] < 1 for r in (small, large))
    assert all(len(r["decoder_runs_ms"]) == 2 for r in rows)


def test_bench_batch_prefills_copies_together_and_costs_a_sample_as_alone(tiny_dir):
    """``--batch 2``: two copies of the sample in one prefill; the analytic saving is a sample's, the
    same as at batch 1 (a batch-wide image-token count taken for one sample's would change it), and
    the batch holds more memory."""
    rows = {}
    for batch in ("1", "2"):
        result = runner.invoke(app, ["bench", "-m", str(tiny_dir), "-p", "fastv(layer=2, keep=8)",
                                     "--runs", "1", "--warmup", "0", "--batch", batch, "--json"])
        assert result.exit_code == 0, result.output
        rows[batch] = json.loads(result.stdout)
    assert rows["1"][1]["analytic_saving"] == rows["2"][1]["analytic_saving"] > 0
    assert rows["2"][0]["peak_memory_mb"] > rows["1"][0]["peak_memory_mb"]
    result = runner.invoke(app, ["bench", "-m", str(tiny_dir), "-p", "pool", "--batch", "0"])
    assert result.exit_code == 2 and "Traceback" not in result.output and "--batch" in result.output


@pytest.mark.parametrize("args, phrase", [
    (["--tokens", "abc"], "not a list of image-token counts"),
    (["--tokens", "0"], "not a list of image-token counts"),
    (["--tokens", "20"], "not a square grid"),
    (["--tokens", "16", "--image", "IMAGE"], "drop --image"),
])
def test_bench_tokens_bad_input_is_one_line(saved_tiny, args, phrase):
    path, image = saved_tiny
    args = [str(image) if a == "IMAGE" else a for a in args]
    result = runner.invoke(app, ["bench", "-m", str(path), "-p", "pool", *args])
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], result.stderr


def test_bench_tokens_refuses_a_model_whose_tokens_follow_the_image(tmp_path):
    model, processor = tiny_qwen2_vl()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    result = runner.invoke(app, ["bench", "-m", str(tmp_path), "-p", "pool", "--tokens", "16"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "fixed-resolution LLaVA" in result.stderr and "larger --image" in result.stderr


def test_pruning_stage_hands_layer_k_the_keys_it_projected_to_score(tiny_sdpa, monkeypatch):
    """pdrop scores with layer K's own keys over its whole input; layer K then takes the kept rows instead of
    projecting them again: the same logits as projecting anew, one projection fewer."""
    model, processor = tiny_sdpa
    inputs = tiny_inputs(processor, 2)
    pipeline = "pdrop(layer=1, step=1, stages=2, keep=0.5)"
    k_proj = model.model.language_model.layers[1].self_attn.k_proj
    projected = []  # rows of every real projection (a reused call returns without projecting)

    def counting(x, project=k_proj.forward):
        projected.append(x.shape[1])
        return project(x)

    monkeypatch.setattr(k_proj, "forward", counting)
    with torch.no_grad():
        with lmmsqueeze.apply(model, pipeline):
            reused = model(**inputs).logits
        with_reuse = list(projected)
        monkeypatch.setattr(ReusedProjection, "__call__", lambda self, x: self.forward(x))
        with lmmsqueeze.apply(model, pipeline):
            anew = model(**inputs).logits
    torch.testing.assert_close(reused, anew, rtol=1e-5, atol=1e-5)
    length = inputs["input_ids"].shape[1]
    # reused: the stage's projection of the whole input only; anew: that, then layer K's of the kept rows
    assert with_reuse == [length]
    assert projected[1] == length and len(projected) == 3 and projected[2] < length


def test_divprune_picks_the_same_on_the_host_and_on_the_device():
    """DivPrune's greedy loop runs in numpy on CPU, in torch elsewhere: the same picks, ties included."""
    from lmmsqueeze.reducers.divprune import _greedy, _greedy_on_device

    torch.manual_seed(0)
    for n, k in ((40, 10), (300, 75)):
        x = torch.nn.functional.normalize(torch.randn(n, 16), dim=1)
        x[n // 2:n // 2 + 5] = x[0]  # exact duplicates: equal distances to break alike
        dist = (1.0 - x @ x.T).fill_diagonal_(0.0)
        host = _greedy(dist.numpy(), 3, k)
        device = _greedy_on_device(dist, torch.tensor(3), k)
        assert host.tolist() == device.tolist() and len(set(host.tolist())) == k
