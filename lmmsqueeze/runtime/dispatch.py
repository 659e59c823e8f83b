"""Models larger than one device: loading through accelerate's big-model inference (``device_map``,
``max_memory``, CPU/disk offload) and where a dispatched model takes its inputs.

accelerate moves every dispatched module's inputs to its execution device in a hook of its own around the
module's ``forward``; lmmsqueeze's hooks are PyTorch module hooks around the call, so both stay in place
and a stage works on the tensors of the layer it sits at. accelerate is the ``dist`` extra, imported by
transformers only when a ``device_map`` is given.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import LmmsqueezeError

#: the device maps accelerate computes by itself
AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
_SIZE = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)$", re.IGNORECASE)


def parse_max_memory(text: str) -> dict[Any, str]:
    """``"0=20GiB,1=20GiB,cpu=64GiB"`` as accelerate's ``max_memory`` (device index or ``cpu``/``disk`` ->
    size); a malformed entry is a one-line error naming it."""
    out: dict[Any, str] = {}
    for entry in (e.strip() for e in text.split(",")):
        device, _, size = entry.partition("=")
        device, size = device.strip(), size.strip()
        if not (device.isdigit() or device in ("cpu", "disk", "mps")) or not _SIZE.match(size):
            raise LmmsqueezeError(f"--max-memory entry {entry!r} is not DEVICE=SIZE; give e.g. "
                                  "--max-memory '0=20GiB,1=20GiB,cpu=64GiB'")
        out[int(device) if device.isdigit() else device] = size.replace(" ", "")
    return out


def load_options(device_map: str | dict | None = None, max_memory: dict[Any, str] | str | None = None,
                 offload_folder: str | Path | None = None) -> dict[str, Any]:
    """The ``from_pretrained`` arguments that dispatch a model (empty without ``device_map``); refuses in one
    line a map accelerate does not compute, options without a map, and a missing accelerate."""
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise LmmsqueezeError("--max-memory and --offload-folder go with --device-map; add "
                                  "--device-map auto")
        return {}
    if isinstance(device_map, str) and device_map not in AUTO_MAPS:
        raise LmmsqueezeError(f"--device-map {device_map!r} is not one of {', '.join(AUTO_MAPS)}; give "
                              "--device-map auto (or a module->device dict from Python)")
    if importlib.util.find_spec("accelerate") is None:
        raise LmmsqueezeError("--device-map needs accelerate; install it with pip install 'lmmsqueeze[dist]'")
    options: dict[str, Any] = {"device_map": device_map}
    if max_memory is not None:
        options["max_memory"] = parse_max_memory(max_memory) if isinstance(max_memory, str) else max_memory
    if offload_folder is not None:
        folder = Path(offload_folder)
        if folder.exists() and not folder.is_dir():
            raise LmmsqueezeError(f"--offload-folder {str(folder)!r} is a file; give a folder (it is created "
                                  "when missing)")
        options["offload_folder"] = str(folder)
    return options


def input_device(model: Any) -> torch.device:
    """Where a model takes its inputs: a dispatched model's first accelerator in its device map (CPU when
    it maps only to CPU and disk; an offloaded parameter sits on ``meta``), else its parameters' device."""
    mapped = getattr(model, "hf_device_map", None)
    if mapped:
        devices = [d for d in mapped.values() if d not in ("cpu", "disk")]
        if not devices:
            return torch.device("cpu")
        first = devices[0]
        return torch.device(f"cuda:{first}" if isinstance(first, int) else first)
    return next(model.parameters()).device
