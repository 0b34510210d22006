"""GGUF written by MoE Studio: llama.cpp's qwen2moe tensor names and shapes, the metadata its loader reads,
f32 / f16 / q8_0 read back within their rounding, transformers' own GGUF reader gives the same logits, and
folders llama.cpp could not run are refused with the reason."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from gguf import GGUFReader, dequantize
from safetensors.torch import load_file

from moe_core.config import CMoEConfig
from moe_core.export import GGUF_TYPES, ExportConfig, ExportError, export_model
from moe_core.export.gguf import QTYPES, pre_tokenizer_name, write_gguf
from moe_core.export.native import SHARED_GATE
from moe_core.methods import convert
from moe_core.model_io import tiny_model

CALIB = torch.randint(4, 250, (4, 64), generator=torch.Generator().manual_seed(0))


def converted(family: str):
    """A 2-layer tiny model, CMoE S1A1E4: 3 routed experts of width 48 (not a multiple of 32), top-1."""
    dense = tiny_model(family, n_layers=2)
    return convert(dense, CALIB, CMoEConfig(experts="S1A1E4"))


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def layout(request, tmp_path_factory):
    """(folder, config) of a --format llamacpp export; qwen2 brings real q/k/v biases."""
    moe = converted(request.param)
    if request.param == "qwen2":
        for layer in moe.model.model.layers:
            torch.nn.init.normal_(layer.self_attn.q_proj.bias, std=0.3)
    folder = tmp_path_factory.mktemp(f"gguf-{request.param}") / "layout"
    export_model(moe, folder, ExportConfig(format="llamacpp", verify=False), calib_ids=CALIB)
    return folder, json.loads((folder / "config.json").read_text())


def field(reader, key):
    return reader.get_field(key).contents()


def expected(cfg) -> dict[str, tuple[int, ...]]:
    """llama.cpp's qwen2moe tensors and their GGUF dims (innermost first), written out by hand."""
    h, v, e = cfg["hidden_size"], cfg["vocab_size"], cfg["num_experts"]
    i, s = cfg["moe_intermediate_size"], cfg["shared_expert_intermediate_size"]
    hd = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    out = {"token_embd.weight": (h, v), "output.weight": (h, v), "output_norm.weight": (h,)}
    for b in range(cfg["num_hidden_layers"]):
        out |= {
            f"blk.{b}.attn_norm.weight": (h,), f"blk.{b}.ffn_norm.weight": (h,),
            f"blk.{b}.attn_q.weight": (h, q), f"blk.{b}.attn_q.bias": (q,),
            f"blk.{b}.attn_k.weight": (h, kv), f"blk.{b}.attn_k.bias": (kv,),
            f"blk.{b}.attn_v.weight": (h, kv), f"blk.{b}.attn_v.bias": (kv,),
            f"blk.{b}.attn_output.weight": (q, h),
            f"blk.{b}.ffn_gate_inp.weight": (h, e), f"blk.{b}.ffn_gate_inp_shexp.weight": (h,),
            f"blk.{b}.ffn_gate_shexp.weight": (h, s), f"blk.{b}.ffn_up_shexp.weight": (h, s),
            f"blk.{b}.ffn_down_shexp.weight": (s, h),
            f"blk.{b}.ffn_gate_exps.weight": (h, i, e), f"blk.{b}.ffn_up_exps.weight": (h, i, e),
            f"blk.{b}.ffn_down_exps.weight": (i, h, e),
        }  # fmt: skip
    return out


def sources(folder, cfg) -> dict[str, np.ndarray]:
    """The export's weights under their GGUF names, in PyTorch order, stacked by hand."""
    sd = {k: v.float().numpy() for k, v in load_file(str(folder / "model.safetensors")).items()}
    out = {
        "token_embd.weight": sd["model.embed_tokens.weight"],
        "output.weight": sd["lm_head.weight"],
        "output_norm.weight": sd["model.norm.weight"],
    }
    for b in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{b}."
        out |= {
            f"blk.{b}.attn_q.weight": sd[p + "self_attn.q_proj.weight"],
            f"blk.{b}.attn_q.bias": sd[p + "self_attn.q_proj.bias"],
            f"blk.{b}.attn_output.weight": sd[p + "self_attn.o_proj.weight"],
            f"blk.{b}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
            f"blk.{b}.ffn_gate_inp.weight": sd[p + "mlp.gate.weight"],
            f"blk.{b}.ffn_gate_inp_shexp.weight": sd[p + "mlp.shared_expert_gate.weight"][0],
            f"blk.{b}.ffn_down_shexp.weight": sd[p + "mlp.shared_expert.down_proj.weight"],
        }
        for proj, name in (("gate_proj", "gate_exps"), ("up_proj", "up_exps"), ("down_proj", "down_exps")):
            experts = [sd[f"{p}mlp.experts.{x}.{proj}.weight"] for x in range(cfg["num_experts"])]
            out[f"blk.{b}.ffn_{name}.weight"] = np.stack(experts)
    return out


