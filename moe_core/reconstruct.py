"""Layer-wise reconstruction: route each token to the experts that reproduce the dense FFN, then refit.

For one MoE block, its calibration inputs x (T, H) and the dense FFN's outputs y (T, H) on them:

1. Oracle experts (:func:`oracle_experts`): per token, the k routed experts whose summed outputs best
   reconstruct what the shared expert leaves, y - shared(x), in squared error (exhaustive over the C(E, k)
   sets while that is small, else greedy). Routing by these labels is the headroom bound of any router for
   these experts (:func:`oracle_routing` evaluates a whole model that way).
2. Router (:func:`train_router`): a linear softmax router (E, H) trained by cross-entropy against the oracle
   sets (uniform target over each token's set): the form stock MoE architectures run, so a model routed by
   it exports without approximation. Measured on SmolLM2-135M at S2A2E8: CMoE's analytical router picks
   the oracle's experts 35% of the time (chance: 33%), the trained one 50-75% (per layer).
3. Down-projection refit (:func:`refit_down`): given the block's own routing and gates, the block output is
   linear in every down projection (shared and routed, and expert biases where the block has them), so
   ridge least squares on the calibration tokens gives the best ones exactly; the active neurons learn to
   stand in for the missing ones (FLAP's bias compensation, generalised). Seconds per layer.

Everything runs in float32 (normal equations in float64) on the device of x.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .moe import MoEMLP, Router
from .plumbing import unshare

# Tokens per router training step beyond which it trains on minibatches: on SmolLM2 at 59k tokens (layers 12 and
# 20, S1A1E8 and S0A1E8) minibatches of 16k give the full batch's held-out error (0.3388 vs 0.3389, 0.1927 vs
# 0.1928, 0.4461 vs 0.4450) at a quarter of the passes over the inputs; 4k ones are a little worse (0.3407)
ROUTER_BATCH = 16384
EXHAUSTIVE_MAX_SETS = 512  # C(E, k) up to this is searched exhaustively (C(14, 3) = 364); greedy beyond
# Native form: router scales tried after training (each with its own refit), the best on the held-out tokens
# kept. A sharper softmax gives the chosen expert a weight nearer 1 whatever the token, which the refit's
# fixed down projections fit better: on SmolLM2 S1A1E8 (16k tokens) held-out error 0.475 -> 0.460 (layer 12)
# and 0.281 -> 0.272 (layer 20), against the analytic form's 0.457 and 0.271. Top-k choices do not change.
SHARPEN = (1.0, 2.0, 4.0, 8.0)
# A top-1 block with unit gates (the analytic form) goes to the native form with its router scaled by this: the
# chosen expert's weight p = softmax(a W x) is then 1 but for near ties. On SmolLM2-135M's servable 50% (20
# layers S1A1E8), distilled in the analytic form (WikiText-2 86.22), the native form gives 90.26 unscaled, 86.17
# at 64 and 86.15 at 1024; a native-form distillation from the same start reached 91.9-96.2.
NATIVE_LIMIT = 64.0


# ---------------------------------------------------------------------------------------------
# Expert outputs and the oracle


@torch.no_grad()
def expert_outputs(block: MoEMLP, x: torch.Tensor) -> torch.Tensor:
    """x (T, H) -> every routed expert's output at unit gate, bias included: (T, E, H) float32."""
    return torch.stack([block._expert(e, x).float() for e in range(block.n_experts)], dim=1)


def _best_sets_exhaustive(gram, corr, k: int) -> torch.Tensor:
    """argmin over k-sets S of sum_{e,f in S} G_ef - 2 sum_{e in S} c_e: gram (T, E, E), corr (T, E) -> (T, k)."""
    sets = torch.tensor(list(itertools.combinations(range(corr.shape[1]), k)), device=corr.device)  # (C, k)
    quad = gram[:, sets[:, :, None], sets[:, None, :]].sum((-1, -2))  # (T, C)
    cost = quad - 2 * corr[:, sets].sum(-1)
    return sets[cost.argmin(-1)]


