"""Shared fixtures: tiny random models of every supported family, the real default model, a served app."""

from __future__ import annotations

import contextlib
import os
import socket

import pytest
import torch

from moe_core.model_io import TINY_FAMILIES, tiny_model

FAMILIES = list(TINY_FAMILIES)


@pytest.fixture(params=FAMILIES)
def tiny(request):
    """A tiny random model of each supported family (seeded)."""
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def smollm2():
    """The real default model (SmolLM2-135M-Instruct, de-quantised and cached once)."""
    from moe_core.model_io import load_model

    return load_model("builtin:smollm2-135m")


@contextlib.contextmanager
def single_thread():
    """Torch on one thread inside, the count it had after. Tiny tensors: thread hand-offs cost more than the maths
    (100x on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    with single_thread():
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def browser_model() -> str:
    """The model the served app opens: builtin:tiny-llama, or MOE_STUDIO_BROWSER_MODEL (builtin:smollm2-135m
    with MOE_STUDIO_SCREENSHOTS=assets/screenshots refreshes the README's screenshots on the real model)."""
    return os.environ.get("MOE_STUDIO_BROWSER_MODEL") or "builtin:tiny-llama"


def start_app(auth=None):
    """(demo, url): the app on :func:`browser_model`, served on 127.0.0.1 at a free port, in this process."""
    import app

    demo = app.build_app(browser_model())
    port = free_port()
    app.launch(demo, "127.0.0.1", port, auth=auth, prevent_thread_lock=True, quiet=True)
    return demo, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def server_url():
    """The URL of the app served for one test module (tiny model unless MOE_STUDIO_BROWSER_MODEL says)."""
    demo, url = start_app()
    yield url
    demo.close()
