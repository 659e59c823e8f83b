"""The analytic cost model against torch.utils.flop_counter on a decoder layer, and against papers; the
whole prefill of every pipeline against the counter runs for every family in ``test_families.py``."""

from __future__ import annotations

import pytest
import torch

import lmmsqueeze
from lmmsqueeze.compose.flops import layer_macs
from lmmsqueeze.compose.geometry import with_tokens
from lmmsqueeze.errors import ModelError
from lmmsqueeze.models import family_for, preset
from lmmsqueeze.proxyv.placement import proxyv_layer_macs
from lmmsqueeze.proxyv.stage import proxyv_stage
from lmmsqueeze.testing import count_flops, tiny_llava


@pytest.fixture(scope="module")
def eager_tiny():
    # on CPU the counter does not see sdpa's kernel, so count with eager attention
    return tiny_llava(attn="eager")


def test_decoder_layer_matches_the_counter_exactly(eager_tiny):
    """n(2d^2 + 2d d_kv) + 2n^2 d + 3ndm MACs per layer, to the unit."""
    model, _ = eager_tiny
    layer = model.model.language_model.layers[0]
    rotary = model.model.language_model.rotary_emb
    n = 50
    hidden = torch.randn(1, n, 64)
    pos = torch.arange(n)[None]
    flops = count_flops(lambda: layer(hidden, attention_mask=None, position_embeddings=rotary(hidden, pos),
                                 position_ids=pos))
    # d=64, d_kv=32, m=128: 50*(2*64*64 + 2*64*32) + 2*50*50*64 + 3*50*64*128
    #                      = 614,400 + 320,000 + 1,228,800 = 2,163,200 MACs
    assert sum(layer_macs(family_for(model).geometry, n)) == 2_163_200
    assert flops == 2 * 2_163_200


def test_fastv_paper_numbers():
    """FastV K=2, R=50% on LLaVA-1.5-7B, FastV's formula with 74 text tokens (reducers.md 6.4)."""
    vanilla = lmmsqueeze.compile("none", "llava-1.5-7b").cost(text_tokens=74, convention="fastv")
    fastv = lmmsqueeze.compile("fastv(layer=2, keep=0.5)", "llava-1.5-7b").cost(
        text_tokens=74, convention="fastv")
    assert vanilla.prefill_macs == pytest.approx(3.38e12, rel=2e-3)
    assert fastv.prefill_macs == pytest.approx(1.95e12, rel=2e-3)
    assert fastv.saving == pytest.approx(1 - 0.577, abs=0.002)


