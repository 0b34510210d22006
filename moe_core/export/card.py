"""The model card (README.md), metrics.json and run_config.json of an export, its provenance, and the zip."""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from .config import EXACT_TOL, ExportResult
from .native import ExportError

# ---------------------------------------------------------------------------------------------
# Provenance, model card, zip


def provenance(moe, cfg, calib_ids, calib_text, run_config, source_metrics) -> dict:
    import safetensors
    import transformers

    from .. import __version__
    from ..methods import METHODS
    from ..model_io import ConvertedModel

    declared = isinstance(moe, ConvertedModel)  # a bare model has no conversion record
    conversion = moe.conversion if declared else None
    run_config = run_config or (moe.run_config if declared else {})
    method = run_config.get("method") or (conversion.method if conversion is not None else None)
    calib = {"text": calib_text or (run_config.get("data") or {}).get("text")}
    if calib_ids is not None:
        calib["tokens"] = int(calib_ids.numel())
        calib["sha256"] = hashlib.sha256(calib_ids.to(torch.int64).cpu().numpy().tobytes()).hexdigest()
    return {
        "source_model": (run_config.get("model") or {}).get("spec") or moe.spec,
        "method": method,
        "paper": METHODS[method].paper if method in METHODS else None,
        "method_config": conversion.config if conversion is not None else run_config.get(method or "", None),
        "run_config": {**run_config, "export": asdict(cfg)},
        "calibration": calib,
        "source_metrics": source_metrics or (moe.metrics if declared else {}),
        "versions": {
            "moe_studio": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "safetensors": safetensors.__version__,
            "python": platform.python_version(),
        },
    }


def write_reports(folder: Path, result: ExportResult, meta: dict) -> None:
    metrics = {
        "format": result.format,
        "architecture": result.architecture,
        "exact_by_construction": result.exact_by_construction,
        "fidelity": result.fidelity,
        "routing": result.routing,
        **({"gguf": result.gguf} if result.gguf else {}),
        "notes": result.notes,
        **{
            k: meta[k]
            for k in ("source_model", "method", "paper", "calibration", "source_metrics", "versions")
        },
        "seconds": meta["seconds"],
    }
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    (folder / "run_config.json").write_text(json.dumps(meta["run_config"], indent=2, default=str))
    (folder / "README.md").write_text(model_card(result, meta))


def model_card(result: ExportResult, meta: dict) -> str:
    """README.md: how to load, what was done (method, paper, source), and the measured fidelity."""
    remote = result.format == "exact"
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        f"tags: [mixture-of-experts, moe-studio, {meta['method'] or 'moe'}]",
        "---",
        f"# {meta['name']}: {meta['method'] or 'MoE'} conversion of {meta['source_model']}",
        "",
        f"Written by MoE Studio {meta['versions']['moe_studio']} as **{result.format}** "
        f"(`{result.architecture}`).",
        "",
        *(_gguf_section(result, meta["name"]) if result.format == "gguf" else _load_section(remote)),
        *(_llamacpp_section() if result.format == "llamacpp" else []),
        *(_engines_section(result, meta) if result.format in ("portable", "llamacpp") else []),
        *_fidelity_section(result),
        *_routing_section(result),
        "## Provenance",
        "",
        f"- Source model: `{meta['source_model']}`",
        f"- Method: {meta['method'] or 'unknown'}" + (f" ({meta['paper']})" if meta["paper"] else ""),
        f"- Calibration text: `{meta['calibration'].get('text')}`, "
        f"{meta['calibration'].get('tokens', 'unknown')} tokens, sha256 `{meta['calibration'].get('sha256', 'n/a')}`",
        "- Library versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        "",
        *_source_metrics_section(meta["source_metrics"]),
        "## Run config",
        "",
        "```json",
        json.dumps(meta["run_config"], indent=2, default=str),
        "```",
        "",
        "`run_config.json` and `metrics.json` in this folder hold the same information as files.",
        "",
    ]
    return "\n".join(lines)


def _load_section(remote: bool) -> list[str]:
    flag = ", trust_remote_code=True" if remote else ""
    why = (
        "This export **needs `trust_remote_code=True`**: `modeling_moe_studio.py` (self-contained, imports only "
        "torch and transformers) defines the MoE blocks. Read it before running it."
        if remote
        else "A stock transformers architecture: no remote code. vLLM serves `Qwen2MoeForCausalLM` natively."
    )
    return [
        "## Load",
        "",
        why,
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder"{flag})',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
        "```",
        "",
    ]


