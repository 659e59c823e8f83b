"""Pictures of what a pipeline keeps: the image with the surviving patches of every stage highlighted.

:func:`render_stages` is a pure function (image + grid + per-stage traces/groups -> a PIL image);
:func:`show_pipeline` runs a model once to get those traces and draws them (what ``lmmsqueeze show``
calls). Only PIL is used.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from .errors import LmmsqueezeError
from .models import family_for
from .runtime import build_prompt, prepare
from .runtime.loading import model_inputs

DROPPED_SHADE = 0.25  # brightness left to a dropped patch
GROUP_TINT = 0.55  # opacity of a merge group's colour
TITLE_HEIGHT = 34
MARGIN = 8


@dataclass(frozen=True)
class StageView:
    """What one stage did to one image's tokens.

    Attributes:
        title: the panel's caption (e.g. ``"pool(size=2) [projector]"``).
        kept: original indices of the tokens that survive the stage (merge representatives).
        groups: for every original token, the output token it belongs to (-1: dropped).
    """

    title: str
    kept: Sequence[int]
    groups: Sequence[int]


def group_colour(group: int) -> tuple[int, int, int]:
    """A distinct, saturated colour for a merge group (golden-ratio hues)."""
    r, g, b = colorsys.hsv_to_rgb((group * 0.618033988749895) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def model_view(image: Image.Image) -> Image.Image:
    """The centred square of ``image`` that a CLIP-style processor (resize the short side, centre
    crop) turns into patches."""
    image = image.convert("RGB")
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side))


def _cell(index: int, grid: tuple[int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    h, w = grid
    width, height = size
    r, c = divmod(index, w)
    return (c * width // w, r * height // h, (c + 1) * width // w, (r + 1) * height // h)


def _panel_size(grid: tuple[int, int], side: int) -> tuple[int, int]:
    """A panel whose longer side is ``side`` and whose cells are square."""
    h, w = grid
    return max(1, side * w // max(h, w)), max(1, side * h // max(h, w))


def _members(groups: Sequence[int]) -> dict[int, int]:
    """Original tokens in every output token."""
    members: dict[int, int] = {}
    for g in groups:
        if g >= 0:
            members[g] = members.get(g, 0) + 1
    return members


def _panel(image: Image.Image, grid: tuple[int, int], view: StageView | None, size: tuple[int, int],
           members: dict[int, int]) -> Image.Image:
    """One crop's panel; ``members`` counts every output token's tokens over all crops."""
    base = image.resize(size, Image.BILINEAR)
    if view is None:
        return base
    dark = Image.blend(base, Image.new("RGB", base.size), 1.0 - DROPPED_SHADE)
    out = base.copy()
    for i, g in enumerate(view.groups):
        box = _cell(i, grid, size)
        if g < 0:
            out.paste(dark.crop(box), box[:2])
        elif members[g] > 1:
            tint = Image.new("RGB", (box[2] - box[0], box[3] - box[1]), group_colour(g))
            out.paste(Image.blend(base.crop(box), tint, GROUP_TINT), box[:2])
    draw = ImageDraw.Draw(out)
    for i in view.kept:
        x0, y0, x1, y1 = _cell(int(i), grid, size)
        g = view.groups[int(i)]
        colour = group_colour(g) if g >= 0 and members.get(g, 0) > 1 else (255, 255, 255)
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=colour, width=max(1, max(size) // (8 * max(grid))))
    return out


def _crop_view(view: StageView, offset: int, count: int) -> StageView:
    """The part of a stage view that falls on one crop's tokens (indices ``offset..offset+count-1``)."""
    kept = [int(i) - offset for i in view.kept if offset <= int(i) < offset + count]
    return StageView(view.title, kept, list(view.groups[offset:offset + count]))


