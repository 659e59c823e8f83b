"""The ``lmmsqueeze`` command line (Typer + rich). Commands parse arguments, call the library and
render plain dicts; no tensor code lives here.

This module only joins: the root ``app`` and ``main()``, plus each command group's own Typer app,
added without a name so that its commands stay top-level (``lmmsqueeze sweep``). The groups are
``inspect`` (reducers, explain), ``run`` (run, bench, show), ``convert`` (convert-proxyv), ``evaluate``
(eval, export-lmms-task, sweep, pareto), ``train`` (train-proxyv) and ``tune`` (tune); ``common`` holds
what they share.
``lmmsqueeze --help`` lists the commands in that order.

Known errors print one line (``error: ...``) and exit with code 2; set ``LMMSQUEEZE_DEBUG=1`` to
see the traceback instead. Usage errors (an unknown option or command, a value of the wrong type, a
missing argument) are one line too, naming the command's ``--help``.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any

import typer
from rich.markup import escape
from typer.core import TyperGroup

from ..machine import THREADS_ENV, check_threads, env_threads
from . import convert, evaluate, inspect, run, scale, train, tune
from .common import console, err_console, user_errors


class OneLineUsageErrors(TyperGroup):
    """The root group: a usage error is one ``error:`` line and exit 2, as every other bad input (Typer's
    own rendering is a usage line, a hint and a boxed message)."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except typer.Abort:
            err_console.print("Aborted.", highlight=False)
            sys.exit(1)
        except typer.TyperException as exc:
            if not hasattr(exc, "format_message"):
                raise
            context = getattr(exc, "ctx", None)
            where = context.command_path if context is not None else "lmmsqueeze"
            message = " ".join(exc.format_message().split())
            err_console.print(f"[bold red]error:[/] {escape(message)} (see '{escape(where)} --help')",
                              highlight=False, soft_wrap=True)
            sys.exit(getattr(exc, "exit_code", 2))
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=OneLineUsageErrors,
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
app.add_typer(tune.app)  # tune
app.add_typer(scale.app, name="results")  # results merge


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
