"""Expert design before anything runs: is a shape valid for this model, and what would it cost per token.

A design is E experts per FFN, S of them shared (always on), A routed experts active per token (one value
for every layer, or one per layer). The sizes follow CMoE's carving (``methods.cmoe.expert_sizes``: I // E
neurons per expert, the remainder to the shared expert); the counts use the same formula as
``evaluate.param_report`` so that the estimate matches what a conversion then measures.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

# router rows per routed expert: CMoE scores with the gate and up rows of a representative neuron
ROUTER_ROWS = {"cmoe": 2, "linear": 1, "native": 1}


def router_kind(routing=None) -> str:
    """The router a conversion with ``routing`` (a RoutingConfig; None: its defaults) builds, as :func:`estimate`
    counts it: "native" (linear router, plus the shared expert's sigmoid gate), "linear" or "cmoe"."""
    from .config import RoutingConfig

    routing = routing or RoutingConfig()
    if routing.form == "native":
        return "native"
    return "linear" if routing.router == "trained" else "cmoe"


@dataclass(frozen=True)
class DesignEstimate:
    """Parameters and FLOPs per token of the dense model and of the design (whole model, every layer)."""

    n_experts: int
    n_shared: int
    active: tuple[int, ...]  # routed experts per token, per layer
    shared_size: int  # neurons in the shared expert
    expert_size: float  # mean neurons per routed expert
    dense_params: int
    moe_params: int  # after conversion (routers added)
    dense_active_params: int
    moe_active_params: int
    active_ffn_share: float  # active FFN weights / dense FFN weights (routers counted)
    dense_flops_per_token: int
    moe_flops_per_token: int
    seq_len: int

    def as_dict(self) -> dict:
        return asdict(self)


def check_design(n_neurons: int, n_layers: int, n_experts: int, n_shared: int, active) -> tuple[int, ...]:
    """Validate a design for a model with n_neurons FFN neurons per layer; returns A per layer.

    Raises ValueError saying what is wrong and what to choose instead.
    """
    if n_experts < 2:
        raise ValueError(f"Need at least 2 experts, got {n_experts}: with one expert nothing is routed.")
    if n_experts > n_neurons:
        raise ValueError(
            f"{n_experts} experts is more than the {n_neurons} FFN neurons of a layer: use at most {n_neurons}."
        )
    if not 0 <= n_shared < n_experts:
        raise ValueError(
            f"Shared experts must be 0..E-1 = 0..{n_experts - 1}, got {n_shared}: with every expert shared "
            "nothing is routed (that is the dense model). Lower the shared ratio."
        )
    per_layer = (
        tuple(int(a) for a in active) if isinstance(active, list | tuple) else (int(active),) * n_layers
    )
    if len(per_layer) != n_layers:
        raise ValueError(f"Give one active count per layer ({n_layers} layers), got {len(per_layer)}.")
    n_routed = n_experts - n_shared
    bad = [(i, a) for i, a in enumerate(per_layer) if not 1 <= a <= n_routed]
    if bad:
        i, a = bad[0]
        raise ValueError(
            f"Layer {i}: {a} active experts, but there are {n_routed} routed experts (E - S = {n_experts} - "
            f"{n_shared}): choose 1..{n_routed}."
        )
    return per_layer


def parse_per_layer(text: str, n_layers: int) -> tuple[int, ...]:
    """'2,2,3' or '2 2 3' -> (2, 2, 3); one value repeats for every layer. ValueError when malformed."""
    parts = [p for p in str(text).replace(",", " ").split() if p]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(
            f"Per-layer active experts must be whole numbers separated by commas, got '{text}'."
        ) from None
    if not values:
        raise ValueError("Per-layer active experts is empty: give one number, or one per layer.")
    return values * n_layers if len(values) == 1 else values


def estimate(
    dense, n_experts: int, n_shared: int, active, router: str | None = None, seq_len: int = 512
) -> DesignEstimate:
    """What the design would cost per token on ``dense`` (a DenseModel), without converting anything.
    router: a :data:`ROUTER_ROWS` key; None: the one the default routing builds (:func:`router_kind`)."""
    from .evaluate import param_report
    from .methods.cmoe import expert_sizes

    width, h = dense.adapter.weights(dense.mlp(0))[0].shape  # W_gate (I, H)
    per_layer = check_design(width, dense.n_layers, n_experts, n_shared, active)
    shared, routed = expert_sizes(width, n_shared, n_experts)
    mean_size = sum(routed) / len(routed)
    router = router or router_kind()
    router_params = ROUTER_ROWS[router] * len(routed) * h
    router_params += h if router == "native" and shared else 0  # Qwen2-MoE's shared-expert gate (H -> 1)
    dense_ffn = 3 * h * width  # per layer
    block_total = 3 * h * (shared + sum(routed)) + router_params
    block_active = [3 * h * (shared + mean_size * a) + router_params for a in per_layer]
    report = param_report(dense, seq_len)
    scales = len(routed)  # CMoE's gate scale u per routed expert: a model parameter outside the block counts
    saved_active = sum(dense_ffn - b - scales for b in block_active)
    return DesignEstimate(
        n_experts=n_experts,
        n_shared=n_shared,
        active=per_layer,
        shared_size=shared,
        expert_size=mean_size,
        dense_params=report["total_params"],
        moe_params=report["total_params"] + dense.n_layers * (block_total + scales - dense_ffn),
        dense_active_params=report["active_params"],
        moe_active_params=round(report["active_params"] - saved_active),
        active_ffn_share=sum(block_active) / (dense.n_layers * dense_ffn),
        dense_flops_per_token=report["flops_per_token"],
        moe_flops_per_token=round(report["flops_per_token"] - 2 * saved_active),
        seq_len=seq_len,
    )


def shared_count(n_experts: int, shared_ratio: float) -> int:
    """Shared experts for a shared ratio in [0, 1): round(ratio * E). ValueError outside that range."""
    if not 0 <= shared_ratio < 1:
        raise ValueError(
            f"Shared ratio must be in [0, 1) (0: no shared expert; 1 would share everything), got {shared_ratio}."
        )
    return round(shared_ratio * n_experts)


def shared_statistic(profile, layer: int, cmoe=None) -> tuple[torch.Tensor, str]:
    """The per-neuron statistic (I,) that a CMoE carving (``cmoe``, a CMoEConfig; None: its defaults) ranks a
    layer's neurons by to fill the shared expert, read from ``profile``, and its name."""
    from .config import CMoEConfig

    cmoe = cmoe or CMoEConfig()
    if cmoe.shared_by == "magnitude":
        stat, name = profile.contribution, "mean |h| x ||W_down column||"
    elif cmoe.variant == "code":
        stat, name = profile.cosine_rates, "cosine activation rate"
    else:
        stat, name = profile.rates, "activation rate"
    if stat is None:
        raise ValueError(
            f"This profile lacks the {name} that carving ranks by (an older profile, or cosine rates without "
            "profile_model(cosine=True)): profile again to draw the shared expert."
        )
    return stat[layer], name


def shared_cutoff(profile, layer: int, n_experts: int, shared_ratio: float, cmoe=None) -> dict | None:
    """Which of a layer's neurons a design's shared expert holds: the ``shared_size`` neurons that rank highest
    by the statistic the carving uses (:func:`shared_statistic`; ``cmoe`` a CMoEConfig, None: its defaults).
    {"shared": bool mask (I,), "by": the statistic's name, "shared_size", "n_shared"}; None when S = 0."""
    from .methods.cmoe import expert_sizes

    stat, by = shared_statistic(profile, layer, cmoe)
    n_shared = shared_count(n_experts, shared_ratio)
    check_design(stat.numel(), 1, n_experts, n_shared, 1)
    size, _ = expert_sizes(stat.numel(), n_shared, n_experts)
    if size == 0:
        return None
    shared = torch.zeros(stat.numel(), dtype=torch.bool)
    shared[torch.sort(stat, descending=True, stable=True).indices[:size]] = True  # carving's order
    return {"shared": shared, "by": by, "shared_size": size, "n_shared": n_shared}
