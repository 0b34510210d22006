"""Map a converted model onto a stock transformers MoE class that needs no remote code: Qwen2-MoE.

``Qwen2MoeForCausalLM`` has plain Llama GQA attention, RMSNorm, one shared expert behind a sigmoid gate and
an arbitrary list of dense layers (``mlp_only_layers``); transformers and vLLM load it natively
(reference/ecosystem.md §A). What is exact here, and how:

- attention, norms, embeddings and dense layers: copied (Qwen2's real q/k/v biases kept, zero biases
  otherwise, because vLLM's module always has them); Phi-3's fused qkv / gate_up are split; Gemma's
  ``(1 + w)`` norms and ``sqrt(H)`` embedding scale are folded into the weights (embeddings untied);
- the ungated shared expert: gate weight 1e-20, so sigmoid(.) is exactly 0.5 in float32 and bfloat16, and
  shared down_proj x 2. Not 0: llama.cpp computes the sigmoid as silu(x)/x and gets 0/0. Not 1e-30 (used
  before): llama.cpp 0.3.36's CPU kernels then give NaN logits (measured on SmolLM2 CMoE; fine from 1e-28 up);
  at 1e-20 the gate input stays a normal float32 by 18 orders of magnitude and below the 1.2e-7 where the
  sigmoid would move off 0.5;
- experts and shared experts narrower than the common width: zero-padded (a zero neuron adds act(0)*0 = 0);
  the expert width is also padded to a multiple of 8, which transformers' grouped_mm kernel needs;
- routing: a linear router with per-expert constants folded into each expert's down_proj (export/routing.py
  decides the router weights, top-k and norm_topk_prob, exact or approximated).

Families whose attention is not Llama GQA are refused with the reason (`ExportError`).
"""

from __future__ import annotations

import torch

from ..moe import MoEMLP

WIDTH_ALIGN = 8  # expert width multiple: 16-byte rows in bf16 (grouped_mm refuses other strides)
SHARED_GATE = 1e-20  # sigmoid(1e-20 * x) == 0.5 exactly in float32 and bfloat16 (not in float16: underflow)

NATIVE_FAMILIES = ("llama", "mistral", "qwen2", "gemma", "phi3")
NOT_NATIVE = {
    "qwen3": "Qwen3 normalises queries and keys per head (QK-norm); Qwen2-MoE attention has no QK-norm",
    "olmo": "OLMo uses LayerNorm without weights and optional q/k/v clipping; Qwen2-MoE uses RMSNorm",
    "olmo2": "OLMo2 normalises after attention and the MLP and has QK-norm; Qwen2-MoE normalises before",
    "gemma2": "Gemma2 has logit soft-capping, extra norms and alternating sliding windows",
}


class ExportError(ValueError):
    """The model cannot be written in the requested format; the message says why and what to use instead."""


# ---------------------------------------------------------------------------------------------
# Which families fit


def native_problems(model, o_bias: list | None = None) -> list[str]:
    """Reasons the source architecture cannot be expressed as Qwen2-MoE (empty list: it can). o_bias: the
    layers' attention output biases when the model's own are not in memory (a streamed export reads them)."""
    cfg = model.config
    kind = cfg.model_type
    if kind in NOT_NATIVE:
        return [NOT_NATIVE[kind]]
    if kind not in NATIVE_FAMILIES:
        return [f"no Qwen2-MoE mapping is known for '{kind}' (known: {', '.join(NATIVE_FAMILIES)})"]
    problems = []
    if getattr(cfg, "mlp_bias", False):
        problems.append("the dense MLPs have biases (mlp_bias), which Qwen2-MoE MLPs do not")
    if o_bias is None:
        o_bias = [layer.self_attn.o_proj.bias for layer in model.model.layers]
    if any(b is not None and bool(b.abs().max() > 0) for b in o_bias):
        problems.append("the attention output projections have nonzero biases; Qwen2-MoE's o_proj has none")
    if float(cfg.rope_parameters.get("partial_rotary_factor", 1.0)) != 1.0:
        problems.append("RoPE covers only part of each head (partial_rotary_factor < 1)")
    return problems


