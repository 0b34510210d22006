"""MoEMLP's fast execution paths and its CPU decode cache; ``moe.py`` holds the block, its routing rule
(``MoEMLP.route``) and the obviously-right ``MoEMLP.forward_reference`` that every path here is tested against
(tests/test_moe_fast.py).

- :func:`routed_few`: a handful of (token, expert) pairs as a host loop over views of the chosen experts.
- :func:`routed_grouped`: prefill, CUDA: two ``grouped_mm`` calls over the stacked experts.
- :func:`decode`: a CPU float32 decode step in a few fused kernels, routed on the host by
  :func:`route_host` (the same rule as ``MoEMLP.route``, on E floats per token: kernel launches cost more
  than the arithmetic there), over weights arranged once by :class:`DecodeWeights`.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .moe import MoEMLP

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


def routed_few(block: MoEMLP, x2, idx, gates, out):
    """Decode, in place: a host loop over the few (token, slot) pairs.

    Each expert is a view of the stacked weights (no copy: only the chosen experts' bytes are read) and
    the gate rides on ``add_``'s alpha (no separate multiply). CPU only: reading idx on the host is free
    there, a device sync on CUDA.
    """
    for t, (experts, weights) in enumerate(zip(idx.tolist(), gates.tolist(), strict=True)):
        for e, g in zip(experts, weights, strict=True):
            if e >= 0:
                out[t : t + 1].add_(block._expert(e, x2[t : t + 1]), alpha=g)


def grouped_mm_ok(block: MoEMLP, x2) -> bool:
    """torch's grouped matmul runs here: kernel present for the device/dtype, rows 16-byte aligned."""
    size = x2.element_size()
    aligned = (block.hidden_size * size) % 16 == 0 and (block.down_proj.shape[-1] * size) % 16 == 0
    return aligned and grouped_mm_available(x2.device.type, x2.dtype)


def routed_grouped(block: MoEMLP, x2, idx, gates, out):
    """Prefill, in place: sort (token, slot) pairs by expert, two grouped matmuls over the stacked weights
    (transformers 5's ``grouped_mm`` experts), then index_add_ the rows back to their tokens.

    Gates scale the (N, I) hidden before down_proj: fewer multiplies than scaling the (N, H) output when I < H.
    """
    flat_e = idx.reshape(-1)  # (T*K,)
    order = flat_e.argsort(stable=True)  # unused slots (-1) first
    counts = torch.bincount(flat_e + 1, minlength=block.n_experts + 1)  # (E + 1,) bin 0 = unused
    if block.policy.mode != "topk":  # top-k has no unused slots: skip the host sync
        order = order[int(counts[0]) :]
    offsets = counts[1:].cumsum(0).to(torch.int32)  # (E,) end of each expert's rows
    tokens = order // idx.shape[1]  # (N,)
    xs = x2.index_select(0, tokens)  # (N, H)
    h = F.grouped_mm(xs, block.gate_up_proj.transpose(1, 2), offs=offsets)  # (N, 2I)
    gate, up = h.chunk(2, dim=-1)
    g = gates.reshape(-1)[order].unsqueeze(-1).to(x2.dtype)  # (N, 1)
    y = F.grouped_mm(block.act_fn(gate) * up * g, block.down_proj.transpose(1, 2), offs=offsets)  # (N, H)
    if block.expert_bias is not None:
        y = y + block.expert_bias[flat_e[order]] * g
    out.index_add_(0, tokens, y)


def decode_plan(block: MoEMLP, x2) -> DecodeWeights | None:
    """The fused weights when this step can take :func:`decode`: CPU float32 inference, at most
    DECODE_MAX_PAIRS (token, expert) pairs, plain Linears (not LoRA-wrapped) and one activation."""
    if block.training or not x2.is_cpu or x2.dtype is not torch.float32:
        return None
    policy = block.policy
    if x2.shape[0] * (policy.k if policy.mode == "topk" else 1) > DECODE_MAX_PAIRS:
        return None
    w = block._decode_weights
    if w is None or w.key != DecodeWeights.key_of(block):
        w = block._decode_weights = DecodeWeights(block)
    return w if w.fusable else None


def decode(block: MoEMLP, w: DecodeWeights, x2):
    """One decode step in 4 + 5 k compute kernels: 19 aten dispatches in all at k = 1, 29 at k = 3, against
    32 and 52 for the host loop it replaced (counted in tests/test_moe_fast.py).

    The shared expert's gate and up rows and the router's rows are one matrix (the parameters are views
    of it, see :class:`DecodeWeights`), so a single matmul gives the shared activations and the router
    scores; routing runs on the host on E floats per token (``MoEMLP.route``'s rule, in float64); each
    chosen expert is two matmuls on views of its rows and one ``addmm_`` that carries its gate.
    SmolLM2-135M's 30 MLPs, one token, 2 threads, block calls: 7.3 -> 5.3 ms at S1A1E8, 15.2 -> 12.4 ms
    at S3A3E8 (dense 13.1 ms).
    Views, not a gather: index_select of the chosen experts' rows plus one bmm copies them first (3 of 5
    experts, 30 layers: 15.3 ms gathered vs 6.4 ms as views), and a decode step is memory-bound.
    """
    act, scores = decode_front(block, w, x2)
    return decode_experts(block, w, x2, act, route_host(block, scores))


def decode_front(block: MoEMLP, w: DecodeWeights, x2):
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


def route_host(block: MoEMLP, scores: list[list[float]]) -> list[list[tuple[int, float]]]:
    """Per token [(expert, gate), ...]: ``MoEMLP.route``'s rule on the host (ties go to the lower index).

    Buffers are read through ``_buffers``/``_parameters``: Module.__getattr__ costs a microsecond a call.
    """
    bias, policy, n = block._buffers["selection_bias"].tolist(), block.policy, len(block.expert_sizes)
    u = block._parameters["gate_scale"].tolist() if block.gate_mode == "cmoe" else None
    absolute, temperature = block._decode_weights.abs_scores, block.temperature
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
        if block.gate_mode == "cmoe":
            gates = [1.0 + p[e] * u[e] for e in chosen]
        elif block.gate_mode == "renorm":
            total = max(sum(p[e] for e in chosen), 1e-20)
            gates = [p[e] / total for e in chosen]
        else:
            gates = [p[e] for e in chosen]
        choices.append(list(zip(chosen, gates, strict=True)))
        for e in chosen:
            counts[e] += 1
    if block.track_load:
        block.load_counts += torch.tensor(counts, dtype=block.load_counts.dtype)
        block.tokens_seen += len(scores)
        block.slots_used += sum(counts)
    return choices


def decode_experts(block: MoEMLP, w: DecodeWeights, x2, act, choices):
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


class DecodeWeights:
    """The weights of :func:`decode`, arranged so a decode step needs few kernels.

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
