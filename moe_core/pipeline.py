"""The pipeline steps as single calls on an already loaded model, for the app and notebooks.

The CLI (``moe_core.cli``) loads models from specs and writes files; these take what is in memory, so the web
app can run one step per click. Each is a short composition of the public functions of the other modules.
"""

from __future__ import annotations

import contextlib
import shlex
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .config import ConvertRun, DataConfig, from_dict, to_dict
from .methods import lookup

Progress = Callable[[float, str], None] | None
Cancel = Callable[[], bool] | None


def calibration(dense, data: DataConfig) -> tuple[torch.Tensor, dict]:
    """Token ids (N, T) sampled from the data config's text, and a preview of that text (counts + head)."""
    from .data import load_documents, sample_sequences, text_preview

    dense.check_seq_len(data.seq_len)
    docs = load_documents(data.text, model=dense, seed=data.seed)
    ids = sample_sequences(docs, dense.tokenizer, data.n_sequences, data.seq_len, data.seed, source=data.text)
    return ids, text_preview(docs, dense.tokenizer)


@dataclass(frozen=True)
class ConvertOutcome:
    moe: object  # the ConvertedModel (moe_core.model_io): its report, run config, metrics and plan
    calib_ids: torch.Tensor  # (N, T)
    run_config: dict
    metrics: dict
    folder: Path | None


def convert_run(
    dense,
    cfg: ConvertRun,
    active: tuple[int, ...] | None = None,
    folder: str | Path | None = None,
    progress: Progress = None,
    cancel: Cancel = None,
    on_step=None,
    source=None,
) -> ConvertOutcome:
    """Convert ``dense`` (already loaded, untouched) as ``cfg`` says: a per-layer budget's allocation first
    (cmoe.budget), the method and its routing step, the per-layer active experts (cfg.active_per_layer), then
    distillation or fine-tuning when enabled, and last an applied routing plan (cfg.plan), in the app's order.

    active: routed experts per layer (top-k), in place of cfg.active_per_layer; folder: where to save the
    checkpoint (save_converted), or None; on_step: distillation's per-step records (a live loss curve). A
    distillation killed part-way resumes from its checkpoint (next to ``folder``) when the same run is started
    again. The run config returned and saved is ``cfg`` completed (allocation, active experts): loading it
    back runs the same conversion."""
    from .checkpoint import save_converted
    from .evaluate import param_report
    from .methods import convert
    from .plumbing import span

    if active is not None:
        cfg = replace(cfg, active_per_layer=tuple(int(a) for a in active))
    if source is not None:  # streamed from its shards (moe_core.streaming): refused now if it cannot be
        from .streaming import check_streamable

        check_streamable(cfg)
        if folder is None:
            raise ValueError("A streamed conversion writes its layers as it goes: give the output folder.")

    ids, _ = calibration(dense, cfg.data)
    start = time.perf_counter()
    cut = 0.35 if cfg.distill.enabled else 1.0  # share of the progress bar before distillation
    budget = None
    if cfg.method == "cmoe" and cfg.cmoe.budget is not None and cfg.cmoe.layer_experts is None:
        from .budget import plan_budget
        from .streaming import layers_of

        with layers_of(dense, source) as measured:  # a streamed source is read once more, a layer at a time
            budget = plan_budget(measured, cfg, ids, span(progress, 0, cut / 2), cancel)
        cfg = replace(cfg, cmoe=replace(cfg.cmoe, layer_experts=tuple(budget["layer_experts"])))
    lo = cut / 2 if budget is not None else 0.0
    unit_gates = recovers_with_unit_gates(cfg, dense.n_layers)
    routing = replace(cfg.routing, form="analytic") if unit_gates else cfg.routing
    with _streamed(source, folder) as stream:
        moe = convert(
            dense, ids, cfg.section(), method=cfg.method, routing=routing, progress=span(progress, lo, cut),
            cancel=cancel,
        )  # fmt: skip
    run = to_dict(cfg)
    if cfg.active_per_layer is not None:
        set_active(moe, cfg.active_per_layer)
    seconds = round(time.perf_counter() - start, 2)
    metrics = {"convert_seconds": seconds, "calibration_tokens": ids.numel()}
    if budget is not None:
        metrics["budget"] = budget
    if cfg.distill.enabled:
        from .distill import distill

        checkpoint = None if folder is None else Path(folder).with_name(f".{Path(folder).name}.distill")
        metrics["distill"] = distill(
            moe, dense, cfg.distill, checkpoint=checkpoint, progress=span(progress, cut, 1.0), cancel=cancel,
            on_step=on_step,
        )  # fmt: skip
    if unit_gates:
        from .evaluate import moe_blocks
        from .reconstruct import NATIVE_LIMIT, to_native_limit

        for block in moe_blocks(moe).values():
            to_native_limit(block)
        metrics["native_after_recovery"] = {"router_scale": NATIVE_LIMIT}
    if cfg.finetune.enabled:  # as `convert --finetune`: the saved model is the tuned one
        from .finetune import finetune, training_ids

        metrics["finetune"] = finetune(moe, training_ids(dense, cfg.finetune), cfg.finetune, progress, cancel)
    if cfg.plan is not None:
        from .sweep import Plan, apply_plan

        moe = apply_plan(moe, Plan.from_dict(cfg.plan), dense)
    metrics |= param_report(moe, cfg.data.seq_len)
    metrics["conversion"] = moe.conversion.as_dict()
    moe.run_config, moe.metrics = run, metrics
    if stream is not None:
        from .streaming import finish

        metrics["streamed"] = True
        try:
            out = finish(moe, stream, stream.writer.folder, folder, run, metrics)
        except BaseException:
            shutil.rmtree(stream.writer.folder, ignore_errors=True)  # no half-written checkpoint stays behind
            raise
    else:
        out = save_converted(moe, folder, run, metrics) if folder is not None else None
    return ConvertOutcome(moe, ids, run, metrics, out)


