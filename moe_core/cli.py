"""Command line: `python -m moe_core <command>`; every command is one library call from a config.

Flags override the config file (YAML or JSON); the effective config is written next to the outputs,
so any run can be repeated exactly. Errors print one line and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import warnings

from .config import DISTILL_PARTS, DataConfig, ModelConfig, ProfileRun, from_dict, load_config_file, to_dict


def _progress(fraction: float, message: str) -> None:
    print(f"[{fraction:6.1%}] {message}", file=sys.stderr, flush=True)


def _common(p: argparse.ArgumentParser, data: bool = True) -> None:
    """The flags every command shares: the config file and the model; with ``data`` the calibration text and
    the output folder too (prepare has neither)."""
    p.add_argument("--config", help="YAML or JSON run config; flags below override it")
    p.add_argument("--model", help="builtin:smollm2-135m, builtin:tiny-llama, a folder, a .gguf or a hub id")
    p.add_argument("--device", help="cpu or cuda")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        default=None,
        help="allow a model repository's own Python code to run (off by default)",
    )
    if not data:
        return
    p.add_argument(
        "--text", help="calibration text: builtin:pydoc, builtin:stdlib, shared:wikitext2, a file ..."
    )
    p.add_argument("--n-sequences", type=int, help="number of calibration sequences")
    p.add_argument("--seq-len", type=int, help="tokens per calibration sequence")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="output folder")


def _overrides(args) -> dict:
    """Map flags onto the nested config dict (only flags the user gave, and the command has)."""
    names = {
        ("model", "spec"): "model",
        ("model", "device"): "device",
        ("model", "trust_remote_code"): "trust_remote_code",
        ("model", "max_memory"): "max_memory",
        ("data", "text"): "text",
        ("data", "n_sequences"): "n_sequences",
        ("data", "seq_len"): "seq_len",
        ("data", "seed"): "seed",
        ("out",): "out",
    }
    tree: dict = {}
    for path, name in names.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def _run_config(cls, args, extra: dict | None = None):
    base = load_config_file(args.config) if args.config else {}
    return from_dict(cls, _merge(_merge(base, _overrides(args)), extra or {}))


def load_dense(model_cfg: ModelConfig, progress=_progress):
    """The model a config names, as a DenseModel."""
    from .model_io import load_model

    return load_model(
        model_cfg.spec,
        device=model_cfg.device,
        dtype=model_cfg.dtype,
        trust_remote_code=model_cfg.trust_remote_code,
        progress=progress,
    )


def load_calibration(model_cfg: ModelConfig, data_cfg: DataConfig, progress=_progress, dense=None):
    """Load the model (unless given) and sample calibration sequences: (DenseModel, input_ids (N, T))."""
    from .data import load_documents, parse_text_source, sample_sequences

    dense = load_dense(model_cfg, progress) if dense is None else dense
    dense.check_seq_len(data_cfg.seq_len)
    docs = load_documents(parse_text_source(data_cfg.text), model=dense, seed=data_cfg.seed)
    ids = sample_sequences(docs, dense.tokenizer, data_cfg.n_sequences, data_cfg.seq_len, data_cfg.seed)
    return dense, ids


def cmd_prepare(args) -> int:
    """Install-time step: de-quantise and cache the default model so the app starts fast.

    The model (spec, device, dtype, trust_remote_code) comes from the config file's model section, if any,
    with the flags on top; the other sections of a run config are not used here."""
    base = load_config_file(args.config) if args.config else {}
    model_cfg = from_dict(ModelConfig, _merge(base.get("model") or {}, _overrides(args).get("model", {})))
    start = time.perf_counter()
    dense = load_dense(model_cfg)
    print(
        json.dumps(
            {
                "model": dense.spec,
                "seconds": round(time.perf_counter() - start, 1),
                **dense.summary().as_dict(),
            }
        )
    )
    return 0


@contextlib.contextmanager
def _read_model(model_cfg):
    """The model for a stage that reads it layer by layer: a model folder larger than --max-memory is streamed
    from its shards (moe_core.streaming.reading: one decoder layer in memory at a time), else loaded whole."""
    from .streaming import open_model, reading, should_stream

    if not should_stream(model_cfg):
        yield load_dense(model_cfg)
        return
    m = model_cfg
    with reading(open_model(m.spec, m.device, m.dtype, m.trust_remote_code, m.max_memory)) as dense:
        yield dense


def cmd_profile(args) -> int:
    from .profiling import profile_model

    cfg = _run_config(ProfileRun, args, {"profile": {"k_act": args.k_act}} if args.k_act else None)
    with _read_model(cfg.model) as dense:
        dense, ids = load_calibration(cfg.model, cfg.data, dense=dense)
        start = time.perf_counter()
        profile = profile_model(
            dense, ids, k_act=cfg.profile.k_act, batch_size=cfg.profile.batch_size, text_spec=cfg.data.text,
            progress=_progress,
        )  # fmt: skip
    seconds = time.perf_counter() - start
    out = profile.save(cfg.out)
    (out / "run_config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    summary = {**profile.summary(), "seconds": round(seconds, 2), "out": str(out)}
    for i in range(profile.n_layers):
        rates = profile.rates[i]
        print(f"layer {i:3d}  max rate {float(rates.max()):.3f}  median {float(rates.median()):.4f}")
    print(json.dumps(summary))
    return 0


def _load_for_eval(model_cfg: ModelConfig):
    """(model, the dense spec it was converted from or None): a converted folder, else any model spec."""
    from pathlib import Path

    from .checkpoint import is_converted, load_converted
    from .model_io import load_model

    if is_converted(Path(model_cfg.spec).expanduser()):
        moe = load_converted(
            Path(model_cfg.spec).expanduser(),
            device=model_cfg.device,
            trust_remote_code=model_cfg.trust_remote_code,
        )
        return moe, moe.run_config.get("model", {}).get("spec")
    kwargs = {"device": model_cfg.device, "dtype": model_cfg.dtype}
    return load_model(model_cfg.spec, trust_remote_code=model_cfg.trust_remote_code, **kwargs), None


def _eval_config(args):
    """EvalRun from the config file and flags (--text / --seq-len / --windows set the perplexity windows)."""
    from .config import EvalRun

    tree = _overrides(args)
    data = tree.pop("data", {})
    flags = {
        "text": data.get("text"),
        "seq_len": data.get("seq_len"),
        "n_windows": args.windows or data.get("n_sequences"),
        "batch_size": args.batch_size,
        "reference": args.reference,
        "tasks": [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None,
        "limit": args.limit,
        "speed": args.speed,
    }
    tree["eval"] = {k: v for k, v in flags.items() if v is not None}
    base = load_config_file(args.config) if args.config else {}
    return from_dict(EvalRun, _merge(base, tree))


def cmd_eval(args) -> int:
    """Evaluate a model (a converted folder: against its source) with the library's one evaluation."""
    from .checkpoint import read_json
    from .model_io import load_model
    from .pipeline import evaluate_pair, evaluate_streamed
    from .streaming import should_stream

    cfg = _eval_config(args)
    if should_stream(cfg.model):  # a folder larger than --max-memory: one decoder layer at a time
        source = read_json(cfg.model.spec, "run_config.json").get("model", {}).get("spec")
        ref_spec = {"auto": source, "none": None}.get(cfg.eval.reference, cfg.eval.reference)
        if cfg.eval.speed and args.speed:
            raise ValueError(
                "--speed times the whole model, which is larger than --max-memory here: drop it."
            )
        report = evaluate_streamed(cfg.model, cfg.eval, ref_spec, progress=_progress)
    else:
        moe, source = _load_for_eval(cfg.model)
        ref_spec = {"auto": source, "none": None}.get(cfg.eval.reference, cfg.eval.reference)
        ref = load_model(ref_spec, device=cfg.model.device, dtype=cfg.model.dtype) if ref_spec else None
        report = evaluate_pair(ref, moe, cfg.eval, progress=_progress)
    path = report.save(cfg.out)
    (path.parent / "run_config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    print(json.dumps({**report.summary(), "out": str(path)}))
    return 0


def _eval_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-memory",
        help="e.g. 2GB: a model folder larger than this is scored one layer at a time (perplexity, KL; no "
        "lm-eval tasks or speed)",
    )
    p.add_argument("--reference", help="dense model for KL: auto (the source model), none, or a spec")
    p.add_argument("--windows", type=int, help="number of perplexity windows (non-overlapping)")
    p.add_argument("--batch-size", type=int, help="windows per forward pass")
    p.add_argument("--tasks", help="comma-separated local lm-eval tasks, e.g. arc_easy_local")
    p.add_argument("--limit", type=int, help="lm-eval: first N documents per task")
    p.add_argument(
        "--speed",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time prefill and batch-1 decode of the model and its reference (default on)",
    )


