"""MoEMLP: the one Mixture-of-Experts FFN that every conversion method produces.

    y = shared(x) + sum_{e in S(x)} g_e(x) * (W_down^e (act(W_gate^e x) * W_up^e x) + b^e)

- ``shared``: an optional always-on gated MLP (CMoE's shared experts merged into one block).
- routed experts stored stacked (``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I)), the transformers-5
  layout; experts narrower than I are zero-padded, which is exact (a zero row gives act(0) * 0 = 0).
- a router giving scores (T, E); probabilities p = softmax(scores / temperature), always in float32.
- a routing policy choosing S(x): top-k on p + selection_bias (CMoE's aux-free balancing bias only
  affects selection), or dynamic: the smallest set whose summed p reaches a threshold (at least one).
- gates g: ``cmoe`` 1 + p * u (u starts at 0), ``prob`` p, ``renorm`` p / sum_S p.

With every expert selected and unit gates the block equals the dense MLP it was cut from.

Execution (``MoEMLP.forward``), all checked against ``forward_reference`` (every expert on every token):
CPU float32 decode (up to DECODE_MAX_PAIRS token-expert pairs) takes ``_decode``: shared gate/up and router in
one matmul, host routing, two matmuls and an ``addmm_`` per chosen expert; prefill and CUDA take two
``grouped_mm`` calls over the stacked experts; training takes the differentiable per-expert loop.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

GateMode = Literal["cmoe", "prob", "renorm"]

# Up to this many (token, slot) pairs the experts run in a host loop (decode); above, grouped matmuls.
# Measured on SmolLM2 sizes (CPU, 1 thread): the loop wins up to 3-4 pairs, grouped_mm from about 6.
HOST_LOOP_MAX_PAIRS = 4
# Up to this many (token, expert) pairs a CPU float32 step takes the fused decode path (MoEMLP._decode).
# Measured on SmolLM2-135M sizes, 30 layers, 2 threads, fused vs grouped_mm: S1A1E8 2 pairs 8.1 vs 12.2 ms,
# 8 pairs 21.9 vs 22.9, 12 pairs 28.8 vs 25.9; S3A3E8 3 pairs 12.6 vs 17.5, 9 pairs 23.1 vs 23.2.
DECODE_MAX_PAIRS = 8


@functools.cache
def grouped_mm_available(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.nn.functional.grouped_mm`` runs for this device type and dtype (probed once).

    The CPU kernel exists from torch 2.9; CUDA needs SM80+ and, depending on the torch build, bf16.
    """
    if not hasattr(F, "grouped_mm"):
        return False
    try:
        a = torch.ones(4, 8, device=device_type, dtype=dtype)  # (N, H)
        b = torch.ones(2, 8, 8, device=device_type, dtype=dtype)  # (E, I, H)
        offsets = torch.tensor([1, 4], dtype=torch.int32, device=device_type)
        return bool(F.grouped_mm(a, b.transpose(1, 2), offs=offsets)[3, 0] == 8)
    except (RuntimeError, NotImplementedError, TypeError):
        return False


@dataclass(frozen=True)
class RoutingPolicy:
    """How many experts a token uses: fixed top-k, or dynamic by cumulative routing weight."""

    mode: Literal["topk", "dynamic"] = "topk"
    k: int = 1
    threshold: float = 0.5  # dynamic: keep adding experts until their summed probability reaches this
    max_k: int | None = None  # dynamic: optional cap

    def __post_init__(self):
        if self.mode not in ("topk", "dynamic"):
            raise ValueError(f"Routing policy mode must be 'topk' or 'dynamic', got '{self.mode}'.")
        if self.k < 1:
            raise ValueError(f"top-k must be at least 1, got {self.k}.")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"Dynamic threshold must be in (0, 1], got {self.threshold}.")

    def label(self) -> str:
        return f"top-{self.k}" if self.mode == "topk" else f"dyn-{self.threshold:g}"


