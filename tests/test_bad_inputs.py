"""Bad input on every CLI path of pipelines, pipeline files, adapters, devices, prompts and images: exit
code 2, exactly one stderr line starting with ``error:``, no traceback, and a results store passed along
left byte for byte as it was. Plus the compiler's bounds (counts against the tokens a stage receives,
ProxyV's proxies and saving) and the refusal of untrained ProxyV modules, in the library."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

import lmmsqueeze
from lmmsqueeze.bundled import SAMPLE_IMAGE
from lmmsqueeze.cli import app
from lmmsqueeze.errors import ModelError, PipelineError
from lmmsqueeze.models import geometry_from_path
from lmmsqueeze.proxyv.attach import adapter_path, allow_untrained
from lmmsqueeze.runtime.generation import MAX_IMAGE_PIXELS
from lmmsqueeze.runtime.loading import model_dir

runner = CliRunner()
BUNDLED_SPATIAL = "bundled:proxyv-spatial"
SPATIAL = "proxyv(factor=3, layer=1)"  # the bundled spatial adapter's pipeline


@pytest.fixture(autouse=True)
def _refuse_untrained():
    """The suite lets ProxyV run untrained (conftest); here the refusal is what is tested."""
    with allow_untrained(False):
        yield


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels (no image data: never decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + chunk(b"IEND", b""))


def _adapter(tmp: Path, damage: Callable[[Path], None]) -> str:
    """A copy of the bundled spatial adapter, damaged by ``damage``."""
    out = tmp / "adapter"
    shutil.copytree(adapter_path(BUNDLED_SPATIAL), out)
    damage(out)
    return str(out)


def _config_edit(**changes) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        config = json.loads((d / "adapter_config.json").read_text())
        config.update(changes)
        (d / "adapter_config.json").write_text(json.dumps(config))
    return edit


def _write(name: str, content: bytes | str) -> Callable[[Path], str]:
    def make(tmp: Path) -> str:
        path = tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)
    return make


def _dir(tmp: Path) -> str:
    (tmp / "dir.yaml").mkdir()
    return str(tmp / "dir.yaml")


#: pipeline text or files that every command taking a pipeline refuses: name -> (make(tmp) -> -p value,
#: a phrase the one line holds)
BAD_PIPELINES = {
    "keep-zero": (lambda t: "fastv(keep=0)", "keep=0 keeps no token"),
    "keep-negative": (lambda t: "fastv(keep=-5)", "keep=-5 keeps no token"),
    "fraction-above-one": (lambda t: "fastv(keep=1.5)", "outside (0, 1]"),
    "fraction-nan": (lambda t: "random(keep=nan)", "not finite"),
    "dominant-beyond-tokens": (lambda t: "visionzip(dominant=200)",
                               "the 144 image tokens this stage receives"),
    "dominant-plus-contextual": (lambda t: "visionzip(dominant=140, contextual=10)", "make 150 tokens"),
    "keep-beyond-tokens-after-pool": (lambda t: "pool | fastv(keep=40)", "the 36 image tokens"),
    "dart-pivots": (lambda t: "dart(pivots=200)", "pivots=200 is not fewer than the 144"),
    "stride-beyond-grid": (lambda t: "stride(stride=13)", "larger than the 12x12 token grid"),
    "proxies-beyond-tokens": (lambda t: "proxyv(layer=1, variant=nonspatial, proxies=100000, untrained=true)",
                              "proxies=100000 per image is not fewer than the 144"),
    "proxies-on-spatial": (lambda t: "proxyv(layer=1, proxies=100000)",
                           "proxies=100000 is more than the 144"),
    "proxyv-factor-one": (lambda t: "proxyv(layer=1, factor=1)", "give factor >= 2"),
    "proxyv-costs-more": (lambda t: "proxyv(layer=1, variant=nonspatial, proxies=120)", "more prefill FLOPs"),
    "ill-typed-parameter": (lambda t: "fastv(keep=yes)", "keep='yes' is not a valid"),
    "unknown-parameter-type": (lambda t: "proxyv(layer=1, untrained=2)", "untrained=2 is not a valid"),
    "bad-escape": (lambda t: 'fastv(tag="a\\x")', "bad escape"),
    "huge-string": (lambda t: "fastv(" + "k" * 100_000, "(100006 characters)"),
    "invalid-yaml": (_write("bad.yaml", "- name: fastv\n  keep: [0.5\n"), "is not valid YAML (line 3"),
    "tab-yaml": (_write("tab.yaml", "- name: fastv\n\tkeep: 1\n"), "is not valid YAML"),
    "binary-yaml": (_write("bin.yaml", bytes(range(256)) * 4), "is not UTF-8 text"),
    "empty-file": (_write("empty.yaml", ""), "is empty"),
    "invalid-json": (_write("bad.json", '{"pipeline": ['), "is not valid JSON"),
    "wrong-suffix": (_write("pipe.txt", "fastv"), "must end in .yaml, .yml or .json"),
    "directory": (_dir, "is a directory"),
    "missing-file": (lambda t: str(t / "nope.yaml"), "does not exist"),
    "nested-mapping-value": (_write("nested.yaml", "- name: fastv\n  keep: {a: 1}\n"),
                             "is not a number, string, boolean"),
    "name-not-a-string": (_write("num.yaml", "- name: 5\n"), "mapping with a `name` key"),
    "scalar-document": (_write("scalar.yaml", "42\n"), "expected a list of stages"),
    "file-names-a-file": (_write("rec.yaml", "- '@other.yaml'\n"), "names another pipeline file"),
}


def _pipeline_arg(value: str) -> str:
    return value if not value.startswith("/") else "@" + value


def _one_line_error(result, phrase: str | tuple[str, ...] | None = None) -> str:
    """The one ``error:`` line of a refused command (exit 2, no traceback), holding ``phrase`` (or one
    of several, where the order of checks decides which the command meets first)."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert len(lines[0]) < 1000
    if phrase is not None:
        assert any(p in lines[0] for p in ((phrase,) if isinstance(phrase, str) else phrase)), lines[0]
    return lines[0]


