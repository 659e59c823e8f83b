"""Shared fixtures: tiny random LLaVA models (sdpa and eager) and their inputs."""

from __future__ import annotations

import pytest
import torch

from lmmsqueeze.testing import tiny_llava

@pytest.fixture(scope="session", params=["sdpa", "eager"])
def tiny(request):
    """(model, processor) for each attention backend."""
    model, processor = tiny_llava(attn=request.param)
    return model, processor


@pytest.fixture(scope="session")
def tiny_sdpa():
    return tiny_llava(attn="sdpa")


@pytest.fixture
def no_grad():
    with torch.no_grad():
        yield
