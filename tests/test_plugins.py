"""Third-party reducers: registration rules, and discovery through a real entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest
from typer.testing import CliRunner

from lmmsqueeze import ScoredPruner, get_reducer, register_reducer
from lmmsqueeze.cli import app
from lmmsqueeze.errors import RegistryError
from lmmsqueeze.reducers import list_reducers, load_plugins, registry, unregister_reducer
from lmmsqueeze.testing import random_image, tiny_llava

cli_runner = CliRunner()

PLUGIN = textwrap.dedent('''
    """A throwaway lmmsqueeze plugin: keep the first image tokens."""
    from dataclasses import dataclass

    from lmmsqueeze import ScoredPruner, register_reducer


    @register_reducer("keep_first", family="pruning", placements=("projector", "llm"), keeps_grid=False,
                      cite="test plugin")
    @dataclass(frozen=True)
    class KeepFirst(ScoredPruner):
        """Keep the first ``keep`` tokens in reading order."""

        keep: int | float = 0.5
        layer: int | None = None

        def score(self, state, signals):
            return -state.index.float()
''')


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    """A directory on PYTHONPATH holding a plugin package and its dist-info with an entry point."""
    root = tmp_path_factory.mktemp("plugin")
    (root / "lmsq_demo_plugin").mkdir()
    (root / "lmsq_demo_plugin" / "__init__.py").write_text(PLUGIN)
    info = root / "lmsq_demo_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lmsq-demo-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[lmmsqueeze.reducers]\nkeep_first = lmsq_demo_plugin\n")
    model_dir = root / "model"
    model, processor = tiny_llava()
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    random_image(0).save(root / "image.png")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    return root, env


def _cli(env, *args):
    return subprocess.run([sys.executable, "-m", "lmmsqueeze", *args], env=env, capture_output=True,
                          text=True, timeout=300)


def test_entry_point_plugin_is_listed_and_runs_through_the_cli(plugin_env):
    root, env = plugin_env
    listed = _cli(env, "reducers", "--json")
    assert listed.returncode == 0, listed.stderr
    row = next(r for r in json.loads(listed.stdout) if r["name"] == "keep_first")
    assert row["module"] == "lmsq_demo_plugin" and row["placements"] == ["projector", "llm"]

    ran = _cli(env, "run", "--model", str(root / "model"), "--image", str(root / "image.png"),
               "--prompt", "what is the colour ?", "--pipeline", "keep_first(keep=5) | fastv(keep=2)",
               "--max-new-tokens", "2", "--json")
    assert ran.returncode == 0, ran.stderr
    data = json.loads(ran.stdout)
    assert data["pipeline"] == "keep_first(keep=5) | fastv(keep=2, layer=2)"
    assert data["kept_per_stage"] == [5, 2] and data["image_tokens_per_layer"] == [5, 5, 2, 2]

    bad = _cli(env, "explain", "keep_first(keep=0)")
    assert bad.returncode == 2 and bad.stderr.strip() == \
        "error: stage 1 (keep_first): keep=0 keeps no token; give a count >= 1 or a fraction in (0, 1]"


def test_duplicate_names_are_refused():
    with pytest.raises(RegistryError, match="already registered"):
        @register_reducer("fastv", family="pruning", placements=("projector",), keeps_grid=False)
        @dataclass(frozen=True)
        class Clash(ScoredPruner):
            keep: int | float = 0.5


def test_bad_registrations_name_the_problem():
    with pytest.raises(RegistryError, match="family 'prune'"):
        register_reducer("x1", family="prune", placements=("projector",), keeps_grid=False)(
            dataclass(frozen=True)(type("X1", (ScoredPruner,), {})))
    with pytest.raises(RegistryError, match="no `layer` parameter"):
        register_reducer("x2", family="pruning", placements=("llm",), keeps_grid=False)(
            dataclass(frozen=True)(type("X2", (ScoredPruner,), {})))
    with pytest.raises(RegistryError, match="unknown signals"):
        register_reducer("x3", family="pruning", placements=("projector",), needs=("telepathy",),
                         keeps_grid=False)(dataclass(frozen=True)(type("X3", (ScoredPruner,), {})))
    assert not {"x1", "x2", "x3"} & set(list_reducers())


def test_override_replaces_and_unregister_removes():
    @register_reducer("tmp_first", family="pruning", placements=("projector",), keeps_grid=False)
    @dataclass(frozen=True)
    class A(ScoredPruner):
        """A."""

    @register_reducer("tmp_first", family="pruning", placements=("projector",), keeps_grid=False,
                      override=True)
    @dataclass(frozen=True)
    class B(ScoredPruner):
        """B."""

    try:
        from lmmsqueeze import get_reducer

        assert get_reducer("tmp_first") is B
    finally:
        unregister_reducer("tmp_first")
    assert "tmp_first" not in list_reducers()


BROKEN = "import lmsq_missing_dependency  # noqa: F401  (not installed)\n"
CLASH = textwrap.dedent('''
    from dataclasses import dataclass

    from lmmsqueeze import ScoredPruner, register_reducer


    @register_reducer("tmp_clash_first", family="pruning", placements=("projector",), keeps_grid=False)
    @dataclass(frozen=True)
    class First(ScoredPruner):
        """Registered before the clash: undone with the plugin."""

        def score(self, state, signals):
            return state.index.float()


    @register_reducer("fastv", family="pruning", placements=("projector",), keeps_grid=False, override=True)
    @dataclass(frozen=True)
    class NotFastV(ScoredPruner):
        """Reuses a built-in name."""

        def score(self, state, signals):
            return state.index.float()
''')


@pytest.fixture
def mixed_plugins(tmp_path, monkeypatch):
    """Three installed plugins seen in-process: one that cannot import, one that reuses `fastv` after
    registering another name, and a good one (the PLUGIN above, entry point key `first` != its name)."""
    plugins = {"lmsq_broken": ("lmsq-broken", "broken_one", BROKEN),
               "lmsq_clash": ("lmsq-clash", "clash", CLASH),
               "lmsq_good": ("lmsq-good", "first", PLUGIN)}
    for module, (dist, key, source) in plugins.items():
        (tmp_path / module).mkdir()
        (tmp_path / module / "__init__.py").write_text(source)
        info = tmp_path / f"{module}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[lmmsqueeze.reducers]\n{key} = {module}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    saved = dict(registry._REGISTRY)
    monkeypatch.setattr(registry, "_PLUGINS_LOADED", False)
    monkeypatch.setattr(registry, "_PLUGIN_ERRORS", {})
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)
    for module in plugins:
        sys.modules.pop(module, None)


def test_a_broken_or_clashing_plugin_is_refused_alone_and_named(mixed_plugins):
    errors = load_plugins()
    assert set(errors) == {"broken_one", "clash"}
    assert errors["broken_one"] == ("package 'lmsq-broken' (module lmsq_broken): ModuleNotFoundError: "
                                    "No module named 'lmsq_missing_dependency'")
    assert errors["clash"].startswith("package 'lmsq-clash' (module lmsq_clash): RegistryError: reducer name "
                                      "'fastv' is taken by lmmsqueeze.reducers.fastv.")
    assert get_reducer("fastv").__module__ == "lmmsqueeze.reducers.fastv"  # override does not apply
    names = list_reducers()
    assert "keep_first" in names and "tmp_clash_first" not in names  # the clashing plugin left nothing


def test_the_cli_names_failed_plugins_and_unrelated_commands_work(mixed_plugins):
    listed = cli_runner.invoke(app, ["reducers"])
    assert listed.exit_code == 0, listed.output
    assert "keep_first" in listed.stdout and "tmp_clash_first" not in listed.stdout
    warnings = [line for line in listed.stderr.splitlines() if line.startswith("warning: plugin")]
    assert len(warnings) == 2
    assert any("'broken_one' failed to load: package 'lmsq-broken'" in w and "lmsq_missing_dependency" in w
               for w in warnings)
    assert any("'clash' failed to load: package 'lmsq-clash'" in w for w in warnings)

    unknown = cli_runner.invoke(app, ["explain", "broken_one"])
    lines = [line for line in unknown.stderr.splitlines() if line.strip()]
    assert unknown.exit_code == 2 and len(lines) == 1 and "Traceback" not in unknown.output
    assert lines[0].startswith("error: unknown stage 'broken_one'")
    assert "plugin 'broken_one' failed to load, package 'lmsq-broken' (module lmsq_broken): " \
           "ModuleNotFoundError" in lines[0]

    fine = cli_runner.invoke(app, ["explain", "keep_first(keep=10) | fastv(keep=0.5)", "--json"])
    assert fine.exit_code == 0, fine.output
    assert json.loads(fine.stdout)["pipeline"] == "keep_first(keep=10) | fastv(keep=0.5, layer=2)"
