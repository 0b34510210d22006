"""Export a converted folder one decoder layer at a time, never whole in memory (moe_core.streaming).

A conversion streamed under --max-memory is exported the way it was made: its folder opens as a meta-device shell
(:func:`moe_core.streaming.open_model`), and each decoder layer is read from the shards, written in the export's
layout and freed, so the export needs one layer's weights, not the model's.

- ``exact``: the converted folder's tensors, copied shard by shard under their own names and in their stored
  dtype, with the config and modeling file of the in-memory exact export.
- ``portable``: Qwen2-MoE in its on-disk layout (one tensor per expert and projection, as ``save_pretrained``
  writes it and vLLM reads it), where every MoE layer's routing has an exact Qwen2-MoE form (a conversion in
  ``--routing-form native``). An approximated routing is fitted on calibration activations and chosen by a
  whole-model KL, which does not stream: such a folder is refused with what would export it.
- ``llamacpp``: the same in the subset llama.cpp's qwen2moe runs (norm_topk_prob false, dense layers as
  shared-only MoE layers); ``gguf``: that layout, streamed to disk, then written tensor by tensor as one GGUF
  file (export/gguf.py reads one tensor at a time) and read back.

Verification without the whole model. Portable: the fixed evaluation text runs through the internal layers and
through Qwen2-MoE layers built from the tensors written, side by side, one layer at a time, then through both
heads; the fidelity numbers are those of the in-memory export's reload (max |logit difference|, KL, top-1,
perplexities), less the greedy generation, which needs the whole model. Exact: its tensors are the converted
folder's, byte for byte; in a clean process, the class its config and modeling file define is built on the meta
device and must expect exactly the tensors written, with their shapes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ..moe import MoEMLP
from ..plumbing import check_cancel
from .card import provenance
from .config import MODELING_FILE, ExportConfig, ExportResult
from .formats import _progress, _save_tokenizer, add_legacy_keys, exact_config, modeling_source, write_export
from .native import ExportError

STREAMED_FORMATS = ("exact", "portable", "llamacpp", "gguf")
STREAMED_NOTE = (
    "exported one decoder layer at a time from a folder larger than the memory bound; its fidelity was measured "
    "layer by layer or by its structure (see Fidelity), not by reloading the whole model"
)


def export_streamed(
    folder: str | Path,
    out: str | Path,
    cfg: ExportConfig | None = None,
    *,
    progress: Callable[[float, str], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> ExportResult:
    """Export the converted folder ``folder`` to ``out`` in ``cfg.format`` (exact or portable), one decoder layer
    in memory at a time, verified as the module docstring says, with the in-memory export's card and reports."""
    from ..checkpoint import is_converted, read_json
    from ..streaming import open_model

    cfg, folder = cfg or ExportConfig(), Path(folder).expanduser()
    if not is_converted(folder):
        raise ExportError(
            f"'{folder}' is not a converted folder: convert it first (python -m moe_core convert)."
        )
    if cfg.format not in STREAMED_FORMATS:
        raise ExportError(f"--format {cfg.format} does not stream; streamed: {', '.join(STREAMED_FORMATS)}.")
    source = open_model(folder)
    if not any(isinstance(m, MoEMLP) for m in source.dense.model.modules()):
        raise ExportError("The model has no MoE layers: convert it first (python -m moe_core convert).")

    def write(tmp: Path) -> ExportResult:
        if cfg.format == "exact":
            return _exact(source, tmp, cfg, progress, cancel)
        if cfg.format == "gguf":
            from .formats import write_gguf_export

            def layout(folder: Path, llamacpp: ExportConfig) -> ExportResult:
                return _native(source, folder, llamacpp, progress, cancel)

            result = write_gguf_export(None, tmp, cfg, None, progress, cancel, write_layout=layout)
            if result.fidelity:  # measured on the layout; the file's own rounding is in the read-back check
                exact = cfg.gguf_type == "f32" and result.fidelity["identical"]
                result.fidelity |= {
                    "identical": exact,
                    "measured_on": "the float32 layout the GGUF was written from",
                }
                result.notes.append(
                    f"fidelity measured layer by layer on the float32 llama.cpp layout; the GGUF stores it as "
                    f"{cfg.gguf_type}, whose rounding the read-back check measures (max relative error per type)"
                )
            return result
        return _native(source, tmp, cfg, progress, cancel)

    def meta() -> dict:
        run_config, metrics = read_json(folder, "run_config.json"), read_json(folder, "metrics.json")
        return provenance(source.dense, cfg, None, None, run_config, metrics)

    return write_export(out, cfg, write, meta, progress, cancel)


