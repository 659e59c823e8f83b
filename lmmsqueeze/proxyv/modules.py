"""ProxyV's trainable modules: the light per-layer VisionMLP, the non-spatial proxy initializer, and
the adapter that holds them (saved as ``adapter.safetensors`` + ``adapter_config.json``)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
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
    def load(cls, directory: str | Path) -> ProxyVAdapter:
        d = Path(directory)
        if not (d / CONFIG_NAME).is_file() or not (d / WEIGHTS_NAME).is_file():
            raise ModelError(
                f"{str(d)!r} is not a ProxyV adapter (expected {CONFIG_NAME} and {WEIGHTS_NAME})"
            )
        try:
            config = ProxyVConfig(**json.loads((d / CONFIG_NAME).read_text()))
        except (TypeError, ValueError) as exc:
            raise ModelError(f"cannot read {str(d / CONFIG_NAME)!r}: {exc}") from None
        adapter = cls(config)
        adapter.load_state_dict(load_file(str(d / WEIGHTS_NAME)))
        return adapter


def read_config(directory: str | Path) -> dict[str, Any]:
    """The adapter config as a dict (for the recorded pipeline) without loading weights."""
    d = Path(directory)
    if not (d / CONFIG_NAME).is_file():
        raise ModelError(f"{str(d)!r} is not a ProxyV adapter (no {CONFIG_NAME})")
    return json.loads((d / CONFIG_NAME).read_text())