def recovers_with_unit_gates(cfg: ConvertRun, n_layers: int) -> bool:
    """Whether a native-form conversion is routed and distilled in the analytic form (unit gates) and put in the
    native form after (moe_core.reconstruct.to_native_limit): when every converted layer routes one expert per
    token, the method's gates are unit gates, and distillation is the recovery (gate scales frozen). Unit gates
    are the native form's limit then, and distilling with them recovers more: on SmolLM2-135M's servable 50%
    (64 steps) 86.17 against 91.89 for a native-form distillation (WikiText-2 perplexity, analytic 86.22)."""
    top_ks = lookup(cfg.method).top_ks
    return (
        cfg.routing.form == "native"
        and cfg.distill.enabled
        and "gate_scales" not in cfg.distill.train
        and not cfg.finetune.enabled
        and cfg.active_per_layer is None
        and top_ks is not None
        and set(top_ks(cfg.section(), n_layers)) == {1}
    )


@contextlib.contextmanager
def _streamed(source, folder):
    """The LayerStream of a streamed conversion (None otherwise); its temporary folder goes on failure."""
    if source is None:
        yield None
        return
    from .streaming import LayerStream, start_writer, streaming

    writer, tmp = start_writer(folder)
    try:
        with streaming(LayerStream(source, writer)) as s:
            yield s
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def set_active(moe, active: tuple[int, ...]) -> None:
    """Set each MoE layer's top-k from ``active`` (one entry per layer; dense layers' entries are unused)."""
    from .moe import RoutingPolicy

    if len(active) != moe.n_layers:
        raise ValueError(
            f"active_per_layer has {len(active)} entries for a {moe.n_layers}-layer model: give one per layer."
        )
    for i, k in enumerate(active):
        if hasattr(moe.mlp(i), "set_policy"):
            moe.mlp(i).set_policy(RoutingPolicy("topk", k=int(k)))


