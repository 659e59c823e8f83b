"""CPU threads: how many intra-op threads torch gets when lmmsqueeze loads a model on CPU.

torch's default (one intra-op thread per physical core) stalls when another process holds one of
the cores: every parallel op waits for its slowest thread, and a 2-core machine with one busy core
ran the bundled model 15-20x slower. :func:`configure_threads` (called by ``load_model`` on CPU)
chooses instead, by the first rule that applies:

1. ``LMMSQUEEZE_THREADS=N`` (what the CLI's ``lmmsqueeze --threads N`` sets): N threads.
2. A count the user chose is left alone: ``torch.set_num_threads(n)`` called before with an n other
   than torch's start-up default, or ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` set.
3. A tiny model (fewer than :data:`TINY_PARAMS` parameters, such as the bundled 2M one): 1 thread;
   per-op overheads dominate, one thread is as fast and immune to a busy core.
4. Otherwise one thread per physical core not in use: the physical cores this process may run on
   minus the cores other processes keep busy (:func:`lmmsqueeze.machine.cores_in_use`), at least 1;
   shared evenly by the ranks a launcher started on this machine (``LOCAL_WORLD_SIZE``, set by torchrun
   and ``lmmsqueeze eval --processes N``; note torchrun and ``accelerate launch`` set
   ``OMP_NUM_THREADS=1`` for every rank unless it is set, which rule 2 keeps).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from ..machine import THREADS_ENV, cores_in_use, env_threads, physical_cores, usable_cpus

#: below this many parameters a model runs on one CPU thread
TINY_PARAMS = 20_000_000
_OMP_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")

_applied: int | None = None  # the count configure_threads set last


def torch_default_threads() -> int:
    """The intra-op thread count torch starts with in this environment."""
    for var in _OMP_VARS:
        value = os.environ.get(var, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return physical_cores()


def user_chose_threads() -> bool:
    """Whether torch's thread count is someone's explicit choice (neither torch's default nor ours)."""
    if any(os.environ.get(var, "").strip() for var in _OMP_VARS):
        return True
    return torch.get_num_threads() not in (torch_default_threads(), _applied)


@dataclass(frozen=True)
class ThreadChoice:
    """A thread count and the rule that chose it."""

    threads: int | None  # None: left as it was
    reason: str


def choose_threads(params: int, in_use: float | None = None, environ: Any = None,
                   user_chose: bool | None = None) -> ThreadChoice:
    """The module's policy for a model of ``params`` parameters (``in_use``: cores other processes keep
    busy, sampled when needed and not given; ``user_chose``: default :func:`user_chose_threads`)."""
    override = env_threads(environ)
    if override is not None:
        return ThreadChoice(override, f"{THREADS_ENV}={override}")
    if user_chose_threads() if user_chose is None else user_chose:
        return ThreadChoice(None, f"left at {torch.get_num_threads()}, the count set before")
    if params < TINY_PARAMS:
        return ThreadChoice(1, f"tiny model ({params / 1e6:.1f}M parameters)")
    cores = physical_cores(usable_cpus())
    busy = cores_in_use() if in_use is None else in_use
    ranks = env_ranks(environ)
    share = f", shared by {ranks} local ranks" if ranks > 1 else ""
    return ThreadChoice(max(1, min(cores, cores - round(busy)) // ranks),
                        f"{cores} physical cores, {busy:.1f} busy with other processes{share}")


def env_ranks(environ: Any = None) -> int:
    """The processes a launcher started on this machine (``LOCAL_WORLD_SIZE``; 1 without one)."""
    text = str((os.environ if environ is None else environ).get("LOCAL_WORLD_SIZE", "1")).strip()
    return int(text) if text.isdigit() and int(text) > 0 else 1


def configure_threads(model: Any) -> ThreadChoice:
    """Apply :func:`choose_threads` for ``model`` when it runs on CPU (else leave torch as it is)."""
    global _applied
    param = next(model.parameters(), None)
    if param is None or param.device.type != "cpu":
        return ThreadChoice(None, "not on CPU")
    choice = choose_threads(sum(p.numel() for p in model.parameters()))
    if choice.threads is not None:
        torch.set_num_threads(choice.threads)
        _applied = choice.threads
    return choice