def _llamacpp_section() -> list[str]:
    return [
        "## llama.cpp",
        "",
        "Laid out for llama.cpp's `qwen2moe` graph: untied embeddings, raw softmax routing weights "
        "(`norm_topk_prob=false`), every layer a MoE layer (dense layers held by the shared expert), a "
        "nonzero shared-expert gate (1e-20). Convert with `python convert_hf_to_gguf.py <this folder> "
        "--outtype f32` (or bf16; not f16, where the 1e-20 gate underflows to 0 and llama.cpp's "
        "silu(x)/x sigmoid gives NaN). llama.cpp was not run on this export: `python benchmarks/llamacpp_check.py "
        "--llama-cpp <llama.cpp> --export <this folder>` runs it and compares its logits with transformers on "
        "the same folder (top-k routing may flip near-ties when the summation order changes).",
        "",
        "`python -m moe_core export --format gguf` writes the GGUF itself, no conversion script needed.",
        "",
    ]


def _engines_section(result: ExportResult, meta: dict) -> list[str]:
    """Which serving engines load a Qwen2-MoE export, with which command, and what was checked where."""
    cfg = meta.get("native_config") or {}
    dense_layers = cfg.get("mlp_only_layers") or []
    width, shared = cfg.get("moe_intermediate_size"), cfg.get("shared_expert_intermediate_size")
    checked = "identical to" if (result.fidelity or {}).get("identical") else "measured against"
    sglang = (
        f"**not** for this export: SGLang treats every layer as MoE and ignores `mlp_only_layers` {dense_layers} "
        "(export with --format llamacpp, where dense layers are shared-only MoE layers)"
        if dense_layers
        else "`python -m sglang.launch_server --model-path <this folder>` (lm_head is written, not tied)"
    )
    return [
        "## Serving engines",
        "",
        "| engine | command | checked here |",
        "|---|---|---|",
        f"| transformers | `AutoModelForCausalLM.from_pretrained(<this folder>)` | yes: reloaded in a clean "
        f"process, {checked} the internal model (table below) |",
        "| vLLM | `vllm serve <this folder>` (Qwen2MoeForCausalLM; `--enable-expert-parallel` across GPUs) | no "
        "(no GPU here): the layout meets its loader (q/k/v biases written, zeros where the source has none; "
        "head_dim = hidden / heads) |",
        f"| SGLang | {sglang} | no |",
        "| llama.cpp | `python -m moe_core export --format gguf`, then `llama-cli -m <file>.gguf` | "
        "with --format gguf: the GGUF is read back and reloaded |",
        "",
        f"Routing weights are raw softmax probabilities (`norm_topk_prob=false`), which llama.cpp also requires; "
        f"expert width {width}, shared expert width {shared} (zero-padded, exact; `--width-align 128` pads to "
        "vLLM's fused-kernel multiples).",
        "",
    ]


def _gguf_section(result: ExportResult, name: str) -> list[str]:
    """How to run the GGUF, and what reading it back found."""
    g, file = result.gguf, f"{name}.gguf"
    lines = [
        "## Run with llama.cpp",
        "",
        f"`{file}` is a GGUF for llama.cpp's `qwen2moe` architecture, written by MoE Studio (no conversion script).",
        "",
        "```bash",
        f'llama-cli -m {file} -p "The history of the city"',
        f"llama-server -m {file} --port 8080",
        "```",
        "",
        "transformers reads it too (config.json here carries the expert widths its GGUF reader does not map):",
        "",
        "```python",
        "from transformers import AutoConfig, AutoModelForCausalLM",
        f'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder", gguf_file="{file}",',
        '                                             config=AutoConfig.from_pretrained("path/to/this/folder"))',
        "```",
        "",
        "Checked on SmolLM2-135M CMoE S2A2E8 with llama-cpp-python 0.3.36, llama.cpp against transformers on the "
        "same file (8 x 256 WikiText-2 tokens): top-1 agreement 97.1% f32, 93.8% f16, 80.1% q8_0 (KL 8.5e-3, "
        "1.8e-2, 0.10 per token; perplexity 340.9, 340.0, 338.7 vs 340.0, 340.4, 339.7). Rounding the weights "
        "moves transformers itself about as far (f16 96.1%, q8_0 81.4% top-1 against the f32 weights): top-k "
        "routing flips near-ties. llama.cpp's own quantiser turns the f32 file into bit-identical f16 and q8_0 "
        "files. `python benchmarks/gguf_check.py --export <this folder>` checks this export the same way.",
        "",
    ]
    if not g:
        return lines
    errors = ", ".join(
        f"{k} {v:.2g} (tolerance {g['tolerance'][k]:.2g})" for k, v in g["max_rel_error"].items()
    )
    types = ", ".join(f"{n} {k}" for k, n in g["tensor_types"].items())
    return lines + [
        f"Read back with gguf's GGUFReader: {g['tensors']} tensors ({types}), names, shapes and "
        f"metadata {'as written' if g['names_match'] and g['shapes_match'] and g['metadata_match'] else 'DIFFERENT'}"
        f"; vocabulary {g['vocab']} tokens, pre-tokenizer `{g['pre_tokenizer']}`; worst "
        f"max |de-quantised - source| / max |source| per type: {errors}; {g['bytes'] / 2**20:.1f} MiB.",
        "",
    ]


