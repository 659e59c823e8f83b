"""ProxyV's trainable modules: the light per-layer VisionMLP, the non-spatial proxy initializer, and
the adapter that holds them (saved as ``adapter.safetensors`` + ``adapter_config.json``)."""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import ModelError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale (as Llama's)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class VisionMLP(nn.Module):
    """Updates image tokens from their own state and their proxy's guidance:
    ``norm(x + W_out silu(W_fuse [W_in x ; W_ctx g]))``."""

    def __init__(self, hidden: int, width: int, eps: float):
        super().__init__()
        self.input_proj = nn.Linear(hidden, width, bias=False)
        self.context_proj = nn.Linear(hidden, width, bias=False)
        self.fuse = nn.Linear(2 * width, width, bias=False)
        self.out_proj = nn.Linear(width, hidden, bias=False)
        self.norm = RMSNorm(hidden, eps)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """``x``: ``[..., N, d]`` image tokens; ``context``: ``[..., N, h]`` projected guidance."""
        return self.norm(self.branch(x, context) + x)

    def branch(self, x: Tensor, context: Tensor) -> Tensor:
        """``W_out silu(W_fuse [W_in x ; context])``: the update before the residual and the norm."""
        return self.out_proj(F.silu(self.fuse(torch.cat([self.input_proj(x), context], dim=-1))))


class ProxyInitializer(nn.Module):
    """Non-spatial proxies: learned queries attend over a group's image tokens (softmax over tokens);
    a second softmax of the same logits over the proxies gives each token its splat weights."""

    def __init__(self, hidden: int, width: int, proxies: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(proxies, width) / math.sqrt(4 * width))
        self.key = nn.Linear(hidden, width, bias=False)
        self.width = width

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x``: ``[..., M, d]`` -> proxies ``[..., n, d]`` and splat ``[..., M, n]``."""
        # [..., n, M]
        logits = self.queries.to(x.dtype) @ self.key(x).transpose(-1, -2) / math.sqrt(self.width)
        proxies = logits.float().softmax(dim=-1).to(x.dtype) @ x
        splat = logits.transpose(-1, -2).float().softmax(dim=-1).to(x.dtype)
        return proxies, splat


@dataclass(frozen=True)
class ProxyVConfig:
    """What an adapter was built for; attaching it elsewhere is refused with the mismatch named."""

    layer: int
    variant: str
    factor: int
    proxies: int
    hidden_size: int
    width: int
    num_layers: int
    rms_norm_eps: float
    base_model: str = ""
    pipeline: str = ""
    objective: str = ""  # what training optimised: "distill" (imitate the vanilla model) or "task" (answers)
    control: str = ""  # for a task-trained adapter: its trained control's directory, relative to this one
    training: dict | None = None  # the settings it was trained with

    def mismatch(self, other: ProxyVConfig) -> str | None:
        for name in ("hidden_size", "num_layers", "layer", "variant", "factor", "proxies", "width"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if name in ("factor",) and self.variant == "nonspatial":
                continue
            if name in ("proxies",) and self.variant == "spatial":
                continue
            if mine != theirs:
                return f"{name}: the adapter has {mine}, the pipeline/model needs {theirs}"
        return None


class ProxyVAdapter(nn.Module):
    """All ProxyV parameters of one model: a VisionMLP per ProxyV layer (+ the initializer)."""

    def __init__(self, config: ProxyVConfig):
        super().__init__()
        self.config = config
        layers = range(config.layer, config.num_layers)
        self.mlps = nn.ModuleList(VisionMLP(config.hidden_size, config.width, config.rms_norm_eps)
                                  for _ in layers)
        if config.variant == "control":  # a residual branch that starts as nothing: the vanilla model
            for mlp in self.mlps:
                nn.init.zeros_(mlp.out_proj.weight)
        self.initializer = (
            ProxyInitializer(config.hidden_size, config.width, config.proxies)
            if config.variant == "nonspatial" else None
        )

    def mlp(self, layer: int) -> VisionMLP:
        return self.mlps[layer - self.config.layer]

    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                  str(d / WEIGHTS_NAME))
        (d / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        return d

    @classmethod
    def load(cls, directory: str | Path, expect: ProxyVConfig | None = None) -> ProxyVAdapter:
        """The adapter saved in ``directory``; with ``expect``, one that does not fit it is refused
        before any weight is built."""
        d = Path(directory)
        if not (d / CONFIG_NAME).is_file() or not (d / WEIGHTS_NAME).is_file():
            raise ModelError(
                f"{str(d)!r} is not a ProxyV adapter (expected {CONFIG_NAME} and {WEIGHTS_NAME})"
            )
        config = config_from(read_config(d), d / CONFIG_NAME)
        problem = config.mismatch(expect) if expect is not None else None
        if problem:
            raise ModelError(f"the ProxyV adapter {str(d)!r} does not fit this pipeline or model: {problem}")
        adapter = cls(config)
        try:
            weights = load_file(str(d / WEIGHTS_NAME))
        except Exception as exc:  # safetensors raises its own error type for damaged files
            raise ModelError(f"cannot read {str(d / WEIGHTS_NAME)!r} (damaged or not a safetensors file: "
                             f"{_first_line(exc)}); train the adapter again or restore the file") from None
        try:
            adapter.load_state_dict(weights)
        except RuntimeError as exc:
            raise ModelError(f"{str(d / WEIGHTS_NAME)!r} does not match {CONFIG_NAME} "
                             f"({_first_line(exc, 1)}); the two files come from different adapters") from None
        return adapter


def check_adapter_dir(directory: str | Path) -> ProxyVConfig:
    """An adapter directory's config, after checking both files without loading a weight: the config's
    fields, and the names and shapes in the safetensors header against what the config builds."""
    d = Path(directory)
    if not (d / CONFIG_NAME).is_file() or not (d / WEIGHTS_NAME).is_file():
        raise ModelError(f"{str(d)!r} is not a ProxyV adapter (expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    config = config_from(read_config(d), d / CONFIG_NAME)
    try:
        with safe_open(str(d / WEIGHTS_NAME), framework="pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error type for damaged files
        raise ModelError(f"cannot read {str(d / WEIGHTS_NAME)!r} (damaged or not a safetensors file: "
                         f"{_first_line(exc)}); train the adapter again or restore the file") from None
    with torch.device("meta"):  # shapes only: nothing allocated
        wanted = {k: tuple(v.shape) for k, v in ProxyVAdapter(config).state_dict().items()}
    if stored != wanted:
        bad = sorted(set(stored) ^ set(wanted)) or sorted(k for k in wanted if stored[k] != wanted[k])
        raise ModelError(f"{str(d / WEIGHTS_NAME)!r} does not match {CONFIG_NAME} (e.g. {bad[0]!r}: "
                         f"{stored.get(bad[0], 'nothing')} stored, {wanted.get(bad[0], 'nothing')} "
                         "expected); the two files come from different adapters")
    return config


def _first_line(exc: BaseException, line: int = 0) -> str:
    """One line of an exception's text (``line``: which, when several), at most 200 characters."""
    lines = [t.strip() for t in str(exc).splitlines() if t.strip()] or [type(exc).__name__]
    text = lines[min(line, len(lines) - 1)]
    return text if len(text) <= 200 else text[:200] + "..."


#: the fields of an adapter config and their types (the rest are optional strings and a dict)
_INT_FIELDS = ("layer", "factor", "proxies", "hidden_size", "width", "num_layers")
VARIANTS = ("spatial", "nonspatial", "control")


def config_from(data: Any, path: str | Path) -> ProxyVConfig:
    """An adapter config from its JSON data, every field checked (a one-line error names the bad one)."""
    where = f"{str(path)!r}"
    if not isinstance(data, dict):
        raise ModelError(f"{where} must hold a JSON object of adapter settings, not {type(data).__name__}")
    known = {f.name for f in fields(ProxyVConfig)}
    unknown = sorted(set(data) - known)
    missing = sorted(f.name for f in fields(ProxyVConfig) if f.default is MISSING and f.name not in data)
    if unknown or missing:
        parts = (unknown and f"unknown fields {unknown}", missing and f"missing {missing}")
        what = "; ".join(p for p in parts if p)
        raise ModelError(f"{where} is not a ProxyV adapter config ({what}); write it with ProxyVAdapter.save")
    for name in _INT_FIELDS:
        value = data[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "layer" else 1):
            raise ModelError(f"{where}: {name}={value!r} must be an integer >= {0 if name == 'layer' else 1}")
    if data["variant"] not in VARIANTS:
        raise ModelError(f"{where}: variant={data['variant']!r} must be one of {', '.join(VARIANTS)}")
    eps = data["rms_norm_eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise ModelError(f"{where}: rms_norm_eps={eps!r} must be a small positive number such as 1e-6")
    for name in ("base_model", "pipeline", "objective", "control"):
        if not isinstance(data.get(name, ""), str):
            raise ModelError(f"{where}: {name}={data[name]!r} must be a string")
    if data.get("training") is not None and not isinstance(data["training"], dict):
        raise ModelError(f"{where}: training must be an object of settings")
    if data["layer"] > data["num_layers"]:
        raise ModelError(f"{where}: layer={data['layer']} is beyond num_layers={data['num_layers']}")
    return ProxyVConfig(**data)


def read_config(directory: str | Path) -> dict[str, Any]:
    """The adapter config as a dict (for the recorded pipeline) without loading weights."""
    d = Path(directory)
    if not (d / CONFIG_NAME).is_file():
        raise ModelError(f"{str(d)!r} is not a ProxyV adapter (no {CONFIG_NAME}); give a directory written "
                         "by train-proxyv or convert-proxyv, or bundled:<name>")
    try:
        data = json.loads((d / CONFIG_NAME).read_bytes().decode("utf-8"))
    except (ValueError, OSError) as exc:  # invalid JSON, not UTF-8, unreadable
        raise ModelError(f"cannot read {str(d / CONFIG_NAME)!r}: {_first_line(exc)}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{str(d / CONFIG_NAME)!r} must hold a JSON object of adapter settings, not "
                         f"{type(data).__name__}")
    if not isinstance(data.get("pipeline", ""), str):
        raise ModelError(f"{str(d / CONFIG_NAME)!r}: pipeline must be a string")
    return data
