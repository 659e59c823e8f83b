"""Pareto trade-off tables: the non-dominated set over (cost, accuracy), and its renderings."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import os
import textwrap
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..compose.flops import si_unit
from ..errors import LmmsqueezeError
from ..proxyv.attach import same_adapter

X_FIELDS = {"flops": "prefill_flops", "latency": "latency_ms"}
COLUMNS = ("pareto", "pipeline", "adapter", "accuracy", "accuracy_delta", "saving", "prefill_flops",
           "latency_ms", "peak_memory_mb", "loyalty", "image_tokens_avg")
#: the columns of the terminal table (narrower; the adapter goes next to the pipeline)
TERMINAL = ("pareto", "pipeline", "accuracy", "accuracy_delta", "saving", "prefill_flops", "latency_ms",
            "loyalty")


def frontier(points: list[tuple[float, float]]) -> list[bool]:
    """For each (cost, accuracy) point, whether no other point is at least as cheap and at least as
    accurate while strictly better in one of the two."""
    flags = []
    for i, (c, a) in enumerate(points):
        dominated = any(
            (c2 <= c and a2 >= a) and (c2 < c or a2 > a) for j, (c2, a2) in enumerate(points) if j != i
        )
        flags.append(not dominated)
    return flags


def pareto_rows(rows: Iterable[dict[str, Any]], x: str = "flops") -> list[dict[str, Any]]:
    """Successful rows of one (model, task, limit, seed) group, sorted by cost, with the frontier
    marked and accuracy/saving relative to the vanilla row."""
    if x not in X_FIELDS:
        raise LmmsqueezeError(f"--x {x!r} must be one of {', '.join(X_FIELDS)}")
    field = X_FIELDS[x]
    ok = [r for r in rows if r.get("status", "ok") == "ok" and r.get(field) is not None]
    if not ok:
        return []
    vanilla = next((r for r in ok if r["pipeline"] == "none" and not r.get("adapter")), None)
    flags = frontier([(float(r[field]), float(r["accuracy"])) for r in ok])
    out = []
    for r, flag in zip(ok, flags, strict=True):
        row = {k: r.get(k) for k in COLUMNS}
        row.update(pareto=flag, task=r.get("task"), model=r.get("model"), reference="vanilla",
                   control=is_control(r["pipeline"]), busy=bool(r.get("busy")))
        baseline = vanilla
        if r.get("adapter_control"):  # task-trained: measured against its trained control, when it ran
            baseline = next((c for c in ok
                             if c.get("adapter") and same_adapter(c["adapter"], r["adapter_control"])), None)
            row["reference"] = "vanilla-ft" if baseline is not None else None
        if baseline is not None:
            row["accuracy_delta"] = r["accuracy"] - baseline["accuracy"]
        if vanilla is not None and x == "latency" and vanilla.get("latency_ms"):
            row["saving"] = 1.0 - r["latency_ms"] / vanilla["latency_ms"]
        out.append(row)
    return sorted(out, key=lambda r: (r[field], -r["accuracy"]))


def is_control(pipeline: str) -> bool:
    """A ProxyV control row: the vanilla model fine-tuned with the adapter's parameters ("vanilla-ft")."""
    return "variant=control" in pipeline


def label(row: dict[str, Any]) -> str:
    """A row's pipeline as tables show it: a control is named vanilla-ft."""
    return f"vanilla-ft: {row['pipeline']}" if row.get("control") else row["pipeline"]