def llamacpp_problems(model) -> list[str]:
    """Extra reasons llama.cpp's MoE graphs cannot run this model exactly (§A.5)."""
    problems = []
    rope = model.config.rope_parameters
    if rope.get("rope_type", "default") != "default":
        problems.append(
            f"the model uses '{rope['rope_type']}' RoPE scaling, and no llama.cpp MoE architecture with a "
            "shared expert applies rope scaling (they call ggml_rope_ext without rope_freqs)"
        )
    act = getattr(model.config, "hidden_act", "silu")
    if act != "silu":
        problems.append(f"its MLP activation is '{act}', but llama.cpp's qwen2moe graph hard-codes SiLU")
    if _layer_types(model.config) and "sliding_attention" in _layer_types(model.config):
        problems.append("it uses sliding-window attention, which llama.cpp's qwen2moe graph does not")
    return problems


def _layer_types(cfg) -> list[str]:
    """Per-layer attention kind of the source ('sliding_attention' or 'full_attention')."""
    n = cfg.num_hidden_layers
    if cfg.model_type == "qwen2":
        return list(cfg.layer_types)
    if cfg.model_type in ("mistral", "phi3") and getattr(cfg, "sliding_window", None):
        return ["sliding_attention"] * n
    return ["full_attention"] * n


# ---------------------------------------------------------------------------------------------
# Non-MLP weights


def _attention(layer, cfg) -> dict[str, torch.Tensor]:
    """q/k/v weights and biases (zeros when the source has none) and o_proj of one decoder layer."""
    attn = layer.self_attn
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if hasattr(attn, "qkv_proj"):  # Phi-3: one Linear, rows [q; k; v]
        sizes = [cfg.num_attention_heads * head_dim] + [cfg.num_key_value_heads * head_dim] * 2
        q, k, v = attn.qkv_proj.weight.split(sizes, dim=0)
        projs = {"q_proj": (q, None), "k_proj": (k, None), "v_proj": (v, None)}
    else:
        projs = {n: (getattr(attn, n).weight, getattr(attn, n).bias) for n in ("q_proj", "k_proj", "v_proj")}
    out = {"self_attn.o_proj.weight": attn.o_proj.weight}
    for name, (w, b) in projs.items():
        out[f"self_attn.{name}.weight"] = w
        out[f"self_attn.{name}.bias"] = torch.zeros(w.shape[0], dtype=w.dtype) if b is None else b
    return out


def _norm(weight: torch.Tensor, gemma: bool) -> torch.Tensor:
    return weight + 1.0 if gemma else weight  # Gemma's RMSNorm multiplies by (1 + w)


def base_state(model, untie: bool) -> dict[str, torch.Tensor]:
    """Embeddings, final norm, lm_head and every layer's attention and norms, in Qwen2-MoE names."""
    gemma = model.config.model_type == "gemma"
    embed = model.model.embed_tokens.weight
    sd = {"model.norm.weight": _norm(model.model.norm.weight, gemma)}
    if gemma:  # GemmaTextScaledWordEmbedding: lookup * sqrt(H) in the weight dtype; folded exactly
        scale = torch.tensor(model.config.hidden_size**0.5, dtype=embed.dtype)
        sd["model.embed_tokens.weight"] = embed * scale
    else:
        sd["model.embed_tokens.weight"] = embed
    # tied: the same tensor under both names (load_state_dict wants both; save_pretrained writes one)
    sd["lm_head.weight"] = (
        model.lm_head.weight
        if untie or not model.config.tie_word_embeddings
        else sd["model.embed_tokens.weight"]
    )
    for i, layer in enumerate(model.model.layers):
        sd.update(layer_base_state(layer, i, model.config))
    return sd


def layer_base_state(layer, i: int, cfg) -> dict[str, torch.Tensor]:
    """One decoder layer's attention and norms, in Qwen2-MoE names (``cfg``: the source config)."""
    gemma, p = cfg.model_type == "gemma", f"model.layers.{i}."
    sd = {p + k: v for k, v in _attention(layer, cfg).items()}
    sd[p + "input_layernorm.weight"] = _norm(layer.input_layernorm.weight, gemma)
    sd[p + "post_attention_layernorm.weight"] = _norm(layer.post_attention_layernorm.weight, gemma)
    return sd


# ---------------------------------------------------------------------------------------------
# MLP weights