def _fidelity_section(result: ExportResult) -> list[str]:
    f = result.fidelity
    if not f:
        return ["## Fidelity", "", "Not verified (verification was switched off).", ""]
    verdict = "identical to" if f["identical"] else "an approximation of"
    if f.get("check") == "structure":  # a streamed exact export: moe_core.export.streamed.check_structure
        return [
            "## Fidelity (checked)",
            "",
            f"Exported one decoder layer at a time: its {f['tensors']} tensors are the converted checkpoint's, "
            f"copied unchanged, and `{f['loaded_class']}`, built from this folder's config and modeling file in a "
            "clean process (on the meta device), expects exactly these tensors with these shapes. The model was "
            "not reloaded whole: it is larger than the memory bound it was exported under.",
            "",
        ]
    rows = [
        ("max abs logit difference", f"{f['max_abs_logit_diff']:.3g}"),
        ("KL(internal || export), nats/token", f"{f['kl']:.3g}"),
        ("top-1 agreement", f"{f['top1_agreement']:.4f}"),
        ("perplexity, internal model", f"{f['ppl_internal']:.3f}"),
        ("perplexity, this export", f"{f['ppl_export']:.3f}"),
        ("greedy generation identical", str(f.get("generation_match"))),
    ]
    if f.get("streamed"):  # a streamed portable export, compared layer by layer
        return [
            "## Fidelity (measured)",
            "",
            f"Exported one decoder layer at a time (the model is larger than the memory bound it was exported under),"
            f" and measured the same way: {f['tokens']} fixed tokens of a short English text ran through MoE "
            f"Studio's internal layers and through `{f['loaded_class']}` layers built from the tensors written, "
            f"side by side, then through both heads: this export is **{verdict}** the internal model (identical "
            f"means max |Δlogit| <= {EXACT_TOL:g}). Greedy generation needs the whole model: not run.",
            "",
            "| metric | value |",
            "|---|---|",
            *[f"| {name} | {value} |" for name, value in rows[:-1]],
            "",
        ]
    return [
        "## Fidelity (measured)",
        "",
        f"Reloaded with `AutoModelForCausalLM.from_pretrained`{_from_gguf(f)} in a clean process (loaded class "
        f"`{f['loaded_class']}`) and compared with MoE Studio's internal model on {f['tokens']} fixed tokens "
        f"of a short English text: this export is **{verdict}** the internal model "
        f"(identical means max |Δlogit| <= {EXACT_TOL:g}).",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {name} | {value} |" for name, value in rows],
        "",
    ]


def _from_gguf(f: dict) -> str:
    return f" from `{f['gguf_file']}` (de-quantised)" if f.get("gguf_file") else ""


def _routing_section(result: ExportResult) -> list[str]:
    if not result.routing:
        return []
    r = result.routing
    dropped = f"; expert biases dropped in {r['layers_bias_dropped']}" if r.get("layers_bias_dropped") else ""
    lines = [
        "## Routing in this format",
        "",
        f"top-k {r['top_k']}, norm_topk_prob {str(r['norm_topk_prob']).lower()}; MoE layers exact: "
        f"{r['layers_exact']}, fitted: {r['layers_fitted']}, naive (unfitted): {r['layers_naive']}{dropped}.",
    ]
    if "mean_selection_agreement" in r:
        lines.append(
            f"Approximated layers on the calibration tokens: mean selection agreement "
            f"{r['mean_selection_agreement']:.3f}, mean relative output error {r['mean_relative_error']:.4f}."
        )
    return lines + [""] + [f"- {n}" for n in result.notes] + [""]


def _source_metrics_section(metrics: dict) -> list[str]:
    flat = {k: v for k, v in (metrics or {}).items() if isinstance(v, int | float | str)}
    if not flat:
        return []
    return ["## Evaluation of the converted model", "", *[f"- {k}: {v}" for k, v in flat.items()], ""]


def make_zip(folder: str | Path) -> Path:
    """Zip an export folder to ``<folder>.zip`` (written to a temporary name, then renamed)."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise ExportError(f"'{folder}' is not an export folder (no config.json).")
    tmp = folder.with_name(folder.name + ".zip.partial")
    archive = shutil.make_archive(str(tmp), "zip", root_dir=folder.parent, base_dir=folder.name)
    final = folder.with_name(folder.name + ".zip")
    Path(archive).replace(final)
    return final