def _layer_names(source) -> list[list[str]]:
    """The folder's tensor names, one group per decoder layer in order, then the rest."""
    prefix = source.dense.adapter.layers_path + "."
    groups: list[list[str]] = [[] for _ in range(source.dense.n_layers)] + [[]]
    for name in source.reader.files:
        index = name[len(prefix) :].split(".", 1)[0] if name.startswith(prefix) else ""
        groups[int(index) if index.isdigit() else -1].append(name)
    return groups


# ---------------------------------------------------------------------------------------------
# Exact


def _exact(source, tmp: Path, cfg: ExportConfig, progress, cancel) -> ExportResult:
    from ..checkpoint import MOE_LAYERS, read_json
    from ..streaming import ShardWriter

    model = source.dense.model
    text = modeling_source(model)  # first: refuses classes transformers does not define
    writer, groups = ShardWriter(tmp, {"format": "pt"}), _layer_names(source)
    for n, names in enumerate(groups):
        check_cancel(cancel)
        _progress(progress, 0.8 * n / len(groups), f"Copying layer {n + 1} of {len(groups) - 1}")
        writer.add({name: source.reader.get(name) for name in names if name != _tied_head(source)})
    writer.close()
    config = exact_config(model, source.dense.adapter)
    config["dtype"] = read_json(source.dense.spec, MOE_LAYERS).get("dtype", config.get("dtype"))
    (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
    (tmp / MODELING_FILE).write_text(text)
    _save_tokenizer(source.dense, tmp)
    notes = ["needs trust_remote_code=True", STREAMED_NOTE]
    result = ExportResult(tmp, "exact", "MoEStudioForCausalLM", True, notes)
    if cfg.verify:
        _progress(progress, 0.85, "Checking the export's structure in a clean process")
        result.fidelity = check_structure(tmp)
    return result


def _tied_head(source) -> str | None:
    return source.head_name if source.tied else None


_STRUCTURE_SCRIPT = r"""
import json, sys
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM
remote = sys.argv[2] == "remote"  # the exact export's own modeling file (MoE Studio's template)
config = AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=remote)
with init_empty_weights():
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=remote)
model.tie_weights()  # as from_pretrained does: a tied head is not in the checkpoint
head, embed = model.get_output_embeddings(), model.get_input_embeddings()
tied = head is not None and head.weight is embed.weight
names = {id(m): n for n, m in model.named_modules()}
skip = f"{names[id(head)]}.weight" if tied else None
shapes = {k: list(v.shape) for k, v in model.state_dict().items() if k != skip}
print(json.dumps({"class": type(model).__name__, "shapes": shapes, "moe_core_imported": "moe_core" in sys.modules}))
"""


def check_structure(folder: Path) -> dict:
    """Build the exact export's class on the meta device in a clean process (its config and modeling file, with
    trust_remote_code) and compare the tensors it expects with those written: names and shapes."""
    from safetensors import safe_open

    from ..streaming import ShardReader
    from .verify import _clean_env

    env = {**_clean_env(), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _STRUCTURE_SCRIPT, str(folder.resolve()), "remote"],
        cwd=folder, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if proc.returncode != 0:
        raise ExportError(
            f"Building the exact export's class in a clean process failed:\n{proc.stderr[-3000:]}"
        )
    built = json.loads(proc.stdout.strip().splitlines()[-1])
    written = {}
    for name, path in ShardReader(folder).files.items():
        with safe_open(str(path), framework="pt") as f:
            written[name] = list(f.get_slice(name).get_shape())
    expected = built["shapes"]
    missing, extra = sorted(set(expected) - set(written)), sorted(set(written) - set(expected))
    wrong = sorted(n for n in set(expected) & set(written) if expected[n] != written[n])
    if missing or extra or wrong:
        raise ExportError(
            f"The exact export does not match its own class: missing {missing[:5]}, unexpected {extra[:5]}, "
            f"other shapes {wrong[:5]}."
        )
    return {
        "streamed": True,
        "check": "structure",
        "tensors": len(written),
        "identical": True,  # the converted folder's tensors, copied unchanged, under the names the class expects
        "loaded_class": built["class"],
        "clean_process": not built["moe_core_imported"],
    }


# ---------------------------------------------------------------------------------------------
# Portable: Qwen2-MoE


# MoEMLP tensors the routing reads (the experts' matrices are not read for the routing pass)
def _routing_tensor(name: str) -> bool:
    return name not in ("gate_up_proj", "down_proj") and not name.startswith("shared_expert.")


def routing_forms(source, forced_norm: bool | None = None, cancel=None) -> tuple[int, bool, dict]:
    """Pass 1: each MoE layer's routing tensors read (not its experts), its exact Qwen2-MoE forms found, and
    freed. Returns (top_k, norm_topk_prob, {layer: LayerRoute}); ExportError where a layer has none (under
    ``forced_norm``, llama.cpp's false, when given)."""
    from ..streaming import read_module
    from .routing import _ranges, approximation_reasons, choose_global, exact_forms

    dense = source.dense
    forms, reasons = {}, {}
    for i in range(dense.n_layers):
        block = dense.mlp(i)
        if not isinstance(block, MoEMLP):
            continue
        check_cancel(cancel)
        prefix = f"{dense.adapter.layers_path}.{i}.{dense.adapter.mlp_name}."
        read_module(block, source.reader, prefix, source.dense_dtype, wanted=_routing_tensor)
        forms[i] = exact_forms(block)
        for reason in approximation_reasons(block):
            reasons.setdefault(reason, []).append(i)
        block.to("meta")
    top_k, norm = choose_global(forms, forced_norm)
    odd = "no exact form shared with the other layers" + (
        " under norm_topk_prob false (what llama.cpp runs)" if forced_norm is False else ""
    )
    for i, layer_forms in forms.items():
        if not any((k, n) == (top_k, norm) for k, n, _ in layer_forms):
            reasons.setdefault(odd, []).append(i)
    if reasons:
        why = "; ".join(f"{r} (layers {_ranges(ls)})" for r, ls in reasons.items())
        raise ExportError(
            f"This model's routing has no exact Qwen2-MoE form: {why}. A portable export then fits routers on "
            "calibration activations and picks them by a whole-model KL, which does not stream. Convert with "
            "--routing-form native (exact in Qwen2-MoE), export --format exact, or export in memory (drop "
            "--max-memory) where the model fits."
        )
    routes = {i: r for i, fs in forms.items() for k, n, r in fs if (k, n) == (top_k, norm)}
    return top_k, norm, routes


def _on_disk(state: dict[str, torch.Tensor], n_experts: int, width: int) -> dict[str, torch.Tensor]:
    """Qwen2-MoE's in-memory expert tensors (E, 2I, H) and (E, H, I) as its checkpoints store them: one gate, up
    and down matrix per expert (what save_pretrained writes and vLLM and llama.cpp's converter read)."""
    out = {}
    for name, tensor in state.items():
        if name.endswith("experts.gate_up_proj"):
            stem = name.removesuffix("gate_up_proj")
            for e in range(n_experts):
                out[f"{stem}{e}.gate_proj.weight"] = tensor[e, :width]
                out[f"{stem}{e}.up_proj.weight"] = tensor[e, width:]
        elif name.endswith("experts.down_proj"):
            stem = name.removesuffix("down_proj")
            for e in range(n_experts):
                out[f"{stem}{e}.down_proj.weight"] = tensor[e]
        else:
            out[name] = tensor
    return out


def _native(source, tmp: Path, cfg: ExportConfig, progress, cancel) -> ExportResult:
    """Qwen2-MoE (portable, or the llama.cpp layout) one decoder layer at a time, compared layer by layer."""
    from ..streaming import LayerStream, ShardWriter, streaming
    from .formats import native_notes
    from .native import (
        _common_shape,
        dense_mlp_state,
        layer_base_state,
        llamacpp_problems,
        moe_layer_state,
        native_problems,
        qwen2moe_config,
        shared_only_state,
    )

    dense, reader = source.dense, source.reader
    model, adapter = dense.model, dense.adapter
    o_bias = [
        reader.get(f"{adapter.layers_path}.{i}.self_attn.o_proj.bias")
        for i in range(dense.n_layers)
        if f"{adapter.layers_path}.{i}.self_attn.o_proj.bias" in reader
    ]
    llamacpp = cfg.format == "llamacpp"
    problems = native_problems(model, o_bias) + (llamacpp_problems(model) if llamacpp else [])
    if problems:
        target = "llama.cpp" if llamacpp else "the portable Qwen2-MoE format"
        raise ExportError(
            f"{model.config.model_type} cannot be exported to {target}: {'; '.join(problems)}. "
            "Use --format exact (safetensors + modeling file, trust_remote_code)."
        )
    _progress(progress, 0.02, "Reading each MoE layer's router")
    top_k, norm, routes = routing_forms(source, False if llamacpp else None, cancel)
    blocks = {i: dense.mlp(i) for i in routes}
    n_experts, width, shared = _common_shape(blocks, cfg.width_align)
    dense_layers = [i for i in range(dense.n_layers) if i not in blocks]
    if llamacpp and dense_layers:  # llama.cpp's qwen2moe needs every layer MoE: a dense one is all shared
        shared = max(shared, model.config.intermediate_size)
    config = qwen2moe_config(
        model, n_experts=n_experts, top_k=top_k, norm_topk_prob=norm, width=width, shared=shared,
        mlp_only=[] if llamacpp else dense_layers, untie=True,
    )  # fmt: skip
    config.dtype = source.dense_dtype
    gemma = model.config.model_type == "gemma"
    twin = _Twin(source, config, _embedding(source, gemma)) if cfg.verify else None
    writer, stream = ShardWriter(tmp, {"format": "pt"}), LayerStream(source, None)
    with streaming(stream):
        for i in range(dense.n_layers):
            check_cancel(cancel)
            _progress(
                progress, 0.05 + 0.85 * i / dense.n_layers, f"Writing layer {i + 1} of {dense.n_layers}"
            )
            stream.load(dense, i)
            layer, p = adapter.layers(model)[i], f"model.layers.{i}."
            state = layer_base_state(layer, i, model.config)
            if i in routes:
                block, route = layer.mlp, routes[i]
                state |= moe_layer_state(block, route.weight, route.scales, width, shared, p + "mlp.")
            elif llamacpp:
                hidden = config.hidden_size
                state |= shared_only_state(adapter, layer.mlp, n_experts, width, shared, hidden, p + "mlp.")
            else:
                state |= dense_mlp_state(adapter, layer.mlp, p + "mlp.")
            if twin is not None:
                twin.layer(i, layer, state)
            writer.add(_on_disk(state, n_experts, width))
            stream.done(dense, i)
        rest = _rest(source, gemma)
        if twin is not None:
            stream.head(dense)
            fidelity = twin.finish(rest)
        writer.add(rest)
    writer.close()
    config.save_pretrained(str(tmp))
    add_legacy_keys(tmp / "config.json")
    _save_tokenizer(dense, tmp)
    notes = native_notes(model, [], llamacpp) + [STREAMED_NOTE]
    routing = {
        "top_k": top_k, "norm_topk_prob": norm, "exact": True, "layers_exact": len(routes), "layers_fitted": 0,
        "layers_naive": 0, "layers_bias_dropped": 0, "notes": [],
        "layers": {str(i): {"how": "exact"} for i in routes},
    }  # fmt: skip
    result = ExportResult(tmp, cfg.format, "Qwen2MoeForCausalLM", True, notes, routing=routing)
    if twin is not None:
        result.fidelity = fidelity
    return result


def _embedding(source, gemma: bool) -> torch.Tensor:
    """The input embedding as Qwen2-MoE holds it (Gemma's sqrt(H) scale folded in, in the weight dtype)."""
    embed = source.reader.get(source.embed_name, source.dense_dtype)
    if gemma:
        embed = embed * torch.tensor(source.dense.model.config.hidden_size**0.5, dtype=embed.dtype)
    return embed


def _rest(source, gemma: bool) -> dict[str, torch.Tensor]:
    """Embeddings, final norm and an untied LM head (Qwen2-MoE's exports always write it), in Qwen2-MoE names."""
    from .native import _norm

    embed = _embedding(source, gemma)
    head = embed.clone() if source.tied else source.reader.get(source.head_name, source.dense_dtype)
    norm = _norm(source.dense.model.model.norm.weight.detach(), gemma)
    return {"model.embed_tokens.weight": embed, "model.norm.weight": norm, "lm_head.weight": head}


class _Twin:
    """The fixed evaluation text through the internal layers and through Qwen2-MoE layers built from the tensors
    written, side by side, one layer at a time (the export's fidelity without the whole model)."""

    def __init__(self, source, config, embedding: torch.Tensor):
        from accelerate import init_empty_weights
        from transformers import Qwen2MoeForCausalLM

        from ..layerwise import capture_layer_inputs
        from .verify import eval_tokens

        self.dense = source.dense
        self.ids = eval_tokens(self.dense.tokenizer)
        self.internal = capture_layer_inputs(self.dense, self.ids)
        with init_empty_weights():
            self.native = Qwen2MoeForCausalLM(config).eval()
        # the native hidden states (1, T, H), from the table written
        self.hidden = F.embedding(self.ids, embedding)

    @torch.no_grad()
    def layer(self, i: int, layer: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        from dataclasses import replace

        from ..layerwise import run_layer

        native_layer, prefix = self.native.model.layers[i], f"model.layers.{i}."
        native_layer.load_state_dict({k.removeprefix(prefix): v for k, v in state.items()}, assign=True)
        native_in = replace(self.internal, hidden=[self.hidden])
        self.hidden = run_layer(native_layer, native_in).hidden[0]
        self.internal = run_layer(layer, self.internal)
        native_layer.to("meta")

    @torch.no_grad()
    def finish(self, rest: dict[str, torch.Tensor]) -> dict:
        from ..layerwise import head_logits
        from .verify import compare

        ref = head_logits(self.dense.model, self.dense.adapter, self.internal)[0].float()
        norm = self.native.model.norm
        norm.load_state_dict({"weight": rest["model.norm.weight"]}, assign=True)
        logits = F.linear(norm(self.hidden), rest["lm_head.weight"]).float()
        return compare(ref, logits, self.ids) | {
            "streamed": True,
            "check": "layer by layer",
            "loaded_class": "Qwen2MoeForCausalLM",
        }