def _best_sets_greedy(gram, corr, k: int) -> torch.Tensor:
    """Forward selection: add the expert that lowers the squared error most, k times. -> (T, k)."""
    n_tokens, n_experts = corr.shape
    rows = torch.arange(n_tokens, device=corr.device)
    cross = torch.zeros_like(corr)  # (T, E): sum over chosen f of G_ef
    taken = torch.zeros_like(corr, dtype=torch.bool)
    chosen = []
    for _ in range(k):
        gain = gram.diagonal(dim1=1, dim2=2) + 2 * cross - 2 * corr  # error change when adding e
        e = gain.masked_fill(taken, math.inf).argmin(-1)
        chosen.append(e)
        taken[rows, e] = True
        cross += gram[rows, e]
    return torch.stack(chosen, dim=1)


@torch.no_grad()
def gate_values(block: MoEMLP, x) -> torch.Tensor:
    """(T, E) float32: the weight each routed expert gets when chosen, by the block's gate rule: 1 + p * u
    (CMoE's gates), p (Qwen2-MoE's), or 1/k for gates renormalised over the chosen set (DIVE's averaged
    copies; the exact value depends on the set)."""
    if block.gate_mode == "renorm":
        return torch.full((x.shape[0], block.n_experts), 1.0 / block.policy.k, device=x.device)
    probs = torch.softmax(block.router(x) / block.temperature, dim=-1)
    return 1.0 + probs * block.gate_scale.float() if block.gate_mode == "cmoe" else probs


@torch.no_grad()
def oracle_experts(block: MoEMLP, x, y, k: int, chunk: int = 2048) -> torch.Tensor:
    """Per token, the k routed experts whose outputs, at the weights the block's gates give them
    (:func:`gate_values`), best reconstruct y - shared(x). x, y (T, H) -> (T, k) long."""
    out = []
    for xs, ys in zip(x.split(chunk), y.split(chunk), strict=True):
        o = expert_outputs(block, xs) * gate_values(block, xs)[:, :, None]  # (t, E, H)
        target = ys.float() - block.shared(xs).float()
        gram = torch.einsum("teh,tfh->tef", o, o)  # (t, E, E)
        corr = torch.einsum("teh,th->te", o, target)  # (t, E)
        search = _best_sets_exhaustive if math.comb(block.n_experts, k) <= EXHAUSTIVE_MAX_SETS else None
        out.append((search or _best_sets_greedy)(gram, corr, k))
    return torch.cat(out)


