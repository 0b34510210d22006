"""Export a converted model as a checkpoint other tools load, with a measured fidelity report.

Formats (``ExportConfig.format``):

- ``portable`` (default): ``Qwen2MoeForCausalLM``, a stock transformers class that vLLM also serves; no
  remote code. Exact where the routing is representable, otherwise approximated (fitted linear router,
  constants folded into the experts) and measured. See export_native.py and export_routing.py.
- ``exact``: safetensors plus ``modeling_moe_studio.py`` named in config.json's ``auto_map``: the source
  family's transformers class with MoE Studio's MoE blocks; loads with ``trust_remote_code=True``.
- ``llamacpp``: Qwen2-MoE in the subset llama.cpp's ``qwen2moe`` graph runs (reference/ecosystem.md §A.6.3):
  untied embeddings, raw-softmax weights (``norm_topk_prob=false``), dense layers as shared-only MoE layers;
  refused with the reason where llama.cpp cannot run the source model (e.g. llama3 RoPE scaling).
- ``gguf``: that llama.cpp layout written as one ``<name>.gguf`` (f16, q8_0 or f32: ``gguf_type``) by
  export_gguf.py, next to config.json and the tokenizer; run it with ``llama-cli -m`` / ``llama-server -m``.

Every export is reloaded with ``AutoModelForCausalLM.from_pretrained`` in a clean Python process (no moe_core
import) and compared with the internal model on fixed tokens: max |logit difference|, KL, top-1 agreement,
perplexity, greedy generation (a GGUF through transformers' GGUF loader, and read back with GGUFReader: names,
shapes, metadata, de-quantised weights). The numbers go into README.md (the model card) and metrics.json; the folder
is written as ``<out>.partial`` and renamed when complete; :func:`make_zip` packs it for download.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from .export_native import ExportError, build_qwen2moe, head_dim_note, llamacpp_problems, native_problems
from .moe import MoEMLP
from .profiling import check_cancel

__all__ = ["ExportConfig", "ExportError", "ExportResult", "export_model", "make_zip", "reload_logits"]

FORMATS = ("portable", "exact", "llamacpp", "gguf")
GGUF_TYPES = ("f16", "q8_0", "f32")  # export_gguf.QTYPES, named here so that importing export stays light
MODELING_FILE = "modeling_moe_studio.py"
TEMPLATE = Path(__file__).parent / "templates" / MODELING_FILE
EXACT_TOL = 1e-4  # max |logit difference| that counts as identical (float32 summation order: ~1e-6)
EVAL_TEXT = (
    "The history of the city begins with a small settlement on the river, where traders met to exchange "
    "grain, salt and cloth. Over the centuries the market grew into a town, and the town into a city with "
    "bridges, schools and a library. Today its museums describe how ordinary people lived, worked and "
    "argued about the future of their streets."
)
PAPERS = {
    "cmoe": "Z. Pei et al., CMoE: Converting Mixture-of-Experts from Dense to Accelerate LLM Inference "
    "(Analytical FFN-to-MoE Restructuring via Activation Pattern Analysis), arXiv 2502.04416, ACL 2026",
    "dive": "Y. Feng et al., DIVE into MoE: Diversity-Enhanced Reconstruction of Large Language Models from "
    "Dense into Mixture-of-Experts, arXiv 2506.09351, ACL 2025",
    "ladimo": "S. Kim et al., LaDiMo: Layer-wise Distillation Inspired MoEfier, arXiv 2408.04278",
}


@dataclass(frozen=True)
class ExportConfig:
    format: Literal["portable", "exact", "llamacpp", "gguf"] = "portable"
    fit_router: bool = True  # approximated layers: fit a linear router on calibration tokens (else naive)
    fit_steps: int = 0  # extra Adam steps on the selection cross-entropy (measured no better: off)
    verify: bool = True  # reload in a clean process and measure; the model card reports it
    zip: bool = False  # also write <out>.zip
    gguf_type: Literal["f16", "q8_0", "f32"] = "f16"  # gguf: matrix type (f16: what llama.cpp users expect)
    # portable / llamacpp: expert and shared widths zero-padded to a multiple of this (exact); 128 suits vLLM's
    # fused MoE kernels (FlashInfer TRTLLM wants per-GPU expert widths in multiples of 128)
    width_align: int = 8

    def __post_init__(self):
        if self.width_align < 8 or self.width_align % 8:
            raise ValueError(f"width_align must be a multiple of 8 (e.g. 128), got {self.width_align}.")
        if self.format not in FORMATS:
            raise ValueError(f"export format must be one of {', '.join(FORMATS)}, got '{self.format}'.")
        if self.gguf_type not in GGUF_TYPES:
            raise ValueError(f"gguf_type must be one of {', '.join(GGUF_TYPES)}, got '{self.gguf_type}'.")
        if not 0 <= self.fit_steps <= 100_000:
            raise ValueError(f"fit_steps must be 0..100000, got {self.fit_steps}.")


@dataclass
class ExportResult:
    """Where the export went, what it is, and how close it is to the internal model."""

    folder: Path
    format: str
    architecture: str
    exact_by_construction: bool
    notes: list[str] = field(default_factory=list)
    fidelity: dict = field(default_factory=dict)
    routing: dict = field(default_factory=dict)
    zip_path: Path | None = None
    gguf: dict = field(default_factory=dict)  # gguf: the file read back (export_gguf.check_gguf)

    def summary(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("folder", "zip_path")}
        return {**out, "folder": str(self.folder), "zip": str(self.zip_path) if self.zip_path else None}


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
    run config and metrics (defaults: ``moe.run_config`` / ``moe.metrics`` / ``moe.conversion`` if set).
    """
    cfg, start = cfg or ExportConfig(), time.perf_counter()
    out = Path(out)
    check_destination(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        result = _write(moe, tmp, cfg, calib_ids, progress, cancel)
        check_cancel(cancel)
        if cfg.verify:
            _progress(progress, 0.8, "Reloading the export in a clean process")
            result.fidelity = verify(moe, [(tmp, cfg.format == "exact")])[0]
        meta = _provenance(moe, cfg, calib_ids, calib_text, run_config, source_metrics)
        meta["seconds"], meta["name"] = round(time.perf_counter() - start, 2), out.name
        if cfg.format in ("portable", "llamacpp"):
            meta["native_config"] = json.loads((tmp / "config.json").read_text())
        _write_reports(tmp, result, meta)
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
    from .export_routing import plan_routing

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


def write_gguf_export(moe, folder: Path, cfg: ExportConfig, calib_ids, progress, cancel) -> ExportResult:
    """The llama.cpp layout built in a temporary folder, written here as ``<name>.gguf`` with its
    config.json (transformers reads the GGUF with it) and tokenizer; the file is read back and compared."""
    from .export_gguf import check_gguf, write_gguf

    name = folder.name.removesuffix(".partial")
    with tempfile.TemporaryDirectory(prefix=".gguf-layout-", dir=folder.parent) as tmp:
        layout = Path(tmp)
        result = write_native(moe, layout, replace(cfg, format="llamacpp"), calib_ids, progress, cancel)
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


# ---------------------------------------------------------------------------------------------
# Verification in a clean process

_RELOAD_SCRIPT = r"""
import json, sys, torch
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM
jobs = json.load(open(sys.argv[1]))
data = torch.load(jobs["tokens"], weights_only=True)
results = []
for job in jobs["folders"]:
    folder = Path(job["folder"])
    ggufs = [] if any(folder.glob("*.safetensors")) else sorted(p.name for p in folder.glob("*.gguf"))
    # config.json gives the expert widths, which transformers' GGUF reader does not map for qwen2moe
    extra = {"gguf_file": ggufs[0], "config": AutoConfig.from_pretrained(folder)} if ggufs else {}
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=job["remote"], dtype="auto", **extra)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=data["ids"]).logits.float()
        gen = model.generate(data["prompt"], max_new_tokens=data["new_tokens"], do_sample=False)
    torch.save({"logits": logits, "generated": gen}, job["out"])
    results.append({"class": type(model).__name__, "moe_core_imported": "moe_core" in sys.modules,
                    "gguf_file": ggufs[0] if ggufs else None})
print(json.dumps(results))
"""


def eval_tokens(tokenizer, text: str = EVAL_TEXT, max_tokens: int = 96) -> torch.Tensor:
    """(1, T) fixed evaluation tokens of a short text."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :max_tokens]
    if ids.shape[1] < 4:
        raise ExportError("The evaluation text is too short for this tokenizer.")
    return ids


def reload_logits(folders: list[tuple[Path, bool]], ids, prompt, new_tokens: int = 12) -> list[dict]:
    """Load each (folder, trust_remote_code) with AutoModelForCausalLM in one fresh Python process.

    Returns per folder: logits (1, T, V) on ids, greedy generation from prompt, and the loaded class.
    """
    with tempfile.TemporaryDirectory(prefix="moe-export-check-") as work:
        work = Path(work)
        torch.save({"ids": ids, "prompt": prompt, "new_tokens": new_tokens}, work / "tokens.pt")
        jobs = [
            {"folder": str(Path(f).resolve()), "remote": r, "out": str(work / f"{n}.pt")}
            for n, (f, r) in enumerate(folders)
        ]
        (work / "jobs.json").write_text(json.dumps({"tokens": str(work / "tokens.pt"), "folders": jobs}))
        env = {**_clean_env(), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        proc = subprocess.run(
            [sys.executable, "-c", _RELOAD_SCRIPT, str(work / "jobs.json")],
            cwd=work, env=env, capture_output=True, text=True, timeout=1800,
        )  # fmt: skip
        if proc.returncode != 0:
            raise ExportError(f"Reloading the export in a clean process failed:\n{proc.stderr[-3000:]}")
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        return [
            {**torch.load(job["out"], weights_only=True), **meta}
            for job, meta in zip(jobs, info, strict=True)
        ]


def _clean_env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the child must not see moe_core


@torch.no_grad()
def verify(moe, folders: list[tuple[Path, bool]], text: str = EVAL_TEXT) -> list[dict]:
    """Fidelity of each reloaded folder against the internal model ``moe`` on the fixed text."""
    ids = eval_tokens(moe.tokenizer, text)
    prompt = ids[:, :8]
    device = moe.device
    ref = moe.model(input_ids=ids.to(device)).logits.float().cpu()
    ref_gen = moe.model.generate(prompt.to(device), max_new_tokens=12, do_sample=False).cpu()
    results = []
    for loaded in reload_logits(folders, ids, prompt):
        metrics = compare(ref, loaded["logits"], ids)
        metrics["generation_match"] = bool(torch.equal(ref_gen, loaded["generated"]))
        metrics["generated_text"] = moe.tokenizer.decode(loaded["generated"][0, prompt.shape[1] :])
        metrics["loaded_class"] = loaded["class"]
        metrics["clean_process"] = not loaded["moe_core_imported"]
        if loaded.get("gguf_file"):
            metrics["gguf_file"] = loaded["gguf_file"]
        results.append(metrics)
    return results


def compare(ref_logits, logits, ids) -> dict:
    """max |Δlogit|, KL(internal || export), top-1 agreement and both perplexities; logits (1, T, V)."""
    ref_logp = F.log_softmax(ref_logits[0].float(), -1)  # (T, V)
    logp = F.log_softmax(logits[0].float(), -1)
    targets = ids[0, 1:]
    nll = -logp[:-1].gather(1, targets[:, None]).mean()
    ref_nll = -ref_logp[:-1].gather(1, targets[:, None]).mean()
    max_diff = float((ref_logits - logits).abs().max())
    return {
        "max_abs_logit_diff": max_diff,
        "kl": float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean()),
        "top1_agreement": float((ref_logp.argmax(-1) == logp.argmax(-1)).float().mean()),
        "ppl_internal": math.exp(float(ref_nll)),
        "ppl_export": math.exp(float(nll)),
        "tokens": int(ids.shape[1]),
        "identical": max_diff <= EXACT_TOL,
    }


# ---------------------------------------------------------------------------------------------
# Provenance, model card, zip


def _provenance(moe, cfg, calib_ids, calib_text, run_config, source_metrics) -> dict:
    import safetensors
    import transformers

    from . import __version__

    conversion = getattr(moe, "conversion", None)
    run_config = run_config or getattr(moe, "run_config", None) or {}
    method = run_config.get("method") or (conversion.method if conversion is not None else None)
    calib = {"text": calib_text or (run_config.get("data") or {}).get("text")}
    if calib_ids is not None:
        calib["tokens"] = int(calib_ids.numel())
        calib["sha256"] = hashlib.sha256(calib_ids.to(torch.int64).cpu().numpy().tobytes()).hexdigest()
    return {
        "source_model": (run_config.get("model") or {}).get("spec") or moe.spec,
        "method": method,
        "paper": PAPERS.get(method or ""),
        "method_config": conversion.config if conversion is not None else run_config.get(method or "", None),
        "run_config": {**run_config, "export": asdict(cfg)},
        "calibration": calib,
        "source_metrics": source_metrics or getattr(moe, "metrics", None) or {},
        "versions": {
            "moe_studio": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "safetensors": safetensors.__version__,
            "python": platform.python_version(),
        },
    }


def _write_reports(folder: Path, result: ExportResult, meta: dict) -> None:
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
        "nonzero shared-expert gate (1e-30). Convert with `python convert_hf_to_gguf.py <this folder> "
        "--outtype f32` (or bf16; not f16, where the 1e-30 gate underflows to 0 and llama.cpp's "
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
    rows = [
        ("max abs logit difference", f"{f['max_abs_logit_diff']:.3g}"),
        ("KL(internal || export), nats/token", f"{f['kl']:.3g}"),
        ("top-1 agreement", f"{f['top1_agreement']:.4f}"),
        ("perplexity, internal model", f"{f['ppl_internal']:.3f}"),
        ("perplexity, this export", f"{f['ppl_export']:.3f}"),
        ("greedy generation identical", str(f["generation_match"])),
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
