"""Writing each format: the pipeline (temporary folder, verify, card, rename), exact, native, GGUF."""

from __future__ import annotations

import errno
import json
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from ..moe import MoEMLP
from ..plumbing import check_cancel
from .card import make_zip, provenance, write_reports
from .config import MODELING_FILE, TEMPLATE, ExportConfig, ExportResult
from .native import ExportError, build_qwen2moe, head_dim_note, llamacpp_problems, native_problems
from .verify import verify

# ---------------------------------------------------------------------------------------------
# The pipeline


def export_model(
    moe,
    out: str | Path,
    cfg: ExportConfig | None = None,
    *,
    calib_ids: torch.Tensor | None = None,
    calib_text: str | None = None,
    run_config: dict | None = None,
    source_metrics: dict | None = None,
    progress: Callable[[float, str], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> ExportResult:
    """Write ``moe`` (a converted DenseModel) to ``out`` in ``cfg.format``, verified, with a model card.

    calib_ids (N, T): tokens to fit approximated routers on (portable/llamacpp), and whose hash the card
    records; calib_text: the calibration source's name; run_config / source_metrics: the conversion's
    run config and metrics (defaults: those of ``moe``, a ConvertedModel; none for a bare model).
    """
    cfg = cfg or ExportConfig()

    def write(tmp: Path) -> ExportResult:
        result = _write(moe, tmp, cfg, calib_ids, progress, cancel)
        check_cancel(cancel)
        if cfg.verify:
            _progress(progress, 0.8, "Reloading the export in a clean process")
            result.fidelity = verify(moe, [(tmp, cfg.format == "exact")])[0]
        return result

    def meta() -> dict:
        return provenance(moe, cfg, calib_ids, calib_text, run_config, source_metrics)

    return write_export(out, cfg, write, meta, progress, cancel)


def write_export(
    out: str | Path,
    cfg: ExportConfig,
    write: Callable[[Path], ExportResult],
    provenance_of: Callable[[], dict],
    progress=None,
    cancel=None,
) -> ExportResult:
    """What every export does around its writer: refuse a destination that is not an earlier export, ``write``
    (weights, configs, fidelity) into ``<out>.partial``, add the reports and model card, rename it into place (a
    reader never sees half an export; a failure or a cancel leaves nothing behind), zip it when asked."""
    start, out = time.perf_counter(), Path(out)
    check_destination(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        result = write(tmp)
        meta = provenance_of()
        meta["seconds"], meta["name"] = round(time.perf_counter() - start, 2), out.name
        if cfg.format in ("portable", "llamacpp"):
            meta["native_config"] = json.loads((tmp / "config.json").read_text())
        write_reports(tmp, result, meta)
        check_cancel(cancel)
        _swap_into_place(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise disk_full(out, exc) from exc
        raise
    result.folder = out
    if cfg.zip:
        result.zip_path = make_zip(out)
    _progress(progress, 1.0, f"Exported to {out}")
    return result


def disk_full(out: Path, exc: OSError) -> ExportError:
    """The message for a full disk: where, how much is free now, and that nothing was left behind."""
    try:
        free = f"{shutil.disk_usage(out.parent if out.parent.exists() else Path.cwd()).free / 2**20:,.0f} MB"
    except OSError:
        free = "unknown"
    return ExportError(
        f"The disk is full: writing the export to '{out}' failed ({exc.strerror or exc}); {free} free now. "
        "The partial files were removed and any earlier export there is unchanged. Free some space (a "
        "portable export of a model needs about its size in float32), or export to another disk."
    )


def check_destination(out: Path) -> None:
    """Refuse to overwrite anything but an earlier export (a source checkpoint, a home folder, ...)."""
    if not out.exists():
        return
    metrics = out / "metrics.json"
    earlier = metrics.is_file() and "fidelity" in json.loads(metrics.read_text() or "{}")
    if out.is_file() or (any(out.iterdir()) and not earlier):
        raise ExportError(
            f"'{out}' exists and is not an earlier export; choose a new output folder or remove it first."
        )


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place; an earlier export is moved aside first, then deleted."""
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)  # a reader never sees a half-written export
    shutil.rmtree(old, ignore_errors=True)


def _progress(progress, fraction: float, message: str) -> None:
    if progress:
        progress(fraction, message)


def _write(moe, folder: Path, cfg: ExportConfig, calib_ids, progress, cancel) -> ExportResult:
    if not any(isinstance(m, MoEMLP) for m in moe.model.modules()):
        raise ExportError("The model has no MoE layers: convert it first (python -m moe_core convert).")
    if cfg.format == "exact":
        write_exact(moe, folder)
        return ExportResult(folder, "exact", "MoEStudioForCausalLM", True, ["needs trust_remote_code=True"])
    if cfg.format == "gguf":
        return write_gguf_export(moe, folder, cfg, calib_ids, progress, cancel)
    return write_native(moe, folder, cfg, calib_ids, progress, cancel)


# ---------------------------------------------------------------------------------------------
# Exact: safetensors + remote-code modeling file


def write_exact(moe, folder: Path) -> None:
    """The internal model's own weights and a self-contained modeling file registered through auto_map."""
    from safetensors.torch import save_file

    model = moe.model
    source = modeling_source(model)  # first: refuses classes transformers does not define
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    for name in tied_head(model):
        state.pop(name, None)  # tied: safetensors refuses shared storage, the loader re-ties
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(exact_config(model, moe.adapter), indent=2, default=str))
    (folder / MODELING_FILE).write_text(source)
    _save_tokenizer(moe, folder)


def tied_head(model) -> list[str]:
    """State-dict names of an LM head that shares its weight with the input embeddings (none when untied)."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embed is None or head.weight.data_ptr() != embed.weight.data_ptr():
        return []
    return [f"{name}.weight" for name, module in model.named_modules() if module is head]


def exact_config(model, adapter) -> dict:
    """The source config with model_type moe_studio, auto_map, every MoE layer's spec, and where the
    family keeps its layers and MLPs (``adapter``: the model's ArchAdapter)."""
    cfg = model.config.to_dict()
    for key in ("architectures", "auto_map", "transformers_version", "model_type"):
        cfg.pop(key, None)
    mlps = [adapter.mlp(model, i) for i in range(len(adapter.layers(model)))]
    cfg["moe_layers"] = {str(i): mlp.spec() for i, mlp in enumerate(mlps) if isinstance(mlp, MoEMLP)}
    cfg["moe_studio_base"] = {
        "model_type": model.config.model_type,
        "class": type(model).__name__,
        "layers": adapter.layers_path,  # e.g. model.layers, model.language_model.layers
        "mlp": adapter.mlp_name,  # e.g. mlp, feed_forward
    }
    return {
        "model_type": "moe_studio",  # not the family's: a loader without the modeling file must fail, not guess
        "architectures": ["MoEStudioForCausalLM"],
        "auto_map": {
            "AutoConfig": "modeling_moe_studio.MoEStudioConfig",
            "AutoModelForCausalLM": "modeling_moe_studio.MoEStudioForCausalLM",
        },
        **cfg,
    }


def modeling_source(model) -> str:
    """The template with its base classes set to the source family's config and CausalLM classes, imported
    from the transformers modules that define them (composite families included, e.g. Gemma-3's
    Gemma3ForConditionalGeneration with Gemma3Config)."""
    text = TEMPLATE.read_text()
    for cls, alias in ((type(model.config), "BaseConfig"), (type(model), "BaseForCausalLM")):
        if not cls.__module__.startswith("transformers."):
            raise ExportError(
                f"{cls.__name__} comes from the model's own code ({cls.__module__}), not from transformers: "
                "the exact export's modeling file can only build on classes transformers defines. Use "
                "--format portable."
            )
        text = re.sub(
            rf"^from \S+ import \w+ as {alias}(?=  # moe-studio)",
            f"from {cls.__module__} import {cls.__name__} as {alias}",
            text,
            count=1,
            flags=re.MULTILINE,
        )
    return text


def _save_tokenizer(moe, folder: Path) -> None:
    if moe.tokenizer is not None:
        moe.tokenizer.save_pretrained(str(folder))
    gen = getattr(moe.model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(str(folder))


# ---------------------------------------------------------------------------------------------
# Portable and llama.cpp: Qwen2-MoE


def write_native(moe, folder: Path, cfg: ExportConfig, calib_ids, progress, cancel) -> ExportResult:
    """Qwen2-MoE weights (save_pretrained: legacy per-expert layout) plus legacy config keys."""
    from .routing import plan_routing

    llamacpp = cfg.format == "llamacpp"
    problems = native_problems(moe.model) + (llamacpp_problems(moe.model) if llamacpp else [])
    if problems:
        target = "llama.cpp" if llamacpp else "the portable Qwen2-MoE format"
        raise ExportError(
            f"{moe.model.config.model_type} cannot be exported to {target}: {'; '.join(problems)}. "
            "Use --format exact (safetensors + modeling file, trust_remote_code)."
        )
    plan = plan_routing(
        moe, calib_ids, fit=cfg.fit_router, forced_norm=False if llamacpp else None,
        steps=cfg.fit_steps, progress=_scaled(progress, 0.0, 0.6), cancel=cancel,
    )  # fmt: skip
    check_cancel(cancel)
    _progress(progress, 0.65, "Writing Qwen2-MoE weights")
    native = build_qwen2moe(
        moe, plan.routing(), top_k=plan.top_k, norm_topk_prob=plan.norm_topk_prob, llamacpp=llamacpp,
        width_align=cfg.width_align,
    )  # fmt: skip
    native.save_pretrained(str(folder))
    add_legacy_keys(folder / "config.json")
    _save_tokenizer(moe, folder)
    notes = native_notes(moe.model, plan.notes, llamacpp)
    routing = {
        **plan.summary(),
        "layers": {str(i): {"how": r.how, **r.stats} for i, r in plan.layers.items()},
    }
    return ExportResult(folder, cfg.format, "Qwen2MoeForCausalLM", plan.exact, notes, routing=routing)


def native_notes(model, routing_notes: list[str], llamacpp: bool) -> list[str]:
    """What the model card must say about a native export beyond the routing."""
    notes = list(routing_notes) + [n for n in [head_dim_note(model)] if n]
    if not llamacpp:
        return notes
    notes.append(LLAMACPP_NOTE)
    dense = [i for i, layer in enumerate(model.model.layers) if not isinstance(layer.mlp, MoEMLP)]
    if dense:
        notes.append(
            f"dense layers {dense} are MoE layers whose shared expert holds the whole FFN (exact); "
            "every shared expert is zero-padded to that width, which costs compute"
        )
    return notes


LLAMACPP_NOTE = (
    "llama.cpp was not run on this export; `benchmarks/llamacpp_check.py --export <folder>` runs it and "
    "compares its logits with transformers on the same folder"
)
GGUF_NOTE = (
    "llama.cpp was not run on this export; `benchmarks/gguf_check.py --export <folder>` runs the GGUF with "
    "llama-cpp-python and compares its logits with transformers on the same file"
)


def write_gguf_export(
    moe, folder: Path, cfg: ExportConfig, calib_ids, progress, cancel, write_layout=None
) -> ExportResult:
    """The llama.cpp layout built in a temporary folder, written here as ``<name>.gguf`` with its
    config.json (transformers reads the GGUF with it) and tokenizer; the file is read back and compared.
    write_layout(folder, cfg): what writes the layout (default: :func:`write_native` from ``moe``; a streamed
    export passes its own, and ``moe`` is then unused)."""
    from .gguf import check_gguf, write_gguf

    if write_layout is None:

        def write_layout(layout: Path, llamacpp: ExportConfig) -> ExportResult:
            return write_native(moe, layout, llamacpp, calib_ids, progress, cancel)

    name = folder.name.removesuffix(".partial")
    with tempfile.TemporaryDirectory(prefix=".gguf-layout-", dir=folder.parent) as tmp:
        layout = Path(tmp)
        result = write_layout(layout, replace(cfg, format="llamacpp"))
        _progress(progress, 0.7, f"Writing {name}.gguf ({cfg.gguf_type})")
        written = write_gguf(layout, folder / f"{name}.gguf", cfg.gguf_type, name=name, cancel=cancel)
        if cfg.verify:
            _progress(progress, 0.75, "Reading the GGUF back")
            result.gguf = check_gguf(written.path, layout)
            if not result.gguf["ok"]:
                raise ExportError(f"The GGUF read back differs from the weights written: {result.gguf}")
        for path in layout.iterdir():
            if path.is_file() and ".safetensors" not in path.name:  # the weights are in the GGUF
                shutil.copy2(path, folder / path.name)
    notes = [GGUF_NOTE if n == LLAMACPP_NOTE else n for n in result.notes] + written.notes
    result.folder, result.format, result.notes = folder, "gguf", notes
    result.architecture = f"qwen2moe GGUF {cfg.gguf_type}"
    return result


def _scaled(progress, lo: float, hi: float):
    if progress is None:
        return None
    return lambda f, msg: progress(lo + (hi - lo) * f, msg)


def add_legacy_keys(path: Path) -> None:
    """transformers 5 writes only rope_parameters and dtype; 4.x, vLLM and converters read the old keys."""
    cfg = json.loads(path.read_text())
    rope = dict(cfg.get("rope_parameters") or {})
    if "rope_theta" in rope:
        cfg.setdefault("rope_theta", rope["rope_theta"])
    if rope.get("rope_type", "default") != "default":
        legacy = {k: v for k, v in rope.items() if k != "rope_theta"}
        cfg.setdefault("rope_scaling", {**legacy, "type": rope["rope_type"]})
    if "dtype" in cfg:
        cfg.setdefault("torch_dtype", cfg["dtype"])
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
