"""Pareto trade-off tables: the non-dominated set over (cost, accuracy), and its renderings."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
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
                   control=is_control(r["pipeline"]))
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


def to_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(HEADERS[c] for c in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        pipeline = label(r).replace("|", "\\|")  # a pipe inside a Markdown table cell must be escaped
        cells = [f"`{pipeline}`" if c == "pipeline"
                 else delta_cell(r) if c == "accuracy_delta"
                 else format_cell(c, r.get(c))
                 for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
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


def plot(rows: list[dict[str, Any]], path: str, x: str = "flops", title: str = "") -> None:
    """Every point, the frontier as a line, labels and the vanilla point, as a PNG."""
    try:  # matplotlib is optional (the `plot` extra)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LmmsqueezeError("plotting needs matplotlib: pip install 'lmmsqueeze[plot]'") from None
    field = X_FIELDS[x]
    top = max(float(r[field]) for r in rows) if rows else 1.0
    unit, scale = si_unit(top) if x == "flops" else ("", 1.0)
    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    xs = [r[field] / scale for r in rows]
    ys = [100 * r["accuracy"] for r in rows]
    ax.scatter(xs, ys, color="#8aa4c8", zorder=2, label="pipelines")
    front = [(a, b) for a, b, r in zip(xs, ys, rows, strict=True) if r["pareto"]]
    if front:
        fx, fy = zip(*sorted(front), strict=True)
        ax.plot(fx, fy, color="#d1495b", marker="o", zorder=3, label="Pareto frontier")
    for a, b, r in zip(xs, ys, rows, strict=True):
        text = label(r) + (f" [{r['adapter']}]" if r.get("adapter") else "")
        ax.annotate(text if len(text) < 48 else text[:45] + "...", (a, b), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    vanilla = [(a, b) for a, b, r in zip(xs, ys, rows, strict=True)
               if r["pipeline"] == "none" and not r.get("adapter")]
    if vanilla:
        ax.scatter(*zip(*vanilla, strict=True), marker="*", s=220, color="#2e4057", zorder=4, label="vanilla")
    ax.set_xlabel(f"prefill {unit}FLOPs (analytic)" if x == "flops"
                  else "prefill latency (ms, median per sample)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or "accuracy vs prefill cost")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