def cmd_convert(args) -> int:
    """Convert a dense model (method from the config) and save it with its run config and metrics."""
    from .config import ConvertRun
    from .pipeline import convert_run
    from .streaming import open_model, should_stream

    base = load_config_file(args.config) if args.config else {}
    cfg = _run_config(ConvertRun, args, convert_overrides(args, args.method or base.get("method") or "cmoe"))
    if should_stream(cfg.model):  # a folder larger than --max-memory: one layer at a time
        m = cfg.model
        source = open_model(m.spec, m.device, m.dtype, m.trust_remote_code, m.max_memory)
        outcome = convert_run(source.dense, cfg, folder=cfg.out, progress=_progress, source=source)
    else:
        outcome = convert_run(load_dense(cfg.model), cfg, folder=cfg.out, progress=_progress)
    metrics = outcome.metrics
    summary = {"method": cfg.method, "seconds": metrics["convert_seconds"], "out": str(outcome.folder)}
    keys = ("ffn_params", "ffn_active_params", "active_ffn_share", "total_params", "active_params")
    print(json.dumps(summary | {k: metrics[k] for k in keys}))
    return 0


def convert_overrides(args, method: str = "cmoe") -> dict:
    """The convert flags the user gave, as a nested config dict (the model, data and out flags aside).

    method: the run's method (from --method or the config file): a method's flags (moe_core.methods: its
    options) fill its own section only, so `--method cmoe --top-k 9` is not read as a LaDiMo setting; a flag
    the run's method does not have is ignored with a warning."""
    from .methods import METHODS, lookup

    entry = lookup(method)
    section: dict = {}
    for option in entry.options:
        value = getattr(args, _dest(option.flag), None) if option.flag else None
        if value is not None:
            option.put(section, option.from_text(value))
    own = {o.flag for o in entry.options}
    for flag, owners in _method_flags(METHODS).items():
        if flag not in own and getattr(args, _dest(flag), None) is not None:
            titles = ", ".join(METHODS[m].title for m in owners)
            warnings.warn(f"{flag} is an option of {titles}, not of {entry.title}: ignored.", stacklevel=2)
    extra = {"method": args.method, method: section}
    routing = {"router": args.router, "form": args.routing_form, "refit": args.refit}
    extra["routing"] = _pick(routing | {"compensate": args.compensate, "max_tokens": args.routing_tokens})
    extra["distill"] = _distill_overrides(args)
    extra["finetune"] = {"enabled": True} if args.finetune else {}
    return {k: v for k, v in extra.items() if v}


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _method_flags(methods) -> dict[str, list[str]]:
    """{flag: names of the methods that have it}, in registry order."""
    out: dict[str, list[str]] = {}
    for name, entry in methods.items():
        for option in entry.options:
            if option.flag:
                out.setdefault(option.flag, []).append(name)
    return out