def dense_mlp_state(adapter, mlp, prefix: str) -> dict[str, torch.Tensor]:
    w_gate, w_up, w_down = adapter.weights(mlp)
    return {
        prefix + "gate_proj.weight": w_gate,
        prefix + "up_proj.weight": w_up,
        prefix + "down_proj.weight": w_down,
    }


def shared_only_state(
    adapter, mlp, n_experts: int, width: int, shared: int, hidden: int, prefix: str
) -> dict:
    """A dense MLP as a MoE layer whose shared expert holds the whole FFN and whose experts are zero (exact)."""
    w_gate, w_up, w_down = adapter.weights(mlp)
    block = {"gate": w_gate, "up": w_up, "down": w_down}
    zeros = torch.zeros(n_experts, hidden, dtype=w_gate.dtype)
    return _moe_tensors(block, zeros, None, None, n_experts, width, shared, prefix)


def moe_layer_state(
    block: MoEMLP, router_weight, scales, width: int, shared: int, prefix: str
) -> dict[str, torch.Tensor]:
    """One MoEMLP in Qwen2-MoE's in-memory layout: router (E, H), experts (E, 2I, H) and (E, H, I) padded
    to the common width I with ``scales`` (E,) folded into down_proj, shared expert padded to ``shared``."""
    sh = block.shared_expert
    parts = None
    if sh is not None:
        parts = {"gate": sh.gate_proj.weight, "up": sh.up_proj.weight, "down": sh.down_proj.weight}
    return _moe_tensors(parts, router_weight, block, scales, block.n_experts, width, shared, prefix)


def _moe_tensors(shared_parts, router_weight, block, scales, n_experts, width, shared, prefix) -> dict:
    hidden = router_weight.shape[1]
    dtype = router_weight.dtype if block is None else block.gate_up_proj.dtype
    gate_up = torch.zeros(n_experts, 2 * width, hidden, dtype=dtype)  # (E, 2I, H)
    down = torch.zeros(n_experts, hidden, width, dtype=dtype)  # (E, H, I)
    if block is not None:
        w = block.gate_up_proj.shape[1] // 2
        gate_up[:, :w] = block.gate_up_proj[:, :w]
        gate_up[:, width : width + w] = block.gate_up_proj[:, w:]
        down[:, :, :w] = block.down_proj * scales.to(dtype)[:, None, None]
    sg = torch.zeros(shared, hidden, dtype=dtype)
    su, sd = torch.zeros_like(sg), torch.zeros(hidden, shared, dtype=dtype)
    gate = getattr(block, "shared_gate", None)
    gate_weight = torch.full((1, hidden), SHARED_GATE, dtype=dtype) if gate is None else gate.weight.to(dtype)
    if shared_parts is not None:
        n = shared_parts["gate"].shape[0]
        sg[:n], su[:n] = shared_parts["gate"], shared_parts["up"]
        # an ungated shared expert: the 1e-20 gate gives sigmoid = 0.5 exactly, which doubling undoes
        sd[:, :n] = shared_parts["down"] * (2.0 if gate is None else 1.0)
    return {
        prefix + "gate.weight": router_weight.to(dtype),
        prefix + "experts.gate_up_proj": gate_up,
        prefix + "experts.down_proj": down,
        prefix + "shared_expert.gate_proj.weight": sg,
        prefix + "shared_expert.up_proj.weight": su,
        prefix + "shared_expert.down_proj.weight": sd,
        prefix + "shared_expert_gate.weight": gate_weight,
    }


# ---------------------------------------------------------------------------------------------
# The model


def qwen2moe_config(model, *, n_experts, top_k, norm_topk_prob, width, shared, mlp_only, untie):
    """A Qwen2MoeConfig carrying the source's attention, RoPE and vocabulary settings."""
    from transformers import Qwen2MoeConfig

    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    layer_types = _layer_types(cfg)
    window = getattr(cfg, "sliding_window", None) if "sliding_attention" in layer_types else None
    extra = {}
    if hasattr(cfg, "original_max_position_embeddings"):  # Phi-3 longrope reads it from the config
        extra["original_max_position_embeddings"] = cfg.original_max_position_embeddings
    return Qwen2MoeConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=head_dim,
        hidden_act=getattr(cfg, "hidden_act", None) or "silu",
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=bool(cfg.tie_word_embeddings) and not untie,
        rope_parameters=dict(cfg.rope_parameters),
        use_sliding_window=window is not None,
        sliding_window=window,
        layer_types=layer_types,
        decoder_sparse_step=1,
        mlp_only_layers=list(mlp_only),
        moe_intermediate_size=width,
        shared_expert_intermediate_size=shared,
        num_experts=n_experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=norm_topk_prob,
        qkv_bias=True,
        attention_dropout=0.0,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=getattr(cfg, "pad_token_id", None),
        **extra,
    )


