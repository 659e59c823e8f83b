"""What every command module shares: the consoles, the option types, the error guard and the output sink.

Command modules import from here only, never from the package ``__init__`` (which joins them).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import LmmsqueezeError
from ..evaluation.store import DEFAULT_PATH

console = Console(width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True)

ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="A local Hugging Face model directory, or `bundled`.")
]
PipelineOpt = Annotated[
    str,
    typer.Option("--pipeline", "-p", help='Pipeline, e.g. "pool | fastv(layer=2, keep=0.5)", or @file.yaml.'),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu, cuda, ... (default: cuda when present).")]
AdapterOpt = Annotated[str | None, typer.Option(
    help="ProxyV adapter: a directory or bundled:<name>; used by pipelines with a proxyv stage "
         "(alone: its own).")]
ResultsOpt = Annotated[Path, typer.Option("--results", help="SQLite results file.")]
DEFAULT_RESULTS = Path(DEFAULT_PATH)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn known errors into one line on stderr and exit code 2."""
    try:
        yield
    except (LmmsqueezeError, FileNotFoundError) as exc:
        if os.environ.get("LMMSQUEEZE_DEBUG"):
            raise
        message = str(exc) if isinstance(exc, LmmsqueezeError) else f"file not found: {exc.filename or exc}"
        err_console.print(f"[bold red]error:[/] {escape(str(message))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def emit(data: Any, as_json: bool, render: Any = None) -> None:
    """The one output sink: JSON on stdout, or a rich rendering."""
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    elif render is not None:
        render(data)
    else:
        console.print(data)


def si(x: float) -> str:
    """``x`` with an SI prefix and two decimals (FLOPs in tables), e.g. ``1.23 G``."""
    from ..compose.flops import si_unit

    unit, scale = si_unit(x)
    return f"{x / scale:.2f} {unit}" if unit else f"{x:.0f}"
