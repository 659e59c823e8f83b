"""Commands that load a model and run it on an image: `run`, `bench` and `show`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import LmmsqueezeError
from .common import AdapterOpt, DeviceOpt, JsonOpt, ModelOpt, PipelineOpt, console, emit, user_errors

app = typer.Typer()


def _check_image(image: Path | None) -> None:
    """An --image that is not a file is refused before any model loads."""
    if image is None:
        return
    if image.is_dir():
        raise LmmsqueezeError(f"image {str(image)!r} is a directory; give an image file (PNG, JPEG, ...)")
    if not image.is_file():
        raise LmmsqueezeError(f"image file {str(image)!r} does not exist")


def _precheck(model: str, pipelines: list[str], adapter: str | None, device: str | None) -> None:
    """Refuse a bad device, adapter or pipeline before any model loads (the model's geometry is read
    from its config)."""
    from ..compose import compile_pipeline
    from ..models import geometry_from_path
    from ..proxyv.attach import pipeline_for
    from ..runtime.loading import model_dir, pick_device

    pick_device(device)
    geometry = geometry_from_path(model_dir(model))
    for pipeline in pipelines:
        compile_pipeline(pipeline_for(pipeline, adapter), geometry)


def _check_picture_path(out: Path) -> None:
    """`show --out`: a file in an existing folder, of a picture type PIL writes."""
    from PIL import Image

    if out.is_dir():
        raise LmmsqueezeError(f"--out {str(out)!r} is a directory; give a file such as "
                              f"{str(out / 'show.png')!r}")
    if not out.parent.is_dir():
        raise LmmsqueezeError(f"cannot write {str(out)!r}: the folder {str(out.parent)!r} does not exist")
    writable = sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE)
    if out.suffix.lower() not in writable:
        common = ", ".join(e for e in (".png", ".jpg", ".webp", ".bmp", ".tiff") if e in writable)
        raise LmmsqueezeError(f"--out {str(out)!r}: {out.suffix or 'no suffix'!s} is not a picture file type "
                              f"this can write; end it in {common}")


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
    from ..runtime.generation import answer

    with user_errors():
        _check_image(image)
        _precheck(model, [pipeline], adapter, device)
        result = answer(model, image, prompt, pipeline, max_new_tokens=max_new_tokens, device=device,
                        weights=adapter)
    emit(result, as_json, lambda r: console.print(r["answer"], highlight=False))


@app.command("bench")
def bench_cmd(
    model: ModelOpt,
    pipeline: Annotated[list[str], typer.Option(
        "--pipeline", "-p", help="A pipeline to measure (repeat the option).")],
    image: Annotated[Path | None, typer.Option(
        "--image", "-i", help="Image file (default: a fixed noise image).")] = None,
    prompt: Annotated[str, typer.Option(
        help="The question in the prompt.")] = "Describe the image in detail.",
    runs: Annotated[int, typer.Option(min=1, help="Timed runs per pipeline (interleaved).")] = 5,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed warm-up rounds.")] = 1,
    tokens: Annotated[str | None, typer.Option(
        help="Image-token counts to measure at, e.g. 144,576,1156,2916 (square grids; a LLaVA model's vision "
             "tower is resized for each, a noise image of its size is used).")] = None,
    batch: Annotated[int, typer.Option(min=1, help="Copies of the sample prefilled as one batch.")] = 1,
    device: DeviceOpt = None,
    adapter: AdapterOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Prefill latency, overhead and peak memory of the vanilla model and each pipeline, measured vs
    analytic saving (with --tokens: at each image-token count, the scaling table)."""
    from ..runtime.generation import open_image
    from ..runtime.loading import load_model
    from ..runtime.measure import bench
    from ..runtime.scaling import resized, scaling
    from ..testing import random_image

    with user_errors():
        sizes = _token_counts(tokens)
        if sizes and image is not None:
            raise LmmsqueezeError("--tokens measures on a noise image of each size; drop --image")
        _check_image(image)
        _precheck(model, [] if sizes else pipeline, adapter, device)  # with --tokens: compiled at each size
        if sizes:
            rows = [{"image_tokens": s["image_tokens"], **r, "busy": s["machine"]["busy"]}
                    for s in scaling(resized(model, device), sizes, pipeline, prompt, runs=runs,
                                     warmup=warmup, weights=adapter, batch=batch)
                    for r in s["rows"]]
        else:
            loaded, processor = load_model(model, device=device)
            picture = open_image(image) if image is not None else random_image(0, 336)
            rows = bench(loaded, processor, pipeline, picture, prompt, runs=runs, warmup=warmup,
                         weights=adapter, batch=batch)

    def render(rows: list[dict]) -> None:
        table = Table(title=f"prefill on {model} ({runs} interleaved runs after {warmup} warm-up)")
        cols = ["pipeline", "latency ms", "decoder ms", "overhead", "peak MB", "RSS MB", "saving measured",
                "saving analytic", "realized"]
        for col in (["image tokens"] if sizes else []) + cols:
            table.add_column(col, overflow="fold")
        for r in rows:
            realized = "-" if r["realized_fraction"] is None else f"{r['realized_fraction']:.2f}"
            overhead = "-" if r["overhead_fraction"] is None else f"{100 * r['overhead_fraction']:.1f}%"
            rss = "-" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.1f}"
            table.add_row(*([f"{r['image_tokens']}{' !' if r['busy'] else ''}"] if sizes else []),
                          escape(r["pipeline"]), f"{r['latency_ms']:.1f} ± {r['latency_iqr_ms'] / 2:.1f}",
                          f"{r['decoder_ms']:.1f}", overhead, f"{r['peak_memory_mb']:.1f}", rss,
                          f"{100 * r['measured_saving']:.1f}%",
                          f"{100 * r['analytic_saving']:.1f}%", realized)
        console.print(table)
        if sizes and any(r["busy"] for r in rows):
            console.print("! measured while other processes kept the CPU busy: rerun on an idle machine")

    emit(rows, as_json, render)


def _token_counts(text: str | None) -> list[int]:
    """``--tokens 144,576``: positive whole numbers (the loader checks they are square grids)."""
    if text is None:
        return []
    try:
        sizes = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise LmmsqueezeError(f"--tokens {text!r} is not a list of image-token counts; give e.g. "
                              "144,576,1156,2916")
    return sizes


# --- show (reducer library) ---
@app.command("show")
def show_cmd(
    model: ModelOpt,
    image: Annotated[Path, typer.Option("--image", "-i", help="Image file.")],
    prompt: Annotated[str, typer.Option(
        help="The question about the image (text-conditioned stages read it).")],
    pipeline: PipelineOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the picture (.png).")],
    panel_size: Annotated[int, typer.Option(min=64, max=2048, help="Side of each panel in pixels.")] = 256,
    device: DeviceOpt = None,
    adapter: AdapterOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Draw the image with the patches that survive each stage highlighted, one panel per stage
    (dropped patches darkened, merged patches coloured by group, each token's patch outlined)."""
    from ..runtime import load_model
    from ..runtime.generation import open_image
    from ..visualize import save_picture, show_pipeline

    with user_errors():
        _check_image(image)
        _check_picture_path(out)
        _precheck(model, [pipeline], adapter, device)
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
