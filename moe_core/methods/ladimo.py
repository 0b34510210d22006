"""LaDiMo: distil each dense FFN into an MoE block, one layer at a time; the routing policy is picked per layer.

Paper: S. Kim, Y. Kim, K. Moon, M. Jang, "LaDiMo: Layer-wise Distillation Inspired MoEfier", arXiv 2408.04278
(2024). Stated there: experts start as a split of the dense FFN's weights; each MoE block (router + experts) is
trained on the inputs its FFN receives on a small text set (~100K tokens) to mimic that FFN (an MSE loss) plus
an auxiliary loss; blocks are independent; a training-free "adaptive router" then sets a routing policy per
layer from the routing-weight distribution and per-layer accuracy / throughput curves (``moe_core/sweep.py``).
No code was released; every choice below is ours, with the reason and, where it was measured, the number.

Stage 1, per layer l, teacher-forced (X are the *dense* model's FFN inputs, so layers are independent and only
one layer's activations are alive at a time)::

    X (T, H) = what FFN_l receives on the calibration text,   Y = FFN_l(X)
    block    = E slices of FFN_l + linear router W_r (E, H);   p = softmax(W_r x);   gates g_e = p_e
    loss     = mean ||block(X) - Y||^2 / mean(Y^2)  +  alpha * E * sum_e f_e P_e

Choices:

- Experts: E contiguous slices of the neurons (the paper "splits the weight matrices"); ``partition="cmoe"``
  uses CMoE's co-activation clusters instead (moe_core/methods/cmoe.py). ``n_shared`` slices may be kept as an
  always-on shared expert (the paper names none, so 0 by default).
- Gates ``prob`` (g_e = p_e, not renormalised over the chosen experts): dropping an expert removes exactly its
  own term, so one trained block serves every top-k and the dynamic rule (keep experts until the summed p
  reaches tau: the dropped gate mass is below 1 - tau). With ``renorm`` a top-1 gate is the constant 1 and
  the router gets no gradient. A linear router with prob gates is also Qwen2-MoE's (norm_topk_prob=False),
  so the block exports to a stock MoE class without approximation.
- Expert scale: each expert's down_proj is multiplied by E, so with a uniform router (p = 1/E) and every
  expert on the block *is* the dense FFN; the random router starts near uniform (score std 0.1), so training
  starts from the split weights (the paper's Fig. 2: split weights beat random ones).
- Router: linear (export-friendly). ``router_init="representative"`` starts W_r at each expert's mean
  gate_proj row (CMoE partition: its representative neuron's row), scaled to score std 1.
- Training k: each token of a minibatch uses a random k in [train_k_min, E] experts (top-k of p), so the block
  is trained for every policy the adaptive router may later choose, not for one k.
- Loss scale: MSE divided by mean(Y^2) of the layer, so one alpha fits every layer (FFN output norms differ
  by two orders of magnitude across SmolLM2's layers); also what the report prints (relative MSE).
- Auxiliary loss: Switch Transformer's load balance E * sum_e f_e P_e (f_e: share of routed slots,
  P_e: mean p), alpha = 0.01 as in Switch; it is 1 when balanced.
- Steps: 300 per layer (``steps``); against 100, the held-out relative MSE on the calibration tokens falls from
  0.0748 to 0.0717 (mean over layers, SmolLM2-135M S2A4E8, 2026-12-06), WikiText-2 perplexity 65.67 -> 63.54.
- Optimiser: Adam, lr 1e-3 for the experts (1e-4 barely moved them in 100 steps; 3e-3 hurt k = E) and 1e-2
  for the router, cosine decay, minibatches of ``batch_tokens`` rows drawn from the layer's calibration
  tokens; 10% of the tokens are held out to report the relative MSE before and after training.
- Training forward: every expert runs on every token and unselected experts get gate 0 (a masked dense
  FFN: three matmuls, no gathers); it equals MoEMLP.forward_reference for the same selection.

Measured on builtin:smollm2-135m (30 layers, E = 8, 100 steps per layer, 16 x 512 tokens of
shared:calib-wikipedia), 2 shared CPU cores, ``python benchmarks/ladimo_quality.py``, 2026-11-24: held-out
relative MSE at top-6 0.220 at the split initialisation, 0.189 trained (mean over layers). WikiText-2 test,
8 x 512 tokens, dense perplexity 30.6: uniform top-6 (24.8% fewer active FFN parameters) 247; the sweep's
plan at the same saving 182 (19 layers dense, the rest top-1..top-6); the plan for +10% perplexity 33.5 at a
3.0% saving. The sweep (360 layer x policy points) took 872 s. The paper's "accuracy is kept" does not hold
for this 135M model at 25% fewer active FFN parameters.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from ..config import LaDiMoConfig
from ..layerwise import convert_layers, target_layers
from ..moe import MoEMLP, Router, RoutingPolicy
from ..profiling import check_cancel
from ..reconstruct import ReconstructSettings, reconstruct_block
from . import Method, Option, choices
from .cmoe import ConversionReport, atopk_markers, carve, carve_features, expert_sizes, magnitude_features

THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95)  # dynamic-policy thresholds profiled per layer (routing distribution)


# ---------------------------------------------------------------------------------------------
# Stage 1a: the split and the block


def split_experts(x, w_gate, w_up, act, cfg: LaDiMoConfig, w_down=None):
    """Neuron index sets of one FFN: (shared (S,), experts: E - n_shared tensors, representatives or None).

    x (T, H) calibration inputs (used by the clustered partitions and to pick shared neurons); w_down (H, I)
    is needed by the magnitude partition.
    """
    n_neurons = w_gate.shape[0]
    shared_size, sizes = expert_sizes(n_neurons, cfg.n_shared, cfg.n_experts)
    if cfg.partition == "cmoe":
        markers = atopk_markers(x, w_gate, w_up, act, cfg.k_act, normalise=True)
        cut = carve(markers, cfg.n_shared, cfg.n_experts, iters=1, metric="l1")
        return cut.shared, cut.experts, cut.representatives
    if cfg.partition == "magnitude":
        feats = magnitude_features(x, w_gate, w_up, w_down, act)  # (I, T)
        cut = carve_features(feats, feats.mean(1), cfg.n_shared, cfg.n_experts, iters=1, metric="cosine")
        return cut.shared, cut.experts, cut.representatives
    if shared_size == 0:
        return torch.zeros(0, dtype=torch.long), list(torch.arange(n_neurons).split(sizes)), None
    rates = atopk_markers(x, w_gate, w_up, act, cfg.k_act, normalise=True).mean(0)  # (I,)
    order = torch.sort(rates, descending=True, stable=True).indices
    shared, rest = order[:shared_size].sort().values, order[shared_size:].sort().values
    return shared, list(rest.split(sizes)), None


def init_router(x, w_gate, experts, representatives, how: str, generator) -> Router:
    """Linear router (E, H): random near-uniform (score std 0.1) or from representative gate rows (std 1)."""
    hidden, n_experts = w_gate.shape[1], len(experts)
    if how == "random":
        weight, target = torch.randn(n_experts, hidden, generator=generator), 0.1
    elif representatives is not None:
        weight, target = w_gate[representatives].float().clone(), 1.0
    else:
        weight, target = torch.stack([w_gate[ix].float().mean(0) for ix in experts]), 1.0
    scores = x.float() @ weight.T  # (T, E)
    weight *= target / scores.std().clamp(min=1e-12)
    router = Router(hidden, n_experts, "linear")
    with torch.no_grad():
        router.weight.copy_(weight)
    return router


def build_block(dense, layer_idx: int, x, cfg: LaDiMoConfig, generator, y=None) -> MoEMLP:
    """Split FFN ``layer_idx`` of ``dense`` into an MoEMLP (float32) ready for training. x (T, H) calibration
    inputs; y (T, H) the dense FFN's outputs on them (needed by the oracle router init).

    oracle: the router is trained on each token's best experts and the down projections refitted, in
    Qwen2-MoE's form (moe_core.reconstruct), so training starts where the layer-wise routing step ends.
    random / representative: routed down_proj scaled by E, so that every expert on under a uniform router
    is the dense FFN (see the module docstring)."""
    return _built(dense, layer_idx, x, cfg, generator, y)[0]


def _built(dense, layer_idx: int, x, cfg: LaDiMoConfig, generator, y=None) -> tuple[MoEMLP, dict | None]:
    """(:func:`build_block`'s block, the oracle init's routing-step report or None)."""
    mlp = dense.mlp(layer_idx)
    w_gate, w_up, w_down = (w.float() for w in dense.adapter.weights(mlp))
    act, act_name = dense.adapter.act_fn(mlp), dense.adapter.act_name(dense.model)
    shared, experts, reps = split_experts(x, w_gate, w_up, act, cfg, w_down)
    if cfg.router_init == "oracle":
        if y is None:
            raise ValueError("ladimo.router_init 'oracle' needs the dense FFN's outputs y.")
        router = Router(w_gate.shape[1], len(experts), "linear")
        block = MoEMLP.from_dense(
            w_gate, w_up, w_down, act_name, shared, experts, router, _policy(cfg), "cmoe"
        )
        settings = ReconstructSettings(router="trained", form="native", refit=True, seed=cfg.seed)
        report = reconstruct_block(
            block, x.float(), y.float(), replace(settings, max_tokens=len(x)), layer_idx
        )
        return block, report
    router = init_router(x, w_gate, experts, reps, cfg.router_init, generator)
    block = MoEMLP.from_dense(
        w_gate, w_up, w_down, act_name, shared, experts, router, _policy(cfg), cfg.gate_mode
    )
    with torch.no_grad():
        block.down_proj.mul_(len(experts))
    return block, None


def _policy(cfg: LaDiMoConfig) -> RoutingPolicy:
    if cfg.threshold is not None:
        return RoutingPolicy("dynamic", threshold=cfg.threshold)
    return RoutingPolicy("topk", k=cfg.top_k)


# ---------------------------------------------------------------------------------------------
# Stage 1b: the training forward and losses


def selection_mask(probs, k_T):
    """probs (T, E), k_T (T,) experts per token -> (T, E) bool: each token's k_T highest p (ties: lower index)."""
    order = probs.argsort(dim=-1, descending=True, stable=True)  # (T, E)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(probs.shape[1]).expand_as(order))
    return ranks < k_T[:, None]