def test_names_shapes_and_metadata_are_what_llama_cpp_loads(layout, tmp_path):
    folder, cfg = layout
    written = write_gguf(folder, tmp_path / "m.gguf", "f16")
    reader = GGUFReader(written.path)
    dims = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    assert dims == expected(cfg)
    arch = "qwen2moe"
    assert field(reader, "general.architecture") == arch and field(reader, "general.file_type") == 1
    for key, value in {
        "block_count": 2, "embedding_length": 64, "feed_forward_length": 192, "context_length": 512,
        "expert_count": 3, "expert_used_count": 1, "expert_feed_forward_length": 48,
        "expert_shared_feed_forward_length": 48, "attention.head_count": 4, "attention.head_count_kv": 2,
        "attention.key_length": 16, "rope.dimension_count": 16,
    }.items():  # fmt: skip
        assert field(reader, f"{arch}.{key}") == value, key
    assert field(reader, f"{arch}.rope.freq_base") == pytest.approx(cfg["rope_theta"])
    assert field(reader, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(cfg["rms_norm_eps"])
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.pre") == "gpt-2"
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    assert field(reader, "tokenizer.ggml.tokens") == sorted(vocab, key=vocab.get)
    assert field(reader, "tokenizer.ggml.token_type")[:5] == [3, 3, 3, 3, 1]  # specials CONTROL, bytes NORMAL
    assert (
        field(reader, "tokenizer.ggml.bos_token_id") == 1
        and field(reader, "tokenizer.ggml.eos_token_id") == 2
    )
    assert any("no BPE merges" in n for n in written.notes)  # the byte tokenizer has none: said, not hidden


@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0"])
def test_round_trip_within_the_types_rounding(layout, tmp_path, qtype):
    folder, cfg = layout
    written = write_gguf(folder, tmp_path / f"m-{qtype}.gguf", qtype)
    tensors = {t.name: t for t in GGUFReader(written.path).tensors}
    # half a rounding step: 2^-11 |x| for f16; for q8_0 half of d = max|block| / 127, plus 127 x d's own
    # f16 rounding (2^-11 d)
    tol = {"F32": 0.0, "F16": 2.0**-11, "Q8_0": (0.5 + 127 * 2.0**-11) / 127}
    for name, source in sources(folder, cfg).items():
        t = tensors[name]
        back = dequantize(t.data, t.tensor_type).reshape(source.shape)
        err = np.abs(back - source).max() / max(np.abs(source).max(), 1e-30)
        assert err <= tol[t.tensor_type.name], (name, t.tensor_type.name, err)
    types = {name: t.tensor_type.name for name, t in tensors.items()}
    assert types["blk.0.attn_norm.weight"] == types["blk.1.ffn_gate_inp.weight"] == "F32"
    assert types["blk.0.ffn_gate_inp_shexp.weight"] == "F32"
    assert float(tensors["blk.0.ffn_gate_inp_shexp.weight"].data[0]) == pytest.approx(SHARED_GATE)  # not 0
    matrix = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}[qtype]
    assert types["blk.0.ffn_gate_exps.weight"] == types["token_embd.weight"] == matrix
    # rows of 48 cannot form q8_0 blocks of 32: f16 instead, and the notes say so
    assert types["blk.0.ffn_down_exps.weight"] == ("F16" if qtype == "q8_0" else matrix)
    assert any("ffn_down_exps" in n and "f16" in n for n in written.notes) == (qtype == "q8_0")
    assert written.tensor_types == dict(Counter(types.values()))


@pytest.mark.parametrize("qtype", ["f32", "q8_0"])
def test_transformers_reads_the_gguf_with_the_exports_logits(layout, tmp_path, qtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    folder, _ = layout
    written = write_gguf(folder, tmp_path / "m.gguf", qtype)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    got = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=written.path.name, config=AutoConfig.from_pretrained(folder), dtype=torch.float32
    ).eval()
    with torch.no_grad():
        diff = (ref(CALIB[:1]).logits - got(CALIB[:1]).logits).abs().max().item()
    assert diff < (1e-5 if qtype == "f32" else 0.05), diff


def test_export_format_gguf_writes_a_verified_folder(tmp_path):
    moe = converted("llama")
    out = tmp_path / "tiny-gguf"
    result = export_model(moe, out, ExportConfig(format="gguf", gguf_type="q8_0"), calib_ids=CALIB)
    assert (out / "tiny-gguf.gguf").is_file() and (out / "config.json").is_file()
    assert (out / "tokenizer.json").is_file() and not list(out.glob("*.safetensors"))
    assert not list(tmp_path.glob(".gguf-layout-*"))  # the temporary layout is gone
    g, f = result.gguf, result.fidelity
    assert g["ok"] and g["names_match"] and g["shapes_match"] and g["metadata_match"]
    assert g["type"] == "q8_0" and g["tensor_types"]["Q8_0"] > 0 and g["max_rel_error"]["Q8_0"] > 0
    assert f["gguf_file"] == "tiny-gguf.gguf" and f["clean_process"] and f["kl"] < 1e-2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["format"] == "gguf" and metrics["gguf"]["ok"]
    card = (out / "README.md").read_text()
    assert "llama-cli -m tiny-gguf.gguf" in card and "llama-server -m tiny-gguf.gguf" in card
    assert "from `tiny-gguf.gguf`" in card and "benchmarks/gguf_check.py" in card


