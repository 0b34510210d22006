"""GGUF for llama.cpp, written directly: a llama.cpp-layout Qwen2-MoE export folder -> one ``.gguf`` file.

llama.cpp's ``qwen2moe`` graph runs what ``--format llamacpp`` writes (reference/ecosystem.md §A.6): untied
embeddings, raw-softmax routing (``norm_topk_prob`` false), every layer MoE, a sigmoid-gated shared expert. This
module reads such a folder (config.json, safetensors, tokenizer.json) and writes the file with the ``gguf``
package's GGUFWriter, so a llama.cpp user needs no conversion script:

- tensor names from gguf's own table (``blk.{i}.ffn_gate_exps`` ...); per-expert matrices stacked to (E, I, H)
  and (E, H, I). GGUF lists dimensions innermost first, so a PyTorch (out, in) matrix reads {in, out} there;
- types: f32, f16 or q8_0 for the matrices; norms, biases, the router and the shared-expert gate stay f32
  (llama.cpp's kernels take 1-D tensors in f32, and the gate's 1e-20 underflows in f16, where llama.cpp's
  sigmoid, computed as silu(x)/x, would give 0/0). A q8_0 matrix whose rows are not a multiple of 32 falls
  back to f16, an f16 one with values beyond 65504 to f32; the notes say which;
- the vocabulary: byte-level BPE from tokenizer.json (tokens, token types, merges, special ids, chat
  template) and the llama.cpp pre-tokenizer recognised from tokenizer.json's pre-tokenizer structure;
- the tensors stream: planned first (names, shapes, types: the header needs them), then converted and
  written one at a time, to ``<out>.partial``, renamed when complete.

:func:`check_gguf` reads the file back with GGUFReader and compares names, shapes, metadata and the
de-quantised tensors with the folder's weights.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from gguf import MODEL_TENSOR as T
from gguf import GGMLQuantizationType as Q

from ..plumbing import check_cancel
from .native import ExportError

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN2MOE]  # "qwen2moe"
QTYPES = {  # file type name -> (matrix tensor type, general.file_type)
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
}
F16_MAX = float(np.finfo(np.float16).max)  # 65504
Q8_BLOCK = gguf.GGML_QUANT_SIZES[Q.Q8_0][0]  # 32 values share one f16 scale
ALWAYS_F32 = (T.FFN_GATE_INP, T.FFN_GATE_INP_SHEXP)  # router logits and the 1e-20 shared gate: full precision
# max |dequantised - source| / max |source| per tensor: f16 rounds to 11 bits; q8_0 to half a step of
# absmax(block) / 127 (its f16 scale adds 2^-11 of that), so 1/127 of the tensor's absmax leaves a margin
TOLERANCE = {Q.F32: 0.0, Q.F16: 2.0**-10, Q.Q8_0: 1.0 / 127}

_LAYER = {  # Qwen2-MoE name after "model.layers.{i}." -> GGUF tensor kind, suffix
    "input_layernorm.weight": (T.ATTN_NORM, "weight"),
    "post_attention_layernorm.weight": (T.FFN_NORM, "weight"),
    "self_attn.q_proj.weight": (T.ATTN_Q, "weight"),
    "self_attn.q_proj.bias": (T.ATTN_Q, "bias"),
    "self_attn.k_proj.weight": (T.ATTN_K, "weight"),
    "self_attn.k_proj.bias": (T.ATTN_K, "bias"),
    "self_attn.v_proj.weight": (T.ATTN_V, "weight"),
    "self_attn.v_proj.bias": (T.ATTN_V, "bias"),
    "self_attn.o_proj.weight": (T.ATTN_OUT, "weight"),
    "mlp.gate.weight": (T.FFN_GATE_INP, "weight"),
    "mlp.shared_expert_gate.weight": (T.FFN_GATE_INP_SHEXP, "weight"),
    "mlp.shared_expert.gate_proj.weight": (T.FFN_GATE_SHEXP, "weight"),
    "mlp.shared_expert.up_proj.weight": (T.FFN_UP_SHEXP, "weight"),
    "mlp.shared_expert.down_proj.weight": (T.FFN_DOWN_SHEXP, "weight"),
}
_EXPERTS = {"gate_proj": T.FFN_GATE_EXP, "up_proj": T.FFN_UP_EXP, "down_proj": T.FFN_DOWN_EXP}
_OPTIONAL = ("bias",)  # llama.cpp's attention biases are optional; everything else must be there

# tokenizer.json pre-tokenizer structure -> llama.cpp's tokenizer.ggml.pre (src/llama-vocab.cpp regexes)
_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = _QWEN2_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
PRE_TOKENIZERS = {
    (("ByteLevel", True, False),): "gpt-2",
    (("Digits", True), ("ByteLevel", True, False)): "smollm",
    (("Split", _QWEN2_SPLIT, "Isolated", False), ("ByteLevel", False, False)): "qwen2",
    (("Split", _LLAMA3_SPLIT, "Isolated", False), ("ByteLevel", False, False)): "llama-bpe",
}
_LAYOUT_HINT = "write one with `python -m moe_core export --format llamacpp` (or --format gguf directly)."
CONVERT_HINT = (
    "Export with --format llamacpp instead and convert that folder with llama.cpp's convert_hf_to_gguf.py."
)


@dataclass
class Planned:
    """One GGUF tensor: its name, its shape in PyTorch order, the type written and how to read it."""

    name: str
    shape: tuple[int, ...]
    kind: T
    load: Callable[[], np.ndarray]
    sources: tuple[str, ...]  # the export's tensor names it is made of
    qtype: Q = Q.F32

    @property
    def nbytes(self) -> int:
        return int(np.prod(gguf.quant_shape_to_byte_shape(self.shape, self.qtype), dtype=np.int64))


@dataclass
class GGUFFile:
    """What :func:`write_gguf` wrote."""

    path: Path
    qtype: str
    tensor_types: dict[str, int]
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Reading the export folder


class Weights:
    """The folder's safetensors (one file or shards with an index), read one tensor at a time; each file's
    mapping is closed again after every read (``moe_core.streaming.ShardReader``), so the pages read do not stay
    counted in this process's memory while a large model is written."""

    def __init__(self, folder: Path):
        from ..streaming import ShardReader

        if not any(folder.glob("*.safetensors")):
            raise ExportError(f"'{folder}' has no safetensors weights; {_LAYOUT_HINT}")
        self.reader = ShardReader(folder)
        self.where = self.reader.files  # name -> file

    def shape(self, name: str) -> tuple[int, ...]:
        from safetensors import safe_open

        with safe_open(str(self.where[name]), framework="pt") as f:
            return tuple(f.get_slice(name).get_shape())

    def load(self, name: str) -> np.ndarray:
        return self.reader.get(name).float().numpy()


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ExportError(f"'{folder}' has no config.json: it is not an export folder; {_LAYOUT_HINT}")
    return json.loads(path.read_text())