@pytest.mark.parametrize("backbone, starts, reported", [
    ("vicuna-7b", (12, 16), (46, 36)),
    ("vicuna-13b", (16, 20), (43, 36)),
    ("llama3-8b", (16, 20), (42, 32)),
    ("qwen2-7b", (16, 20), (37, 25)),
])
def test_proxyv_paper_savings(backbone, starts, reported):
    """ProxyV: 2880 image tokens (5 crops of 24x24) + 50 text + 5 newline tokens, 180 proxies, light MLP
    width d/4; the formula alone and the same through a compiled plan."""
    g = with_tokens(preset(backbone), 2880)
    n = 2880 + 55
    base = sum(layer_macs(g, n))
    proxy = sum(proxyv_layer_macs(g, image_tokens=2880, proxies=180, other_tokens=55,
                                  mlp_hidden=g.hidden_size // 4))
    for start, expected in zip(starts, reported, strict=True):
        total = start * base + (g.num_layers - start) * proxy
        assert 100 * (1 - total / (g.num_layers * base)) == pytest.approx(expected, abs=1.0)
        plan = lmmsqueeze.compile(f"proxyv(layer={start})", g)
        assert proxyv_stage(plan).grids_in == ((24, 24),) * 5
        assert 100 * plan.cost(text_tokens=55).saving == pytest.approx(expected, abs=1.0)


def test_the_fastv_convention_counts_proxyv_layers_the_fastv_way():
    """ProxyV L12 on Vicuna-7B (2880 image + 55 other tokens, 180 proxies, h = d/4) with FastV's formula
    for every layer: ordinary ones 4nd^2 + 2n^2d + 2ndm, ProxyV ones 2*nq*d^2 (Q, O) + 2*nkv*d^2 (K, V)
    + 2*nq*nkv*d + 2*nq*d*m, plus the light MLP N(2dh + 2h^2) + Pdh, as the exact convention counts it."""
    g = with_tokens(preset("vicuna-7b"), 2880)
    d, m, h = 4096, 11008, 1024
    n, nq = 2880 + 55, 180 + 55
    nkv = 2880 + nq
    ordinary = 4 * n * d * d + 2 * n * n * d + 2 * n * d * m
    proxyv = 2 * nq * d * d + 2 * nkv * d * d + 2 * nq * nkv * d + 2 * nq * d * m
    light = 2880 * (2 * d * h + 2 * h * h) + 180 * d * h
    cost = lmmsqueeze.compile("proxyv(layer=12)", g).cost(text_tokens=55, convention="fastv")
    assert cost.prefill_macs == 12 * ordinary + 20 * (proxyv + light)
    assert cost.vanilla_macs == 32 * ordinary


def test_explain_json_carries_costs():
    from typer.testing import CliRunner

    from lmmsqueeze.cli import app

    result = CliRunner().invoke(app, ["explain", "fastv(layer=2, keep=0.5)", "--model-config", "llava-1.5-7b",
                                      "--text-tokens", "74", "--convention", "fastv", "--json"])
    import json

    data = json.loads(result.stdout)
    assert data["saving"] == pytest.approx(0.423, abs=0.001)
    assert data["prefill_flops"] == sum(layer["flops"] for layer in data["layers"])
    assert data["vanilla_prefill_flops"] > data["prefill_flops"]
    assert [layer["image_tokens"] for layer in data["layers"][:3]] == [576, 576, 288]


@pytest.mark.parametrize("args, message", [
    (["--model-config", "llava-99b"], "unknown model config 'llava-99b'"),
    (["--vision-tokens", "-5"], "--vision-tokens -5 must be a positive integer"),
    (["--text-tokens", "-1"], "--text-tokens -1 must be >= 0"),
])
def test_bad_geometry_is_one_line(args, message):
    from typer.testing import CliRunner

    from lmmsqueeze.cli import app

    result = CliRunner().invoke(app, ["explain", "pool", *args])
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("config, message", [
    ('{"architectures": ["Foo"]}', "cannot read the config"),
    ('{"model_type": "llama", "hidden_size": 64}', "model type 'llama' is not supported"),
    ("{not json", "cannot read the config"),
])
def test_bad_model_configs_are_one_line(tmp_path, config, message):
    from typer.testing import CliRunner

    from lmmsqueeze.cli import app
    from lmmsqueeze.models import geometry_from_path

    (tmp_path / "config.json").write_text(config)
    with pytest.raises(ModelError, match=message):
        geometry_from_path(tmp_path)
    result = CliRunner().invoke(app, ["explain", "pool", "--model", str(tmp_path)])
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_bench_runs_on_a_local_model_directory(tmp_path):
    import json

    from typer.testing import CliRunner

    from lmmsqueeze.cli import app

    model, processor = tiny_llava()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    result = CliRunner().invoke(app, ["bench", "--model", str(tmp_path), "-p", "pool", "-p", "fastv(keep=4)",
                                      "--runs", "2", "--warmup", "0", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["pipeline"] for r in rows] == ["none", "pool(size=2)", "fastv(keep=4, layer=2)"]
    assert rows[0]["analytic_saving"] == 0 and rows[1]["analytic_saving"] > 0.5
    assert all(r["latency_ms"] > 0 and r["peak_memory_mb"] > 0 for r in rows)
    # pooling 36 -> 9 image tokens must lower the peak of live tensors
    assert rows[1]["peak_memory_mb"] < rows[0]["peak_memory_mb"]
    bad = CliRunner().invoke(app, ["bench", "--model", str(tmp_path), "-p", "fastv(layer=9)"])
    assert bad.exit_code == 2 and "layer=9 is beyond the model" in bad.stderr


def test_peak_tensor_memory_counts_live_bytes():
    from lmmsqueeze.runtime.measure import PeakTensorMemory

    with PeakTensorMemory() as mode:
        a = torch.ones(1000)  # 4,000 bytes
        b = a * 2  # +4,000 -> 8,000 live
        del a, b
        c = torch.zeros(250)  # 1,000 bytes after both were freed
        del c
    assert mode.peak == 8000 and mode.live == 0


def test_peak_tensor_memory_leaves_out_views_of_tensors_from_before():
    """A linear layer views its weight (``t()``) under the mode: the weight's bytes existed before the
    call and must not be counted; a view of a tensor made during the call keeps that tensor's bytes
    live until the view goes."""
    from lmmsqueeze.runtime.measure import PeakTensorMemory

    weight = torch.ones(300, 100)  # 120,000 bytes, before the call
    with PeakTensorMemory() as mode:
        y = torch.nn.functional.linear(torch.ones(2, 100), weight)  # 800 + 2,400 bytes
        weight.mul_(1.0)  # in place on a tensor from before: nothing new
        del y
        a = torch.ones(1000)  # 4,000 bytes
        view = a[:10]
        del a
        b = torch.ones(500)  # a's storage is still live through the view: 6,000
        del view, b
    assert mode.peak == 6000 and mode.live == 0


def test_qwen2_vl_preset_geometry_and_cls_note():
    """Qwen2-VL-7B: 28 layers, d=3584 with 4 KV heads (d_kv=512), 576 merged image tokens; no [CLS],
    so [CLS] reducers read the mean attention each token receives, and the plan says so."""
    plan = lmmsqueeze.compile("pool", "qwen2-vl-7b")
    assert plan.geometry.num_layers == 28 and plan.geometry.num_kv_heads * plan.geometry.head_dim == 512
    assert plan.tokens_per_layer() == [144] * 28 and plan.notes() == []
    notes = lmmsqueeze.compile("fastervlm", "qwen2-vl-7b").to_dict()["notes"]
    assert len(notes) == 1 and "no [CLS] token" in notes[0] and "mean attention" in notes[0]
    assert lmmsqueeze.compile("fastervlm", "llava-1.5-7b").notes() == []