def _broken(folder, tmp_path, edit_config=None, edit_tokenizer=None):
    copy = tmp_path / "broken"
    shutil.copytree(folder, copy)
    for name, edit in (("config.json", edit_config), ("tokenizer.json", edit_tokenizer)):
        if edit:
            data = json.loads((copy / name).read_text())
            edit(data)
            (copy / name).write_text(json.dumps(data))
    return copy


@pytest.mark.parametrize(
    "edit_config, edit_tokenizer, message",
    [
        (lambda c: c.update(norm_topk_prob=True), None, "norm_topk_prob"),
        (lambda c: c.update(tie_word_embeddings=True), None, "tied"),
        (lambda c: c.update(moe_intermediate_size=64), None, "config.json implies"),
        (None, lambda t: t.update(pre_tokenizer={"type": "Metaspace"}), "pre-tokenizer"),
        (None, lambda t: t["model"].update(byte_fallback=True), "byte fallback"),
    ],
    ids=["renormalised-topk", "tied", "shape", "pre-tokenizer", "sentencepiece-like"],
)
def test_folders_llama_cpp_cannot_run_are_refused(layout, tmp_path, edit_config, edit_tokenizer, message):
    folder, _ = layout
    broken = _broken(folder, tmp_path, edit_config, edit_tokenizer)
    with pytest.raises(ExportError, match=message):
        write_gguf(broken, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("x.gguf*"))  # nothing half-written left behind


def test_bad_types_and_a_non_export_folder_are_refused(tmp_path):
    with pytest.raises(ExportError, match="config.json"):
        write_gguf(tmp_path, tmp_path / "x.gguf")
    with pytest.raises(ExportError, match="q8_0"):
        write_gguf(tmp_path, tmp_path / "x.gguf", "q4_0")
    with pytest.raises(ValueError, match="gguf_type"):
        ExportConfig(format="gguf", gguf_type="q4_0")
    assert tuple(QTYPES) == GGUF_TYPES


def test_pre_tokenizers_map_to_llama_cpp_names():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    digits = {"type": "Digits", "individual_digits": True}
    assert pre_tokenizer_name(byte_level) == "gpt-2"
    assert pre_tokenizer_name({"type": "Sequence", "pretokenizers": [digits, byte_level]}) == "smollm"
    qwen2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    split = {"type": "Split", "pattern": {"Regex": qwen2}, "behavior": "Isolated", "invert": False}
    plain = {**byte_level, "use_regex": False}
    assert pre_tokenizer_name({"type": "Sequence", "pretokenizers": [split, plain]}) == "qwen2"
    llama3 = {**split, "pattern": {"Regex": qwen2.replace(r"|\p{N}|", r"|\p{N}{1,3}|")}}
    assert pre_tokenizer_name({"type": "Sequence", "pretokenizers": [llama3, plain]}) == "llama-bpe"
    with pytest.raises(ExportError):
        pre_tokenizer_name({**byte_level, "add_prefix_space": True})  # llama.cpp adds no prefix space


def test_cli_takes_the_gguf_type():
    from moe_core.cli import build_parser

    args = build_parser().parse_args(["export", "--format", "gguf", "--gguf-type", "q8_0"])
    assert args.format == "gguf" and args.gguf_type == "q8_0"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["export", "--format", "gguf", "--gguf-type", "q4_0"])


def test_the_shared_gate_gives_one_half_exactly_and_stays_far_from_llama_cpps_trouble():
    """The ungated shared expert's gate (the export doubles its down projection): sigmoid(gate . x) must be 0.5
    exactly in float32 and bfloat16 for any hidden state from 1e-3 to 1e5 in size, and gate . x must stay a
    normal float32 with a margin of 1e6: llama.cpp computes the sigmoid as silu(z)/z, which gave NaN logits at
    the 1e-30 used before (llama-cpp-python 0.3.36 on SmolLM2 CMoE)."""
    for size in (1e-3, 1.0, 1e5):
        for dtype in (torch.float32, torch.bfloat16):
            z = torch.tensor([SHARED_GATE * size, -SHARED_GATE * size], dtype=dtype)
            assert torch.sigmoid(z).tolist() == [0.5, 0.5], (size, dtype)
    assert torch.finfo(torch.float32).tiny * 1e6 < SHARED_GATE * 1e-3
