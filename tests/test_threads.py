"""CPU threads chosen deliberately (runtime/threads.py) and the machine's contention recorded with each
measurement (lmmsqueeze/machine.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lmmsqueeze import machine
from lmmsqueeze.cli import app
from lmmsqueeze.errors import LmmsqueezeError
from lmmsqueeze.evaluation.runner import evaluate
from lmmsqueeze.evaluation.tasks import get_task
from lmmsqueeze.runtime import load_model
from lmmsqueeze.runtime import threads as threads_mod
from lmmsqueeze.runtime.threads import TINY_PARAMS, choose_threads, configure_threads

runner = CliRunner()
ENV = machine.THREADS_ENV


@pytest.fixture
def torch_threads(monkeypatch):
    """Restore torch's thread count and clear every variable that fixes it."""
    before = torch.get_num_threads()
    for var in (ENV, "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def eight_cores(monkeypatch):
    monkeypatch.setattr(threads_mod, "physical_cores", lambda cpus=None: 8)


@pytest.mark.parametrize("in_use, expected", [(0.0, 8), (0.4, 8), (1.0, 7), (3.4, 5), (7.6, 1), (20.0, 1)])
def test_a_large_model_gets_one_thread_per_core_not_in_use(eight_cores, in_use, expected):
    choice = choose_threads(TINY_PARAMS * 10, in_use=in_use, environ={}, user_chose=False)
    assert choice.threads == expected


def test_a_tiny_model_gets_one_thread_whatever_the_load(eight_cores):
    for in_use in (0.0, 5.0):
        assert choose_threads(2_000_000, in_use=in_use, environ={}, user_chose=False).threads == 1
    assert choose_threads(TINY_PARAMS - 1, environ={}, user_chose=False).threads == 1


def test_the_environment_override_beats_every_rule(eight_cores):
    choice = choose_threads(2_000_000, in_use=0.0, environ={ENV: "2"}, user_chose=True)
    assert (choice.threads, choice.reason) == (2, f"{ENV}=2")
    assert choose_threads(TINY_PARAMS * 10, in_use=7.9, environ={ENV: " 1 "}, user_chose=False).threads == 1


def test_a_count_the_user_chose_is_left_alone(eight_cores):
    assert choose_threads(2_000_000, in_use=0.0, environ={}, user_chose=True).threads is None


@pytest.mark.parametrize("raw", ["0", "-1", "two", "1.5", "100000"])
def test_a_bad_environment_count_is_refused_by_name(raw):
    with pytest.raises(LmmsqueezeError, match=rf"{ENV}='{raw}' is not a thread count in 1\.\.\d+"):
        machine.env_threads({ENV: raw})


def test_loading_on_cpu_applies_the_policy_and_keeps_an_explicit_count(torch_threads, monkeypatch):
    model, _ = load_model("bundled", device="cpu")  # 2M parameters
    assert torch.get_num_threads() == 1
    torch.set_num_threads(threads_mod.torch_default_threads() + 1)  # a count the user chose
    configure_threads(model)
    assert torch.get_num_threads() == threads_mod.torch_default_threads() + 1
    if len(machine.usable_cpus()) >= 2:
        monkeypatch.setenv(ENV, "2")
        configure_threads(model)
        assert torch.get_num_threads() == 2
    monkeypatch.delenv(ENV)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # a launcher's choice: left alone
    torch.set_num_threads(3)
    configure_threads(model)
    assert torch.get_num_threads() == 3


def test_a_model_off_the_cpu_is_left_alone(torch_threads):
    model = torch.nn.Linear(2, 2).to("meta")
    torch.set_num_threads(threads_mod.torch_default_threads())
    assert configure_threads(model).threads is None
    assert torch.get_num_threads() == threads_mod.torch_default_threads()


@pytest.mark.parametrize("args, env, message", [
    (["--threads", "0", "reducers"], None, "--threads 0 is not a thread count in 1.."),
    (["--threads", "many", "explain", "pool"], None, "--threads many is not a thread count"),
    (["--threads", "100000", "explain", "pool"], None, "--threads 100000 is not a thread count"),
    (["explain", "pool"], "0", f"{ENV}='0' is not a thread count"),
    (["eval", "--limit", "2"], "x", f"{ENV}='x' is not a thread count"),
])
def test_bad_thread_counts_are_one_line_before_any_command(tmp_path, args, env, message):
    if args[0] == "eval":
        args = [*args, "--results", str(tmp_path / "r.db")]
    result = runner.invoke(app, args, env={ENV: env})
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "r.db").exists()


def test_the_threads_option_sets_the_override(torch_threads):
    result = runner.invoke(app, ["--threads", "1", "explain", "pool", "--json"], env={ENV: None})
    assert result.exit_code == 0, result.output
    # inside the invocation the override was set; CliRunner's env restores it afterwards
    assert os.environ.get(ENV) is None


def _fake_cores(monkeypatch, n):
    monkeypatch.setattr(machine, "physical_cores", lambda cpus=None: n)


@pytest.mark.parametrize("threads, others, busy", [
    (1, 0.2, False), (1, 1.0, False), (1, 1.4, False), (1, 1.6, True), (2, 0.3, False), (2, 0.6, True),
])
def test_busy_means_others_wanted_more_than_our_threads_left_free(monkeypatch, threads, others, busy):
    _fake_cores(monkeypatch, 2)
    row = machine.contention(threads, others, 0.5, 0.7, cpus=[0, 1])
    assert row == {"threads": threads, "cpu_cores": 2, "loadavg_before": 0.5, "loadavg_after": 0.7,
                   "others_cpu": others, "busy": busy}


def test_without_proc_stat_the_load_average_stands_in(monkeypatch):
    _fake_cores(monkeypatch, 2)
    assert machine.contention(1, None, 0.4, 2.9, cpus=[0, 1])["busy"] is True  # 2.9 - our 1 thread
    assert machine.contention(1, None, 0.4, 1.2, cpus=[0, 1])["busy"] is False
    assert machine.contention(1, None, None, None, cpus=[0, 1])["busy"] is None


def test_physical_cores_match_cpuinfo():
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    pairs, phys = set(), None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "physical id":
            phys = value.strip()
        elif key.strip() == "core id":
            pairs.add((phys, value.strip()))
    if not pairs:
        pytest.skip("no core topology in /proc/cpuinfo")
    assert machine.physical_cores() == len(pairs)


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="needs /proc/stat")
def test_a_spinning_process_is_seen_and_flagged():
    cores = machine.physical_cores(machine.usable_cpus())
    loop = "import time\nt = time.time()\nwhile time.time() - t < 20: pass"
    spin = subprocess.Popen([sys.executable, "-c", loop])
    try:
        time.sleep(0.3)
        with machine.LoadMeter(threads=cores) as meter:  # every core ours: any other process contends
            time.sleep(1.0)
    finally:
        spin.kill()
        spin.wait()
    metrics = meter.metrics()
    assert metrics["others_cpu"] >= 0.5 and metrics["busy"] is True
    assert metrics["threads"] == cores and metrics["cpu_cores"] == cores


def test_each_evaluated_row_records_the_machine(torch_threads):
    model, processor = load_model("bundled", device="cpu")
    row = evaluate(model, processor, "pool", get_task("bundled"), limit=2, measure_memory=False)
    assert row["threads"] == torch.get_num_threads() == 1
    assert row["cpu_cores"] == machine.physical_cores(machine.usable_cpus())
    assert isinstance(row["busy"], bool) and row["others_cpu"] >= 0
    assert row["loadavg_before"] >= 0 and row["loadavg_after"] >= 0
