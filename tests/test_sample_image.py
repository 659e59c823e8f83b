"""The shipped sample image: what the bundled benchmark draws, and what the README's `run` answers."""

from __future__ import annotations

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from lmmsqueeze.bundled import SAMPLE_IMAGE
from lmmsqueeze.cli import app
from lmmsqueeze.evaluation.tasks.bundled import samples

runner = CliRunner()


def test_the_sample_is_the_benchmarks_validation_image_4():
    shipped = Image.open(SAMPLE_IMAGE)
    assert shipped.size == (96, 96) and SAMPLE_IMAGE.stat().st_size < 4096
    item = samples("val", 5)[4]
    assert np.array_equal(np.asarray(shipped.convert("RGB")), np.asarray(item.image))
    assert (item.question, item.answer) == ("what color is the cell with the box", "yellow")


def test_run_answers_the_readme_question_on_the_sample():
    result = runner.invoke(app, ["run", "--model", "bundled", "--image", str(SAMPLE_IMAGE), "--prompt",
                                 "what color is the cell with the box", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "yellow"
