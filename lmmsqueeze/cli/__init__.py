"""The ``lmmsqueeze`` command line (Typer + rich). Commands parse arguments, call the library and
render plain dicts; no tensor code lives here.

This module only joins: the root ``app`` and ``main()``, plus each command group's own Typer app,
added without a name so that its commands stay top-level (``lmmsqueeze sweep``). The groups are
``inspect`` (reducers, explain), ``run`` (run, bench, show), ``convert`` (convert-proxyv), ``evaluate``
(eval, export-lmms-task, sweep, pareto) and ``train`` (train-proxyv); ``common`` holds what they share.
``lmmsqueeze --help`` lists the commands in that order.

Known errors print one line (``error: ...``) and exit with code 2; set ``LMMSQUEEZE_DEBUG=1`` to
see the traceback instead.
"""

from __future__ import annotations

import os
from typing import Annotated

import typer

from ..machine import THREADS_ENV, check_threads, env_threads
from . import convert, evaluate, inspect, run, train
from .common import console, user_errors

app = typer.Typer(
    name="lmmsqueeze",
    help="Composable visual-token reducers and ProxyV for LLaVA-style models: run, explain, measure.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Added without a name, a group's commands join the root's (Typer >= 0.15), in this order in --help.
app.add_typer(inspect.app)  # reducers, explain
app.add_typer(run.app)  # run, bench, show
app.add_typer(convert.app)  # convert-proxyv
app.add_typer(evaluate.app)  # eval, export-lmms-task, sweep, pareto
app.add_typer(train.app)  # train-proxyv


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        console.print(f"lmmsqueeze {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    threads: Annotated[str | None, typer.Option(
        "--threads", metavar="N", show_default=False,
        help=f"torch CPU threads (same as {THREADS_ENV}=N). Default: 1 for tiny models such as the bundled "
             "one, else one per physical core not busy; a count set with torch.set_num_threads is kept.")
    ] = None,
) -> None:
    """Composable visual-token reducers and ProxyV for LLaVA-style models: run, explain, measure."""
    with user_errors():  # refuse a bad count before any command runs
        if threads is not None:
            count = check_threads(threads, f"--threads {threads}", "give e.g. --threads 1")
            os.environ[THREADS_ENV] = str(count)
        env_threads()


def main() -> None:
    """Console entry point."""
    app()


__all__ = ["app", "main"]