def render_stages(image: Image.Image | Sequence[Image.Image],
                  grid: tuple[int, int] | Sequence[tuple[int, int]],
                  stages: Sequence[StageView], panel_size: int = 256) -> Image.Image:
    """One panel for the input and one per stage, side by side; one row of panels per crop.

    In a stage's panel, dropped patches are darkened, patches merged into a token of more than one
    patch are tinted with that token's colour (the same colour in every crop), and the patch that
    carries each surviving token (its representative) is outlined (white for unmerged tokens).

    Args:
        image: the image as the model sees it (see :func:`model_view`), or one image per crop.
        grid: ``(rows, cols)`` of the image's tokens (token ``i`` covers row ``i // cols``, column
            ``i % cols``), or one grid per crop, the crops' tokens numbered one crop after another.
        stages: per stage, the surviving original indices and the group of every original token.
        panel_size: longer side of each panel in pixels.
    """
    grids = [tuple(grid)] if isinstance(grid[0], int) else [tuple(g) for g in grid]
    images = [image] * len(grids) if isinstance(image, Image.Image) else list(image)
    if len(images) != len(grids):
        raise LmmsqueezeError(f"{len(images)} images for {len(grids)} crop grids; give one image per grid")
    total = sum(h * w for h, w in grids)
    for view in stages:
        if len(view.groups) != total:
            raise LmmsqueezeError(f"stage {view.title!r} has {len(view.groups)} groups but the grid holds "
                                  f"{total} tokens")
    font = ImageFont.load_default()
    panels = [("input", total, None)] + [(s.title, len(s.kept), s) for s in stages]
    sizes = [_panel_size(g, panel_size) for g in grids]
    column = max(w for w, _ in sizes)
    width = len(panels) * (column + MARGIN) + MARGIN
    height = TITLE_HEIGHT + MARGIN + sum(h + MARGIN for _, h in sizes)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, (title, count, view) in enumerate(panels):
        x = MARGIN + k * (column + MARGIN)
        y, offset = MARGIN + TITLE_HEIGHT, 0
        for picture, g, size in zip(images, grids, sizes, strict=True):
            n = g[0] * g[1]
            part = None if view is None else _crop_view(view, offset, n)
            members = {} if view is None else _members(view.groups)
            canvas.paste(_panel(picture.convert("RGB"), g, part, size, members), (x, y))
            y += size[1] + MARGIN
            offset += n
        caption = title if len(title) * 6 <= column else title[: column // 6 - 1] + "…"
        draw.text((x, MARGIN), caption, fill=(0, 0, 0), font=font)
        draw.text((x, MARGIN + 14), f"{count} tokens", fill=(90, 90, 90), font=font)
    return canvas


def trace_pipeline(model: Any, processor: Any, image: Image.Image, question: str, pipeline: Any,
                   adapter: Any = None) -> tuple[list[StageView], Any]:
    """Run one prefill of ``model`` with ``pipeline`` installed; return what each stage kept and the
    processor outputs."""
    inputs = model_inputs(processor, model, [image], [build_prompt(processor, question)])
    with torch.no_grad(), prepare(model, pipeline, adapter).apply() as run:
        model(**inputs)
    views = [StageView(stage.label(), run.trace[i][0].tolist(), run.groups[i][0].tolist())
             for i, stage in enumerate(run.plan.stages)]
    return views, inputs


def show_pipeline(model: Any, processor: Any, image: Image.Image, question: str, pipeline: Any,
                  panel_size: int = 256, adapter: Any = None) -> tuple[Image.Image, list[StageView]]:
    """The picture of ``pipeline`` on ``image`` (one panel per stage, one row per crop grid) and the
    stage views drawn in it.

    LLaVA-1.5 sees the centre square of the image; LLaVA-NeXT's base crop and sub-crop grid and
    Qwen2-VL's merged grid each cover the whole image.
    """
    family = family_for(model)
    views, inputs = trace_pipeline(model, processor, image, question, pipeline, adapter)
    grids = family.image_geometries(inputs)[0].grids
    if not grids:
        raise LmmsqueezeError("show needs the image tokens to form a grid; this model's features do not "
                              "(e.g. vision_feature_select_strategy='full' keeps [CLS])")
    picture = model_view(image) if family.geometry.family == "llava" else image.convert("RGB")
    return render_stages(picture, grids, views, panel_size), views


def save_picture(picture: Image.Image, out: str | Path) -> Path:
    out = Path(out)
    if not out.parent.is_dir():
        raise LmmsqueezeError(f"cannot write {str(out)!r}: the folder {str(out.parent)!r} does not exist")
    try:
        picture.save(out)
    except (ValueError, OSError) as exc:
        raise LmmsqueezeError(f"cannot write {str(out)!r}: {exc}") from None
    return out


__all__ = ["StageView", "group_colour", "model_view", "render_stages", "save_picture", "show_pipeline",
           "trace_pipeline"]
