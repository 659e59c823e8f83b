"""Commands that need no model weights: `reducers` (the registry) and `explain` (a pipeline's plan)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import LmmsqueezeError
from .common import JsonOpt, console, emit, err_console, si, user_errors

app = typer.Typer()


@app.command("reducers")
def reducers_cmd(
    family: Annotated[str | None, typer.Option(help="Only this family: pruning, merging or pooling.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List the registered reducers (built-in and plugins) with their parameters."""
    from ..reducers import list_reducers, load_plugins, reducer_info

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
            table.add_row(r["name"], r["family"], ", ".join(r["placements"]), escape(params),
                          escape(r["code"] or "-"), escape(r["fidelity"] or "-"))
        console.print(table)
        console.print("Papers and signals: lmmsqueeze reducers --json", highlight=False)
        for name, why in broken.items():
            err_console.print(f"[yellow]warning:[/] plugin {escape(repr(name))} failed to load: "
                              f"{escape(str(why))}", highlight=False, soft_wrap=True)

    emit(rows, as_json, render)


def _fmt(value: Any) -> str:
    from ..compose import format_value

    return "-" if value is None else format_value(value)


def _geometry(model: str | None, model_config: str | None, vision_tokens: int | None = None) -> Any:
    from ..compose.geometry import with_tokens
    from ..models import geometry_from_path, preset

    if model and model_config:
        raise LmmsqueezeError("give either --model or --model-config, not both")
    if model_config:
        geometry = preset(model_config)
    elif model:  # a model directory, its config.json, or `bundled`
        from ..runtime.loading import model_dir

        geometry = geometry_from_path(model_dir(model) if model == "bundled" else model)
    else:
        geometry = preset("llava-1.5-7b")
    return geometry if vision_tokens is None else with_tokens(geometry, vision_tokens)



@app.command("explain")
def explain_cmd(
    pipeline: Annotated[str, typer.Argument(
        help='Pipeline text, e.g. "fastv(layer=2, keep=0.5)", or @file.yaml.')],
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="Model directory, its config.json, or `bundled`.")] = None,
    model_config: Annotated[str | None, typer.Option(
        help="A built-in geometry: llava-1.5-7b, llava-1.5-13b, llava-next-7b, qwen2-vl-7b, qwen2.5-vl-7b, "
             "vicuna-7b, vicuna-13b, llama3-8b, qwen2-7b, phi3-mini.")] = None,
    vision_tokens: Annotated[int | None, typer.Option(
        help="Image tokens per image (default: the model's).")] = None,
    text_tokens: Annotated[int, typer.Option(help="Non-image prompt tokens, for the cost.")] = 64,
    convention: Annotated[str, typer.Option(help="FLOPs convention: exact or fastv.")] = "exact",
    as_json: JsonOpt = False,
) -> None:
    """Validate a pipeline and print its plan: stages, placements, image tokens and FLOPs of every layer."""
    from ..compose import compile_pipeline
    from ..compose.flops import CONVENTIONS

    with user_errors():
        if text_tokens < 0:
            raise LmmsqueezeError(f"--text-tokens {text_tokens} must be >= 0")
        if convention not in CONVENTIONS:
            raise LmmsqueezeError(f"--convention {convention!r} is not one of {', '.join(CONVENTIONS)}")
        plan = compile_pipeline(pipeline, _geometry(model, model_config, vision_tokens))
        data = plan.to_dict(text_tokens=text_tokens, convention=convention)

    def render(d: dict) -> None:
        console.print(f"[bold]{escape(d['pipeline'])}[/] on {escape(str(d['model']))} "
                      f"({d['image_tokens']} image tokens per image, {d['text_tokens']} text tokens)",
                      highlight=False)
        table = Table()
        for col in ("#", "stage", "family", "placement", "positions", "tokens in", "tokens out", "grid kept"):
            table.add_column(col)
        for s in d["stages"]:
            where = f"llm @ layer {s['layer']}" if s["placement"] == "llm" else s["placement"]
            part = f" ({s['part'][0]}/{s['part'][1]})" if s.get("part") else ""
            out = f"~{s['tokens_out']}" if s.get("adaptive") else str(s["tokens_out"])
            table.add_row(str(s["position"]), escape(s["stage"] + part), s["family"], where,
                          s["positions"] or "-", str(s["tokens_in"]), out, "yes" if s["keeps_grid"] else "no")
        if d["stages"]:
            console.print(table)
        if any(s.get("adaptive") for s in d["stages"]):
            console.print("~: the stage's count depends on the image; the plan assumes a typical one, and "
                          "eval costs what each image kept", highlight=False)
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
        parts = ", ".join(f"{k} {si(v)}" for k, v in d["parts_flops"].items())
        console.print(f"prefill FLOPs ({d['convention']}): {si(d['prefill_flops'])} vs vanilla "
                      f"{si(d['vanilla_prefill_flops'])}: saving {100 * d['saving']:.1f}%", highlight=False)
        console.print(f"by part: {parts}", highlight=False)

    emit(data, as_json, render)