@pytest.mark.parametrize("case", list(BAD_PIPELINES))
def test_explain_refuses_a_bad_pipeline_in_one_line(case, tmp_path):
    make, phrase = BAD_PIPELINES[case]
    result = runner.invoke(app, ["explain", _pipeline_arg(make(tmp_path)), "-m", "bundled"])
    _one_line_error(result, phrase)


#: commands that load the bundled model and take a pipeline (and the store, for eval/sweep)
def _commands(tmp: Path, store: Path) -> dict[str, Callable[[str], list[str]]]:
    image, out = str(SAMPLE_IMAGE), str(tmp / "out.png")
    return {
        "run": lambda p: ["run", "-m", "bundled", "-i", image, "--prompt", "what?", "-p", p,
                          "--device", "cpu"],
        "show": lambda p: ["show", "-m", "bundled", "-i", image, "--prompt", "what?", "-p", p, "-o", out,
                           "--device", "cpu"],
        "bench": lambda p: ["bench", "-m", "bundled", "-p", p, "--runs", "1", "--warmup", "0",
                            "--device", "cpu"],
        "eval": lambda p: ["eval", "-m", "bundled", "-p", p, "--limit", "2", "--results", str(store),
                           "--device", "cpu"],
        "sweep": lambda p: ["sweep", "-p", p, "--limit", "2", "--results", str(store), "--device", "cpu"],
    }


