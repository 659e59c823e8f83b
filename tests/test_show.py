"""`lmmsqueeze show` and the pure drawing function behind it."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from lmmsqueeze.cli import app
from lmmsqueeze.visualize import MARGIN, TITLE_HEIGHT, StageView, group_colour, model_view, render_stages

runner = CliRunner()
GREY = (120, 120, 120)


def _pixel(picture, panel, cell, grid=(2, 2), size=64):
    """Colour at the centre of token ``cell`` in panel ``panel`` (0 = input)."""
    r, c = divmod(cell, grid[1])
    x = MARGIN + panel * (size + MARGIN) + int((c + 0.5) * size / grid[1])
    y = MARGIN + TITLE_HEIGHT + int((r + 0.5) * size / grid[0])
    return picture.getpixel((x, y))


def test_render_darkens_dropped_tints_merged_and_outlines_representatives():
    image = Image.new("RGB", (40, 40), GREY)
    stages = [
        StageView("prune", kept=[0, 3], groups=[0, -1, -1, 1]),  # tokens 1 and 2 dropped
        StageView("merge", kept=[2, 3], groups=[0, 0, 0, 1]),  # 0, 1, 2 merged into one token at 2
    ]
    picture = render_stages(image, (2, 2), stages, panel_size=64)
    assert picture.size == (3 * (64 + MARGIN) + MARGIN, 64 + TITLE_HEIGHT + 2 * MARGIN)
    assert _pixel(picture, 0, 1) == GREY  # the input panel is the image itself
    assert _pixel(picture, 1, 0) == GREY  # kept, unmerged: untouched
    dropped = _pixel(picture, 1, 1)
    assert all(v == round(g * 0.25) or abs(v - g * 0.25) <= 1 for v, g in zip(dropped, GREY, strict=True))
    tint = [round(g * 0.45 + t * 0.55) for g, t in zip(GREY, group_colour(0), strict=True)]
    for cell in (0, 1, 2):  # one colour for the whole group
        assert all(abs(a - b) <= 1 for a, b in zip(_pixel(picture, 2, cell), tint, strict=True))
    assert _pixel(picture, 2, 3) == GREY
    # the representative of the merged group is outlined in the group's colour, a kept single in white
    panel2 = MARGIN + 2 * (64 + MARGIN)
    # top edge of cell 2
    assert picture.getpixel((panel2 + 10, MARGIN + TITLE_HEIGHT + 32)) == group_colour(0)
    assert picture.getpixel((MARGIN + (64 + MARGIN) + 1, MARGIN + TITLE_HEIGHT + 10)) == (255, 255, 255)


def test_render_draws_one_row_per_crop_grid():
    """Two crops (a 1x2 and a 2x2 grid): tokens 0-1 are the first row, 2-5 the second; merge
    colours are shared across crops."""
    image = Image.new("RGB", (40, 40), GREY)
    # token 4 (crop 2) merged into token 0
    view = StageView("merge", kept=[0, 5], groups=[0, -1, -1, -1, 0, 1])
    picture = render_stages([image, image], [(1, 2), (2, 2)], [view], panel_size=64)
    # rows: a 64x32 panel for the 1x2 grid, then a 64x64 one
    assert picture.size == (2 * (64 + MARGIN) + MARGIN, TITLE_HEIGHT + MARGIN + (32 + MARGIN) + (64 + MARGIN))
    x0, top = MARGIN + 64 + MARGIN, MARGIN + TITLE_HEIGHT
    tint = [round(g * 0.45 + t * 0.55) for g, t in zip(GREY, group_colour(0), strict=True)]
    crop1_token0 = picture.getpixel((x0 + 16, top + 16))
    assert all(abs(a - b) <= 1 for a, b in zip(crop1_token0, tint, strict=True))
    assert picture.getpixel((x0 + 48, top + 16)) != GREY  # crop 1, token 1: dropped (darkened)
    second = top + 32 + MARGIN
    crop2_token2 = picture.getpixel((x0 + 16, second + 48))
    assert all(abs(a - b) <= 1 for a, b in zip(crop2_token2, tint, strict=True))
    assert picture.getpixel((x0 + 48, second + 48)) == GREY  # crop 2, token 3 (index 5): kept alone


def test_render_refuses_groups_that_do_not_fit_the_grid():
    with pytest.raises(Exception, match="has 3 groups but the grid holds 4 tokens"):
        render_stages(Image.new("RGB", (8, 8)), (2, 2), [StageView("x", [0], [0, -1, -1])])


def test_model_view_is_the_centre_square():
    image = Image.new("RGB", (30, 10))
    image.paste((255, 0, 0), (10, 0, 20, 10))
    view = model_view(image)
    assert view.size == (10, 10)
    assert view.getpixel((0, 0)) == (255, 0, 0) and view.getpixel((9, 9)) == (255, 0, 0)


def test_show_writes_one_panel_per_stage(saved_tiny, tmp_path):
    path, image = saved_tiny
    out = tmp_path / "show.png"
    pipeline = "visionzip(dominant=6, contextual=3) | fastv(layer=2, keep=4)"
    result = runner.invoke(app, ["show", "-m", str(path), "-i", str(image), "--prompt",
                                 "what is the colour ?", "-p", pipeline, "--out", str(out),
                                 "--panel-size", "96", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [s["tokens"] for s in data["stages"]] == [9, 4]
    picture = Image.open(out)
    assert picture.size == (3 * (96 + MARGIN) + MARGIN, 96 + TITLE_HEIGHT + 2 * MARGIN)


@pytest.mark.parametrize("args, message", [
    (["-i", "/no/such.png", "-p", "pool"], "image file '/no/such.png' does not exist"),
    (["-p", "pool", "--out", "/no/such/dir/x.png"], "the folder '/no/such/dir' does not exist"),
    (["-p", "fastv(layer=9)"], "layer=9 is beyond the model"),
])
def test_show_errors_are_one_line(saved_tiny, tmp_path, args, message):
    path, image = saved_tiny
    base = ["show", "-m", str(path), "-i", str(image), "--prompt", "q", "--out", str(tmp_path / "x.png")]
    result = runner.invoke(app, base + args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output
