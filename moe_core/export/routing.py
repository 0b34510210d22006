"""Routing for native export: express each MoE layer's routing as Qwen2-MoE's, exactly or as well as possible.

Qwen2-MoE routes every MoE layer the same way: p = softmax(W x) with a linear, bias-free W (E, H); the
top-k of p (one k for all layers) is used, each with weight p (``norm_topk_prob=false``) or p / sum_topk p
(``true``); a per-expert constant c_e can be folded into expert e's down_proj.

Exact (reference/ecosystem.md §A.3): a linear router with ``prob`` or ``renorm`` gates and top-k, no
selection bias and no expert bias (temperature folds into W); unit gates (CMoE's 1 + p*u at u = 0) with
top-1 (weight p/p = 1); unit gates with every expert active (a zero router gives 1/E: c_e = E).

Expert output biases (DIVE's FLAP compensation) have no Qwen2-MoE form at all: they are dropped, with a
note, and the export is marked approximate; the routing of such a layer is still mapped exactly when it
has an exact form (DIVE: a linear router, softmax over the top-k), so the export equals the internal
model with its expert biases zeroed.

Everything else (CMoE's analytical router, unit gates with top-k >= 2, per-layer top-k or dynamic
policies, selection biases, CMoE's u) is approximated on calibration tokens, one layer at a time
on the internal model's own MLP inputs x (T, H):

1. router: ridge least squares of the internal log-probabilities on x, so that softmax(W x) ~ the
   internal p (optional Adam steps on the cross-entropy of the selected experts: measured no better);
2. constants: c_e = mean internal gate of expert e / mean native weight of e, both where e is chosen,
   which folds unit gates vs p or p / sum p, temperature and u into down_proj without shrinking it (a
   least-squares fit of c on the block output lowered the layer error but raised perplexity: it
   attenuates c towards 0 because the routing is imperfect).

The naive mapping (W = the internal router's first projection, c = k for unit gates) and the fitted one
under each allowed ``norm_topk_prob`` are candidates; the one with the lowest KL(internal || native) on
held-out calibration sequences is kept, and the model card lists every candidate's KL. Measured on
SmolLM2-135M CMoE S2A2E8 (pydoc calibration): held-out KL 0.58 naive vs 0.37 fitted (least squares).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..moe import MoEMLP
from ..plumbing import check_cancel


@dataclass
class LayerRoute:
    """One MoE layer in Qwen2-MoE form: router weight (E, H), per-expert constants (E,), and how it was made."""

    weight: torch.Tensor
    scales: torch.Tensor
    how: str  # "exact", "fitted" or "naive"
    stats: dict = field(default_factory=dict)


@dataclass
class RoutingPlan:
    """Global top-k and norm_topk_prob, one LayerRoute per MoE layer, and the reasons for approximations."""

    top_k: int
    norm_topk_prob: bool
    layers: dict[int, LayerRoute]
    notes: list[str] = field(default_factory=list)
    candidates: dict = field(default_factory=dict)  # name -> (RoutingPlan, held-out KL) when measured
    bias_dropped: list[int] = field(default_factory=list)  # layers whose expert biases the format cannot hold

    @property
    def exact(self) -> bool:
        return all(r.how == "exact" for r in self.layers.values()) and not self.bias_dropped

    def summary(self) -> dict:
        counts = {
            f"layers_{h}": sum(r.how == h for r in self.layers.values()) for h in ("exact", "fitted", "naive")
        }
        fitted = [r.stats for r in self.layers.values() if r.stats]
        out = {"top_k": self.top_k, "norm_topk_prob": self.norm_topk_prob, "exact": self.exact, **counts}
        out["layers_bias_dropped"] = len(self.bias_dropped)
        for key in ("selection_agreement", "relative_error"):
            values = [s[key] for s in fitted if key in s]
            if values:
                out[f"mean_{key}"] = round(sum(values) / len(values), 5)
        if self.candidates:
            out["held_out_kl"] = {name: kl for name, (_, kl) in self.candidates.items()}
        out["notes"] = list(self.notes)
        return out

    def routing(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        return {i: (r.weight, r.scales) for i, r in self.layers.items()}


# ---------------------------------------------------------------------------------------------
# What is exact


BIAS_DROPPED = (
    "experts have output biases, which Qwen2-MoE experts cannot hold (dropped; --format exact keeps them)"
)


def has_expert_bias(block: MoEMLP) -> bool:
    return block.expert_bias is not None and bool(block.expert_bias.abs().max() > 0)


def approximation_reasons(block: MoEMLP) -> list[str]:
    """Why this block has no exact Qwen2-MoE form (empty: it may have one; see exact_forms)."""
    return routing_reasons(block) + ([BIAS_DROPPED] if has_expert_bias(block) else [])


def routing_reasons(block: MoEMLP) -> list[str]:
    """Why this block's routing has no exact Qwen2-MoE form (empty: it may have one; see exact_forms)."""
    reasons, pol = [], block.policy
    k_all = pol.mode == "topk" and pol.k == block.n_experts
    if block.router.kind != "linear" and not (k_all and _unit_gates(block)):
        reasons.append("CMoE's analytical router act(W_g x) * (W_u x) is not a linear map")
    if pol.mode == "dynamic":
        reasons.append(f"dynamic routing ({pol.label()}) uses a varying number of experts per token")
    if block.gate_mode == "cmoe" and not _unit_gates(block):
        reasons.append("CMoE gates 1 + p*u with a trained u have no native form")
    elif block.gate_mode == "cmoe" and pol.mode == "topk" and 1 < pol.k < block.n_experts:
        reasons.append(f"unit gates with top-{pol.k}: native weights are p or p / sum p, never 1 each")
    if bool(block.selection_bias.abs().max() > 0):
        reasons.append("a selection (load-balancing) bias shifts which experts are chosen")
    return reasons