def masked_forward(block: MoEMLP, x, k_T):
    """Differentiable block output with k_T (T,) experts per token: (y (T, H), probs (T, E), mask (T, E)).

    Every expert runs on every token and unselected ones get gate 0: three matmuls over the stacked weights.
    """
    n_tokens, hidden = x.shape
    n_experts, width = block.n_experts, block.down_proj.shape[-1]
    probs = block.probabilities(x)  # (T, E) float32
    mask = selection_mask(probs.detach(), k_T)
    gates = probs * mask
    if block.gate_mode == "renorm":
        gates = gates / gates.sum(-1, keepdim=True).clamp(min=1e-20)
    gate_up = (x @ block.gate_up_proj.reshape(-1, hidden).T).view(n_tokens, n_experts, 2 * width)
    gate, up = gate_up.chunk(2, dim=-1)  # (T, E, W) each
    h = block.act_fn(gate) * up * gates.unsqueeze(-1).to(x.dtype)  # (T, E, W)
    down = block.down_proj.permute(1, 0, 2).reshape(hidden, -1)  # (H, E*W)
    y = h.reshape(n_tokens, -1) @ down.T  # (T, H)
    if block.shared_expert is not None:
        y = y + block.shared(x)
    return y, probs, mask


def balance_loss(probs, mask):
    """Switch Transformer load balance E * sum_e f_e * P_e: 1 when balanced, E when one expert takes all.

    probs (T, E); mask (T, E) the routed slots; f_e = share of slots routed to e, P_e = mean p_e.
    """
    f = mask.float().sum(0) / mask.float().sum().clamp(min=1.0)  # (E,)
    return probs.shape[1] * (f * probs.mean(0)).sum()