def _flag_values(cfg: ConvertRun) -> list[tuple[str, object]]:
    """(flag, value) of the `python -m moe_core convert` flags that express this config."""
    flags = [("--model", cfg.model.spec)]
    if cfg.model.device != "cpu":
        flags.append(("--device", cfg.model.device))
    flags += [("--text", cfg.data.text), ("--n-sequences", cfg.data.n_sequences)]
    flags += [("--seq-len", cfg.data.seq_len), ("--seed", cfg.data.seed), ("--method", cfg.method)]
    section = cfg.section()
    for option in lookup(cfg.method).options:
        value = option.get(section)
        if option.flag and option.kind is bool:  # a switch: given when on
            flags += [(option.flag, None)] if value else []
        elif option.flag and value is not None:
            flags.append((option.flag, option.to_text(value)))
    r = cfg.routing
    flags += [("--router", r.router), ("--routing-form", r.form)]
    flags += [("--refit" if r.refit else "--no-refit", None)]
    flags += [("--compensate" if r.compensate else "--no-compensate", None)]
    flags += [("--routing-tokens", r.max_tokens)]
    flags += [("--distill" if cfg.distill.enabled else "--no-distill", None)]
    if cfg.distill.enabled:
        d = cfg.distill
        flags += [("--distill-tokens", d.tokens), ("--distill-lr", d.lr)]
        flags += [("--distill-minutes", d.max_minutes)] if d.max_minutes is not None else []
        flags += [("--distill-train", ",".join(d.train)), ("--distill-lora-r", d.lora_r)]
    return flags + [("--out", cfg.out)]


def _section_tree(cfg: ConvertRun) -> dict:
    """The method section's settings that its flags express, as a nested dict."""
    tree: dict = {}
    section = cfg.section()
    for option in lookup(cfg.method).options:
        if option.flag:
            option.put(tree, option.get(section))
    return tree


def command_line(cfg: ConvertRun, config_file: str = "run_config.yaml") -> str:
    """The `python -m moe_core convert` line that reproduces ``cfg``: flags alone where they express every
    setting, else ``--config config_file`` (the YAML of :func:`config_yaml`) with the same flags on top."""
    flags = _flag_values(cfg)
    tree: dict = {"model": {"spec": cfg.model.spec, "device": cfg.model.device}, "method": cfg.method}
    tree["data"] = to_dict(cfg.data)
    tree["out"] = cfg.out
    tree[cfg.method] = _section_tree(cfg)
    r = cfg.routing
    tree["routing"] = {
        "router": r.router, "form": r.form, "refit": r.refit, "compensate": r.compensate, "max_tokens": r.max_tokens
    }  # fmt: skip
    d = cfg.distill
    tree["distill"] = {"enabled": d.enabled}
    if d.enabled:
        tree["distill"] |= {"tokens": d.tokens, "lr": d.lr, "max_minutes": d.max_minutes}
        tree["distill"] |= {"train": list(d.train), "lora_r": d.lora_r}
    if cfg.finetune.enabled:
        tree["finetune"] = {"enabled": True}
    try:
        complete = from_dict(ConvertRun, tree) == cfg
    except ValueError:
        complete = False
    args = ["python", "-m", "moe_core", "convert"]
    if cfg.model.trust_remote_code:
        args.append("--trust-remote-code")
    if not complete:
        args += ["--config", config_file]
    if cfg.finetune.enabled:
        args.append("--finetune")
    for flag, value in flags:
        args += [flag] if value is None else [flag, str(value)]
    return shlex.join(args)


def config_yaml(cfg: ConvertRun) -> str:
    """The run config as YAML, loadable by ``load_config_file`` and ``--config``: model, data, the chosen
    method's section, routing, distillation and fine-tuning when enabled, the per-layer active experts and
    the routing plan when set, and out (the other sections are left at their defaults)."""
    import yaml

    full = to_dict(cfg)
    keys = ("model", "data", "method", cfg.method, "routing")
    keys += (("distill",) if cfg.distill.enabled else ()) + (("finetune",) if cfg.finetune.enabled else ())
    keys += (("active_per_layer",) if cfg.active_per_layer is not None else ()) + (
        ("plan",) if cfg.plan is not None else ()
    )
    keys += ("out",)
    data = {k: full[k] for k in keys}
    return yaml.safe_dump(_plain(data), sort_keys=False)