def grouped(rows: Iterable[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    """Rows grouped by (model, task, limit, seed): frontiers are only comparable within a group."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["task"], r["limit"], r["seed"]), []).append(r)
    return groups


def format_cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "pareto":
        return "*" if value else ""
    if key in ("accuracy", "loyalty"):
        return f"{100 * value:.1f}"
    if key in ("accuracy_delta",):
        return f"{100 * value:+.1f}"
    if key == "saving":
        return f"{100 * value:.1f}%"
    if key == "prefill_flops":
        unit, scale = si_unit(value)
        return f"{value / scale:.3g} {unit}".rstrip()
    if key in ("latency_ms", "peak_memory_mb", "image_tokens_avg"):
        return f"{value:.3g}"
    return str(value)


HEADERS = {"pareto": "frontier", "pipeline": "pipeline", "adapter": "adapter", "accuracy": "acc %",
           "accuracy_delta": "Δ acc", "saving": "saving", "prefill_flops": "prefill FLOPs",
           "latency_ms": "latency ms", "peak_memory_mb": "peak MB", "loyalty": "loyalty %",
           "image_tokens_avg": "img tok/layer"}


def delta_cell(row: dict[str, Any]) -> str:
    """Δ acc as printed: against vanilla, or against the trained control (``vs ft``) for task training."""
    cell = format_cell("accuracy_delta", row.get("accuracy_delta"))
    return f"{cell} vs ft" if row.get("reference") == "vanilla-ft" else cell


#: the footnote of a table with a latency measured on a busy machine (marked ``!``)
BUSY_NOTE = ("! latency measured while other processes kept the CPU busy (the row's metrics: others_cpu, "
             "loadavg_before, loadavg_after); measure it again on an idle machine")


def table_cell(row: dict[str, Any], key: str) -> str:
    """A cell as tables print it: Δ acc with its reference, a latency measured on a busy machine
    marked ``!`` (see :data:`BUSY_NOTE`), else :func:`format_cell`."""
    if key == "accuracy_delta":
        return delta_cell(row)
    cell = format_cell(key, row.get(key))
    return f"{cell} !" if key == "latency_ms" and row.get("busy") and row.get(key) is not None else cell


def to_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(HEADERS[c] for c in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        pipeline = label(r).replace("|", "\\|")  # a pipe inside a Markdown table cell must be escaped
        cells = [f"`{pipeline}`" if c == "pipeline" else table_cell(r, c) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    if any(r.get("busy") for r in rows):
        lines += ["", BUSY_NOTE]
    return "\n".join(lines)


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["task", "model", *COLUMNS], extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow(r)
    return buf.getvalue()


def to_json(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, indent=2)


#: plot file types matplotlib writes with its default backends
PLOT_TYPES = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".eps", ".ps", ".tif", ".tiff", ".webp")
KEY_WIDTH = 58  # characters of a pipeline per line in the plot's key
KEY_LINE = 10  # points between the key's lines


def check_plot_path(path: str | Path) -> Path:
    """Refuse, before anything runs, a plot path that cannot be written (type, folder, matplotlib)."""
    p = Path(path)
    if p.is_dir():
        raise LmmsqueezeError(f"cannot write plot {str(p)!r}: it is a folder; give a file name")
    if p.suffix.lower() not in PLOT_TYPES:
        kind = f"file type {p.suffix!r}" if p.suffix else "a name without a file type"
        raise LmmsqueezeError(f"cannot write plot {str(p)!r}: {kind} is not supported; end it in "
                              f"{', '.join(PLOT_TYPES)}")
    if not p.parent.is_dir():
        raise LmmsqueezeError(f"cannot write plot {str(p)!r}: the folder {str(p.parent)!r} does not exist")
    if not os.access(p.parent, os.W_OK) or p.exists() and not os.access(p, os.W_OK):
        raise LmmsqueezeError(f"cannot write plot {str(p)!r}: not writable; give another --plot path")
    if importlib.util.find_spec("matplotlib") is None:
        raise LmmsqueezeError("plotting needs matplotlib: pip install 'lmmsqueeze[plot]'")
    return p


def plot_paths(path: str | Path, count: int) -> list[Path]:
    """One plot per group: ``path`` itself for one group, ``name-1.png``, ``name-2.png``, ... for more."""
    p = Path(path)
    return [p] if count == 1 else [p.with_name(f"{p.stem}-{i}{p.suffix}") for i in range(1, count + 1)]


def plot_title(model: str, task: str, limit: int, seed: int) -> str:
    """A group's plot title: model and task once each (``bundled model and task``), the model by its
    folder name."""
    name = model if model == "bundled" else (Path(model).name or str(model))
    what = f"{task} model and task" if name == task else f"{task} on {name}"
    return f"{what} ({limit} samples, seed {seed})"


def _key_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The plot's key: one numbered entry per point (wrapped pipeline, adapter on its own line)."""
    lines = ["  #  frontier  acc %  saving  pipeline"]
    for i, r in enumerate(rows, 1):
        text = label(r) + (f" [{r['adapter']}]" if r.get("adapter") else "")
        wrapped = textwrap.wrap(text, KEY_WIDTH, break_on_hyphens=False) or [""]
        saving = format_cell("saving", r.get("saving"))
        lines.append(f"{i:>3}  {'*' if r['pareto'] else ' ':^8}  {100 * r['accuracy']:5.1f}  {saving:>6}  "
                     f"{wrapped[0]}")
        lines += [" " * 32 + more for more in wrapped[1:]]
    return lines


#: label offsets (points) tried in order: near the point first, then further out with a leader line
_OFFSETS = [(r * math.cos(a), r * math.sin(a)) for r in (7, 15, 25, 36)
            for a in (math.pi / 4, -math.pi / 4, 3 * math.pi / 4, -3 * math.pi / 4, 0, math.pi / 2, math.pi,
                      -math.pi / 2)]


def _place_numbers(fig: Any, ax: Any, xs: list[float], ys: list[float], avoid: list[Any]) -> None:
    """Number every point (points that coincide on screen share one label, ``3,4``) at the first
    offset whose label overlaps no other label, marker, legend or the axes' edge."""
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    screen = ax.transData.transform(list(zip(xs, ys, strict=True)))
    clusters: list[list[int]] = []
    for i, (px, py) in enumerate(screen):
        for c in clusters:
            cx, cy = screen[c[0]]
            if abs(cx - px) < 6 and abs(cy - py) < 6:
                c.append(i)
                break
        else:
            clusters.append([i])
    placed = list(avoid) + [Bbox.from_extents(px - 5, py - 5, px + 5, py + 5) for px, py in screen]
    frame = ax.get_window_extent(renderer)
    for c in clusters:
        text = ",".join(str(i + 1) for i in c)
        for n, (dx, dy) in enumerate(_OFFSETS):
            far = n >= 8
            note = ax.annotate(
                text, (xs[c[0]], ys[c[0]]), xytext=(dx, dy), textcoords="offset points", fontsize=8,
                ha="left" if dx > 1 else "right" if dx < -1 else "center",
                va="bottom" if dy > 1 else "top" if dy < -1 else "center", zorder=5,
                arrowprops={"arrowstyle": "-", "color": "0.5", "lw": 0.6} if far else None)
            box = note.get_window_extent(renderer)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            last = n == len(_OFFSETS) - 1
            if last or inside and not any(box.overlaps(b) for b in placed):
                placed.append(box)
                break
            note.remove()


def _pyplot() -> Any:
    try:  # matplotlib is optional (the `plot` extra)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LmmsqueezeError("plotting needs matplotlib: pip install 'lmmsqueeze[plot]'") from None
    return plt


def plot(rows: list[dict[str, Any]], path: str, x: str = "flops", title: str = "") -> None:
    """:func:`figure` written to ``path`` (its type from the suffix), the key included."""
    plt = _pyplot()
    fig = figure(rows, x, title)
    try:
        fig.savefig(path, bbox_inches="tight")
    except (OSError, ValueError) as exc:
        raise LmmsqueezeError(f"cannot write plot {path!r}: {' '.join(str(exc).split())}") from None
    finally:
        plt.close(fig)


def figure(rows: list[dict[str, Any]], x: str = "flops", title: str = "") -> Any:
    """Every point (numbered in cost order), the frontier as a line and the vanilla point, with a key
    beside the axes naming each number's pipeline; the matplotlib Figure (close it when done).

    Labels never overlap (each number takes the first free place around its point) and the key is
    part of the saved figure (``bbox_inches="tight"``), so long ProxyV pipelines are wrapped, not cut.
    """
    plt = _pyplot()
    field = X_FIELDS[x]
    top = max(float(r[field]) for r in rows) if rows else 1.0
    unit, scale = si_unit(top) if x == "flops" else ("", 1.0)
    key = _key_lines(rows)
    height = max(5.5, KEY_LINE * len(key) / 72 + 1.2)  # the key's lines fit beside the axes
    fig, ax = plt.subplots(figsize=(15, height), dpi=120)
    fig.subplots_adjust(left=0.06, right=0.53, bottom=0.6 / height, top=1 - 0.5 / height)
    xs = [r[field] / scale for r in rows]
    ys = [100 * r["accuracy"] for r in rows]
    ax.scatter(xs, ys, color="#8aa4c8", zorder=2, label="pipelines")
    front = [(a, b) for a, b, r in zip(xs, ys, rows, strict=True) if r["pareto"]]
    if front:
        fx, fy = zip(*sorted(front), strict=True)
        ax.plot(fx, fy, color="#d1495b", marker="o", zorder=3, label="Pareto frontier")
    vanilla = [(a, b) for a, b, r in zip(xs, ys, rows, strict=True)
               if r["pipeline"] == "none" and not r.get("adapter")]
    if vanilla:
        ax.scatter(*zip(*vanilla, strict=True), marker="*", s=220, color="#2e4057", zorder=4, label="vanilla")
    ax.margins(0.12)
    ax.set_xlabel(f"prefill {unit}FLOPs (analytic)" if x == "flops"
                  else "prefill latency (ms, median per sample)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or "accuracy vs prefill cost")
    ax.grid(alpha=0.3)
    legend = ax.legend(loc="best", fontsize=8)
    for i, line in enumerate(key):  # one text per line: even spacing whatever the glyphs
        ax.annotate(line, (1.03, 1.0), xycoords="axes fraction", xytext=(0, -KEY_LINE * (i + 1)),
                    textcoords="offset points", va="baseline", ha="left", family="monospace", fontsize=7.5,
                    weight="bold" if i == 0 else "normal")
    fig.canvas.draw()
    _place_numbers(fig, ax, xs, ys, [legend.get_window_extent(fig.canvas.get_renderer())])
    return fig