class GatedMLP(nn.Module):
    """act(gate_proj(x)) * up_proj(x) -> down_proj: the shared expert (and a standalone dense FFN)."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: nn.Module):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = act

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Scores (T, E) in float32.

    ``linear``: W_r x (+ optional training noise, DIVE's NoisyTopkRouter).
    ``cmoe``:   act(W_gate^R x) * (W_up^R x) from each expert's representative neuron (CMoE eq. 8);
                ``abs_scores`` takes |.| as the released code does.
    """

    def __init__(
        self,
        hidden_size: int,
        n_experts: int,
        kind: Literal["linear", "cmoe"] = "linear",
        act: nn.Module | None = None,
        abs_scores: bool = False,
        noise: bool = False,
    ):
        super().__init__()
        if kind not in ("linear", "cmoe"):
            raise ValueError(f"Router kind must be 'linear' or 'cmoe', got '{kind}'.")
        self.kind, self.abs_scores, self.noise_scale = kind, abs_scores, 5e-4
        self.weight = nn.Parameter(torch.zeros(n_experts, hidden_size))  # linear: W_r; cmoe: W_gate^R
        self.up_weight = nn.Parameter(torch.zeros(n_experts, hidden_size)) if kind == "cmoe" else None
        self.noise_weight = nn.Parameter(torch.zeros(n_experts, hidden_size)) if noise else None
        self.act_fn = act if act is not None else nn.SiLU()

    def forward(self, x):  # (T, H) -> (T, E) float32
        xf = x.float()
        scores = F.linear(xf, self.weight.float())
        if self.kind == "cmoe":
            scores = self.act_fn(scores) * F.linear(xf, self.up_weight.float())
            if self.abs_scores:
                scores = scores.abs()
        if self.noise_weight is not None and self.training:
            noise_std = F.softplus(F.linear(xf, self.noise_weight.float())) * self.noise_scale
            scores = scores + torch.randn_like(scores) * noise_std
        return scores