def build_qwen2moe(
    dense,
    routing,
    *,
    top_k: int,
    norm_topk_prob: bool,
    llamacpp: bool = False,
    width_align: int = WIDTH_ALIGN,
):
    """A Qwen2MoeForCausalLM equal to ``dense`` (a converted DenseModel) under ``routing``.

    routing: {layer: (router weight (E, H), scales (E,))} for every MoE layer. The LM head is always written
    (untied: SGLang does not tie it and llama.cpp needs output.weight). With ``llamacpp`` dense layers become
    shared-only MoE layers (llama.cpp's qwen2moe needs every layer MoE). width_align: expert and shared
    widths are zero-padded to a multiple of it (exact; 128 suits vLLM's fused MoE kernels).
    """
    from transformers import Qwen2MoeForCausalLM

    model, adapter = dense.model, dense.adapter
    blocks = {i: layer.mlp for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, MoEMLP)}
    n_experts, width, shared = _common_shape(blocks, width_align)
    dense_layers = [i for i in range(len(model.model.layers)) if i not in blocks]
    untie = True
    if llamacpp and dense_layers:
        shared = max(shared, model.config.intermediate_size)
    mlp_only = [] if llamacpp else dense_layers
    cfg = qwen2moe_config(
        model, n_experts=n_experts, top_k=top_k, norm_topk_prob=norm_topk_prob, width=width,
        shared=shared, mlp_only=mlp_only, untie=untie,
    )  # fmt: skip
    sd = base_state(model, untie)
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}.mlp."
        if i in blocks:
            weight, scales = routing[i]
            sd.update(moe_layer_state(blocks[i], weight, scales, width, shared, prefix))
        elif llamacpp:
            sd.update(
                shared_only_state(adapter, layer.mlp, n_experts, width, shared, cfg.hidden_size, prefix)
            )
        else:
            sd.update(dense_mlp_state(adapter, layer.mlp, prefix))
    native = Qwen2MoeForCausalLM(cfg)
    native.load_state_dict({k: v.detach().contiguous() for k, v in sd.items()}, strict=True)
    if cfg.tie_word_embeddings:
        native.tie_weights()
    return native.to(next(model.parameters()).dtype).eval()


def _common_shape(blocks: dict[int, MoEMLP], align: int = WIDTH_ALIGN) -> tuple[int, int, int]:
    """(experts, common expert width, common shared width >= 1) of all MoE layers, widths padded to a
    multiple of ``align`` (the shared width too when align is above the kernel minimum)."""
    if not blocks:
        raise ExportError("The model has no MoE layers: convert it first (python -m moe_core convert).")
    counts = {b.n_experts for b in blocks.values()}
    if len(counts) > 1:
        raise ExportError(
            f"The MoE layers have different numbers of routed experts ({sorted(counts)}); Qwen2-MoE has one "
            "count for all layers. Use --format exact, which keeps every layer as it is, or convert with a "
            "servable budget (--servable: one shape, the other layers dense) in --routing-form native."
        )
    width = max(max(b.expert_sizes) for b in blocks.values())
    # transformers' default grouped_mm expert kernel needs 16-byte strides: pad the width to a multiple of 8
    align = max(align, WIDTH_ALIGN)
    width = -(-width // align) * align
    shared = max(max(b.shared_size for b in blocks.values()), 1)  # a zero-width Linear breaks some loaders
    if align > WIDTH_ALIGN:
        shared = -(-shared // align) * align
    return counts.pop(), width, shared


def head_dim_note(model) -> str | None:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if head_dim * cfg.num_attention_heads != cfg.hidden_size:
        return (
            f"head_dim {head_dim} differs from hidden_size / heads ({cfg.hidden_size / cfg.num_attention_heads:g});"
            " transformers honours it, but vLLM's Qwen2-MoE derives head_dim from hidden_size and will not load it."
        )
    return None
