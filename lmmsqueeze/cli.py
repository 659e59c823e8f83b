"""The ``lmmsqueeze`` command line (Typer + rich). Commands parse arguments, call the library and
render plain dicts; no tensor code lives here.

Known errors print one line (``error: ...``) and exit with code 2; set ``LMMSQUEEZE_DEBUG=1`` to
see the traceback instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import LmmsqueezeError

app = typer.Typer(
    name="lmmsqueeze",
    help="Composable visual-token reducers and ProxyV for LLaVA-style models: run, explain, measure.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="A local Hugging Face model directory, or `bundled`.")]
PipelineOpt = Annotated[
    str, typer.Option("--pipeline", "-p", help='Pipeline, e.g. "pool | fastv(layer=2, keep=0.5)", or @file.yaml.')
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="cpu, cuda, ... (default: cuda when present).")]
AdapterOpt = Annotated[Optional[str], typer.Option(
    help="ProxyV adapter: a directory or bundled:<name>; used by pipelines with a proxyv stage (alone: its own).")]


def _version(value: bool) -> None:
    if value:
        from . import __version__

        console.print(f"lmmsqueeze {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Composable visual-token reducers and ProxyV for LLaVA-style models: run, explain, measure."""


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


@app.command("reducers")
def reducers_cmd(
    family: Annotated[Optional[str], typer.Option(help="Only this family: pruning, merging or pooling.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List the registered reducers (built-in and plugins) with their parameters."""
    from .reducers import list_reducers, load_plugins, reducer_info

    with user_errors():
        rows = [reducer_info(n) for n in list_reducers(family=family)]
        broken = load_plugins()

    def render(rows: list[dict]) -> None:
        table = Table(title=f"{len(rows)} reducers", show_lines=False)
        for col in ("name", "family", "placements", "parameters", "released code", "fidelity"):
            table.add_column(col, overflow="fold")
        for r in rows:
            params = ", ".join(f"{k}={_fmt(v['default'])}" for k, v in r["params"].items())
            if "llm" in r["placements"]:
                params += f" (llm positions: {r['llm_positions']})"
            table.add_row(r["name"], r["family"], ", ".join(r["placements"]), escape(params), escape(r["code"] or "-"),
                          escape(r["fidelity"] or "-"))
        console.print(table)
        console.print("Papers and signals: lmmsqueeze reducers --json", highlight=False)
        for name, why in broken.items():
            err_console.print(f"[yellow]warning:[/] plugin {escape(repr(name))} failed to load: {escape(str(why))}")

    emit(rows, as_json, render)


def _fmt(value: Any) -> str:
    from .compose import format_value

    return "-" if value is None else format_value(value)


def _geometry(model: Optional[str], model_config: Optional[str], vision_tokens: Optional[int] = None) -> Any:
    from .models import geometry_from_path, preset
    from .compose.geometry import with_tokens

    if model and model_config:
        raise LmmsqueezeError("give either --model or --model-config, not both")
    if model_config:
        geometry = preset(model_config)
    elif model:  # a model directory, its config.json, or `bundled`
        from .runtime.loading import model_dir

        geometry = geometry_from_path(model_dir(model) if model == "bundled" else model)
    else:
        geometry = preset("llava-1.5-7b")
    return geometry if vision_tokens is None else with_tokens(geometry, vision_tokens)


def _si(x: float) -> str:
    from .compose.flops import si_unit

    unit, scale = si_unit(x)
    return f"{x / scale:.2f} {unit}" if unit else f"{x:.0f}"


@app.command("explain")
def explain_cmd(
    pipeline: Annotated[str, typer.Argument(help='Pipeline text, e.g. "fastv(layer=2, keep=0.5)", or @file.yaml.')],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model directory, its config.json, or `bundled`.")] = None,
    model_config: Annotated[Optional[str], typer.Option(help="A built-in geometry: llava-1.5-7b, llava-1.5-13b, llava-next-7b, qwen2-vl-7b, qwen2.5-vl-7b, vicuna-7b, vicuna-13b, llama3-8b, qwen2-7b, phi3-mini.")] = None,
    vision_tokens: Annotated[Optional[int], typer.Option(help="Image tokens per image (default: the model's).")] = None,
    text_tokens: Annotated[int, typer.Option(help="Non-image prompt tokens, for the cost.")] = 64,
    convention: Annotated[str, typer.Option(help="FLOPs convention: exact or fastv.")] = "exact",
    as_json: JsonOpt = False,
) -> None:
    """Validate a pipeline and print its plan: stages, placements, image tokens and FLOPs of every layer."""
    from .compose import compile_pipeline
    from .compose.flops import CONVENTIONS

    with user_errors():
        if text_tokens < 0:
            raise LmmsqueezeError(f"--text-tokens {text_tokens} must be >= 0")
        if convention not in CONVENTIONS:
            raise LmmsqueezeError(f"--convention {convention!r} is not one of {', '.join(CONVENTIONS)}")
        plan = compile_pipeline(pipeline, _geometry(model, model_config, vision_tokens))
        data = plan.to_dict(text_tokens=text_tokens, convention=convention)

    def render(d: dict) -> None:
        console.print(f"[bold]{escape(d['pipeline'])}[/] on {escape(str(d['model']))} ({d['image_tokens']} image tokens per image, "
                      f"{d['text_tokens']} text tokens)", highlight=False)
        table = Table()
        for col in ("#", "stage", "family", "placement", "positions", "tokens in", "tokens out", "grid kept"):
            table.add_column(col)
        for s in d["stages"]:
            where = f"llm @ layer {s['layer']}" if s["placement"] == "llm" else s["placement"]
            part = f" ({s['part'][0]}/{s['part'][1]})" if s.get("part") else ""
            out = f"~{s['tokens_out']}" if s.get("adaptive") else str(s["tokens_out"])
            table.add_row(str(s["position"]), escape(s["stage"] + part), s["family"], where, s["positions"] or "-",
                          str(s["tokens_in"]), out, "yes" if s["keeps_grid"] else "no")
        if d["stages"]:
            console.print(table)
        if any(s.get("adaptive") for s in d["stages"]):
            console.print("~: the stage's count depends on the image; the plan assumes a typical one, and eval "
                          "costs what each image kept", highlight=False)
        for note in d.get("notes", []):
            console.print(f"note: {note}", highlight=False)
        spans, start = [], 0
        layers = d["layers"]
        for i in range(1, len(layers) + 1):
            if i == len(layers) or layers[i]["image_tokens"] != layers[start]["image_tokens"]:
                span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
                spans.append(f"layers {span}: {layers[start]['image_tokens']}")
                start = i
        console.print("image tokens entering each decoder layer: " + "; ".join(spans), highlight=False)
        console.print(f"layer-averaged image tokens: {d['image_tokens_avg']:.1f}", highlight=False)
        parts = ", ".join(f"{k} {_si(v)}" for k, v in d["parts_flops"].items())
        console.print(f"prefill FLOPs ({d['convention']}): {_si(d['prefill_flops'])} vs vanilla "
                      f"{_si(d['vanilla_prefill_flops'])}: saving {100 * d['saving']:.1f}%", highlight=False)
        console.print(f"by part: {parts}", highlight=False)

    emit(data, as_json, render)


@app.command("run")
def run_cmd(
    model: ModelOpt,
    image: Annotated[Path, typer.Option("--image", "-i", help="Image file.")],
    prompt: Annotated[str, typer.Option(help="The question about the image.")],
    pipeline: PipelineOpt = "none",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate (greedy).")] = 32,
    device: DeviceOpt = None,
    adapter: AdapterOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Answer one question about one image (greedy decoding) with a pipeline installed."""
    from .runtime.generation import answer

    with user_errors():
        if not image.is_file():
            raise LmmsqueezeError(f"image file {str(image)!r} does not exist")
        result = answer(model, image, prompt, pipeline, max_new_tokens=max_new_tokens, device=device,
                        weights=adapter)
    emit(result, as_json, lambda r: console.print(r["answer"], highlight=False))


@app.command("bench")
def bench_cmd(
    model: ModelOpt,
    pipeline: Annotated[list[str], typer.Option("--pipeline", "-p", help="A pipeline to measure (repeat the option).")],
    image: Annotated[Optional[Path], typer.Option("--image", "-i", help="Image file (default: a fixed noise image).")] = None,
    prompt: Annotated[str, typer.Option(help="The question in the prompt.")] = "Describe the image in detail.",
    runs: Annotated[int, typer.Option(min=1, help="Timed runs per pipeline (interleaved).")] = 5,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed warm-up rounds.")] = 1,
    device: DeviceOpt = None,
    adapter: AdapterOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Prefill latency and peak memory of the vanilla model and each pipeline, measured vs analytic saving."""
    from .runtime.generation import open_image
    from .runtime.loading import load_model
    from .runtime.measure import bench
    from .testing import random_image

    with user_errors():
        if image is not None and not image.is_file():
            raise LmmsqueezeError(f"image file {str(image)!r} does not exist")
        loaded, processor = load_model(model, device=device)
        picture = open_image(image) if image is not None else random_image(0, 336)
        rows = bench(loaded, processor, pipeline, picture, prompt, runs=runs, warmup=warmup, weights=adapter)

    def render(rows: list[dict]) -> None:
        table = Table(title=f"prefill on {model} ({runs} interleaved runs after {warmup} warm-up)")
        for col in ("pipeline", "latency ms", "decoder ms", "peak MB", "saving measured", "saving analytic",
                    "realized"):
            table.add_column(col, overflow="fold")
        for r in rows:
            realized = "-" if r["realized_fraction"] is None else f"{r['realized_fraction']:.2f}"
            table.add_row(r["pipeline"], f"{r['latency_ms']:.1f} ± {r['latency_iqr_ms'] / 2:.1f}",
                          f"{r['decoder_ms']:.1f}", f"{r['peak_memory_mb']:.1f}", f"{100 * r['measured_saving']:.1f}%",
                          f"{100 * r['analytic_saving']:.1f}%", realized)
        console.print(table)

    emit(rows, as_json, render)


# --- show (reducer library) ---
@app.command("show")
def show_cmd(
    model: ModelOpt,
    image: Annotated[Path, typer.Option("--image", "-i", help="Image file.")],
    prompt: Annotated[str, typer.Option(help="The question about the image (text-conditioned stages read it).")],
    pipeline: PipelineOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the picture (.png).")],
    panel_size: Annotated[int, typer.Option(min=64, max=2048, help="Side of each panel in pixels.")] = 256,
    device: DeviceOpt = None,
    adapter: AdapterOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Draw the image with the patches that survive each stage highlighted, one panel per stage
    (dropped patches darkened, merged patches coloured by group, each token's patch outlined)."""
    from .runtime import load_model
    from .runtime.generation import open_image
    from .visualize import save_picture, show_pipeline

    with user_errors():
        if not image.is_file():
            raise LmmsqueezeError(f"image file {str(image)!r} does not exist")
        if not out.parent.is_dir():
            raise LmmsqueezeError(f"cannot write {str(out)!r}: the folder {str(out.parent)!r} does not exist")
        picture = open_image(image)
        loaded, processor = load_model(model, device=device)
        drawing, views = show_pipeline(loaded, processor, picture, prompt, pipeline, panel_size, adapter)
        save_picture(drawing, out)
    data = {"out": str(out), "stages": [{"stage": v.title, "tokens": len(v.kept)} for v in views]}

    def render(d: dict) -> None:
        for s in d["stages"]:
            console.print(f"{s['stage']}: {s['tokens']} tokens", highlight=False)
        console.print(f"wrote {d['out']}", highlight=False)

    emit(data, as_json, render)
# --- show (reducer library) ---


from . import cli_convert, cli_eval, cli_proxyv  # noqa: E402,F401  (register the other commands on `app`)


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()
