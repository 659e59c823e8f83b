"""Command `convert-proxyv`: an official ProxyV checkpoint into a model and an lmmsqueeze adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import LmmsqueezeError
from .common import console, err_console, user_errors

app = typer.Typer()


@app.command("convert-proxyv")
def convert_proxyv_cmd(
    src: Annotated[Path, typer.Argument(help="A checkpoint directory of the official ProxyV code (config"
                                             ".json + weights), e.g. craigwu/proxyv_vicuna_7b_layer12.")],
    out: Annotated[Path, typer.Argument(help="Output directory: OUT/model and OUT/adapter are written.")],
    vision_config: Annotated[Path | None, typer.Option(
        "--vision-config", help="CLIP config directory, when the tower SRC names is not local nor cached "
                                "(else it is read off the weights, as OpenAI CLIP).")] = None,
) -> None:
    """Convert an official ProxyV checkpoint into a transformers LLaVA-NeXT model (OUT/model) and an
    lmmsqueeze ProxyV adapter (OUT/adapter, which records its pipeline).

    The weights and the ProxyV layer are converted exactly, but answers can differ from the official
    code's: transformers' LLaVA-NeXT unpads the sub-crops and puts a newline after every row, while
    the official code concatenates whole crops with one newline per crop and no unpadding.
    """
    from ..proxyv.convert import convert_official
    from ..proxyv.modules import read_config

    notes: list[str] = []
    with user_errors():
        if out.exists() and not out.is_dir():
            raise LmmsqueezeError(f"OUT {str(out)!r} is a file; give a directory (it is created if missing)")
        model_dir, adapter_dir = convert_official(src, out, vision_config=vision_config, say=notes.append)
        pipeline = read_config(adapter_dir)["pipeline"]
    for note in notes:
        err_console.print(f"note: {note}", highlight=False, soft_wrap=True)
    console.print(f"wrote {model_dir} and {adapter_dir} (pipeline {pipeline})\n"
                  f"run it: lmmsqueeze run -m {model_dir} --adapter {adapter_dir} -i IMAGE --prompt TEXT",
                  highlight=False, soft_wrap=True)
