"""The CLI: bad pipelines give one line and exit code 2; explain/reducers/run print what they should."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lmmsqueeze.cli import app

runner = CliRunner()

BAD_PIPELINES = {
    "fastvv": "unknown stage 'fastvv': did you mean 'fastv'",
    "fastv(kep=0.5)": "unknown parameter 'kep'; did you mean 'keep'",
    "fastv(keep=0)": "keep=0 keeps no token",
    "fastv(keep=1.5)": "keep=1.5 is a float outside (0, 1]",
    "fastv(keep=-0.5)": "keep=-0.5 is a float outside (0, 1]",
    "fastv(keep=nan)": "keep=nan is not finite",
    "fastv(keep=inf)": "keep=inf is not finite",
    "fastv(keep=true)": "keep=true is not a valid",
    "fastv(layer=32)": "layer=32 is beyond the model",
    "fastv(layer=0)": "layer=0 must be an integer >= 1",
    "fastv(layer=2.5)": "layer=2.5 is not a valid int",
    "fastv(layer=5) | random(layer=3)": "layer=3 does not come after the previous stage's layer=5",
    "fastv(layer=3) | fastv(layer=3)": "layer=3 does not come after",
    "fastv | pool": "a projector stage cannot follow an llm stage",
    "stride | fastervlm": "a vision stage cannot follow a projector stage",
    "tome(at=llm)": "is not a placement of tome before the LLM",
    "random | pool": "pool needs the token grid, but an earlier stage broke it",
    "pool(layer=2)": "pool does not run inside the LLM",
    "random(keep=600)": "keep=600 is more than the 576 image tokens",
    "pool | fastv(keep=200)": "keep=200 is more than the 144 image tokens",
    "fastv(keep=[0.25, 0.5])": "holds a list of values",
    "random(seed=-1)": "seed=-1 must be >= 0",
    "pool(size=0)": "size=0 must be an integer >= 1",
    "fastv(keep=0.5, keep=0.2)": "is given twice",
    "fastv(keep=": "cannot parse pipeline",
    "random(mode=fast)": "unknown parameter 'mode'",
    "@/nonexistent/pipeline.yaml": "does not exist",
}


@pytest.mark.parametrize("pipeline", list(BAD_PIPELINES))
def test_bad_pipeline_gives_one_line_and_exit_2(pipeline):
    result = runner.invoke(app, ["explain", pipeline])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert BAD_PIPELINES[pipeline] in lines[0]
    assert "Traceback" not in result.output


def test_explain_json_lists_tokens_per_layer():
    result = runner.invoke(app, ["explain", "pool | fastv(layer=2, keep=0.5)", "--json"])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["pipeline"] == "pool(size=2) | fastv(keep=0.5, layer=2)"
    tokens = [layer["image_tokens"] for layer in data["layers"]]
    assert tokens == [144, 144] + [72] * 30  # 576 -> 144 by pooling, halved from layer 2 of 32
    assert [s["placement"] for s in data["stages"]] == ["projector", "llm"]


def test_reducers_json():
    result = runner.invoke(app, ["reducers", "--json"])
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["fastv"]["params"] == {"keep": {"type": "int|float", "default": 0.5},
                                       "layer": {"type": "int", "default": 2}}
    assert rows["pool"]["family"] == "pooling"


def test_run_answers_with_a_pipeline(saved_tiny):
    path, image = saved_tiny
    result = runner.invoke(app, ["run", "--model", str(path), "--image", str(image),
                                 "--prompt", "what is the colour ?", "--pipeline", "pool | fastv(keep=3)",
                                 "--max-new-tokens", "3", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["pipeline"] == "pool(size=2) | fastv(keep=3, layer=2)"
    assert data["image_tokens_per_layer"] == [9, 9, 3, 3]
    assert len(data["answer"].split()) == 3


def test_run_refuses_a_pipeline_the_model_cannot_hold(saved_tiny):
    path, image = saved_tiny
    result = runner.invoke(app, ["run", "-m", str(path), "-i", str(image), "--prompt", "hi",
                                 "-p", "fastv(layer=4)"])
    assert result.exit_code == 2
    assert "layer=4 is beyond the model" in result.stderr and "has 4 decoder layers (0..3)" in result.stderr


def test_explain_reads_geometry_from_a_model_directory(saved_tiny):
    path, _ = saved_tiny
    result = runner.invoke(app, ["explain", "pool", "--model", str(path / "config.json"), "--json"])
    assert result.exit_code == 0, result.output
    assert [layer["image_tokens"] for layer in json.loads(result.stdout)["layers"]] == [9, 9, 9, 9]


@pytest.mark.parametrize("args, message", [
    (["run", "-m", "/no/such/model", "--prompt", "q"], "is not a local model directory"),
    (["explain", "pool", "--model-config", "llava-99b"], "unknown model config 'llava-99b'"),
    (["explain", "pool", "--model", "/no/such/model"], "is neither a model directory"),
])
def test_bad_model_references_are_one_line(saved_tiny, args, message):
    if args[0] == "run":
        args = [*args, "-i", str(saved_tiny[1])]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output


def test_missing_image_is_one_line(saved_tiny):
    path, _ = saved_tiny
    result = runner.invoke(app, ["run", "-m", str(path), "-i", "/no/such.png", "--prompt", "q"])
    assert result.exit_code == 2 and "image file '/no/such.png' does not exist" in result.stderr
