"""Third-party reducers: registration rules, and discovery through a real entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest

from lmmsqueeze import ScoredPruner, register_reducer
from lmmsqueeze.errors import RegistryError
from lmmsqueeze.reducers import list_reducers, unregister_reducer
from lmmsqueeze.testing import random_image, tiny_llava

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
