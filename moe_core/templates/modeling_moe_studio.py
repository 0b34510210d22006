"""MoE Studio exact export: a stock transformers model whose listed MLPs are Mixture-of-Experts blocks.

Written by moe_core.export (MoE Studio); self-contained: it imports only torch and transformers, never
moe_core. Load it with ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``.

config.json keeps the source family's config, plus ``moe_layers`` {layer index: block spec} and
``moe_studio_base`` (the family's class, and where it keeps its decoder layers and their MLP: ``layers``, e.g.
model.layers or model.language_model.layers, and ``mlp``, e.g. mlp or feed_forward). Each listed layer's MLP
becomes a MoEBlock with exactly MoE Studio's maths:

    y = shared(x) + sum_{e in S(x)} g_e(x) * (W_down^e (act(W_gate^e x) * W_up^e x) + b^e)

- router scores s (T, E) in float32: linear W_r x, or CMoE's act(W_g^R x) * (W_u^R x) (optionally |.|);
- p = softmax(s / temperature); S(x): top-k of p + selection_bias, or dynamic (smallest set whose summed
  p reaches a threshold, at most max_k);
- gates g: "cmoe" 1 + p * u, "prob" p, "renorm" p / sum_S p.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.llama.configuration_llama import LlamaConfig as BaseConfig  # moe-studio
from transformers.models.llama.modeling_llama import LlamaForCausalLM as BaseForCausalLM  # moe-studio


class MoEStudioConfig(BaseConfig):
    """The source family's config plus ``moe_layers`` ({"i": spec}) and ``moe_studio`` (provenance)."""

    model_type = "moe_studio"


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act: nn.Module):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = act

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    def __init__(self, hidden_size: int, n_experts: int, spec: dict, act: nn.Module):
        super().__init__()
        self.kind, self.abs_scores, self.act_fn = spec["kind"], spec["abs_scores"], act
        self.weight = nn.Parameter(torch.zeros(n_experts, hidden_size))
        self.up_weight = nn.Parameter(torch.zeros(n_experts, hidden_size)) if self.kind == "cmoe" else None
        # training-time noise of DIVE's router: kept so the weights load, unused at inference
        self.noise_weight = nn.Parameter(torch.zeros(n_experts, hidden_size)) if spec["noise"] else None

    def forward(self, x):  # (T, H) -> (T, E) float32
        xf = x.float()
        scores = F.linear(xf, self.weight.float())
        if self.kind == "cmoe":
            scores = self.act_fn(scores) * F.linear(xf, self.up_weight.float())
            if self.abs_scores:
                scores = scores.abs()
        return scores


class MoEBlock(nn.Module):
    """Shared expert + stacked routed experts (E, 2I, H) / (E, H, I) + router + routing policy."""

    def __init__(self, spec: dict):
        super().__init__()
        act = ACT2FN[spec["act_name"]]
        hidden, sizes = spec["hidden_size"], spec["expert_sizes"]
        n_experts, width = len(sizes), max(sizes)
        self.n_experts, self.act_fn, self.gate_mode = n_experts, act, spec["gate_mode"]
        self.policy, self.temperature = spec["policy"], float(spec.get("temperature", 1.0))
        shared = spec["shared_size"]
        self.shared_expert = GatedMLP(hidden, shared, act) if shared > 0 else None
        gated = spec.get("shared_gate", False) and shared > 0  # Qwen2-MoE's sigmoid gate on the shared expert
        self.shared_gate = nn.Linear(hidden, 1, bias=False) if gated else None
        self.gate_up_proj = nn.Parameter(torch.zeros(n_experts, 2 * width, hidden))
        self.down_proj = nn.Parameter(torch.zeros(n_experts, hidden, width))
        self.expert_bias = nn.Parameter(torch.zeros(n_experts, hidden)) if spec["expert_bias"] else None
        self.router = Router(hidden, n_experts, spec["router"], act)
        self.gate_scale = nn.Parameter(torch.zeros(n_experts))
        self.register_buffer("selection_bias", torch.zeros(n_experts))

    def route(self, x):  # (T, H) -> idx (T, K) (-1 = unused slot), gates (T, K) float32
        probs = torch.softmax(self.router(x) / self.temperature, dim=-1)  # (T, E)
        ranking = probs + self.selection_bias
        if self.policy["mode"] == "topk":
            idx = ranking.topk(self.policy["k"], dim=-1).indices
            chosen = probs.gather(1, idx)
        else:
            cap = min(self.policy.get("max_k") or self.n_experts, self.n_experts)
            idx = ranking.topk(cap, dim=-1).indices
            chosen = probs.gather(1, idx)
            keep = (chosen.cumsum(-1) - chosen) < self.policy["threshold"]
            n = int(keep.sum(-1).max())
            idx, chosen, keep = idx[:, :n], chosen[:, :n], keep[:, :n]
            idx, chosen = idx.masked_fill(~keep, -1), chosen * keep
        if self.gate_mode == "cmoe":
            gates = (1.0 + chosen * self.gate_scale.float()[idx.clamp(min=0)]) * (idx >= 0)
        elif self.gate_mode == "renorm":
            gates = chosen / chosen.sum(-1, keepdim=True).clamp(min=1e-20)
        else:
            gates = chosen
        return idx, gates

    def expert(self, e: int, x):  # (n, H) -> (n, H)
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        y = F.linear(self.act_fn(gate) * up, self.down_proj[e])
        return y if self.expert_bias is None else y + self.expert_bias[e]

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (T, H)
        idx, gates = self.route(x2)
        out = self.shared_expert(x2) if self.shared_expert is not None else torch.zeros_like(x2)
        if self.shared_gate is not None:
            out = out * torch.sigmoid(self.shared_gate(x2))
        for e in idx[idx >= 0].unique().tolist():
            tokens, slots = torch.where(idx == e)
            y = self.expert(e, x2[tokens]) * gates[tokens, slots].unsqueeze(-1).to(x2.dtype)
            out = out.index_add(0, tokens, y)
        return out.reshape(shape)


class MoEStudioForCausalLM(BaseForCausalLM):
    """The source family's CausalLM with the MLPs listed in ``config.moe_layers`` replaced by MoEBlocks."""

    config_class = MoEStudioConfig

    @classmethod
    def is_custom_code(cls) -> bool:
        # This file is the family's own transformers class plus MoE blocks that _init_weights leaves alone: load
        # it as transformers loads that class. As "custom code" it would skip initialising modules that hold no
        # weights of their own, and so leave the family's non-persistent buffers (Falcon-H1's mup_vector) empty.
        return False

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() decides this from the class name: a recurrent family's own cache (xLSTM's) is the base's call
        own = getattr(BaseForCausalLM, "_supports_default_dynamic_cache", None)
        return True if own is None else own()

    def __init__(self, config):
        super().__init__(config)
        base = getattr(config, "moe_studio_base", None) or {}
        layers = self.get_submodule(base.get("layers", "model.layers"))
        for i, spec in (getattr(config, "moe_layers", None) or {}).items():
            setattr(layers[int(i)], base.get("mlp", "mlp"), MoEBlock(spec))
        self.post_init()