def layout_problems(cfg: dict) -> list[str]:
    """Why config.json is not the Qwen2-MoE subset llama.cpp's qwen2moe graph runs (empty list: it is)."""
    problems = []
    if cfg.get("model_type") != "qwen2_moe":
        return [f"its model_type is '{cfg.get('model_type')}', not qwen2_moe"]
    if cfg.get("tie_word_embeddings"):
        problems.append("its embeddings are tied; llama.cpp's qwen2moe reads a separate output matrix")
    if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
        problems.append("some layers are dense; llama.cpp's qwen2moe expects every layer to be MoE")
    if cfg.get("norm_topk_prob"):
        problems.append(
            "it renormalises the top-k weights (norm_topk_prob), which llama.cpp's qwen2moe does not"
        )
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"its activation is '{cfg['hidden_act']}'; llama.cpp's qwen2moe hard-codes SiLU")
    if cfg.get("use_sliding_window"):
        problems.append("it uses sliding-window attention, which llama.cpp's qwen2moe does not")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append("it scales RoPE, which llama.cpp's qwen2moe does not apply")
    if _head_dim(cfg) * cfg["num_attention_heads"] != cfg["hidden_size"]:
        problems.append("head_dim x heads differs from hidden_size; llama.cpp's qwen2moe needs them equal")
    return problems


def _head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


# ---------------------------------------------------------------------------------------------
# Tensors


def _gguf_name(kind: T, bid: int | None, suffix: str = "weight") -> str:
    return f"{gguf.TENSOR_NAMES[kind].format(bid=bid)}.{suffix}"


