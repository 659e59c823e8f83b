"""Shared fixtures: tiny random LLaVA models (sdpa and eager) and their inputs."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from lmmsqueeze.proxyv.attach import allow_untrained
from lmmsqueeze.testing import tiny_llava


@pytest.fixture(autouse=True)
def _untrained_proxyv():
    """Tests run ProxyV stages on random models without adapters (fresh modules, seed 0); users must
    pass an adapter or say untrained=true. tests/test_bad_inputs.py turns this off to test the refusal."""
    with allow_untrained():
        yield


#: device parameter for model tests: the same tests run on CUDA when one is present
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                               reason="no CUDA device"))]

@pytest.fixture(scope="session", params=DEVICES)
def device(request):
    """Each model test that takes it runs on the CPU, and again on CUDA when a GPU is present."""
    return torch.device(request.param)


@pytest.fixture(scope="session", params=["sdpa", "eager"])
def tiny(request):
    """(model, processor) for each attention backend."""
    model, processor = tiny_llava(attn=request.param)
    return model, processor


@pytest.fixture(scope="session", params=["sdpa", "eager"])
def tiny_dev(request, device):
    """(model, processor) for each attention backend, on each device (CPU; CUDA when present)."""
    model, processor = tiny_llava(attn=request.param)
    return model.to(device), processor


@pytest.fixture(scope="session")
def tiny_sdpa():
    return tiny_llava(attn="sdpa")


@pytest.fixture
def no_grad():
    with torch.no_grad():
        yield


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow (CI does)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        return
    skip = pytest.mark.skip(reason="slow: runs in CI (CI=true) or with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def saved_tiny(tmp_path_factory):
    """A tiny LLaVA saved as a local model directory, and an image file: what the CLI reads."""
    from lmmsqueeze.testing import random_image

    path = tmp_path_factory.mktemp("tiny-llava")
    model, processor = tiny_llava()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    image = path / "image.png"
    random_image(3).save(image)
    return path, image


@pytest.fixture(scope="session")
def tiny_dir(saved_tiny):
    return saved_tiny[0]


@dataclass
class Miniature:
    """LLaVA-1.5 in miniature for the fidelity tests: 336 px images at patch 14 (576 patch tokens), a
    24-layer CLIP tower read at layer -2 and a 32-layer decoder, so every method's defaults apply
    unchanged. ``model`` (sdpa) runs lmmsqueeze; ``eager`` (the same weights, eager attention) feeds
    the transcriptions of the released code. Float64, and query/key weights scaled up so attention is
    peaked: rankings have no near-ties that numerical noise could flip."""

    model: Any
    eager: Any
    processor: Any
    inputs: Any


@pytest.fixture(scope="session")
def miniature():
    from lmmsqueeze.testing import miniature_inputs, tiny_llava

    model, processor = tiny_llava(image_size=336, patch_size=14, layers=32, vision_layers=24, hidden=64,
                                  heads=4, kv_heads=4, ffn=128, vision_hidden=32)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                weight.mul_(6.0)
    model = model.double()
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    return Miniature(model, eager, processor, miniature_inputs(processor))


@pytest.fixture
def no_model(monkeypatch):
    """A model loader (and runner) that fails the test if anything tries to load or run a model."""
    from lmmsqueeze.evaluation import sweep
    from lmmsqueeze.runtime import loading

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded or run although the input was refused")

    monkeypatch.setattr(loading, "load_model", refuse)
    monkeypatch.setattr(sweep, "evaluate", refuse)