def _pick(flags: dict) -> dict:
    """The flags the user gave (not None)."""
    return {k: v for k, v in flags.items() if v is not None}


def _distill_overrides(args) -> dict:
    """The distill section from its flags; any distill flag turns distillation on."""
    train = (
        None
        if args.distill_train is None
        else [p.strip() for p in args.distill_train.split(",") if p.strip()]
    )
    flags = _pick({"tokens": args.distill_tokens, "max_minutes": args.distill_minutes, "lr": args.distill_lr})
    flags |= _pick({"train": train, "lora_r": args.distill_lora_r})
    if args.distill is False:
        return {"enabled": False}
    return ({"enabled": True} | flags) if (args.distill or flags) else {}


def _convert_flags(p: argparse.ArgumentParser) -> None:
    from .methods import METHODS

    p.add_argument(
        "--max-memory",
        help="e.g. 2GB: a model folder larger than this converts one layer at a time, never whole in memory",
    )
    titles = ", ".join(f"{name} ({m.title})" for name, m in METHODS.items())
    p.add_argument("--method", choices=list(METHODS), help=f"conversion method: {titles}")
    p.add_argument(
        "--finetune", action="store_true", help="light LoRA fine-tuning after conversion (finetune section)"
    )
    _method_options(p, METHODS)
    p.add_argument(
        "--router", choices=["method", "trained"], help="routing step: keep the method's router or train one"
    )
    p.add_argument(
        "--routing-form",
        choices=["analytic", "native"],
        help="native: Qwen2-MoE's routing, exact portable export",
    )
    p.add_argument(
        "--refit",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="least-squares refit of down projections",
    )
    p.add_argument(
        "--routing-tokens",
        type=int,
        help="calibration tokens per layer for the routing step's router and refit (routing.max_tokens)",
    )
    p.add_argument(
        "--compensate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="analytic form with --refit: refit a bias per routed expert too (FLAP-style compensation)",
    )
    p.add_argument(
        "--distill",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="distil from the dense model after converting (distill section)",
    )
    p.add_argument("--distill-tokens", type=int, help="distillation token budget")
    p.add_argument("--distill-minutes", type=float, help="distillation time budget")
    p.add_argument("--distill-lr", type=float, help="distillation learning rate")
    p.add_argument(
        "--distill-train",
        help=f"parts that train, comma-separated: {','.join(DISTILL_PARTS)} (default experts,shared,routers,norms)",
    )
    p.add_argument("--distill-lora-r", type=int, help="0: parts train in full; r > 0: LoRA of rank r")