@pytest.fixture(scope="module")
def stored(tmp_path_factory) -> bytes:
    """The bytes of a results store with one stored vanilla row, made once."""
    path = tmp_path_factory.mktemp("store") / "results.db"
    result = runner.invoke(app, ["eval", "-m", "bundled", "--limit", "2", "--results", str(path),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return path.read_bytes()


@pytest.fixture
def store(tmp_path, stored) -> Path:
    """A copy of that store for one test (what a bad run must leave as it is)."""
    path = tmp_path / "results.db"
    path.write_bytes(stored)
    return path


COMMANDS = ["run", "show", "bench", "eval", "sweep"]
#: the pipeline cases every command is run on (all of them run on `explain` above)
PER_COMMAND = ["keep-zero", "dominant-beyond-tokens", "proxies-beyond-tokens", "bad-escape", "huge-string",
               "invalid-yaml", "binary-yaml", "empty-file", "directory"]


@pytest.mark.parametrize("case", PER_COMMAND)
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_refuses_a_bad_pipeline_and_leaves_the_store(command, case, tmp_path, store):
    make, phrase = BAD_PIPELINES[case]
    before = store.read_bytes()
    argv = _commands(tmp_path, store)[command](_pipeline_arg(make(tmp_path)))
    _one_line_error(runner.invoke(app, argv), phrase)
    assert store.read_bytes() == before
    assert not (tmp_path / "out.png").exists()


#: damaged or mismatched adapters: name -> (damage, phrase)
BAD_ADAPTERS = {
    "truncated-weights": (lambda d: (d / "adapter.safetensors").write_bytes(
        (d / "adapter.safetensors").read_bytes()[:300]), "damaged or not a safetensors file"),
    "garbage-weights": (lambda d: (d / "adapter.safetensors").write_bytes(b"\x00" * 64),
                        "damaged or not a safetensors file"),
    "invalid-json-config": (lambda d: (d / "adapter_config.json").write_text("{bad"), "cannot read"),
    "binary-config": (lambda d: (d / "adapter_config.json").write_bytes(b"\xff\xfe\x00"), "cannot read"),
    "config-not-an-object": (lambda d: (d / "adapter_config.json").write_text("[1, 2]"), "JSON object"),
    "config-wrong-type": (_config_edit(hidden_size="64"), "hidden_size='64' must be an integer"),
    "config-unknown-field": (_config_edit(colour="blue"), "unknown fields ['colour']"),
    "config-of-other-shapes": (_config_edit(hidden_size=4096),
                               ("does not match adapter_config.json", "hidden_size: the adapter has 4096")),
    "config-of-other-layer": (_config_edit(layer=2),
                              ("layer: the adapter has 2", "does not match adapter_config")),
    "adapter-of-other-variant": (lambda d: shutil.copytree(adapter_path("bundled:proxyv-nonspatial"), d,
                                                           dirs_exist_ok=True), "variant: the adapter has"),
    "weights-of-another-adapter": (lambda d: shutil.copy(
        adapter_path("bundled:proxyv-nonspatial") / "adapter.safetensors", d / "adapter.safetensors"),
        "does not match adapter_config.json"),
    "missing-weights": (lambda d: (d / "adapter.safetensors").unlink(), "is not a ProxyV adapter"),
    "not-a-directory": (lambda d: shutil.rmtree(d), "is not a ProxyV adapter"),
}


@pytest.mark.parametrize("case", list(BAD_ADAPTERS))
@pytest.mark.parametrize("command", ["run", "eval"])
def test_bad_adapter_files_are_one_line_and_leave_the_store(command, case, tmp_path, store):
    damage, phrase = BAD_ADAPTERS[case]
    adapter = _adapter(tmp_path, damage)
    before = store.read_bytes()
    argv = _commands(tmp_path, store)[command](SPATIAL) + ["--adapter", adapter]
    _one_line_error(runner.invoke(app, argv), phrase)
    assert store.read_bytes() == before


def test_unknown_bundled_adapter_is_one_line():
    result = runner.invoke(app, ["run", "-m", "bundled", "-i", str(SAMPLE_IMAGE), "--prompt", "what?",
                                 "--adapter", "bundled:nope"])
    _one_line_error(result, "unknown bundled adapter 'nope'")


@pytest.mark.parametrize("command", ["run", "show", "bench", "eval"])
def test_proxyv_without_adapter_is_refused_naming_the_flag(command, tmp_path, store):
    before = store.read_bytes()
    line = _one_line_error(runner.invoke(app, _commands(tmp_path, store)[command](SPATIAL)), "--adapter")
    assert "untrained=true" in line
    assert store.read_bytes() == before


def test_untrained_true_runs_fresh_modules_on_purpose_and_is_named_in_the_identity():
    ok = runner.invoke(app, ["run", "-m", "bundled", "-i", str(SAMPLE_IMAGE), "--prompt", "what?", "--json",
                             "-p", "proxyv(layer=1, factor=3, untrained=true)", "--max-new-tokens", "2"])
    assert ok.exit_code == 0, ok.output
    assert "untrained=true" in json.loads(ok.stdout)["pipeline"]
    both = runner.invoke(app, ["run", "-m", "bundled", "-i", str(SAMPLE_IMAGE), "--prompt", "what?",
                               "-p", "proxyv(layer=1, factor=3, untrained=true)",
                               "--adapter", BUNDLED_SPATIAL])
    _one_line_error(both, "untrained=true, but an adapter was given")


#: devices: value -> phrase
BAD_DEVICES = {"tpu9": "unknown device 'tpu9'", "cuda:99": "cuda:99", "meta": "lmmsqueeze runs on",
               "cpu:x": "unknown device"}


@pytest.mark.parametrize("device", list(BAD_DEVICES))
@pytest.mark.parametrize("command", COMMANDS + ["train-proxyv"])
def test_bad_devices_are_one_line(command, device, tmp_path, store):
    if command == "train-proxyv":
        argv = ["train-proxyv", "-m", "bundled", "-p", "proxyv(layer=1)", "--out", str(tmp_path / "t"),
                "--steps", "1"]
    else:
        argv = _commands(tmp_path, store)[command]("pool")[:-2]  # without --device cpu
    before = store.read_bytes()
    _one_line_error(runner.invoke(app, [*argv, "--device", device]), BAD_DEVICES[device])
    assert store.read_bytes() == before


def test_cuda_without_cuda_is_one_line(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    result = runner.invoke(app, ["bench", "-m", "bundled", "-p", "pool", "--device", "cuda"])
    _one_line_error(result, "device 'cuda' is not available on this machine")


#: images: name -> (make(tmp) -> path, phrase)
BAD_IMAGES = {
    "garbage": (_write("x.png", b"not an image at all"), "cannot read image"),
    "truncated": (lambda t: _write("t.png", SAMPLE_IMAGE.read_bytes()[:60])(t), "cannot read image"),
    "huge": (_write("huge.png", _png_header(20_000, 20_000)), "over lmmsqueeze's limit of 40 megapixels"),
    "directory": (lambda t: str(t), "is a directory"),
    "missing": (lambda t: str(t / "missing.png"), "does not exist"),
    "empty": (_write("empty.png", b""), "cannot read image"),
}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
@pytest.mark.parametrize("command", ["run", "show", "bench"])
def test_bad_images_are_one_line(command, case, tmp_path):
    make, phrase = BAD_IMAGES[case]
    image = make(tmp_path)
    argv = {"run": ["run", "-m", "bundled", "--prompt", "what?"],
            "show": ["show", "-m", "bundled", "--prompt", "what?", "-p", "pool",
                     "-o", str(tmp_path / "o.png")],
            "bench": ["bench", "-m", "bundled", "-p", "pool", "--runs", "1"]}[command]
    _one_line_error(runner.invoke(app, [*argv, "-i", image, "--device", "cpu"]), phrase)
    assert not (tmp_path / "o.png").exists()


def test_the_pixel_limit_is_named_and_sane():
    assert 10_000_000 <= MAX_IMAGE_PIXELS <= 100_000_000


@pytest.mark.parametrize("command", ["run", "show", "bench"])
def test_a_prompt_with_more_image_placeholders_than_images_is_one_line(command, tmp_path):
    argv = {"run": ["run"], "show": ["show", "-p", "pool", "-o", str(tmp_path / "o.png")],
            "bench": ["bench", "-p", "pool", "--runs", "1"]}[command]
    result = runner.invoke(app, [*argv, "-m", "bundled", "-i", str(SAMPLE_IMAGE), "--device", "cpu",
                                 "--prompt", "<image> and <image>: which is larger?"])
    _one_line_error(result, "the prompt holds 2 <image> placeholders for one image")


#: output paths of `show`: make(tmp) -> --out, phrase
BAD_OUTPUTS = {
    "unsupported-suffix": (lambda t: str(t / "picture.xyz"), "picture file type"),
    "no-suffix": (lambda t: str(t / "picture"), "picture file type"),
    "missing-folder": (lambda t: str(t / "no" / "such" / "p.png"), "does not exist"),
    "a-directory": (lambda t: str(t), "is a directory"),
}


@pytest.mark.parametrize("case", list(BAD_OUTPUTS))
def test_show_refuses_bad_output_paths_before_loading(case, tmp_path):
    make, phrase = BAD_OUTPUTS[case]
    result = runner.invoke(app, ["show", "-m", "bundled", "-i", str(SAMPLE_IMAGE), "--prompt", "what?",
                                 "-p", "pool", "-o", make(tmp_path), "--device", "cpu"])
    _one_line_error(result, phrase)


def test_convert_proxyv_refuses_a_missing_source_in_one_line(tmp_path):
    result = runner.invoke(app, ["convert-proxyv", str(tmp_path / "nope"), str(tmp_path / "out")])
    _one_line_error(result)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["train-proxyv", "convert-proxyv"])
def test_an_output_directory_that_is_a_file_is_one_line(command, tmp_path):
    (tmp_path / "taken").write_text("x")
    argv = (["train-proxyv", "-m", "bundled", "-p", "proxyv(layer=1)", "--steps", "1", "--device", "cpu",
             "--out", str(tmp_path / "taken")] if command == "train-proxyv"
            else ["convert-proxyv", str(tmp_path), str(tmp_path / "taken")])
    _one_line_error(runner.invoke(app, argv), "is a file; give a directory")
    assert (tmp_path / "taken").read_text() == "x"


def test_train_proxyv_refuses_untrained_true(tmp_path):
    result = runner.invoke(app, ["train-proxyv", "-m", "bundled", "-p", "proxyv(layer=1, untrained=true)",
                                 "--out", str(tmp_path / "t"), "--steps", "1", "--device", "cpu"])
    _one_line_error(result, "remove untrained=true")


# ----------------------------------------------------------------------------- the library


def _bundled_geometry():
    return geometry_from_path(model_dir("bundled"))



@pytest.mark.parametrize("pipeline, phrase", [
    ("fastv(keep=144)", None),  # every token: allowed (a count up to the tokens received)
    ("proxyv(layer=1, variant=nonspatial, proxies=143)", "more prefill FLOPs"),
    ("fastv(keep=145)", "keep=145 is more than the 144 image tokens"),
    ("visionzip(dominant=144, contextual=0)", None),
    ("visionzip(dominant=0.9, contextual=0.2)", "make 159 tokens"),
    ("pool | stride(stride=6)", None),
    ("pool | stride(stride=7)", "larger than the 6x6 token grid"),
    ("pool | dart(pivots=35, keep=1)", None),
    ("pool | dart(pivots=36, keep=1)", "pivots=36 is not fewer than the 36"),
    ("pool | proxyv(layer=1, variant=nonspatial, proxies=36)",
     "proxies=36 per image is not fewer than the 36"),
    ("pool | proxyv(layer=1, variant=nonspatial, proxies=4)", None),
    ("proxyv(layer=1, factor=2)", None),
    ("proxyv(layer=1, variant=control)", None),  # the documented control may cost more
    ("fastv(keep=1.0)", None),  # keeps all on purpose: a control
])
def test_compiler_bounds_against_the_tokens_a_stage_receives(pipeline, phrase):
    g = _bundled_geometry()
    if phrase is None:
        plan = lmmsqueeze.compile_pipeline(pipeline, g)
        if "proxyv" in pipeline and "control" not in pipeline:
            assert plan.cost().saving > 0
    else:
        with pytest.raises(PipelineError, match=phrase.replace("(", r"\(").replace(")", r"\)")):
            lmmsqueeze.compile_pipeline(pipeline, g)


def test_no_accepted_proxyv_pipeline_costs_more_than_vanilla():
    """Over a grid of ProxyV settings on the bundled model, every pipeline the compiler accepts saves
    FLOPs (the control aside), and the refusals are PipelineErrors."""
    g = _bundled_geometry()
    accepted = 0
    for prefix in ("", "pool | ", "random(keep=0.25) | "):
        for layer in range(4):
            for extra in [f"factor={f}" for f in (1, 2, 3, 6, 12, 13)] + \
                         [f"variant=nonspatial, proxies={p}" for p in (1, 8, 16, 30, 60, 143, 144)]:
                if prefix.startswith("random") and "nonspatial" not in extra:
                    continue
                try:
                    plan = lmmsqueeze.compile_pipeline(f"{prefix}proxyv(layer={layer}, {extra})", g)
                except PipelineError:
                    continue
                accepted += 1
                assert plan.cost().saving >= 0, plan.canonical
                for text in (0, 16, 256):
                    assert plan.cost(text).saving > -0.01, (plan.canonical, text)
    assert accepted > 10


def test_prepare_refuses_proxyv_without_weights_and_allows_untrained_on_purpose():
    model, _ = lmmsqueeze.load_model("bundled", device="cpu")
    with pytest.raises(ModelError, match="needs trained ProxyV weights: pass --adapter"):
        lmmsqueeze.prepare(model, SPATIAL)
    fresh = lmmsqueeze.prepare(model, "proxyv(factor=3, layer=1, untrained=true)")
    assert fresh.weights is not None and fresh.plan.canonical.endswith("untrained=true, variant=spatial)")
    with allow_untrained():
        assert lmmsqueeze.prepare(model, SPATIAL).weights is not None
    trained = lmmsqueeze.prepare(model, SPATIAL, BUNDLED_SPATIAL)
    assert trained.plan.canonical == "proxyv(factor=3, layer=1, mlp_hidden=0, proxies=36, variant=spatial)"
    assert lmmsqueeze.compile_pipeline("proxyv(layer=1, untrained=false)", fresh.plan.geometry).canonical == \
        lmmsqueeze.compile_pipeline("proxyv(layer=1)", fresh.plan.geometry).canonical


#: usage errors Typer finds before any command runs: (arguments, a phrase of the one line)
USAGE_ERRORS = {
    "wrong type": (["sweep", "--limit", "abc"], "Invalid value for '--limit'"),
    "unknown option": (["eval", "--bogus"], "No such option: --bogus"),
    "unknown command": (["evaluate"], "No such command 'evaluate'"),
    "missing argument": (["explain"], "Missing argument"),
    "missing option value": (["pareto", "--results"], "requires an argument"),
    "extra argument": (["reducers", "pool", "fastv"], "unexpected extra argument"),
}


@pytest.mark.parametrize("case", list(USAGE_ERRORS))
def test_usage_errors_are_one_line_naming_the_commands_help(case, tmp_path):
    args, phrase = USAGE_ERRORS[case]
    store = tmp_path / "r.db"
    line = _one_line_error(runner.invoke(app, [*args]), phrase)
    assert line.endswith("--help')") and not store.exists()


#: `tune` arguments and space files refused before anything loads or runs: name -> (arguments after
#: `tune`, with {tmp} for the test's folder; space file text or None; a phrase of the one line)
BAD_TUNE = {
    "budget-zero": (["--budget", "0"], None, "--budget 0.0 must be a fraction"),
    "budget-negative": (["--budget", "-0.5"], None, "in (0, 1]"),
    "budget-above-one": (["--budget", "1.5"], None, "--budget 1.5 must be a fraction"),
    "unknown-metric": (["--metric", "speed"], None, "--metric 'speed' must be one of flops, latency"),
    "trials-zero": (["--trials", "0"], None, "--trials 0 must be an integer >= 1"),
    "bad-rungs": (["--rungs", "50,x"], None, "--rungs '50,x' must be comma-separated"),
    "missing-space": (["--space", "{tmp}/nope.yaml"], None, "does not exist"),
    "invalid-yaml": ([], "reducers: [fastv\n", "is not valid YAML"),
    "space-not-a-mapping": ([], "- fastv\n", "must be a mapping"),
    "unknown-key": ([], "reducer: [fastv]\n", "unknown keys ['reducer']; valid: reducers"),
    "unknown-reducer": ([], "reducers: [fastvv]\n", "unknown stage 'fastvv': did you mean 'fastv'"),
    "unknown-parameter": ([], "reducers: {fastv: {kep: [0.1, 0.5]}}\n", "fastv has no parameter 'kep'"),
    "range-outside-bounds": ([], "reducers: {fastv: {keep: [0.0, 0.5]}}\n", "0.0 is outside fastv's bounds"),
    "layer-beyond-model": ([], "reducers: {fastv: {layer: [1, 9]}}\n", "layer 9 is beyond the model's 4"),
    "range-reversed": ([], "reducers: {fastv: {keep: [0.5, 0.1]}}\n", "low 0.5 is above high 0.1"),
    "bad-max-stages": ([], "max_stages: 99\n", "must be an integer from 0 to"),
    "placement-not-declared": ([], "reducers: {fastv: {placements: [vision]}}\n",
                               "placements fastv declares"),
    "proxyv-as-reducer": ([], "reducers: [proxyv]\n", "list it under `adapters:`"),
    "unknown-adapter": ([], "adapters: [bundled:nope]\n", "unknown bundled adapter 'nope'"),
}


@pytest.mark.parametrize("case", list(BAD_TUNE))
def test_tune_refuses_bad_arguments_and_spaces_in_one_line(case, tmp_path, store, no_model):
    args, space, phrase = BAD_TUNE[case]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if space is not None:
        (tmp_path / "space.yaml").write_text(space)
        args += ["--space", str(tmp_path / "space.yaml")]
    before = store.read_bytes()
    _one_line_error(runner.invoke(app, ["tune", "--results", str(store), "--trials", "2", *args]), phrase)
    assert store.read_bytes() == before
    assert not list(tmp_path.glob("*.tune.db"))


#: scale-out arguments refused before anything loads or runs: name -> (arguments, a phrase of the one line)
BAD_SCALE = {
    "shard-zero": (["sweep", "-p", "pool", "--shard", "0/2"], "--shard '0/2' is not I/N with 1 <= I <= N"),
    "shard-beyond": (["sweep", "-p", "pool", "--shard", "3/2"], "--shard '3/2' is not I/N"),
    "shard-word": (["sweep", "-p", "pool", "--shard", "x"], "--shard 'x' is not I/N"),
    "shard-of-zero": (["sweep", "-p", "pool", "--shard", "1/0"], "--shard '1/0' is not I/N"),
    "processes-zero-eval": (["eval", "-p", "pool", "--processes", "0"], "--processes 0 must be an integer"),
    "processes-zero-sweep": (["sweep", "-p", "pool", "--processes", "0"], "--processes 0 must be"),
    "device-map-unknown": (["eval", "-p", "pool", "--device-map", "everywhere"], "is not one of auto"),
    "max-memory-alone": (["eval", "-p", "pool", "--max-memory", "cpu=1GiB"], "go with --device-map"),
    "max-memory-malformed": (["eval", "--device-map", "auto", "--max-memory", "cpu:1GiB"],
                             "is not DEVICE=SIZE"),
    "device-map-with-processes": (["eval", "--device-map", "auto", "--processes", "2"],
                                  "runs in one process"),
    "offload-folder-a-file": (["eval", "--device-map", "auto", "--offload-folder", "{store}"], "is a file"),
    "lmms-task-with-processes": (["eval", "--task", "lmms:mme", "--processes", "2"], "own launcher"),
}


@pytest.mark.parametrize("case", list(BAD_SCALE))
def test_scale_out_arguments_are_refused_in_one_line(case, tmp_path, store, no_model):
    args, phrase = BAD_SCALE[case]
    before = store.read_bytes()
    args = [a.replace("{store}", str(store)) for a in args]
    _one_line_error(runner.invoke(app, [*args, "--results", str(store), "--limit", "2"]), phrase)
    assert store.read_bytes() == before


def _not_a_store(tmp: Path) -> str:
    (tmp / "notes.db").write_text("not a database, just text\n" * 100)
    return str(tmp / "notes.db")


def _damaged_store(tmp: Path, stored: Path) -> str:
    data = bytearray(stored.read_bytes())
    data[4096:8192] = b"\xff" * 4096  # a damaged page
    (tmp / "damaged.db").write_bytes(bytes(data))
    return str(tmp / "damaged.db")


#: `results merge` inputs refused before the output is written: name -> (make(tmp, store) -> a source,
#: a phrase of the one line)
BAD_MERGE = {
    "missing": (lambda tmp, store: str(tmp / "nope.db"), "does not exist"),
    "folder": (lambda tmp, store: str(tmp), "is a folder"),
    "not-a-store": (lambda tmp, store: _not_a_store(tmp), "is not a lmmsqueeze results file"),
    "damaged": (_damaged_store, ("cannot be used", "is not a lmmsqueeze results file")),
}


@pytest.mark.parametrize("case", list(BAD_MERGE))
def test_results_merge_refuses_missing_or_damaged_inputs_in_one_line(case, tmp_path, store):
    make, phrase = BAD_MERGE[case]
    bad = make(tmp_path, store)
    out = tmp_path / "out" / "merged.db"
    out.parent.mkdir()
    _one_line_error(runner.invoke(app, ["results", "merge", str(store), bad, "-o", str(out)]), phrase)
    assert not out.exists()  # every source is checked before anything is written