def set_mask(sets: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(T, k) expert indices -> (T, E) float 0/1."""
    return torch.zeros(sets.shape[0], n_experts, device=sets.device).scatter_(1, sets, 1.0)


# ---------------------------------------------------------------------------------------------
# The router


def train_router(
    x,
    sets,
    n_experts: int,
    steps: int = 200,
    lr: float = 0.05,
    init: torch.Tensor | None = None,
    seed: int = 0,
    batch: int = ROUTER_BATCH,
) -> torch.Tensor:
    """A linear router W (E, H): softmax(W x) trained by cross-entropy against the oracle sets (T, k).

    Adam on RMS-normalised inputs (one learning rate fits every layer), from ``init`` or zero: full-batch up to
    ``batch`` tokens, beyond that on ``batch`` tokens per step, in seeded passes over all of them.
    """
    xs = x.float()
    scale = xs.pow(2).mean().sqrt().clamp(min=1e-12)
    xs = xs / scale
    target = set_mask(sets, n_experts) / sets.shape[1]  # (T, E): uniform over each token's oracle set
    w = (
        torch.zeros(n_experts, x.shape[1], device=x.device) if init is None else init.float() * scale
    ).clone()
    w.requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    g, per_pass, order = torch.Generator().manual_seed(seed), max(1, len(xs) // batch), None
    with torch.enable_grad():
        for step in range(steps):
            xb, tb = xs, target
            if len(xs) > batch:
                if step % per_pass == 0:
                    order = torch.randperm(len(xs), generator=g).to(x.device)
                rows = order[(step % per_pass) * batch :][:batch]
                xb, tb = xs[rows], target[rows]
            loss = -(tb * F.log_softmax(xb @ w.T, dim=-1)).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return (w.detach() / scale).to(x.dtype)


def linear_router(weight: torch.Tensor) -> Router:
    """A Router of kind linear holding ``weight`` (E, H)."""
    router = Router(weight.shape[1], weight.shape[0], "linear").to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        router.weight.copy_(weight)
    return router


@torch.no_grad()
def to_native(block: MoEMLP, router_weight: torch.Tensor | None = None) -> None:
    """Put ``block`` in Qwen2-MoE's routing form, in place: linear router (``router_weight``, or the block's own
    when it is linear), weights p = softmax(W x) on the top-k (``prob`` gates), no selection bias, and the
    shared expert behind a sigmoid gate. Expert biases, which the form cannot hold, are dropped (a refit
    of the down projections then compensates for them, :func:`refit_down`)."""
    if router_weight is None:
        if block.router.kind != "linear":
            raise ValueError("to_native needs a router weight for a block whose router is not linear.")
        router_weight = block.router.weight.detach() / block.temperature
    block.router, block.temperature = linear_router(router_weight.to(block.gate_up_proj.dtype)), 1.0
    block.gate_mode = "prob"
    block.selection_bias.zero_()
    block.expert_bias = None
    block.add_shared_gate()
    block._decode_weights = None


@torch.no_grad()
def to_native_limit(block: MoEMLP, scale: float = NATIVE_LIMIT) -> None:
    """A top-1 block with unit gates (CMoE's gates, u = 0) and a linear router, in Qwen2-MoE's form, in place:
    :func:`to_native`, its router scaled by ``scale`` (:data:`NATIVE_LIMIT`). Unit gates are the native form's
    limit as its router sharpens, so a model recovered with them keeps what it learned (up to near ties)."""
    unit = block.gate_mode == "cmoe" and not bool(block.gate_scale.any()) and block.expert_bias is None
    if not (unit and block.router.kind == "linear" and block.policy.mode == "topk" and block.policy.k == 1):
        raise ValueError(
            "to_native_limit takes a top-1 block with unit gates (CMoE's, gate scales zero, no expert biases) "
            "and a linear router."
        )
    to_native(block)
    block.router.weight.mul_(scale)


# ---------------------------------------------------------------------------------------------
# The least-squares refit


def _feature_groups(block: MoEMLP, x) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
    """The block output's linear features as column groups, in :func:`_set_down`'s order: [shared hidden * its
    gate | each routed expert's hidden * its routing weight | each expert's routing weight (when the block has
    expert biases)]. Each group is (rows, feats): rows None for every token of x, or the (t_e,) tokens that
    routed to the expert, whose features are zero on every other token; feats (t or t_e, n) float32. A routed
    expert's hidden is computed on its own tokens only (a k/E share of them), not on all."""
    groups: list[tuple[torch.Tensor | None, torch.Tensor]] = []
    if block.shared_expert is not None:
        s = block.shared_expert
        h = s.act_fn(s.gate_proj(x)) * s.up_proj(x)
        h = h * torch.sigmoid(block.shared_gate(x)) if block.shared_gate is not None else h
        groups.append((None, h.float()))
    idx, gates, _ = block.route(x)
    weights = torch.zeros(x.shape[0], block.n_experts + 1, device=x.device)  # last column: unused slots
    weights.scatter_add_(1, idx.clamp(min=-1) % (block.n_experts + 1), gates)
    weights = weights[:, :-1].to(x.dtype)  # (T, E)
    width = block.down_proj.shape[-1]
    gate_up = block.gate_up_proj
    for e, n in enumerate(block.expert_sizes):
        rows = weights[:, e].nonzero().squeeze(1)  # a token with weight 0 has features 0 anyway
        proj = torch.cat([gate_up[e, :n], gate_up[e, width : width + n]])
        g, u = F.linear(x[rows], proj).chunk(2, dim=-1)
        groups.append((rows, (block.act_fn(g) * u * weights[rows, e : e + 1]).float()))
    if block.expert_bias is not None:
        groups.append((None, weights.float()))
    return groups


def _aligned(a, b):
    """The rows two feature groups (rows, feats) share, as (feats_a', feats_b') aligned token by token, or None
    when they share none (two experts no token chose together)."""
    (rows_a, fa), (rows_b, fb) = a, b
    if rows_a is None:
        return (fa, fb) if rows_b is None else (fa[rows_b], fb)
    if rows_b is None:
        return fa, fb[rows_a]
    if not (len(rows_a) and len(rows_b)):
        return None
    where = torch.full((int(max(rows_a.max(), rows_b.max())) + 1,), -1, dtype=torch.long, device=fb.device)
    where[rows_b] = torch.arange(len(rows_b), device=fb.device)
    pos = where[rows_a]
    both = pos >= 0
    return (fa[both], fb[pos[both]]) if bool(both.any()) else None


GRAM_COLUMNS = 1024  # columns of a normal-matrix block accumulated per product (bounds the float32 temporary)
REFIT_FEATURES = 2**23  # features (tokens x columns) a refit builds at once: 32 MB per float32 temporary


@torch.no_grad()
def refit_down(block: MoEMLP, x, y, ridge: float = 1e-2, chunk: int | None = None) -> None:
    """Ridge least squares of the down projections (and expert biases) given the block's routing, in place.

    x, y (T, H). ridge: relative to the mean diagonal of the normal matrix (a scale-free regulariser). chunk:
    tokens whose features are built at once (default: 8M features' worth, 32 MB of float32 per temporary,
    5461 tokens at D = 1536 and 1213 at D = 6912). The normal matrix is accumulated block by block over the feature
    groups (:func:`_feature_groups`), each pair on the tokens both have: a routed expert's columns meet only the
    tokens that chose it, so at top-1 of E no two experts' blocks are computed at all. On SmolLM2 (layer 12, 65k
    tokens) the same normal equations as the dense product's (solutions within 5e-6) in a fifth to a seventh of the
    time: 3.96 s -> 0.83 s at S1A1E8, 4.3 s -> 0.6 s at S0A1E8.
    """
    sizes = [f.shape[1] for _, f in _feature_groups(block, x[:1])]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    n_feat = sum(sizes)
    chunk = chunk or max(256, REFIT_FEATURES // n_feat)
    gram = torch.zeros(n_feat, n_feat, dtype=torch.float64, device=x.device)
    rhs_t = torch.zeros(y.shape[1], n_feat, dtype=torch.float64, device=x.device)  # (H, D): rhs transposed
    for xs, ys in zip(x.split(chunk), y.split(chunk), strict=True):
        groups = _feature_groups(block, xs)  # float32 products per chunk, float64 sums across chunks
        ys = ys.float()
        for i, (rows, feats) in enumerate(groups):
            a = starts[i]
            rhs_t[:, a : a + sizes[i]].add_((ys if rows is None else ys[rows]).T @ feats)
            for j in range(i, len(groups)):
                pair = _aligned(groups[i], groups[j])
                if pair is None:
                    continue
                fa, fb = pair
                for cols in range(0, sizes[j], GRAM_COLUMNS):  # an (n_i, 1024) float32 product at a time
                    b = starts[j] + cols
                    part = fa.T @ fb[:, cols : cols + GRAM_COLUMNS]
                    gram[a : a + sizes[i], b : b + part.shape[1]].add_(part)
                    if j != i:
                        gram[b : b + part.shape[1], a : a + sizes[i]].add_(part.T)
    # the ridge scales with the hidden features' mean diagonal: the bias columns (gate values, ~1 per token)
    # would otherwise inflate it and shrink every weight
    n_hidden = n_feat - (block.n_experts if block.expert_bias is not None else 0)
    gram.diagonal().add_(ridge * gram.diagonal()[:n_hidden].mean().clamp(min=1e-30))
    _set_down(block, _solve_spd(gram, rhs_t))  # (H, D)


def _solve_spd(gram: torch.Tensor, rhs_t: torch.Tensor) -> torch.Tensor:
    """(gram^-1 rhs_t^T)^T (H, D) for a symmetric positive definite float64 gram (D, D) and rhs_t (H, D), both
    overwritten: on the CPU a Cholesky factorisation and solve in place (scipy), so no second (D, D) or (D, H)
    matrix is made (0.4 GB and 0.14 GB at D = 6912, H = 2560: what a streamed conversion's peak memory was made
    of); elsewhere torch's solver."""
    if gram.device.type != "cpu":
        return torch.linalg.solve(gram, rhs_t.T).T
    from scipy.linalg import cho_factor, cho_solve

    # the transposes are Fortran-ordered views of the same memory (gram is symmetric: the same matrix), which
    # LAPACK factorises and solves where they lie
    factor = cho_factor(gram.numpy().T, lower=True, overwrite_a=True, check_finite=False)
    return torch.from_numpy(cho_solve(factor, rhs_t.numpy().T, overwrite_b=True, check_finite=False).T)


@torch.no_grad()
def add_expert_bias(block: MoEMLP) -> None:
    """Give ``block`` a zero bias per routed expert (added with the expert's gate) unless it has one; the refit
    then fits it: with unit gates and top-k it can hold each unchosen expert's mean output (FLAP's
    compensation, M / k - m_e per expert for M the sum of the means) and whatever else least squares finds."""
    if block.expert_bias is None:
        down = block.down_proj
        block.expert_bias = nn.Parameter(
            torch.zeros(block.n_experts, block.hidden_size, dtype=down.dtype, device=down.device)
        )
        block._decode_weights = None


def _set_down(block: MoEMLP, w) -> None:
    """Write the solved (H, D) matrix back in the order of :func:`_feature_groups`."""
    dtype, col = block.down_proj.dtype, 0
    if block.shared_expert is not None:
        n = block.shared_size
        block.shared_expert.down_proj.weight.copy_(w[:, :n].to(dtype))
        col = n
    for e, n in enumerate(block.expert_sizes):
        block.down_proj[e, :, :n] = w[:, col : col + n].to(dtype)
        col += n
    if block.expert_bias is not None:
        block.expert_bias.copy_(w[:, col : col + block.n_experts].T.to(dtype))
    block._decode_weights = None


# ---------------------------------------------------------------------------------------------
# One layer


@dataclass(frozen=True)
class ReconstructSettings:
    """How a block is routed and refitted (the fields of the run config's ``routing`` section that apply)."""

    router: str = "trained"  # trained: linear router on oracle labels; keep: the method's own router
    form: str = (
        "analytic"  # native: Qwen2-MoE's routing (prob gates, gated shared expert); analytic: unit gates
    )
    refit: bool = True  # least-squares refit of the down projections
    rounds: int = 1  # label -> router -> refit rounds
    router_steps: int = 200
    max_tokens: int = 8192  # calibration tokens used per layer (a seeded subset when there are more)
    holdout: float = 0.1  # share of those tokens kept to report the errors
    ridge: float = 1e-2  # measured: 1e-2 generalises a little better than 1e-3 at 16k-32k tokens
    seed: int = 0
    compensate: bool = False  # analytic refit: fit a bias per routed expert too (FLAP-style compensation)
    sharpen: tuple[float, ...] = SHARPEN  # native form with a refit: router scales tried (() or (1,): none)


def relative_error(out, y) -> float:
    """||out - y||^2 / ||y||^2 over all tokens."""
    return float((out.float() - y.float()).pow(2).sum() / y.float().pow(2).sum().clamp(min=1e-30))


@torch.no_grad()
def reconstruct_block(block: MoEMLP, x, y, s: ReconstructSettings, layer: int = 0) -> dict:
    """Route and refit one block in place on its inputs x and dense outputs y (T, H); returns a report:
    relative errors on held-out tokens (oracle routing, the block as routed before and after the refit),
    and how often the router picks the oracle's experts."""
    g = torch.Generator().manual_seed(s.seed * 1_000_003 + layer)
    rows = torch.randperm(x.shape[0], generator=g)[: s.max_tokens].to(x.device)
    n_val = max(1, int(s.holdout * len(rows)))
    (xv, yv), (xt, yt) = (x[rows[:n_val]], y[rows[:n_val]]), (x[rows[n_val:]], y[rows[n_val:]])
    report = {"layer": layer, "tokens": len(rows), "error_before": relative_error(block(xv), yv)}
    k = block.policy.k
    for r in range(s.rounds):
        sets = oracle_experts(block, xt, yt, k)
        if s.router == "trained" and k < block.n_experts:
            init = block.router.weight if (r or block.router.kind == "linear") else None
            w = train_router(xt, sets, block.n_experts, s.router_steps, init=init, seed=s.seed)
            if s.form == "native":
                to_native(block, w)
            else:
                block.router = linear_router(w)
                block.selection_bias.zero_()
                block._decode_weights = None
        elif s.form == "native":
            to_native(block)
        if s.refit:
            if s.compensate and s.form != "native":
                add_expert_bias(block)
            refit_down(block, xt, yt, s.ridge)
    if s.form == "native" and s.refit and len(s.sharpen) > 1 and k < block.n_experts:
        report["router_scale"] = sharpen_router(block, xt, yt, xv, yv, s.sharpen, s.ridge)
    return report | _after(block, xv, yv, k)


@torch.no_grad()
def sharpen_router(block: MoEMLP, xt, yt, xv, yv, scales=SHARPEN, ridge: float = 1e-2) -> float:
    """Scale a native block's router weight by each of ``scales``, refitting the down projections on (xt, yt)
    each time, and keep the scale with the least error on (xv, yv); returns it. The experts chosen per token
    stay the same (top-k of a scaled softmax); only the weights p the chosen experts get move toward 1."""
    weight = block.router.weight.detach().clone()
    errors = []
    for a in scales:
        block.router.weight.copy_(weight * a)
        refit_down(block, xt, yt, ridge)
        errors.append(relative_error(block(xv), yv))
    best = scales[min(range(len(scales)), key=errors.__getitem__)]
    if best != scales[-1]:
        block.router.weight.copy_(weight * best)
        refit_down(block, xt, yt, ridge)
    return float(best)


def _after(block: MoEMLP, xv, yv, k: int) -> dict:
    """Held-out errors after routing and refitting, and the router's overlap with the oracle sets."""
    sets = oracle_experts(block, xv, yv, k)
    mask = set_mask(sets, block.n_experts)
    chosen = set_mask(block.route(xv)[0].clamp(min=0), block.n_experts)
    return {
        "error": relative_error(block(xv), yv),
        "error_oracle": relative_error(_routed_by(block, xv, sets), yv),
        "oracle_overlap": float((mask * chosen).sum() / mask.sum()),
    }


def _routed_by(block: MoEMLP, x, sets) -> torch.Tensor:
    """The block's output (T, H) float32 when the experts of ``sets`` (T, k) are chosen instead of the
    router's, each at the weight the block's gates give it (:func:`gate_values`)."""
    o = expert_outputs(block, x) * gate_values(block, x)[:, :, None]  # (T, E, H)
    picked = o.gather(1, sets[:, :, None].expand(-1, -1, o.shape[-1]))  # (T, k, H)
    return block.shared(x).float() + picked.sum(1)


# ---------------------------------------------------------------------------------------------
# The oracle bound of a whole model


@contextlib.contextmanager
def oracle_routing(moe, dense):
    """Inside: every MoE block of ``moe`` routes each token to its oracle experts, computed from the dense
    model's FFN on the same input (so it needs ``dense``); outside, blocks route as before. The perplexity
    measured inside is the headroom bound of any router for these experts."""
    from .evaluate import moe_blocks

    blocks = moe_blocks(moe)
    for i, block in blocks.items():
        dense_mlp = dense.mlp(i)

        def forward(x, block=block, dense_mlp=dense_mlp):
            x2 = x.reshape(-1, x.shape[-1])
            sets = oracle_experts(block, x2, dense_mlp(x2), block.policy.k)
            return _routed_by(block, x2, sets).to(x.dtype).reshape(x.shape)

        block.forward = forward
    try:
        yield moe
    finally:
        for block in blocks.values():
            del block.forward  # back to the class's forward


def reconstruct_model(
    moe, dense, input_ids, s: ReconstructSettings, batch_size: int = 4, progress=None, cancel=None
):
    """Route and refit every MoE block of ``moe`` in place, layer by layer on input_ids (N, T): each block on
    the inputs the already reconstructed layers before it produce, against ``dense``'s FFN on those inputs.
    Returns the per-layer reports."""
    from .evaluate import moe_blocks
    from .layerwise import convert_layers

    def build(i, x, y):
        block = moe.mlp(i)
        # the refit writes the down projections in place; a model made by shell_copy may share them
        unshare(block, lambda name, _p: "down_proj" in name or name == "expert_bias")
        return block, reconstruct_block(block, x, y, s, layer=i)

    return convert_layers(
        moe, input_ids, sorted(moe_blocks(moe)), build, batch_size=batch_size, progress=progress,
        cancel=cancel, label="Routing", reference=dense.mlp,
    )  # fmt: skip
