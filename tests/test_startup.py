"""`lmmsqueeze --help` starts fast: importing the CLI (or the package) imports neither torch nor
transformers; the commands import them when they run."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ["torch", "transformers", "numpy", "PIL", "safetensors"]


def _loaded_after(code: str) -> list[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_importing_the_cli_and_the_package_loads_no_heavy_module():
    assert _loaded_after("import lmmsqueeze.cli") == []
    assert _loaded_after("import lmmsqueeze\nassert lmmsqueeze.__version__") == []


def test_help_runs_without_torch():
    code = ("import sys\nfrom lmmsqueeze.cli import app\nsys.argv = ['lmmsqueeze', '--help']\n"
            "try:\n    app()\nexcept SystemExit as exc:\n    assert exc.code == 0, exc.code")
    assert _loaded_after(code) == []


def test_the_package_names_still_load_on_use():
    assert _loaded_after("import lmmsqueeze\nassert lmmsqueeze.compile('pool', 'llava-1.5-7b').canonical "
                         "== 'pool(size=2)'") != []  # torch comes with the first real use
    import lmmsqueeze

    assert {"ScoredPruner", "apply", "compile", "load_model", "register_reducer"} <= set(dir(lmmsqueeze))
    assert lmmsqueeze.get_reducer("proxyv").name == "proxyv"