def _method_options(p: argparse.ArgumentParser, methods) -> None:
    """One flag per method option (moe_core.methods); a flag several methods share is added once and says
    what it means for each."""
    options: dict[str, list] = {}
    for entry in methods.values():
        for option in entry.options:
            if option.flag:
                options.setdefault(option.flag, []).append((entry.title, option))
    for flag, owners in options.items():
        first = owners[0][1]
        kind = first.kind
        kwargs: dict = {"help": "; ".join(f"{title}: {o.help}" for title, o in owners).replace("%", "%%")}
        if isinstance(kind, tuple):
            kwargs["choices"] = list(kind)
        elif kind in (int, float):
            kwargs["type"] = kind
        elif kind == "optional":
            kwargs["type"] = float
        elif kind is bool:
            kwargs |= {"action": "store_const", "const": True}  # None when not given: the config decides
        p.add_argument(flag, **kwargs)


def cmd_sweep(args) -> int:
    """Per-layer accuracy / throughput curves (LaDiMo's adaptive router); with a target, pick and apply a plan."""
    from .config import SweepRun
    from .sweep import held_out_windows, sweep

    ladimo = {"n_experts": args.n_experts, "top_k": args.top_k, "steps": args.steps}
    flags = {"n_windows": args.windows, "max_ppl_increase": args.max_ppl_increase}
    flags["min_active_reduction"] = args.min_active_reduction
    extra = {"sweep": {k: v for k, v in flags.items() if v is not None}}
    extra["ladimo"] = {k: v for k, v in ladimo.items() if v is not None}
    cfg = _run_config(SweepRun, args, {k: v for k, v in extra.items() if v})
    dense, moe = _sweep_models(cfg)
    result = sweep(dense, moe, held_out_windows(dense.tokenizer, cfg.sweep), cfg.sweep, progress=_progress)
    out = result.save(cfg.out)
    (out / "run_config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    for i in result.sensitivity_order:
        p = result.point(i, moe.mlp(i).policy.label())
        print(f"layer {i:3d} {p.policy:7s} KL {p.kl:.5f} dNLL {p.dnll:+.5f} x{p.throughput_ratio:.3f}")
    summary = {"out": str(out), "seconds": result.seconds, "dense_ppl": result.dense_ppl}
    if cfg.sweep.max_ppl_increase is not None or cfg.sweep.min_active_reduction is not None:
        summary["plan"] = _apply_target(result, dense, moe, cfg, out)
    print(json.dumps(summary))
    return 0


def _sweep_models(cfg):
    """(dense, converted): a converted folder and its source model, or a dense spec converted with ladimo."""
    from .methods import convert
    from .model_io import load_model

    moe, source = _load_for_eval(cfg.model)
    if source is None:
        dense, ids = load_calibration(cfg.model, cfg.data)
        return dense, convert(dense, ids, cfg.ladimo, method="ladimo", progress=_progress)
    return load_model(source, device=cfg.model.device, dtype=cfg.model.dtype), moe


def _apply_target(result, dense, moe, cfg, out) -> dict:
    """Pick the plan for the config's target, write plan.json and the planned model (out/model)."""
    from .checkpoint import save_converted
    from .evaluate import param_report
    from .sweep import apply_plan, pick_plan

    plan = pick_plan(result, cfg.sweep.max_ppl_increase, cfg.sweep.min_active_reduction)
    plan.save(out / "plan.json")
    planned = apply_plan(moe, plan, dense)
    params = param_report(planned, cfg.sweep.seq_len)
    save_converted(planned, out / "model", _planned_run(moe, cfg, plan), {"plan": plan.to_dict(), **params})
    return {"labels": plan.labels, "predicted": plan.predicted, "model": str(out / "model")}


def _planned_run(moe, cfg, plan) -> dict:
    """The convert run config that rebuilds the planned model (``convert --config`` loads it): the swept
    folder's own run config, or the LaDiMo conversion the sweep made (no routing step), plus the plan."""
    from .config import ConvertRun, RoutingConfig, from_dict
    from .model_io import ConvertedModel

    base = (moe.run_config if isinstance(moe, ConvertedModel) else None) or to_dict(
        ConvertRun(
            method="ladimo", model=cfg.model, data=cfg.data, ladimo=cfg.ladimo,
            routing=RoutingConfig(router="method", form="analytic", refit=False),
        )
    )  # fmt: skip
    return to_dict(from_dict(ConvertRun, {**base, "plan": plan.to_dict()}))


def _sweep_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--windows", type=int, help="held-out windows scored per (layer, policy)")
    p.add_argument("--max-ppl-increase", type=float, help="plan: perplexity increase at most (0.05: 5%%)")
    p.add_argument("--min-active-reduction", type=float, help="plan: share fewer active FFN params (0.2)")
    from .methods import METHODS

    _method_options(p, {"ladimo": METHODS["ladimo"]})  # the LaDiMo conversion a dense spec is swept with


def cmd_export(args) -> int:
    """Export a converted folder as portable Qwen2-MoE, exact remote-code, llama.cpp-compatible or GGUF.

    --config: the file's ``export`` section (ExportConfig fields, as an export's own run_config.json records
    them) gives the defaults that the flags override, so ``--config <export>/run_config.json`` repeats an export's
    settings; calibration comes from the converted folder's run config, then the config's ``data``, then the
    flags (the config's ``out`` is a conversion's folder, not the export's: --out names that). Export runs on the CPU: the writers, the router fit, and the reference pass that the clean-process
    reload (on the CPU) is compared with; --device is refused rather than ignored."""
    from .checkpoint import load_converted, read_json
    from .config import ModelConfig
    from .export import ExportConfig, export_model
    from .export.streamed import export_streamed
    from .streaming import should_stream

    if not args.model:
        raise ValueError("export needs --model: a folder written by `python -m moe_core convert`.")
    if args.device not in (None, "cpu"):
        raise ValueError(
            f"export runs on the CPU, so --device {args.device} would do nothing: its fidelity check compares "
            "the model with the export reloaded on the CPU in a clean process. Drop --device."
        )
    base = load_config_file(args.config) if args.config else {}
    flags = {"format": args.format, "zip": True if args.zip else None, "gguf_type": args.gguf_type}
    flags |= {"width_align": args.width_align, "fit_router": False if args.no_fit else None}
    cfg = from_dict(ExportConfig, _merge(base.get("export") or {}, _pick(flags)))
    out = args.out or f"outputs/export-{cfg.format}"
    if args.max_memory and should_stream(ModelConfig(spec=args.model, max_memory=args.max_memory)):
        result = export_streamed(args.model, out, cfg, progress=_progress)  # one decoder layer at a time
        return _export_summary(result, cfg)
    trust = bool(args.trust_remote_code or (base.get("model") or {}).get("trust_remote_code"))
    moe = load_converted(args.model, trust_remote_code=trust)  # a source family defined by its own code
    run_config, metrics = read_json(args.model, "run_config.json"), read_json(args.model, "metrics.json")
    data = _merge(run_config.get("data", {}), base.get("data") or {})
    data = from_dict(DataConfig, _merge(data, _overrides(args).get("data", {})))
    ids = _calibration_ids(moe, data)
    result = export_model(
        moe, out, cfg, calib_ids=ids, calib_text=data.text, run_config=run_config, source_metrics=metrics,
        progress=_progress,
    )  # fmt: skip
    return _export_summary(result, cfg)


def _export_summary(result, cfg) -> int:
    """Print an export's JSON summary line: where it went and its fidelity."""
    f, fmt = result.fidelity, cfg.format
    keys = ("max_abs_logit_diff", "kl", "top1_agreement", "ppl_internal", "ppl_export", "identical")
    summary = {"format": fmt, "out": str(result.folder), "zip": str(result.zip_path or "")}
    if fmt == "gguf":
        summary |= {"gguf": str(next(result.folder.glob("*.gguf"))), "gguf_type": cfg.gguf_type}
    print(json.dumps(summary | {k: f.get(k) for k in keys}))
    return 0


def _calibration_ids(moe, data: DataConfig):
    """The calibration tokens of the conversion's run config (or the flags): for router fitting and the hash."""
    from .data import load_documents, parse_text_source, sample_sequences

    docs = load_documents(parse_text_source(data.text), model=moe, seed=data.seed)
    return sample_sequences(docs, moe.tokenizer, data.n_sequences, data.seq_len, data.seed)


def _export_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=["portable", "exact", "llamacpp", "gguf"], help="default: portable")
    p.add_argument("--gguf-type", choices=["f16", "q8_0", "f32"], help="gguf: matrix type (default f16)")
    p.add_argument(
        "--width-align",
        type=int,
        help="portable/llamacpp: pad expert widths to a multiple (128 for vLLM kernels)",
    )
    p.add_argument("--zip", action="store_true", help="also write <out>.zip")
    p.add_argument("--no-fit", action="store_true", help="portable: naive router, no calibration fit")
    p.add_argument(
        "--max-memory",
        help="e.g. 2GB: a converted folder larger than this is exported one decoder layer at a time",
    )


