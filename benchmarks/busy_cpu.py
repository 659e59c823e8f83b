"""The README main job on an idle CPU and on a busy one: wall times and their ratio (target: <= 2x).

Runs `lmmsqueeze sweep` (the default grid on the bundled model; `--limit` samples per pipeline) into a
fresh temporary results store twice: once on the idle machine, once while `--busy` other processes
spin (a pure-Python loop each, one core apiece). Prints both wall times, the ratio, and what the
stored rows recorded about the machine (threads, others' CPU, rows flagged busy).

    python benchmarks/busy_cpu.py [--limit 200] [--busy 1] [--threads N] [--out FILE.json]

Run it on an otherwise idle machine: the first run is the idle reference, and the script says so
when other processes already keep a core busy. `--threads N` passes `lmmsqueeze --threads N` to both
runs (e.g. the core count, to see torch's default thread count suffer).
"""

from __future__ import annotations

import argparse
import json
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lmmsqueeze.machine import cores_in_use, physical_cores, usable_cpus

SPIN = "while True:\n    pass\n"


def sweep(limit: int, threads: int | None, timeout: float) -> dict:
    """One `lmmsqueeze sweep --limit N` in a fresh folder: wall seconds and what the rows recorded."""
    with tempfile.TemporaryDirectory(prefix="lmmsqueeze-busy-") as tmp:
        store = Path(tmp) / "results.db"
        cmd = [sys.executable, "-m", "lmmsqueeze", *(["--threads", str(threads)] if threads else []),
               "sweep", "--limit", str(limit), "--results", str(store)]
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"sweep failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
        with sqlite3.connect(store) as db:
            rows = [json.loads(m) for (m,) in db.execute("SELECT metrics FROM runs WHERE status = 'ok'")]
    return {
        "wall_s": round(wall, 2),
        "rows": len(rows),
        "threads": sorted({r.get("threads") for r in rows}, key=str),
        "others_cpu_max": max((r.get("others_cpu") or 0.0 for r in rows), default=None),
        "rows_busy": sum(bool(r.get("busy")) for r in rows),
        "latency_ms_median_of_rows": sorted(r["latency_ms"] for r in rows)[len(rows) // 2] if rows else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=200, help="samples per pipeline (the README job: 1000)")
    parser.add_argument("--busy", type=int, default=1, help="spinning processes during the busy run")
    parser.add_argument("--threads", type=int, default=None,
                        help="pass `lmmsqueeze --threads N` to both runs")
    parser.add_argument("--timeout", type=float, default=3 * 3600, help="seconds allowed per run")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()

    cores = physical_cores(usable_cpus())
    already = cores_in_use(1.0)
    if already > 0.3:
        print(f"warning: {already:.1f} cores are already busy: the 'idle' run is not idle", file=sys.stderr)
    print(f"{cores} physical cores; `lmmsqueeze sweep --limit {args.limit}`"
          + (f" with --threads {args.threads}" if args.threads else "") + ": idle run ...", flush=True)
    idle = sweep(args.limit, args.threads, args.timeout)
    print(f"  idle: {idle['wall_s']:.1f} s", flush=True)

    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(args.busy)]
    try:
        time.sleep(1.0)
        print(f"busy run ({args.busy} spinning process{'es' if args.busy != 1 else ''}) ...", flush=True)
        busy = sweep(args.limit, args.threads, args.timeout)
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    ratio = busy["wall_s"] / idle["wall_s"]
    print(f"  busy: {busy['wall_s']:.1f} s")
    print("| run | wall s | rows | threads | others' CPU (max) | rows flagged busy |")
    print("|---|---|---|---|---|---|")
    for name, r in (("idle", idle), (f"{args.busy} busy process(es)", busy)):
        print(f"| {name} | {r['wall_s']:.1f} | {r['rows']} | {r['threads']} | {r['others_cpu_max']} | "
              f"{r['rows_busy']} |")
    print(f"busy / idle = {ratio:.2f}x ({'within' if ratio <= 2.0 else 'NOT within'} 2x)")
    if args.out:
        machine = f"{platform.processor() or platform.machine()}, {cores} physical cores"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine, "limit": args.limit, "busy_processes": args.busy,
                                        "threads_option": args.threads, "idle": idle, "busy": busy,
                                        "ratio": round(ratio, 3)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
