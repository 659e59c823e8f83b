"""Starting data-parallel ranks on this machine through torch's elastic launcher (what ``torchrun
--standalone --nproc-per-node N`` runs): a local rendezvous on a free port, no restarts, every rank in a
fresh (spawned) process with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` and
``MASTER_ADDR``/``MASTER_PORT`` set, the ranks' output on this process's terminal.
"""

from __future__ import annotations

import logging
import signal
import uuid
from collections.abc import Callable
from typing import Any

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from ..errors import LmmsqueezeError

_LOGGERS = ("torch.distributed.elastic", "torch.distributed.launcher")


def _signal_name(code: int) -> str:
    try:
        return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
    except ValueError:
        return f"exit code {code}"


def launch(processes: int, entrypoint: Callable[..., Any], *args: Any) -> dict[int, Any]:
    """Run ``entrypoint(*args)`` on ``processes`` local ranks; returns each rank's return value by rank.

    ``entrypoint`` must be importable by name (a module-level function). A rank that dies (a signal, or
    an uncaught error) stops the others and is one :class:`LmmsqueezeError`.
    """
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise LmmsqueezeError(f"--processes {processes!r} must be an integer >= 1; give e.g. --processes 2")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=0.1, start_method="spawn")
    levels = {name: logging.getLogger(name).level for name in _LOGGERS}
    for name in _LOGGERS:  # the launcher's own progress and failure logs: the error line says it
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        return elastic_launch(config, entrypoint)(*args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        raise LmmsqueezeError(
            f"rank {rank} of {processes} stopped ({_signal_name(failure.exitcode)}); the other ranks were "
            "stopped and no partial row was stored: run the command again (stored rows are skipped)"
        ) from None
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
