"""Dense -> MoE conversion methods: a plain registry, one module and one ``convert`` function per method.

Every method has the signature ``convert(dense, input_ids (N, T), cfg, progress=None, cancel=None)`` and
returns a new DenseModel (the caller's model is never modified) whose converted layers are MoEMLP blocks
and whose ``conversion`` attribute is a report (per-layer sizes, seconds). :func:`convert` seeds the global
RNG from the config's ``seed`` first, so the same config gives the same model in any process or session.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..config import ConvertRun
from . import cmoe, dive, ladimo

METHODS: dict[str, Callable] = {"cmoe": cmoe.convert, "ladimo": ladimo.convert, "dive": dive.convert}


def convert(
    dense,
    input_ids: torch.Tensor,
    cfg=None,
    *,
    method: str = "cmoe",
    progress: Callable[[float, str], None] | None = None,
    cancel: Callable[[], bool] | None = None,
):
    """Run one registered method. cfg: its config section (e.g. CMoEConfig), a ConvertRun, or None (defaults)."""
    if isinstance(cfg, ConvertRun):
        method, cfg = cfg.method, cfg.section()
    if method not in METHODS:
        raise ValueError(f"Unknown conversion method '{method}'. Methods: {', '.join(METHODS)}.")
    default = getattr(ConvertRun(method=method), method)
    if cfg is None:
        cfg = default
    elif not isinstance(cfg, type(default)):
        raise ValueError(f"Method '{method}' needs a {type(default).__name__}, got {type(cfg).__name__}.")
    # Same config and seed, same model: whatever a method draws from the global RNG (router init, LoRA, noise)
    # comes from the config's seed, and the caller's RNG streams are left where they were.
    with torch.random.fork_rng(devices=[dense.device] if dense.device.type == "cuda" else []):
        torch.manual_seed(getattr(cfg, "seed", 0))
        return METHODS[method](dense, input_ids, cfg, progress=progress, cancel=cancel)