@torch.no_grad()
def relative_mse(block: MoEMLP, x, y, k: int, chunk: int = 4096) -> float:
    """mean ||block(x) - y||^2 / mean(y^2) with every token using its top-k experts (prob gates as trained)."""
    err = 0.0
    for xs, ys in zip(x.split(chunk), y.split(chunk), strict=True):
        k_T = torch.full((xs.shape[0],), k, dtype=torch.long)
        err += float((masked_forward(block, xs, k_T)[0] - ys).pow(2).sum())
    return err / max(float(y.pow(2).sum()), 1e-30)


def train_block(block: MoEMLP, x, y, cfg: LaDiMoConfig, generator, cancel=None, on_step=None) -> dict:
    """Distil (router + experts) on x (T, H) -> y (T, H) with Adam; returns losses (first and last 10 steps).

    Every 25 steps: the cancel check and ``on_step(step, cfg.steps)`` (progress within the layer)."""
    experts = [p for n, p in block.named_parameters() if not n.startswith("router") and n != "gate_scale"]
    opt = torch.optim.Adam(
        [{"params": experts, "lr": cfg.lr}, {"params": list(block.router.parameters()), "lr": cfg.router_lr}]
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    scale, losses, aux_seen = y.pow(2).mean(), [], []
    order = _minibatches(x.shape[0], cfg.batch_tokens, cfg.steps, generator)
    block.train()
    for step, rows in enumerate(order):
        if step % 25 == 0:
            check_cancel(cancel)
            if on_step is not None and step:
                on_step(step, cfg.steps)
        if cfg.train_k == "deployed":
            k_T = torch.full((len(rows),), _deployed_k(block), dtype=torch.long)
        else:
            k_T = torch.randint(cfg.train_k_min, block.n_experts + 1, (len(rows),), generator=generator)
        out, probs, mask = masked_forward(block, x[rows], k_T)
        mse = (out - y[rows]).pow(2).mean() / scale
        aux = balance_loss(probs, mask)
        opt.zero_grad(set_to_none=True)
        (mse + cfg.aux_weight * aux).backward()
        opt.step()
        sched.step()
        losses.append(float(mse.detach()))
        aux_seen.append(float(aux.detach()))
    block.eval()
    return {
        "loss_first": _mean(losses[:10]),
        "loss_last": _mean(losses[-10:]),
        "aux_last": _mean(aux_seen[-10:]),
    }


def _deployed_k(block: MoEMLP) -> int:
    """The experts per token the block will run: its top-k (every expert under a dynamic policy)."""
    return block.policy.k if block.policy.mode == "topk" else block.n_experts


def _minibatches(n_rows: int, batch: int, steps: int, generator) -> list[torch.Tensor]:
    """``steps`` row-index batches: consecutive slices of seeded shuffles (every row once per epoch)."""
    batch = min(batch, n_rows)
    per_epoch = n_rows // batch
    epochs = [torch.randperm(n_rows, generator=generator) for _ in range(-(-steps // per_epoch))]
    return [epochs[s // per_epoch][(s % per_epoch) * batch :][:batch] for s in range(steps)]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


# ---------------------------------------------------------------------------------------------
# Stage 2 input: the routing-weight distribution of a trained block


@torch.no_grad()
def routing_profile(block: MoEMLP, x, thresholds=THRESHOLDS) -> dict:
    """Distribution of routing weights on x (T, H): mean sorted p (E,), mean experts needed per dynamic
    threshold, and the share of tokens each expert wins (its top-1 share)."""
    probs = block.probabilities(x)  # (T, E)
    sorted_p = probs.sort(dim=-1, descending=True).values
    before = sorted_p.cumsum(-1) - sorted_p
    return {
        "mean_sorted_p": [round(float(v), 5) for v in sorted_p.mean(0)],
        "mean_k_at_threshold": {f"{t:g}": float((before < t).sum(-1).float().mean()) for t in thresholds},
        "top1_share": [
            round(float(v), 4) for v in torch.bincount(probs.argmax(-1), minlength=probs.shape[1]) / len(x)
        ],
    }


# ---------------------------------------------------------------------------------------------
# One layer and the pipeline


def distill_layer(
    dense, layer_idx: int, x, y, cfg: LaDiMoConfig, cancel=None, on_step=None
) -> tuple[MoEMLP, dict]:
    """Build and train one MoE block from FFN ``layer_idx`` given its inputs x and outputs y (T, H)."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + layer_idx)
    held = torch.randperm(x.shape[0], generator=generator)
    n_val = max(1, int(cfg.holdout * x.shape[0]))
    val, train = held[:n_val], held[n_val:]
    block, routed = _built(dense, layer_idx, x[train], cfg, generator, y[train])
    k = cfg.top_k if cfg.threshold is None else block.n_experts
    before = {"val_mse_init": relative_mse(block, x[val], y[val], k)}
    with torch.enable_grad():
        losses = train_block(block, x[train], y[train], cfg, generator, cancel, on_step)
    info = {
        "layer": layer_idx,
        "expert_sizes": block.expert_sizes,
        "shared_size": block.shared_size,
        **before,
    }
    info |= {
        "val_mse": relative_mse(block, x[val], y[val], k),
        "val_mse_all": relative_mse(block, x[val], y[val], block.n_experts),
    }
    if routed is not None:
        info["routing_step"] = routed  # the oracle init's: LaDiMo routes before it trains (see convert)
    info |= losses | {
        "routing": routing_profile(block, x[val]),
        "seconds": round(time.perf_counter() - start, 2),
    }
    dtype = dense.adapter.weights(dense.mlp(layer_idx))[0].dtype
    return block.to(dtype).eval(), info


@torch.no_grad()
def convert(
    dense,
    input_ids: torch.Tensor,
    cfg: LaDiMoConfig | None = None,
    progress: Callable[[float, str], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    routing: ReconstructSettings | None = None,
):
    """Distil a copy of ``dense`` into LaDiMo MoE layers on calibration input_ids (N, T); ``dense`` is untouched.

    Layers are trained one at a time, each on what the converted layers before it produce (``sequential``)
    or on the dense model's own FFN inputs (teacher forcing), through the one layer-by-layer driver (it
    streams). routing (the run's routing section) is not applied after training: LaDiMo's routing step is its
    oracle initialisation (``router_init``: a router trained on each token's best experts and the down
    projections refitted, in the native form it trains in; its report under ``routing_step``), and the router
    then trains with the experts. A second routing step after training undoes that: measured on SmolLM2-135M
    (S2A4E8, 32 x 512 calibration tokens, WikiText-2 test 8 x 512) 65.67 without it, 66.71 with a refit under
    LaDiMo's own router, 75.27 with the router retrained (native), 74.96 with the analytic step (the default
    routing section, which every LaDiMo conversion from the app or the command line used to run). Returns a
    DenseModel with MoEMLP blocks (uniform policy from cfg; moe_core.sweep picks one per layer) and a
    ``conversion`` report: per layer the relative MSE before / after, losses, routing profile,
    seconds.
    """
    from ..model_io import ConvertedModel

    cfg, start = cfg or LaDiMoConfig(), time.perf_counter()
    moe = ConvertedModel.shell_of(dense)
    targets = target_layers(cfg.layers, moe.n_layers, "ladimo")
    _check_shape(moe, cfg)
    report = ConversionReport("ladimo", _config_dict(cfg))
    last = targets[-1]

    def build(i, x, y):
        on_step = None
        if progress:
            on_step = lambda s, n: progress(  # noqa: E731
                (i + s / n) / (last + 1), f"LaDiMo: layer {i + 1}/{last + 1}, step {s}/{n}"
            )
        return distill_layer(moe, i, x.float(), y.float(), cfg, cancel, on_step)

    report.layers = convert_layers(
        moe, input_ids, targets, build, batch_size=cfg.batch_size, sequential=cfg.sequential,
        progress=progress, cancel=cancel, label="LaDiMo",
    )  # fmt: skip
    report.seconds = round(time.perf_counter() - start, 2)
    moe.conversion = report
    return moe


def _check_shape(moe, cfg: LaDiMoConfig) -> None:
    """Refuse more experts than FFN neurons before any work is done."""
    expert_sizes(moe.adapter.down(moe.mlp(0)).in_features, cfg.n_shared, cfg.n_experts)


def _config_dict(cfg: LaDiMoConfig) -> dict:
    from dataclasses import asdict

    out = asdict(cfg)
    out["layers"] = None if cfg.layers is None else list(cfg.layers)
    return out


# ---------------------------------------------------------------------------------------------
# Registry entry

METHOD = Method(
    name="ladimo",
    title="LaDiMo",
    paper="S. Kim et al., LaDiMo: Layer-wise Distillation Inspired MoEfier, arXiv 2408.04278",
    about="LaDiMo (arXiv 2408.04278): split each FFN, then distil experts and router layer by layer.",
    config=LaDiMoConfig,
    convert=convert,
    options=(
        Option("n_experts", "--n-experts", "experts per FFN", kind=int, tab=False),
        Option(
            "top_k", "--top-k", "experts per token after conversion (uniform policy)", kind=int, tab=False
        ),
        Option(
            "steps",
            "--steps",
            "Adam distillation steps per layer (~25 s per SmolLM2 layer)",
            "Steps per layer",
            int,
        ),  # fmt: skip
        Option("lr", "", "experts; the router uses 10x", "Learning rate", float),
        Option(
            "partition",
            "",
            "contiguous slices (paper), co-activation clusters (cmoe) or |h| ||W_down|| clusters (magnitude)",
            "Partition",
            choices(LaDiMoConfig, "partition"),
        ),  # fmt: skip
        Option(
            "router_init",
            "",
            "oracle: trained on each token's best experts, then refit; random: near uniform",
            "Router init",
            choices(LaDiMoConfig, "router_init"),
        ),  # fmt: skip
    ),
    from_layout=lambda layout: {
        "n_experts": layout.n_experts,
        "n_shared": layout.n_shared,
        "top_k": layout.active,
    },
    to_layout=lambda cfg: (cfg.n_experts, cfg.top_k, cfg.n_shared / cfg.n_experts),
    describe=lambda s: f"E{s.get('n_experts')} S{s.get('n_shared')} top-{s.get('top_k')}",
    order=10,
)