class MoEMLP(nn.Module):
    """Shared expert + stacked routed experts + router + routing policy (see module docstring)."""

    def __init__(
        self,
        hidden_size: int,
        expert_sizes: list[int],
        shared_size: int,
        act: nn.Module,
        router: Router,
        policy: RoutingPolicy = RoutingPolicy(),
        gate_mode: GateMode = "cmoe",
        expert_bias: bool = False,
        act_name: str = "silu",
        shared_gate: bool = False,
    ):
        super().__init__()
        n_experts, width = len(expert_sizes), max(expert_sizes)
        if n_experts < 1 or min(expert_sizes) < 1:
            raise ValueError(f"Need at least one routed expert of width >= 1, got sizes {expert_sizes}.")
        if gate_mode not in ("cmoe", "prob", "renorm"):
            raise ValueError(f"gate_mode must be cmoe, prob or renorm, got '{gate_mode}'.")
        self.hidden_size, self.expert_sizes, self.act_name = hidden_size, list(expert_sizes), act_name
        self.shared_expert = GatedMLP(hidden_size, shared_size, act) if shared_size > 0 else None
        # Qwen2-MoE's sigmoid gate on the shared expert (the native form); None: the shared expert is ungated
        self.shared_gate = nn.Linear(hidden_size, 1, bias=False) if shared_gate and shared_size > 0 else None
        self.gate_up_proj = nn.Parameter(torch.zeros(n_experts, 2 * width, hidden_size))  # (E, 2I, H)
        self.down_proj = nn.Parameter(torch.zeros(n_experts, hidden_size, width))  # (E, H, I)
        self.expert_bias = nn.Parameter(torch.zeros(n_experts, hidden_size)) if expert_bias else None
        self.router, self.act_fn, self.gate_mode = router, act, gate_mode
        self.gate_scale = nn.Parameter(torch.zeros(n_experts))  # CMoE's u, eq. 9
        self.register_buffer("selection_bias", torch.zeros(n_experts))  # CMoE's b, selection only
        self.register_buffer("load_counts", torch.zeros(n_experts), persistent=False)
        self.policy, self.temperature, self.balance_gamma = policy, 1.0, 0.0
        self.track_load, self.tokens_seen, self.slots_used = False, 0, 0
        self._decode_weights: _DecodeWeights | None = None  # built on the first CPU decode step
        self.set_policy(policy)

    def __getstate__(self):  # deepcopy and pickle leave the decode cache behind; the copy rebuilds its own
        return self.__dict__ | {"_decode_weights": None}

    @property
    def n_experts(self) -> int:
        return len(self.expert_sizes)

    @property
    def shared_size(self) -> int:
        return 0 if self.shared_expert is None else self.shared_expert.gate_proj.out_features

    def shared(self, x2):
        """The shared expert's output (T, H), behind its sigmoid gate when it has one; zeros without one."""
        if self.shared_expert is None:
            return torch.zeros_like(x2)
        out = self.shared_expert(x2)
        if self.shared_gate is not None:
            out = out * torch.sigmoid(self.shared_gate(x2))
        return out

    def set_policy(self, policy: RoutingPolicy) -> None:
        if policy.mode == "topk" and policy.k > self.n_experts:
            raise ValueError(
                f"top-{policy.k} needs at least {policy.k} routed experts; this layer has {self.n_experts}."
            )
        self.policy = policy

    # ------------------------------------------------------------------ routing
    def route(self, x):
        """x (T, H) -> (idx (T, K) long, gates (T, K) float32, probs (T, E) float32).

        Unselected slots (dynamic policy, fewer than K experts for a token) have idx -1 and gate 0.
        """
        scores = self.router(x)  # (T, E) float32
        if self.temperature != 1.0:  # skipped at 1: a scalar op costs as much as the softmax on a decode step
            scores = scores / self.temperature
        probs = torch.softmax(scores, dim=-1)
        ranking = probs + self.selection_bias
        if self.policy.mode == "topk":
            idx = ranking.topk(self.policy.k, dim=-1).indices  # (T, K)
            chosen = probs.gather(1, idx)
        else:
            idx, chosen = self._dynamic_selection(probs, ranking)
        gates = self._gates(chosen, idx)
        return idx, gates, probs

    def _dynamic_selection(self, probs, ranking):
        cap = min(self.policy.max_k or self.n_experts, self.n_experts)
        idx = ranking.topk(cap, dim=-1).indices  # (T, cap), best first
        p_sorted = probs.gather(1, idx)
        before = p_sorted.cumsum(-1) - p_sorted  # mass of the better experts
        keep = before < self.policy.threshold  # smallest prefix reaching the threshold; slot 0 always kept
        k_needed = int(keep.sum(-1).max())
        idx, p_sorted, keep = idx[:, :k_needed], p_sorted[:, :k_needed], keep[:, :k_needed]
        return idx.masked_fill(~keep, -1), p_sorted * keep

    def _gates(self, chosen, idx):  # chosen: (T, K) probabilities of the selected experts, 0 where unused
        if self.gate_mode == "cmoe":
            u = self.gate_scale.float()
            if self.policy.mode == "topk":  # every slot is used: no mask, three kernels fewer per step
                return 1.0 + chosen * u[idx]
            return (1.0 + chosen * u[idx.clamp(min=0)]) * (idx >= 0)
        if self.gate_mode == "renorm":
            return chosen / chosen.sum(-1, keepdim=True).clamp(min=1e-20)
        return chosen

    # ------------------------------------------------------------------ forward
    def forward(self, x):
        """x (..., H) -> (..., H), equal to ``forward_reference`` up to float rounding.

        Without autograd: a CPU float32 decode step (a few tokens) takes :meth:`_decode`; other small CPU
        batches run the routed experts as a host loop over views of the chosen experts; larger ones (prefill;
        CUDA) as grouped matmuls. With autograd (training): the differentiable per-expert loop.
        """
        if torch.compiler.is_compiling():  # routing is data-dependent: the block runs eagerly inside a graph
            return _eager_forward(self, x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (T, H)
        if not torch.is_grad_enabled() and (w := self._decode_plan(x2)) is not None:
            return self._decode(w, x2).reshape(shape)
        idx, gates, _ = self.route(x2)
        self._after_routing(idx)
        out = self.shared(x2)
        if torch.is_grad_enabled():  # training and gradient checks: the differentiable loop
            out = self._routed(x2, idx, gates, out)
        elif idx.numel() <= HOST_LOOP_MAX_PAIRS and x2.device.type == "cpu":  # decode
            self._routed_few(x2, idx, gates, out)
        elif self._grouped_mm_ok(x2):  # prefill
            self._routed_grouped(x2, idx, gates, out)
        else:
            out = self._routed(x2, idx, gates, out)
        return out.reshape(shape)

    def _routed(self, x2, idx, gates, out):
        """Group (token, slot) pairs by expert; one matmul pair per expert hit; no loop over tokens."""
        n_slots = idx.shape[1]
        flat_e = idx.reshape(-1)
        order = flat_e.argsort(stable=True)
        counts = torch.bincount(flat_e.clamp(min=0)[flat_e >= 0], minlength=self.n_experts).tolist()
        start = int((flat_e < 0).sum())  # unused slots (-1) sort first
        flat_gate = gates.reshape(-1).to(x2.dtype)
        for e, count in enumerate(counts):
            if count == 0:
                continue
            pairs = order[start : start + count]
            start += count
            tokens = pairs // n_slots
            y = self._expert(e, x2[tokens]) * flat_gate[pairs].unsqueeze(-1)
            out = out.index_add(0, tokens, y)
        return out

    def _routed_few(self, x2, idx, gates, out):
        """Decode, in place: a host loop over the few (token, slot) pairs.

        Each expert is a view of the stacked weights (no copy: only the chosen experts' bytes are read) and
        the gate rides on ``add_``'s alpha (no separate multiply). CPU only: reading idx on the host is free
        there, a device sync on CUDA.
        """
        for t, (experts, weights) in enumerate(zip(idx.tolist(), gates.tolist(), strict=True)):
            for e, g in zip(experts, weights, strict=True):
                if e >= 0:
                    out[t : t + 1].add_(self._expert(e, x2[t : t + 1]), alpha=g)

    def _grouped_mm_ok(self, x2) -> bool:
        """torch's grouped matmul runs here: kernel present for the device/dtype, rows 16-byte aligned."""
        size = x2.element_size()
        aligned = (self.hidden_size * size) % 16 == 0 and (self.down_proj.shape[-1] * size) % 16 == 0
        return aligned and grouped_mm_available(x2.device.type, x2.dtype)

    def _routed_grouped(self, x2, idx, gates, out):
        """Prefill, in place: sort (token, slot) pairs by expert, two grouped matmuls over the stacked weights
        (transformers 5's ``grouped_mm`` experts), then index_add_ the rows back to their tokens.

        Gates scale the (N, I) hidden before down_proj: fewer multiplies than scaling the (N, H) output when I < H.
        """
        flat_e = idx.reshape(-1)  # (T*K,)
        order = flat_e.argsort(stable=True)  # unused slots (-1) first
        counts = torch.bincount(flat_e + 1, minlength=self.n_experts + 1)  # (E + 1,) bin 0 = unused
        if self.policy.mode != "topk":  # top-k has no unused slots: skip the host sync
            order = order[int(counts[0]) :]
        offsets = counts[1:].cumsum(0).to(torch.int32)  # (E,) end of each expert's rows
        tokens = order // idx.shape[1]  # (N,)
        xs = x2.index_select(0, tokens)  # (N, H)
        h = F.grouped_mm(xs, self.gate_up_proj.transpose(1, 2), offs=offsets)  # (N, 2I)
        gate, up = h.chunk(2, dim=-1)
        g = gates.reshape(-1)[order].unsqueeze(-1).to(x2.dtype)  # (N, 1)
        y = F.grouped_mm(self.act_fn(gate) * up * g, self.down_proj.transpose(1, 2), offs=offsets)  # (N, H)
        if self.expert_bias is not None:
            y = y + self.expert_bias[flat_e[order]] * g
        out.index_add_(0, tokens, y)

    def _expert(self, e: int, x):  # (n, H) -> (n, H)
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        y = F.linear(self.act_fn(gate) * up, self.down_proj[e])
        return y if self.expert_bias is None else y + self.expert_bias[e]

    def forward_reference(self, x):
        """Every expert on every token, combined with a dense (T, E) gate matrix: slow, obviously right."""
        x2 = x.reshape(-1, x.shape[-1])
        idx, gates, _ = self.route(x2)
        dense_gates = torch.zeros(x2.shape[0], self.n_experts + 1, dtype=torch.float32, device=x.device)
        dense_gates.scatter_add_(1, idx.clamp(min=-1) % (self.n_experts + 1), gates)
        out = self.shared(x2)
        for e in range(self.n_experts):
            out = out + self._expert(e, x2) * dense_gates[:, e : e + 1].to(x2.dtype)
        return out.reshape(x.shape)

    # ------------------------------------------------------------------ CPU decode
    def _decode_plan(self, x2) -> _DecodeWeights | None:
        """The fused weights when this step can take :meth:`_decode`: CPU float32 inference, at most
        DECODE_MAX_PAIRS (token, expert) pairs, plain Linears (not LoRA-wrapped) and one activation."""
        if self.training or not x2.is_cpu or x2.dtype is not torch.float32:
            return None
        policy = self.policy
        if x2.shape[0] * (policy.k if policy.mode == "topk" else 1) > DECODE_MAX_PAIRS:
            return None
        w = self._decode_weights
        if w is None or w.key != _DecodeWeights.key_of(self):
            w = self._decode_weights = _DecodeWeights(self)
        return w if w.fusable else None

    def _decode(self, w: _DecodeWeights, x2):
        """One decode step in 4 + 5 k compute kernels: 19 aten dispatches in all at k = 1, 29 at k = 3, against
        32 and 52 for the host loop it replaced (counted in tests/test_moe_fast.py).

        The shared expert's gate and up rows and the router's rows are one matrix (the parameters are views
        of it, see :class:`_DecodeWeights`), so a single matmul gives the shared activations and the router
        scores; routing runs on the host on E floats per token (:meth:`route`'s rule, in float64); each
        chosen expert is two matmuls on views of its rows and one ``addmm_`` that carries its gate.
        SmolLM2-135M's 30 MLPs, one token, 2 threads, block calls: 7.3 -> 5.3 ms at S1A1E8, 15.2 -> 12.4 ms
        at S3A3E8 (dense 13.1 ms).
        Views, not a gather: index_select of the chosen experts' rows plus one bmm copies them first (3 of 5
        experts, 30 layers: 15.3 ms gathered vs 6.4 ms as views), and a decode step is memory-bound.
        """
        act, scores = self._decode_front(w, x2)
        return self._decode_experts(w, x2, act, self._route_host(scores))

    def _decode_front(self, w: _DecodeWeights, x2):
        """(shared activations (T, S) or None, router scores: T lists of E floats)."""
        h = torch.mm(x2, w.fused_t)  # (T, 2 G + L)
        if w.n_gate == 0:  # no shared expert, linear router
            return None, h.tolist()
        gate, up, tail = h.split([w.n_gate, w.n_gate, w.n_linear + w.n_shared_gate], dim=1)
        a = w.act(gate).mul_(up)  # (T, G): [shared activations | cmoe router scores]
        if w.n_shared_gate:  # the shared gate's logit is the last fused row: gate the shared activations
            a[:, : w.n_shared].mul_(torch.sigmoid(tail[:, -1:]))
            tail = tail[:, :-1]
        scores = tail if w.n_linear else a[:, w.n_shared :]
        return (a[:, : w.n_shared] if w.n_shared else None), scores.tolist()

    def _route_host(self, scores: list[list[float]]) -> list[list[tuple[int, float]]]:
        """Per token [(expert, gate), ...]: :meth:`route`'s rule on the host (ties go to the lower index).

        Buffers are read through ``_buffers``/``_parameters``: Module.__getattr__ costs a microsecond a call.
        """
        bias, policy, n = self._buffers["selection_bias"].tolist(), self.policy, len(self.expert_sizes)
        u = self._parameters["gate_scale"].tolist() if self.gate_mode == "cmoe" else None
        absolute, temperature = self._decode_weights.abs_scores, self.temperature
        choices, counts = [], [0] * n
        for row in scores:
            if absolute:
                row = [abs(v) for v in row]
            if temperature != 1.0:
                row = [v / temperature for v in row]
            top = max(row)
            ex = [math.exp(v - top) for v in row]
            z = sum(ex)
            p = [v / z for v in ex]
            order = sorted(range(n), key=lambda e: p[e] + bias[e], reverse=True)  # stable: lower index first
            if policy.mode == "topk":
                chosen = order[: policy.k]
            else:  # the smallest prefix whose summed probability reaches the threshold
                chosen, mass = [], 0.0
                for e in order[: min(policy.max_k or n, n)]:
                    if mass >= policy.threshold:
                        break
                    chosen.append(e)
                    mass += p[e]
            if self.gate_mode == "cmoe":
                gates = [1.0 + p[e] * u[e] for e in chosen]
            elif self.gate_mode == "renorm":
                total = max(sum(p[e] for e in chosen), 1e-20)
                gates = [p[e] / total for e in chosen]
            else:
                gates = [p[e] for e in chosen]
            choices.append(list(zip(chosen, gates, strict=True)))
            for e in chosen:
                counts[e] += 1
        if self.track_load:
            self.load_counts += torch.tensor(counts, dtype=self.load_counts.dtype)
            self.tokens_seen += len(scores)
            self.slots_used += sum(counts)
        return choices

    def _decode_experts(self, w: _DecodeWeights, x2, act, choices):
        """Shared down projection, then each chosen expert added in place with its gate as addmm's alpha."""
        out = torch.mm(act, w.shared_down_t) if act is not None else x2.new_zeros(x2.shape)
        single = len(choices) == 1
        for t, chosen in enumerate(choices):
            xt, ot = (x2, out) if single else (x2[t : t + 1], out[t : t + 1])
            for e, g in chosen:
                a = w.act(torch.mm(xt, w.gate_t[e])).mul_(torch.mm(xt, w.up_t[e]))  # (1, I_e)
                ot.addmm_(a, w.down_t[e], alpha=g)
                if w.bias is not None:
                    ot.add_(w.bias[e], alpha=g)
        return out

    # ------------------------------------------------------------------ load statistics and balancing
    def _after_routing(self, idx):
        if not (self.track_load or (self.training and self.balance_gamma > 0)):
            return
        with torch.no_grad():
            used = idx[idx >= 0]
            counts = torch.bincount(used, minlength=self.n_experts).float()
            if self.track_load:
                self.load_counts += counts
                self.tokens_seen += idx.shape[0]
                self.slots_used += int(used.numel())
            if self.training and self.balance_gamma > 0:
                # CMoE / DeepSeek-V3 aux-loss-free balancing: overloaded experts lose selection bias.
                self.selection_bias -= self.balance_gamma * torch.sign(counts - counts.mean())

    def reset_load(self) -> None:
        self.load_counts.zero_()
        self.tokens_seen = self.slots_used = 0

    def mean_active_experts(self) -> float:
        """Average routed experts per token: measured if load was tracked, else the policy's k."""
        if self.tokens_seen:
            return self.slots_used / self.tokens_seen
        return float(self.policy.k if self.policy.mode == "topk" else self.n_experts)

    # ------------------------------------------------------------------ accounting and serialisation
    def param_counts(self, mean_active: float | None = None) -> dict:
        """Total and per-token active parameters of this block (padding excluded)."""
        h = self.hidden_size
        k = self.mean_active_experts() if mean_active is None else mean_active
        mean_size = sum(self.expert_sizes) / self.n_experts
        router = sum(p.numel() for p in self.router.parameters() if p is not self.router.noise_weight)
        router += 0 if self.shared_gate is None else self.shared_gate.weight.numel()
        shared, routed = 3 * h * self.shared_size, 3 * h * sum(self.expert_sizes)
        return {
            "total": shared + routed + router,
            "active": shared + 3 * h * mean_size * k + router,
            "shared": shared,
            "routed": routed,
            "router": router,
        }

    def spec(self) -> dict:
        """Everything needed to rebuild an empty block of the same shape (weights come separately)."""
        r = self.router
        return {
            "hidden_size": self.hidden_size,
            "expert_sizes": self.expert_sizes,
            "shared_size": self.shared_size,
            "act_name": self.act_name,
            "gate_mode": self.gate_mode,
            "expert_bias": self.expert_bias is not None,
            "shared_gate": self.shared_gate is not None,
            "policy": asdict(self.policy),
            "temperature": self.temperature,
            "router": {"kind": r.kind, "abs_scores": r.abs_scores, "noise": r.noise_weight is not None},
        }

    @classmethod
    def from_spec(cls, spec: dict) -> MoEMLP:
        from transformers.activations import ACT2FN

        act = ACT2FN[spec["act_name"]]
        rs = spec["router"]
        router = Router(
            spec["hidden_size"], len(spec["expert_sizes"]), rs["kind"], act, rs["abs_scores"], rs["noise"]
        )
        block = cls(
            spec["hidden_size"],
            spec["expert_sizes"],
            spec["shared_size"],
            act,
            router,
            RoutingPolicy(**spec["policy"]),
            spec["gate_mode"],
            spec["expert_bias"],
            spec["act_name"],
            spec.get("shared_gate", False),
        )
        block.temperature = spec.get("temperature", 1.0)
        return block

    @classmethod
    @torch.no_grad()
    def from_dense(
        cls,
        w_gate,
        w_up,
        w_down,
        act_name: str,
        shared_idx,
        expert_idx: list,
        router: Router,
        policy: RoutingPolicy = RoutingPolicy(),
        gate_mode: GateMode = "cmoe",
        expert_bias=None,
    ) -> MoEMLP:
        """Cut a dense gated MLP into experts by neuron indices.

        w_gate, w_up (I, H); w_down (H, I); shared_idx (S,) long (may be empty); expert_idx: E index
        tensors (experts may overlap, as DIVE's pruned copies do); expert_bias (E, H) or None;
        act_name: a transformers ACT2FN key (the model config's hidden_act).
        """
        from transformers.activations import ACT2FN

        act, hidden = ACT2FN[act_name], w_gate.shape[1]
        sizes = [int(ix.numel()) for ix in expert_idx]
        block = cls(
            hidden,
            sizes,
            int(shared_idx.numel()),
            act,
            router,
            policy,
            gate_mode,
            expert_bias is not None,
            act_name,
        ).to(device=w_gate.device, dtype=w_gate.dtype)
        if block.shared_expert is not None:
            block.shared_expert.gate_proj.weight.copy_(w_gate[shared_idx])
            block.shared_expert.up_proj.weight.copy_(w_up[shared_idx])
            block.shared_expert.down_proj.weight.copy_(w_down[:, shared_idx])
        width = max(sizes)
        for e, ix in enumerate(expert_idx):
            n = ix.numel()
            block.gate_up_proj[e, :n] = w_gate[ix]
            block.gate_up_proj[e, width : width + n] = w_up[ix]
            block.down_proj[e, :, :n] = w_down[:, ix]
        if expert_bias is not None:
            block.expert_bias.copy_(expert_bias)
        return block.eval()

    @torch.no_grad()
    def add_shared_gate(self) -> None:
        """Put the shared expert behind a sigmoid gate (Qwen2-MoE's) without changing the output: the zero gate
        weight gives sigmoid(0) = 0.5 and the shared down projection doubles. No-op without a shared expert."""
        if self.shared_expert is None or self.shared_gate is not None:
            return
        down = self.shared_expert.down_proj.weight
        self.shared_gate = nn.Linear(self.hidden_size, 1, bias=False).to(device=down.device, dtype=down.dtype)
        self.shared_gate.weight.zero_()
        down.mul_(2.0)


@torch.compiler.disable
def _eager_forward(block: MoEMLP, x):
    """MoEMLP.forward outside torch.compile's graph (a graph break per block): the grouped_mm probe and the
    host routing do not trace. Measured on SmolLM2-135M, CPU: compiling the dense model cuts its decode step
    31.3 -> 25.1 ms, but S1A1E8 with these breaks goes 23.9 -> 30.4 ms, so eager is the default everywhere."""
    return block.forward(x)


class _DecodeWeights:
    """The weights of :meth:`MoEMLP._decode`, arranged so a decode step needs few kernels.

    ``fused`` (2 G + L, H) stacks [shared gate rows; cmoe router gate rows] (G rows), the matching up rows
    (G rows), then a linear router's rows (L). The block's parameters are re-pointed at slices of it
    (``param.data = fused[rows]``), so the fusion costs no memory and in-place updates (optimiser steps,
    ``load_state_dict``) reach it; when a parameter or submodule is replaced instead (``.to()``, a new
    tensor, a LoRA wrapper), :meth:`key_of` no longer matches and the block builds a new one. Expert views
    are narrowed to each expert's true width (zero padding skipped).
    """

    def __init__(self, block: MoEMLP):
        self.key = self.key_of(block)
        s, r = block.shared_expert, block.router
        linears = [s.gate_proj, s.up_proj, s.down_proj] if s is not None else []
        linears += [block.shared_gate] if block.shared_gate is not None else []
        acts = ([r.act_fn] if r.kind == "cmoe" else []) + ([s.act_fn] if s is not None else [])
        self.fusable = (
            all(type(m) is nn.Linear and m.weight.dtype is torch.float32 for m in linears)
            and all(type(a) is type(block.act_fn) for a in acts)  # one activation over the fused rows
            and block.gate_up_proj.dtype is torch.float32
            and r.weight.dtype is torch.float32
        )
        if not self.fusable:
            return
        gates = ([s.gate_proj.weight] if s is not None else []) + ([r.weight] if r.kind == "cmoe" else [])
        ups = ([s.up_proj.weight] if s is not None else []) + ([r.up_weight] if r.kind == "cmoe" else [])
        tail = [r.weight] if r.kind == "linear" else []
        tail += [block.shared_gate.weight] if block.shared_gate is not None else []
        params = gates + ups + tail
        inference = any(p.is_inference() for p in params)  # a block built under inference_mode stays so
        # inference_mode(False) turns grad mode back on, so no_grad goes inside it (views without grad_fn)
        with torch.inference_mode(inference), torch.no_grad():  # else normal tensors: training may follow
            fused = torch.cat([p.detach() for p in params])
            row = 0
            for p in params:
                p.data = fused[row : row + p.shape[0]]
                row += p.shape[0]
            self.fused_t = fused.t()  # (H, 2 G + L)
            self.n_shared, self.n_gate = block.shared_size, sum(p.shape[0] for p in gates)
            self.n_shared_gate = 1 if block.shared_gate is not None else 0
            self.n_linear = sum(p.shape[0] for p in tail) - self.n_shared_gate
            self.shared_down_t = s.down_proj.weight.t() if s is not None else None  # (S, H)
            width, sizes = block.down_proj.shape[-1], block.expert_sizes
            self.gate_t = [block.gate_up_proj[e, :n].t() for e, n in enumerate(sizes)]  # (H, I_e)
            self.up_t = [block.gate_up_proj[e, width : width + n].t() for e, n in enumerate(sizes)]
            self.down_t = [block.down_proj[e, :, :n].t() for e, n in enumerate(sizes)]  # (I_e, H)
            self.bias = list(block.expert_bias) if block.expert_bias is not None else None
        # the activation, in place where it can be (on fresh matmul outputs), skipping Module.__call__
        silu = isinstance(block.act_fn, nn.SiLU) or block.act_name == "silu"
        self.act = functools.partial(F.silu, inplace=True) if silu else block.act_fn.forward
        self.abs_scores = r.kind == "cmoe" and r.abs_scores
        self.key = self.key_of(block)  # the re-pointed parameters

    @staticmethod
    def key_of(block: MoEMLP) -> tuple:
        """Submodule identities and parameter data pointers: equal while this object stays valid."""
        s, r = block._modules.get("shared_expert"), block._modules["router"]
        tensors = [block._parameters["gate_up_proj"], block._parameters["down_proj"]]
        tensors += [
            block._parameters.get("expert_bias"),
            r._parameters["weight"],
            r._parameters.get("up_weight"),
        ]
        key = [s, r, block._modules.get("shared_gate")]
        if s is not None:
            linears = [s._modules["gate_proj"], s._modules["up_proj"], s._modules["down_proj"]]
            linears += [g] if (g := block._modules.get("shared_gate")) is not None else []
            key += linears
            tensors += [m._parameters.get("weight") for m in linears]
        return (*key, *(t.data_ptr() if t is not None else 0 for t in tensors))