def _profile_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--k-act", type=int, help="CMoE K_a: neurons active per token")
    p.add_argument(
        "--max-memory", help="e.g. 2GB: a model folder larger than this is profiled one layer at a time"
    )


COMMANDS = {
    "prepare": (cmd_prepare, "cache the default model (de-quantise the GGUF once)", None),
    "export": (cmd_export, "converted folder -> portable / exact / llama.cpp / GGUF + card", _export_flags),
    "eval": (cmd_eval, "perplexity, KL and agreement vs dense, parameters, expert load", _eval_flags),
    "convert": (
        cmd_convert,
        "dense -> MoE with a registered method (--method); saves a folder load_converted reloads",
        _convert_flags,
    ),
    "sweep": (cmd_sweep, "per-layer accuracy / throughput curves (LaDiMo); picks a plan", _sweep_flags),
    "profile": (
        cmd_profile,
        "per-layer neuron activation rates and hidden-state histograms",
        _profile_flags,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m moe_core", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text, extra) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        _common(p, data=name != "prepare")  # prepare reads no text and writes only the model cache
        if extra:
            extra(p)
    return parser


def _warn(message, category, *_args, **_kwargs) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _warn  # one line, like the errors; restored on return
        try:
            return COMMANDS[args.command][0](args)
        except KeyboardInterrupt:
            print("\nInterrupted; nothing was written.", file=sys.stderr)
            return 130
        except (ValueError, OSError) as exc:  # library errors carry the what and the how-to-fix
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except Exception as exc:  # a bug: one line here, the trace only when asked for
            if os.environ.get("MOE_STUDIO_DEBUG"):
                raise
            print(
                f"error: {type(exc).__name__}: {exc} (an internal error; MOE_STUDIO_DEBUG=1 shows the trace)",
                file=sys.stderr,
            )
            return 1