def _unit_gates(block: MoEMLP) -> bool:
    return block.gate_mode == "cmoe" and not bool(block.gate_scale.abs().max() > 0)


def exact_forms(block: MoEMLP) -> list[tuple[int, bool, LayerRoute]]:
    """Every (top_k, norm_topk_prob, route) under which the block's routing is reproduced exactly (expert
    biases aside: no form holds them, see approximation_reasons)."""
    if routing_reasons(block):
        return []
    k, n = block.policy.k, block.n_experts
    w = block.router.weight.detach().float() / block.temperature
    ones = torch.ones(n)
    if block.gate_mode == "prob":
        return [(k, False, LayerRoute(w, ones, "exact"))]
    if block.gate_mode == "renorm":
        forms = [(k, True, LayerRoute(w, ones, "exact"))]
        return forms + ([(k, False, LayerRoute(w, ones, "exact"))] if k == n else [])  # p sums to 1
    if k == n:  # unit gates, all experts: a zero router gives weights 1/E under either setting
        zero, scale = torch.zeros_like(w), torch.full((n,), float(n))
        return [(k, norm, LayerRoute(zero, scale, "exact")) for norm in (False, True)]
    return [(1, True, LayerRoute(w, ones, "exact"))]  # unit gates, top-1: p / p = 1