def expected_shapes(cfg: dict) -> dict[T, tuple[int, ...]]:
    """Each tensor kind's weight shape in PyTorch order, from config.json (what llama.cpp will insist on)."""
    h, v, e = cfg["hidden_size"], cfg["vocab_size"], cfg["num_experts"]
    q, kv = cfg["num_attention_heads"] * _head_dim(cfg), cfg["num_key_value_heads"] * _head_dim(cfg)
    i_e, i_s = cfg["moe_intermediate_size"], cfg["shared_expert_intermediate_size"]
    return {
        T.TOKEN_EMBD: (v, h), T.OUTPUT: (v, h), T.OUTPUT_NORM: (h,), T.ATTN_NORM: (h,), T.FFN_NORM: (h,),
        T.ATTN_Q: (q, h), T.ATTN_K: (kv, h), T.ATTN_V: (kv, h), T.ATTN_OUT: (h, q),
        T.FFN_GATE_INP: (e, h), T.FFN_GATE_INP_SHEXP: (h,),
        T.FFN_GATE_SHEXP: (i_s, h), T.FFN_UP_SHEXP: (i_s, h), T.FFN_DOWN_SHEXP: (h, i_s),
        T.FFN_GATE_EXP: (e, i_e, h), T.FFN_UP_EXP: (e, i_e, h), T.FFN_DOWN_EXP: (e, h, i_e),
    }  # fmt: skip