def _plain(value):
    """Tuples -> lists, recursively (safe_dump writes tuples as Python objects)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def evaluate_pair(ref, moe, cfg=None, progress: Progress = None, cancel: Cancel = None):
    """Evaluate ``moe`` against ``ref`` (its dense source, or None) as ``cfg`` (an EvalConfig; None: the
    defaults) says: perplexity, KL and top-1 agreement on the same windows of ``cfg.text``, parameters and
    expert load, lm-eval tasks for both models, and (``cfg.speed``) measured prefill and batch-1 decode tokens/s
    of both, timed in turn (:func:`moe_core.evaluate.measure_speed`). Returns the EvalReport.

    The one evaluation of `python -m moe_core eval` and the app's Evaluate tab, so both share EvalConfig's
    defaults. ``cfg.reference`` names the reference for callers that load it; here ``ref`` is already loaded.
    """
    from .config import EvalConfig
    from .data import eval_windows, load_documents
    from .evaluate import evaluate, lm_eval_tasks, measure_speed

    cfg = cfg or EvalConfig()
    moe.check_seq_len(cfg.seq_len)
    docs = load_documents(cfg.text)
    windows = eval_windows(docs, moe.tokenizer, cfg.seq_len, cfg.n_windows, source=cfg.text)
    report = evaluate(
        ref, moe, windows, text=cfg.text, batch_size=cfg.batch_size, tasks=list(cfg.tasks), limit=cfg.limit,
        progress=progress, cancel=cancel,
    )  # fmt: skip
    if ref is None:
        return report
    if cfg.tasks:
        report = replace(report, ref_lm_eval=lm_eval_tasks(ref, list(cfg.tasks), cfg.limit))
    if cfg.speed:
        if progress:
            progress(0.9, "Measuring prefill and decode speed of both models, in turn")
        report = replace(report, speed=measure_speed(ref, moe, seq_len=min(cfg.seq_len, 256), cancel=cancel))
    return report


def evaluate_streamed(model_cfg, cfg, reference=None, progress: Progress = None, cancel: Cancel = None):
    """The evaluation of a model folder larger than ``model_cfg.max_memory`` (a converted folder or a dense one),
    one decoder layer in memory at a time (moe_core.streaming.reading): perplexity, and KL and top-1 agreement
    against ``reference`` (a spec or None), whose logits on the same windows are computed first (streamed too
    when it is a folder larger than max_memory) and kept in float16; expert load and parameters as usual.

    lm-eval tasks and measured speed run the whole model, so a streamed evaluation refuses tasks and leaves
    speed out (the report says so). Returns the EvalReport."""
    from dataclasses import replace as _replace

    from .data import eval_windows, load_documents
    from .evaluate import evaluate, param_report, reference_logits
    from .model_io import load_model
    from .plumbing import span
    from .streaming import open_model, reading, should_stream

    if cfg.tasks:
        raise ValueError(
            "lm-eval tasks run the whole model, which is larger than --max-memory here: drop --tasks, or raise "
            "--max-memory and evaluate in memory."
        )
    device, dtype, remote = model_cfg.device, model_cfg.dtype, model_cfg.trust_remote_code
    source = open_model(model_cfg.spec, device, dtype, remote, model_cfg.max_memory)
    docs = load_documents(cfg.text)
    windows = eval_windows(docs, source.dense.tokenizer, cfg.seq_len, cfg.n_windows, source=cfg.text)
    ref, ref_params = None, {}
    if reference is not None:
        part = span(progress, 0.0, 0.5)
        if should_stream(_replace(model_cfg, spec=reference)):
            with reading(open_model(reference, device, dtype, remote, model_cfg.max_memory)) as dense:
                ref = reference_logits(dense, windows, cfg.batch_size, part, cancel)
        else:
            dense = load_model(reference, device=device, dtype=dtype)
            ref = reference_logits(dense, windows, cfg.batch_size, part, cancel)
        ref_params = param_report(dense, cfg.seq_len)  # counted from the shapes: a shell's are enough
    with reading(source) as m:
        report = evaluate(
            ref, m, windows, text=cfg.text, batch_size=cfg.batch_size,
            progress=span(progress, 0.5 if ref is not None else 0.0, 1.0), cancel=cancel,
        )  # fmt: skip
    return _replace(report, streamed=True, ref_params=ref_params)


def sweep_model(dense, moe, cfg, progress: Progress = None, cancel: Cancel = None):
    """LaDiMo's per-layer curves of ``moe`` on the held-out windows ``cfg`` (a SweepConfig) names."""
    from .sweep import held_out_windows, sweep

    return sweep(dense, moe, held_out_windows(dense.tokenizer, cfg), cfg, progress=progress, cancel=cancel)
