"""Shared fixtures: tiny random models of every supported family, and the real default model."""

from __future__ import annotations

import pytest
import torch

from moe_core.model_io import TINY_CONFIGS, tiny_model

FAMILIES = list(TINY_CONFIGS)


@pytest.fixture(params=FAMILIES)
def tiny(request):
    """A tiny random model of each supported family (seeded)."""
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def smollm2():
    """The real default model (SmolLM2-135M-Instruct, de-quantised and cached once)."""
    from moe_core.model_io import load_model

    return load_model("builtin:smollm2-135m")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