def tensor_plan(weights: Weights, cfg: dict) -> list[Planned]:
    """Every GGUF tensor with its loader, in file order; refuses missing, surplus or misshapen weights."""
    plan = [_single(weights, "model.embed_tokens.weight", T.TOKEN_EMBD, None)]
    for i in range(cfg["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        for hf_name, (kind, suffix) in _LAYER.items():
            if suffix in _OPTIONAL and prefix + hf_name not in weights.where:
                continue
            plan.append(_single(weights, prefix + hf_name, kind, i, suffix))
        plan += _experts(weights, prefix + "mlp.experts.", cfg["num_experts"], i)
    plan += [
        _single(weights, "model.norm.weight", T.OUTPUT_NORM, None),
        _single(weights, "lm_head.weight", T.OUTPUT, None),
    ]
    _check_coverage(weights, plan)
    _check_shapes(plan, expected_shapes(cfg))
    return plan


def _single(weights: Weights, hf_name: str, kind: T, bid: int | None, suffix: str = "weight") -> Planned:
    if hf_name not in weights.where:
        raise ExportError(
            f"The export has no '{hf_name}'; it is not a complete llama.cpp layout: {_LAYOUT_HINT}"
        )
    shape = weights.shape(hf_name)
    if kind == T.FFN_GATE_INP_SHEXP:  # (1, H) in transformers; llama.cpp declares the gate a vector {H}
        shape = shape[1:]
    load = lambda: weights.load(hf_name).reshape(shape)  # noqa: E731
    return Planned(_gguf_name(kind, bid, suffix), shape, kind, load, (hf_name,))


def _experts(weights: Weights, prefix: str, n_experts: int, bid: int) -> list[Planned]:
    """Stacked expert matrices: gate/up (E, I, H), down (E, H, I), from per-expert or fused tensors."""
    if prefix + "gate_up_proj" in weights.where:  # fused (E, 2I, H) and (E, H, I)
        e, two_i, h = weights.shape(prefix + "gate_up_proj")
        i = two_i // 2
        fused = {
            "gate_proj": ((e, i, h), lambda: weights.load(prefix + "gate_up_proj")[:, :i]),
            "up_proj": ((e, i, h), lambda: weights.load(prefix + "gate_up_proj")[:, i:]),
            "down_proj": (weights.shape(prefix + "down_proj"), lambda: weights.load(prefix + "down_proj")),
        }
        sources = (prefix + "gate_up_proj", prefix + "down_proj")
        return [
            Planned(_gguf_name(_EXPERTS[p], bid), s, _EXPERTS[p], f, sources) for p, (s, f) in fused.items()
        ]
    out = []
    for proj, kind in _EXPERTS.items():
        names = [f"{prefix}{x}.{proj}.weight" for x in range(n_experts)]
        missing = [n for n in names if n not in weights.where]
        if missing:
            raise ExportError(f"The export lacks expert weights ({missing[0]}, ...); {_LAYOUT_HINT}")
        shape = (n_experts, *weights.shape(names[0]))
        out.append(Planned(_gguf_name(kind, bid), shape, kind, _stacker(weights, names), tuple(names)))
    return out


def _stacker(weights: Weights, names: list[str]) -> Callable[[], np.ndarray]:
    return lambda: np.stack([weights.load(n) for n in names])  # (E, rows, cols)


def _check_coverage(weights: Weights, plan: list[Planned]) -> None:
    used = {name for p in plan for name in p.sources}
    surplus = sorted(set(weights.where) - used)
    if surplus:
        raise ExportError(
            f"The export holds tensors llama.cpp's qwen2moe has no place for ({', '.join(surplus[:3])}"
            f"{', ...' if len(surplus) > 3 else ''}); {_LAYOUT_HINT}"
        )


def _check_shapes(plan: list[Planned], expected: dict[T, tuple[int, ...]]) -> None:
    for p in plan:
        want = expected[p.kind] if p.name.endswith(".weight") else expected[p.kind][:1]
        if p.shape != want:
            raise ExportError(
                f"'{p.name}' has shape {p.shape} but config.json implies {want}; llama.cpp would refuse "
                f"the file. The export folder is inconsistent: {_LAYOUT_HINT}"
            )


def choose_types(plan: list[Planned], qtype: str) -> list[str]:
    """Set each tensor's type for file type ``qtype``; returns a note per tensor that had to differ."""
    target, notes = QTYPES[qtype][0], []
    for p in plan:
        if len(p.shape) == 1 or p.kind in ALWAYS_F32 or target == Q.F32:
            p.qtype = Q.F32
            continue
        p.qtype = target
        if target == Q.Q8_0 and p.shape[-1] % Q8_BLOCK:
            p.qtype = Q.F16
            notes.append(
                f"{p.name}: rows of {p.shape[-1]} values are not a multiple of {Q8_BLOCK}, written as f16"
            )
        if p.qtype == Q.F16 and float(np.abs(p.load()).max(initial=0.0)) > F16_MAX:
            p.qtype = Q.F32
            notes.append(f"{p.name}: values beyond f16's range (65504), written as f32")
    return notes


# ---------------------------------------------------------------------------------------------
# Metadata and vocabulary


def hparams(cfg: dict, qtype: str) -> dict[str, tuple[object, gguf.GGUFValueType]]:
    """The qwen2moe keys llama.cpp's loader reads, from config.json: {key: (value, GGUF type)}."""
    u32, f32, k = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32, gguf.Keys
    rope = cfg.get("rope_parameters") or {}
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    values = {
        k.LLM.CONTEXT_LENGTH: (cfg["max_position_embeddings"], u32),
        k.LLM.EMBEDDING_LENGTH: (cfg["hidden_size"], u32),
        k.LLM.BLOCK_COUNT: (cfg["num_hidden_layers"], u32),
        k.LLM.FEED_FORWARD_LENGTH: (cfg["intermediate_size"], u32),
        k.LLM.EXPERT_FEED_FORWARD_LENGTH: (cfg["moe_intermediate_size"], u32),
        k.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH: (cfg["shared_expert_intermediate_size"], u32),
        k.LLM.EXPERT_COUNT: (cfg["num_experts"], u32),
        k.LLM.EXPERT_USED_COUNT: (cfg["num_experts_per_tok"], u32),
        k.LLM.VOCAB_SIZE: (cfg["vocab_size"], u32),
        k.Attention.HEAD_COUNT: (cfg["num_attention_heads"], u32),
        k.Attention.HEAD_COUNT_KV: (cfg["num_key_value_heads"], u32),
        k.Attention.KEY_LENGTH: (_head_dim(cfg), u32),
        k.Attention.VALUE_LENGTH: (_head_dim(cfg), u32),
        k.Attention.LAYERNORM_RMS_EPS: (float(cfg["rms_norm_eps"]), f32),
        k.Rope.DIMENSION_COUNT: (_head_dim(cfg), u32),
        k.Rope.FREQ_BASE: (theta, f32),
    }
    out = {key.format(arch=ARCH): v for key, v in values.items()}
    out[k.General.FILE_TYPE] = (int(QTYPES[qtype][1]), u32)
    return out


def pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for a tokenizer.json pre-tokenizer; ExportError when none is known to match."""
    signature = tuple(_step(p) for p in _steps(pre))
    if signature not in PRE_TOKENIZERS:
        raise ExportError(
            f"tokenizer.json's pre-tokenizer {[s[0] for s in signature] or 'none'} is not one this writer "
            f"maps to llama.cpp (known: {', '.join(PRE_TOKENIZERS.values())}); llama.cpp would split text "
            f"differently from transformers. {CONVERT_HINT}"
        )
    return PRE_TOKENIZERS[signature]


def _steps(pre: dict | None) -> list[dict]:
    if pre is None:
        return []
    return pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]


def _step(p: dict) -> tuple:
    kind = p.get("type")
    if kind == "ByteLevel":
        return (kind, p.get("use_regex", True), p.get("add_prefix_space", False))
    if kind == "Digits":
        return (kind, p.get("individual_digits", False))
    if kind == "Split":
        pattern = p.get("pattern") or {}
        return (kind, pattern.get("Regex", pattern.get("String")), p.get("behavior"), p.get("invert", False))
    return (kind,)


def token_table(tok: dict, n_vocab: int) -> tuple[list[str], list[int]]:
    """Tokens and llama.cpp token types (V,) from tokenizer.json; ids the tokenizer lacks are UNUSED pads."""
    tokens: list[str | None] = [None] * n_vocab
    types = [int(gguf.TokenType.UNUSED)] * n_vocab
    entries = [(i, text, gguf.TokenType.NORMAL) for text, i in tok["model"]["vocab"].items()]
    entries += [
        (a["id"], a["content"], gguf.TokenType.CONTROL if a["special"] else gguf.TokenType.USER_DEFINED)
        for a in tok.get("added_tokens", [])
    ]
    for i, text, kind in entries:
        if not 0 <= i < n_vocab:
            raise ExportError(
                f"tokenizer.json has token id {i} ('{text}') but config.json's vocab_size is {n_vocab}; "
                "the tokenizer does not belong to these weights."
            )
        tokens[i], types[i] = text, int(kind)
    return [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)], types


def add_vocab(writer: gguf.GGUFWriter, folder: Path, n_vocab: int) -> list[str]:
    """tokenizer.ggml.* keys of a byte-level BPE tokenizer.json; returns notes."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"'{folder}' has no tokenizer.json; llama.cpp needs the vocabulary in the GGUF.")
    tok = json.loads(path.read_text())
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ExportError(
            f"The tokenizer is {model.get('type')}{' with byte fallback' if model.get('byte_fallback') else ''}"
            f", not byte-level BPE (GPT-2 style), the only kind this writer handles. {CONVERT_HINT}"
        )
    tokens, types = token_table(tok, n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tok.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab)
    special.add_to_gguf(writer, quiet=True)
    if "bos" not in special.add_special_token:  # transformers adds none here; llama.cpp must not either
        writer.add_add_bos_token(False)
    if special.merges:
        return []
    return ["tokenizer.json has no BPE merges; llama.cpp refuses a gpt2 vocabulary without them"]


# ---------------------------------------------------------------------------------------------
# Writing


def write_gguf(
    folder: str | Path,
    out_path: str | Path,
    qtype: str = "f16",
    *,
    name: str | None = None,
    progress: Callable[[float, str], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> GGUFFile:
    """Write the llama.cpp-layout Qwen2-MoE export in ``folder`` as one GGUF file for llama.cpp's qwen2moe.

    qtype: "f16" (default), "q8_0" or "f32" for the matrices (norms, biases and gates stay f32). The file
    is written to ``<out_path>.partial`` and renamed when complete. Returns the path, the count of tensors
    per GGML type and notes (tensors written in another type than asked, and why).
    """
    folder, out_path = Path(folder), Path(out_path)
    if qtype not in QTYPES:
        raise ExportError(f"GGUF type must be one of {', '.join(QTYPES)}, got '{qtype}'.")
    cfg = read_config(folder)
    problems = layout_problems(cfg)
    if problems:
        raise ExportError(
            f"'{folder}' is not laid out for llama.cpp's qwen2moe: {'; '.join(problems)}. {_LAYOUT_HINT}"
        )
    plan = tensor_plan(Weights(folder), cfg)
    notes = choose_types(plan, qtype)
    writer = gguf.GGUFWriter(None, ARCH)
    writer.add_name(name or out_path.stem)
    for key, (value, vtype) in hparams(cfg, qtype).items():
        writer.add_key_value(key, value, vtype)
    if qtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    notes += add_vocab(writer, folder, cfg["vocab_size"])
    partial = out_path.with_name(out_path.name + ".partial")
    try:
        _stream(writer, plan, partial, progress, cancel)
        partial.replace(out_path)
    finally:
        writer.close()
        partial.unlink(missing_ok=True)
    types = Counter(p.qtype.name for p in plan)
    return GGUFFile(out_path, qtype, dict(sorted(types.items())), notes)


def _stream(writer: gguf.GGUFWriter, plan: list[Planned], path: Path, progress, cancel) -> None:
    """Header, metadata and tensor directory first, then each tensor converted and written in turn."""
    for p in plan:
        byte_shape = gguf.quant_shape_to_byte_shape(p.shape, p.qtype)
        dtype = {Q.F32: np.float32, Q.F16: np.float16}.get(p.qtype, np.uint8)
        raw = p.qtype if dtype is np.uint8 else None
        writer.add_tensor_info(
            p.name, byte_shape if raw else p.shape, np.dtype(dtype), p.nbytes, raw_dtype=raw
        )
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for n, p in enumerate(plan):
        check_cancel(cancel)
        data = gguf.quants.quantize(np.ascontiguousarray(p.load(), dtype=np.float32), p.qtype)
        writer.write_tensor_data(data)
        if progress and n % 16 == 0:
            progress(n / len(plan), f"GGUF: {p.name}")


# ---------------------------------------------------------------------------------------------
# Reading it back


def check_gguf(path: str | Path, folder: str | Path) -> dict:
    """Read ``path`` back with GGUFReader and compare it with the export ``folder`` it was written from.

    Returns names_match, shapes_match, metadata_match (and the mismatches), the worst relative error
    max |dequantised - source| / max |source| per GGML type with its tolerance, and ok (all within).
    """
    path, folder = Path(path), Path(folder)
    reader = gguf.GGUFReader(path)
    cfg = read_config(folder)
    plan = tensor_plan(Weights(folder), cfg)
    found = {t.name: t for t in reader.tensors}
    planned = {p.name for p in plan}
    names = sorted(planned ^ set(found))
    shapes = [p.name for p in plan if p.name in found and _shape(found[p.name]) != p.shape]
    qtype = _file_qtype(reader)
    metadata = _metadata_mismatches(reader, hparams(cfg, qtype) if qtype else {})
    errors, worst = _errors([p for p in plan if p.name in found and p.name not in shapes], found)
    ok = not (names or shapes or metadata) and all(errors[k] <= TOLERANCE[Q[k]] for k in errors)
    return {
        "file": path.name,
        "bytes": path.stat().st_size,
        "type": qtype,
        "tensors": len(found),
        "tensor_types": dict(sorted(Counter(t.tensor_type.name for t in found.values()).items())),
        "names_match": not names,
        "shapes_match": not shapes,
        "metadata_match": not metadata,
        "mismatches": (names + shapes + metadata)[:10],
        "max_rel_error": errors,
        "tolerance": {k: TOLERANCE[Q[k]] for k in errors},
        "worst_tensor": worst,
        "vocab": _field(reader, gguf.Keys.Tokenizer.LIST, whole=True),
        "pre_tokenizer": _field(reader, gguf.Keys.Tokenizer.PRE),
        "ok": ok,
    }


def _shape(tensor) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))  # GGUF: innermost first


def _field(reader: gguf.GGUFReader, key: str, whole: bool = False):
    f = reader.get_field(key)
    if f is None:
        return None
    return len(f.data) if whole else f.contents()


def _file_qtype(reader: gguf.GGUFReader) -> str | None:
    ftype = _field(reader, gguf.Keys.General.FILE_TYPE)
    return next((name for name, (_, ft) in QTYPES.items() if int(ft) == ftype), None)


def _metadata_mismatches(reader: gguf.GGUFReader, expected: dict) -> list[str]:
    if not expected:
        return [f"{gguf.Keys.General.FILE_TYPE} is missing or not f32/f16/q8_0"]
    out = []
    if _field(reader, gguf.Keys.General.ARCHITECTURE) != ARCH:
        out.append(f"general.architecture is not {ARCH}")
    for key, (value, vtype) in expected.items():
        got = _field(reader, key)
        want = float(np.float32(value)) if vtype == gguf.GGUFValueType.FLOAT32 else value
        if got is None or (float(np.float32(got)) if isinstance(got, float) else got) != want:
            out.append(f"{key}: {got} != {want}")
    return out


def _errors(plan: list[Planned], found: dict) -> tuple[dict[str, float], str | None]:
    """Worst max |dequantised - source| / max |source| per GGML type, and the tensor where it is largest."""
    errors: dict[str, float] = {}
    worst, worst_ratio = None, -1.0
    for p in plan:
        t = found[p.name]
        source = p.load()
        back = gguf.quants.dequantize(t.data, t.tensor_type).reshape(p.shape)
        scale = float(np.abs(source).max(initial=0.0))
        err = float(np.abs(back - source).max(initial=0.0)) / scale if scale > 0 else 0.0
        key = t.tensor_type.name
        errors[key] = max(errors.get(key, 0.0), err)
        ratio = err / max(TOLERANCE[t.tensor_type], 1e-12)
        if ratio > worst_ratio:
            worst, worst_ratio = p.name, ratio
    return errors, worst
