"""The machine a measurement runs on: the CPUs this process may use, its physical cores, and how busy
other processes keep them (no torch here, so the CLI can check ``--threads`` before importing it).

:class:`LoadMeter` records the contention over a measured span (load average before and after, the
CPU other processes used, the threads and cores) and flags it ``busy`` when other processes wanted
more than the cores our threads left free. :mod:`lmmsqueeze.runtime.threads` chooses torch's threads
from the same numbers.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from .errors import LmmsqueezeError

#: the environment variable that fixes torch's CPU threads (``lmmsqueeze --threads N`` sets it)
THREADS_ENV = "LMMSQUEEZE_THREADS"
#: a measurement is ``busy`` when other processes used this many cores more than our threads left free
BUSY_MARGIN = 0.5
#: how long :func:`cores_in_use` samples other processes' CPU use (seconds)
SAMPLE_S = 0.1


def usable_cpus() -> list[int]:
    """The logical CPUs this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def physical_cores(cpus: list[int] | None = None) -> int:
    """Distinct physical cores among ``cpus`` (default: every CPU of the machine), from sysfs; the
    logical count where the topology is unknown."""
    root = Path("/sys/devices/system/cpu")
    if cpus is None:
        cpus = sorted(int(p.name[3:]) for p in root.glob("cpu[0-9]*")) or list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topo = root / f"cpu{cpu}" / "topology"
        try:
            cores.add(tuple((topo / f).read_text().strip() for f in ("physical_package_id", "core_id")))
        except OSError:
            return len(cpus)
    return len(cores) or len(cpus)


def check_threads(value: Any, what: str, fix: str) -> int:
    """``value`` as a thread count in 1..(CPUs this process may use); else a one-line error naming ``what``
    and ending with ``fix``."""
    limit = len(usable_cpus())
    text = str(value).strip()
    if not (text.isdigit() and 1 <= int(text) <= limit):
        raise LmmsqueezeError(f"{what} is not a thread count in 1..{limit} (the CPUs this process may use); "
                              f"{fix}")
    return int(text)


def env_threads(environ: Any = None) -> int | None:
    """The thread count ``LMMSQUEEZE_THREADS`` asks for (None when unset); refuses a bad value."""
    environ = os.environ if environ is None else environ
    raw = environ.get(THREADS_ENV, "")
    if not raw.strip():
        return None
    fix = f"set {THREADS_ENV} to a count such as 1, or unset it"
    return check_threads(raw, f"{THREADS_ENV}={raw!r}", fix)


def _cpu_times(cpus: list[int]) -> tuple[float, float] | None:
    """(busy, total) jiffies summed over ``cpus`` from /proc/stat; None where unavailable."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    wanted = {f"cpu{c}" for c in cpus}
    busy = total = 0.0
    for line in lines:
        parts = line.split()
        if parts and parts[0] in wanted:
            # user nice system idle iowait irq softirq steal (guest time is counted inside user)
            values = [float(v) for v in parts[1:9]]
            total += sum(values)
            busy += sum(values) - values[3] - values[4]
    return (busy, total) if total else None


def _others(before: tuple[float, float] | None, after: tuple[float, float] | None, own_s: float,
            wall_s: float, n_cpus: int) -> float | None:
    """Cores other processes used on average between two /proc/stat samples (ours subtracted)."""
    if not (before and after and after[1] > before[1] and wall_s > 0):
        return None
    share = (after[0] - before[0]) / (after[1] - before[1])  # of the usable CPUs
    return max(0.0, share * n_cpus - own_s / wall_s)


def loadavg() -> float | None:
    """The 1-minute load average, where the platform has one."""
    try:
        return round(os.getloadavg()[0], 3)
    except (AttributeError, OSError):
        return None


def cores_in_use(sample_s: float = SAMPLE_S) -> float:
    """Cores other processes keep busy now: a short /proc/stat sample, else the 1-minute load average."""
    cpus = usable_cpus()
    before, own0, wall0 = _cpu_times(cpus), time.process_time(), time.perf_counter()
    if before is not None:
        time.sleep(sample_s)
        others = _others(before, _cpu_times(cpus), time.process_time() - own0, time.perf_counter() - wall0,
                         len(cpus))
        if others is not None:
            return others
    return loadavg() or 0.0


def contention(threads: int, others: float | None, load_before: float | None = None,
               load_after: float | None = None, cpus: list[int] | None = None) -> dict[str, Any]:
    """The metrics :class:`LoadMeter` records (see :meth:`LoadMeter.metrics`)."""
    cores = physical_cores(usable_cpus() if cpus is None else cpus)
    if others is None and load_after is not None:  # no /proc/stat: the load average, less our threads
        others = max(0.0, max(load_before or 0.0, load_after) - threads)
    return {
        "threads": threads,
        "cpu_cores": cores,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "others_cpu": None if others is None else round(others, 3),
        "busy": None if others is None else bool(others >= max(0, cores - threads) + BUSY_MARGIN),
    }


class LoadMeter:
    """Context manager measuring how busy other processes kept this process's CPUs over a span."""

    def __init__(self, threads: int):
        self.threads = threads
        self.cpus = usable_cpus()
        self.result: dict[str, Any] = {}

    def __enter__(self) -> LoadMeter:
        self._load0, self._cpu0 = loadavg(), _cpu_times(self.cpus)
        self._own0, self._wall0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        others = _others(self._cpu0, _cpu_times(self.cpus), time.process_time() - self._own0,
                         time.perf_counter() - self._wall0, len(self.cpus))
        self.result = contention(self.threads, others, self._load0, loadavg(), self.cpus)

    def metrics(self) -> dict[str, Any]:
        """``threads`` (torch's intra-op threads), ``cpu_cores`` (physical cores usable), ``loadavg_before``
        and ``loadavg_after`` (1-minute load average), ``others_cpu`` (cores other processes used on
        average meanwhile; None where unknown) and ``busy`` (they wanted at least ``BUSY_MARGIN`` cores
        more than our threads left free)."""
        return dict(self.result)
