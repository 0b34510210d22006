"""Dense -> MoE conversion methods: a plain registry, one module and one ``convert`` function per method.

Every method has the signature ``convert(dense, input_ids (N, T), cfg, progress=None, cancel=None)`` and
returns a new DenseModel (the caller's model is never modified) whose converted layers are MoEMLP blocks
and whose ``conversion`` attribute is a report (per-layer sizes, seconds). :func:`convert` seeds the global
RNG from the config's ``seed`` first, so the same config gives the same model in any process or session.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..config import ConvertRun, RoutingConfig
from ..plumbing import span
from ..reconstruct import reconstruct_model
from . import cmoe, dive, ladimo

METHODS: dict[str, Callable] = {"cmoe": cmoe.convert, "ladimo": ladimo.convert, "dive": dive.convert}


def convert(
    dense,
    input_ids: torch.Tensor,
    cfg=None,
    *,
    method: str = "cmoe",
    routing: RoutingConfig | None = None,
    progress: Callable[[float, str], None] | None = None,
    cancel: Callable[[], bool] | None = None,
):
    """Run one registered method. cfg: its config section (e.g. CMoEConfig), a ConvertRun (its routing
    section then applies too), or None (defaults). routing: the layer-wise routing step after the method
    (moe_core.reconstruct): CMoE runs it inside its layer loop, the other methods in a second pass."""
    if isinstance(cfg, ConvertRun):
        method, routing, cfg = cfg.method, routing or cfg.routing, cfg.section()
    if method not in METHODS:
        raise ValueError(f"Unknown conversion method '{method}'. Methods: {', '.join(METHODS)}.")
    default = getattr(ConvertRun(method=method), method)
    if cfg is None:
        cfg = default
    elif not isinstance(cfg, type(default)):
        raise ValueError(f"Method '{method}' needs a {type(default).__name__}, got {type(cfg).__name__}.")
    # Same config and seed, same model: whatever a method draws from the global RNG (router init, LoRA, noise)
    # comes from the config's seed, and the caller's RNG streams are left where they were.
    settings = routing.settings(getattr(cfg, "seed", 0)) if routing is not None and routing.enabled else None
    with torch.random.fork_rng(devices=[dense.device] if dense.device.type == "cuda" else []):
        torch.manual_seed(getattr(cfg, "seed", 0))
        if method == "cmoe":
            return cmoe.convert(dense, input_ids, cfg, progress=progress, cancel=cancel, routing=settings)
        end = 1.0 if settings is None else 0.9  # the routing pass takes the last tenth of the bar
        moe = METHODS[method](dense, input_ids, cfg, progress=span(progress, 0, end), cancel=cancel)
        if settings is not None:
            reports = reconstruct_model(
                moe, dense, input_ids, settings, progress=span(progress, 0.9, 1.0), cancel=cancel
            )
            moe.conversion.routing = reports
        return moe
