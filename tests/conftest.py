"""Shared fixtures: tiny random LLaVA models (sdpa and eager) and their inputs."""

from __future__ import annotations

import os

import pytest
import torch

from lmmsqueeze.testing import tiny_llava

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