def effective_k(block: MoEMLP, x: torch.Tensor | None = None) -> float:
    """Experts per token: the policy's k, or for dynamic policies the mean measured on x (T, H)."""
    if block.policy.mode == "topk":
        return float(block.policy.k)
    if x is None:
        return float(block.policy.max_k or max(1, block.n_experts // 2))
    idx, _, _ = block.route(x)
    return float((idx >= 0).sum(-1).float().mean())


def choose_global(forms: dict[int, list], forced_norm: bool | None) -> tuple[int | None, bool | None]:
    """(top_k, norm) making the most layers exact; (None, ...) when no layer can be exact. forms: each MoE
    layer's :func:`exact_forms`."""
    votes: dict[tuple[int, bool], int] = {}
    for layer_forms in forms.values():
        for k, norm, _ in layer_forms:
            if forced_norm is None or norm == forced_norm:
                votes[(k, norm)] = votes.get((k, norm), 0) + 1
    if not votes:
        return None, forced_norm
    best = max(votes.items(), key=lambda kv: (kv[1], not kv[0][1]))  # ties: norm false (llama.cpp-safe)
    return best[0]


def naive_route(block: MoEMLP, top_k: int) -> LayerRoute:
    """The internal router's (first) projection as W, constants k: no calibration, a baseline."""
    w = block.router.weight.detach().float() / block.temperature
    scale = float(top_k) if block.gate_mode == "cmoe" else 1.0
    return LayerRoute(w, torch.full((block.n_experts,), scale), "naive")


# ---------------------------------------------------------------------------------------------
# Fitting on calibration inputs


def fit_router(x: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor | None = None, steps: int = 0):
    """W (E, H) with softmax(W x) close to the internal probabilities: ridge least squares on the internal
    log-probabilities logp (T, E); optionally ``steps`` Adam steps on the cross-entropy of the internal
    selection ``mask`` (T, E). Measured on SmolLM2 CMoE S2A2E8 the cross-entropy steps did not help
    (mean relative output error 0.255 -> 0.27), hence off by default."""
    xf = x.float()
    centred = logp - logp.mean(-1, keepdim=True)  # softmax ignores a per-token constant
    gram = xf.T @ xf + 1e-3 * xf.shape[0] * torch.eye(xf.shape[1])
    w = torch.linalg.solve(gram, xf.T @ centred).T.contiguous()  # (E, H)
    if steps <= 0 or mask is None:
        return w
    w = w.clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=1e-2 * float(w.detach().abs().mean()) + 1e-3)
    per_token = mask.sum(-1).clamp(min=1)
    with torch.enable_grad():
        for _ in range(steps):
            loss = -((mask * F.log_softmax(xf @ w.T, dim=-1)).sum(-1) / per_token).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return w.detach()


def native_weights(logits: torch.Tensor, top_k: int, norm: bool) -> torch.Tensor:
    """Qwen2-MoE's routing weights as a dense (T, E) matrix (zero off the top-k)."""
    probs = torch.softmax(logits.float(), dim=-1)
    top, idx = probs.topk(top_k, dim=-1)
    if norm:
        top = top / top.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(1, idx, top)


@torch.no_grad()
def internal_weights(block: MoEMLP, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(internal gates as a dense (T, E) matrix, log of the internal ranking p + bias (T, E)) on x (T, H)."""
    idx, gates, probs = block.route(x)
    dense = torch.zeros_like(probs).scatter_add_(1, idx.clamp(min=0), gates * (idx >= 0))
    # selection ranks p + selection_bias; its log is monotone in it, so a router fitting it ranks alike
    return dense, (probs + block.selection_bias.float()).clamp(min=1e-30).log()


def mean_gate_scales(internal: torch.Tensor, native: torch.Tensor) -> torch.Tensor:
    """c_e = mean internal gate of e where chosen / mean native weight of e where chosen (E,).

    Folds the mean gate into each expert's down_proj without shrinking it: a least-squares fit of c on the
    block output was tried and measured worse (it attenuates c towards 0 because the routing is imperfect).
    """

    def mean_where_chosen(w):
        chosen = (w > 0).float()
        return w.sum(0) / chosen.sum(0).clamp(min=1)

    g, n = mean_where_chosen(internal), mean_where_chosen(native)
    return torch.where(n > 0, g / n.clamp(min=1e-12), torch.ones_like(g))


@torch.no_grad()
def route_stats(block: MoEMLP, x: torch.Tensor, route: LayerRoute, top_k: int, norm: bool) -> dict:
    """Selection agreement (share of tokens with the same expert set) and relative output error on x."""
    internal, _ = internal_weights(block, x)
    native = native_weights(x.float() @ route.weight.T, top_k, norm) * route.scales
    same = ((internal > 0) == (native > 0)).all(-1).float().mean()
    y = block(x).float()
    shared = block.shared_expert(x).float() if block.shared_expert is not None else torch.zeros_like(y)
    routed = torch.zeros_like(y)
    for e in (native > 0).any(0).nonzero().flatten().tolist():
        rows = native[:, e].nonzero().flatten()
        gate, up = F.linear(x[rows], block.gate_up_proj[e]).chunk(2, dim=-1)
        out = F.linear(block.act_fn(gate) * up, block.down_proj[e]).float()
        routed.index_add_(0, rows, out * native[rows, e : e + 1])
    err = (shared + routed - y).norm() / y.norm().clamp(min=1e-12)
    return {"selection_agreement": round(float(same), 5), "relative_error": round(float(err), 6)}


def fit_layer(block: MoEMLP, x: torch.Tensor, top_k: int, norm: bool, steps: int = 0) -> LayerRoute:
    """Fitted router and mean-gate constants for one layer, with calibration statistics."""
    internal, logp = internal_weights(block, x)
    w = fit_router(x, logp, (internal > 0).float(), steps)
    scales = mean_gate_scales(internal, native_weights(x.float() @ w.T, top_k, norm))
    route = LayerRoute(w, scales, "fitted")
    route.stats = route_stats(block, x, route, top_k, norm)
    return route


# ---------------------------------------------------------------------------------------------
# The plan


def plan_routing(
    dense,
    calib_ids: torch.Tensor | None = None,
    *,
    fit: bool = True,
    forced_norm: bool | None = None,
    steps: int = 0,
    batch_size: int = 4,
    progress: Callable[[float, str], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> RoutingPlan:
    """Qwen2-MoE routing for every MoE layer of ``dense``; calib_ids (N, T) are needed to fit and measure.

    Approximated layers: the naive mapping and (with ``fit``) the fitted one under each allowed
    norm_topk_prob are candidates; the one with the lowest KL(internal || native) on held-out
    calibration sequences wins, and ``plan.candidates`` keeps them all with their KL.
    """
    from ..evaluate import moe_blocks

    blocks = moe_blocks(dense)
    forms = {i: exact_forms(b) for i, b in blocks.items()}
    top_k, norm = choose_global(forms, forced_norm)
    exact = {i: r for i, fs in forms.items() for k, n, r in fs if (k, n) == (top_k, norm)}
    notes = _notes(blocks, exact)
    dropped = [i for i, b in blocks.items() if has_expert_bias(b)]
    todo = [i for i in blocks if i not in exact]
    if not todo:
        return RoutingPlan(top_k, norm, exact, notes, bias_dropped=dropped)
    if calib_ids is None:
        plan = _naive_plan(blocks, exact, top_k, norm, notes + ["no calibration tokens: routers not fitted"])
        plan.bias_dropped = dropped
        return plan
    fit_ids, held_out = split_calibration(calib_ids)
    xs = _collect_inputs(dense, fit_ids, todo, batch_size, cancel)
    if top_k is None:
        top_k = max(1, round(sum(effective_k(blocks[i], xs[i]) for i in todo) / len(todo)))
    candidates = {"naive": _naive_plan(blocks, exact, top_k, norm, notes)}
    for i in todo:
        route = candidates["naive"].layers[i]
        route.stats = route_stats(blocks[i], xs[i], route, top_k, candidates["naive"].norm_topk_prob)
    if fit:
        for n in (False, True) if norm is None else (norm,):
            candidates[f"fitted-norm-{str(n).lower()}"] = _fitted_plan(
                blocks, exact, xs, top_k, n, notes, steps, cancel
            )
            if progress:
                progress(len(candidates) / 3, f"Fitted native routers (norm_topk_prob={n})")
    for plan in candidates.values():
        plan.bias_dropped = dropped
    return _pick(dense, candidates, held_out, cancel)


def split_calibration(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, held out) sequences: the last quarter (at least one) is held out when there are two or more."""
    if ids.shape[0] < 2:
        return ids, ids
    n_out = max(1, ids.shape[0] // 4)
    return ids[:-n_out], ids[-n_out:]


def _naive_plan(blocks, exact, top_k, norm, notes) -> RoutingPlan:
    top_k = top_k or max(1, round(sum(effective_k(b) for b in blocks.values()) / len(blocks)))
    if norm is None:  # unit and renormalised gates sum to a constant: keep that with norm_topk_prob
        norm = sum(b.gate_mode != "prob" for b in blocks.values()) * 2 >= len(blocks)
    layers = {i: exact.get(i) or naive_route(b, top_k) for i, b in blocks.items()}
    return RoutingPlan(top_k, norm, layers, list(notes))


def _fitted_plan(blocks, exact, xs, top_k, norm, notes, steps, cancel) -> RoutingPlan:
    layers = dict(exact)
    for i, x in xs.items():
        check_cancel(cancel)
        layers[i] = fit_layer(blocks[i], x, top_k, norm, steps)
    return RoutingPlan(top_k, norm, dict(sorted(layers.items())), list(notes))


@torch.no_grad()
def _pick(dense, candidates: dict[str, RoutingPlan], held_out, cancel) -> RoutingPlan:
    """The candidate with the lowest KL(internal || native) per token on the held-out sequences."""
    from .native import build_qwen2moe

    ref = F.log_softmax(dense.model(input_ids=held_out.to(dense.device)).logits.float(), -1)
    kls = {}
    for name, plan in candidates.items():
        check_cancel(cancel)
        native = build_qwen2moe(dense, plan.routing(), top_k=plan.top_k, norm_topk_prob=plan.norm_topk_prob)
        logq = F.log_softmax(native(input_ids=held_out).logits.float(), -1)
        kls[name] = round(float((ref.exp() * (ref - logq)).sum(-1).mean()), 6)
        del native
    best = min(kls, key=kls.get)
    plan = candidates[best]
    plan.candidates = {name: (candidates[name], kl) for name, kl in kls.items()}
    plan.notes.append(
        f"routing chosen by KL on {held_out.numel()} held-out calibration tokens: "
        + ", ".join(f"{n} {kl:.4g}" for n, kl in kls.items())
        + f" -> {best}"
    )
    return plan


def _notes(blocks: dict[int, MoEMLP], exact: dict) -> list[str]:
    reasons: dict[str, list[int]] = {}
    for i, block in blocks.items():
        why = approximation_reasons(block) or (
            [] if i in exact else ["top-k or gate mode differs from the others"]
        )
        for r in why:
            reasons.setdefault(r, []).append(i)
    return [f"{r} (layers {_ranges(ls)})" for r, ls in reasons.items()]


def _ranges(ids: list[int]) -> str:
    ids, out = sorted(ids), []
    start = prev = ids[0]
    for i in ids[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(out)


@torch.no_grad()
def _collect_inputs(dense, calib_ids, layers: list[int], batch_size: int, cancel) -> dict[int, torch.Tensor]:
    """{layer: MLP inputs (T, H) float32} on calibration tokens, through the internal model, layer by layer."""
    from ..layerwise import walk_layers

    wanted, xs = set(layers), {}
    for step in walk_layers(dense, calib_ids, batch_size=batch_size, last=max(layers), cancel=cancel):
        if step.index in wanted:
            xs[step.index] = step.run_seeing(dense.mlp(step.index)).float()
    return xs
