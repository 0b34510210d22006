"""Convert tab: run a registered method on the Design tab's layout and the Data tab's text; show the run config
as YAML and as the equivalent `python -m moe_core convert` line, downloadable and loadable from a file."""

from __future__ import annotations

import html
import time
from dataclasses import dataclass, replace

import gradio as gr

from moe_core.config import ConvertRun, from_dict
from views import plots, widgets
from views.data_tab import DataTab, data_config
from views.design_tab import Design, DesignTab, design
from views.state import Session

NO_MODEL = (
    "Load a model in the **Model** tab first; the layout comes from **Design**, the text from **Data**."
)
EMPTY = widgets.empty(
    "No converted model yet: press <b>Convert</b>. Then evaluate, tune routing or export it."
)
CONFIG_FILE = "run_config.yaml"
TITLES = {"cmoe": "CMoE", "dive": "DIVE", "ladimo": "LaDiMo", "finetune": "Fine-tuning"}
ABOUT = {
    "cmoe": "CMoE (arXiv 2502.04416): carve neurons into experts by co-activation; no training, seconds per layer.",
    "dive": "DIVE (arXiv 2506.09351): one FLAP-pruned expert per group of related domains, then two short "
    "retraining stages. E and A come from the Design tab; the shared ratio is a share of channels. After "
    "converting, a heatmap shows the mined domain affinity and which domains became which expert.",
    "ladimo": "LaDiMo (arXiv 2408.04278): split each FFN, then distil experts and router layer by layer.",
    "finetune": "After any method: LoRA on attention and experts, CMoE's gate scales and aux-free balancing "
    "(CMoE §5.1), on text other than the evaluation set. The saved model is the tuned one.",
}
# Method options shown in each accordion: (field, label, choices or type, one-line help). Fields of the
# layout (experts, n_experts, n_shared, top_k) come from the Design tab and are not repeated here.
OPTIONS = {
    "cmoe": [
        (
            "variant",
            "Variant",
            ["code", "paper"],
            "code: cosine profiling, L1 clusters, |s| router (lower ppl)",
        ),
        ("k_act", "K_a", int, "neurons per token marked active when grouping neurons"),
        ("kmeans_iters", "Clustering rounds", int, "balanced-assignment + centroid rounds (the code does 1)"),
    ],
    "dive": [
        (
            "domains",
            "Domains",
            "domains",
            "name=text source, comma-separated; one expert per group of domains",
        ),
        ("prune_ratio", "Prune ratio", "optional", "channels each expert drops; empty: 1 - 0.5 / A"),
        ("n_sequences", "Sequences per domain", int, "calibration windows per domain"),
        ("retrain.stage1_steps", "Stage 1 steps", int, "router only, every expert on (0 skips)"),
        ("retrain.stage2_steps", "Stage 2 steps", int, "LoRA on experts + router + norms (0 skips)"),
    ],
    "ladimo": [
        ("steps", "Steps per layer", int, "Adam distillation steps per layer (~15 s per SmolLM2 layer)"),
        ("lr", "Learning rate", float, "experts; the router uses 10x"),
        (
            "partition",
            "Partition",
            ["contiguous", "cmoe"],
            "contiguous slices (paper) or co-activation clusters",
        ),
        ("router_init", "Router init", ["random", "representative"], "random starts near uniform routing"),
    ],
    "finetune": [
        ("enabled", "Fine-tune after converting", bool, "minutes on a CPU for the defaults"),
        ("text", "Text", str, "auto: shared:calib-wikipedia when present, else builtin:pydoc"),
        ("n_sequences", "Sequences", int, "training windows"),
        ("seq_len", "Tokens per sequence", int, "window length"),
        ("lr", "Learning rate", float, "LoRA; the gate scales use their own rate"),
    ],
}


def sections() -> list[str]:
    """The config sections with inputs in this tab, in build order: every method, then fine-tuning."""
    from moe_core.methods import METHODS

    return [*METHODS, "finetune"]


@dataclass(frozen=True)
class ConvertTab:
    status: gr.Markdown
    method: gr.Radio
    options: list  # one component per (method, field) of OPTIONS, in order
    summary: gr.HTML
    converted: object  # the convert event's Dependency
    preview_outputs: list  # YAML and command boxes


def _option_fields(methods: list[str]) -> list[tuple[str, str, object]]:
    """(method, field, type or choices) of every option component, in the order they are built."""
    return [(m, f[0], f[2]) for m in methods for f in OPTIONS.get(m, [])]


def _to_config(kind, value):
    """An input's value as its config field wants it."""
    if kind == "domains":
        return [part.strip() for part in str(value or "").split(",") if part.strip()]
    if kind == "optional":
        return None if value in (None, "") else float(value)
    if kind is str:
        return str(value).strip()
    return kind(value) if kind in (int, float, bool) else value


def _to_input(kind, value):
    if kind == "domains":
        return ", ".join(f"{name}={spec}" for name, spec in value)
    return value


def _option_value(section, name: str):
    for part in name.split("."):
        section = getattr(section, part)
    return section


def run_config(
    session: Session, data_values, design_values, method, *option_values
) -> tuple[ConvertRun, Design]:
    """The ConvertRun the inputs describe (validated), and the Design it took the layout from."""
    d = design(session, *design_values)
    names = sections()
    sections_ = {m: {} for m in names}
    for (m, name, kind), value in zip(_option_fields(names), option_values, strict=True):
        if value is None and kind != "optional":
            raise ValueError(f"{TITLES.get(m, m)} option '{name}' is empty: give a value.")
        node = sections_[m]
        *parents, leaf = name.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = _to_config(kind, value)
    sections_["cmoe"]["experts"] = d.experts
    sections_["ladimo"] |= {"n_experts": d.n_experts, "n_shared": d.n_shared, "top_k": d.active}
    if "dive" in sections_:  # DIVE's experts overlap (pruned copies): the shared ratio is a share of channels
        sections_["dive"] |= {
            "n_experts": d.n_experts,
            "top_k": d.active,
            "shared_share": float(design_values[1]),
        }
    model = {"spec": session.dense.spec if session.dense is not None else "builtin:smollm2-135m"}
    if session.dense is not None:
        model["device"] = session.dense.device.type
    tree = {
        "model": model,
        "data": vars(data_config(*data_values)),
        "method": method,
        "out": "outputs/convert",
        "finetune": sections_["finetune"],
    }
    if method in sections_ and method in ConvertRun.__dataclass_fields__:
        tree[method] = sections_[method]  # the other methods keep their defaults
    return from_dict(ConvertRun, tree), d


def preview(session: Session, *values):
    """(YAML, command line) of the current inputs, or the reason they do not make a valid run."""
    from moe_core.pipeline import command_line, config_yaml

    try:
        cfg, d = run_config(session, values[:4], values[4:9], values[9], *values[10:])
    except ValueError as exc:
        return f"# Not a valid run yet:\n# {exc}", f"# {exc}"
    note = "" if d.per_layer is None else "  # then per-layer A from the Design tab (the app applies it)"
    return config_yaml(cfg), command_line(cfg, CONFIG_FILE) + note


def status_text(session: Session) -> str:
    """The grey line on top: which model converts, and what this session converted last."""
    if session.dense is None:
        return NO_MODEL
    cfg = session.dense.model.config
    line = f"Model **{session.dense.spec}**: {session.dense.n_layers} layers x {cfg.intermediate_size} FFN neurons. "
    if session.moe is None:
        return line + "Layout from **Design**, text from **Data**; press **Convert**."
    return widgets.converted_status(session, "", "Convert again to replace it.")


def summary_html(session: Session, seconds: float) -> str:
    m, run = session.metrics, session.run_config
    method = TITLES.get(run["method"], run["method"])
    tiles = [
        widgets.tile(f"{m['moe_layers']}", "MoE layers"),
        widgets.tile(
            widgets.millions(m["active_params"]),
            f"active params per token (of {widgets.millions(m['total_params'])})",
        ),
        widgets.tile(f"{m['active_ffn_share']:.1%}", "of the FFN runs per token"),
        widgets.tile(
            f"{m['flops_per_token'] / 1e6:,.1f} MFLOP", f"per token ({m['flops_seq_len']}-token window)"
        ),
        widgets.tile(f"{m['calibration_tokens']:,}", "calibration tokens"),
        widgets.tile(f"{seconds:.1f} s", "conversion time"),
    ]
    tuned = m.get("finetune")
    if tuned:
        tiles.append(
            widgets.tile(
                f"{tuned['loss_first']:.2f} → {tuned['loss_last']:.2f}",
                f"fine-tuning loss, {len(tuned['losses'])} steps in {tuned['seconds']:.0f} s",
            )
        )
    layout = run.get(run["method"], {})
    shape = (
        layout.get("experts")
        or f"E{layout.get('n_experts')} S{layout.get('n_shared')} top-{layout.get('top_k')}"
    )
    per_layer = run.get("active_per_layer")
    footer = (
        f'<div class="moe-bar-label">Layout {html.escape(str(shape))}'
        + (f", A per layer {html.escape(str(per_layer))}" if per_layer else "")
        + ". Next: <b>Evaluate</b> against the dense model, tune <b>Routing policy</b>, or <b>Export</b>.</div>"
    )
    return widgets.card(
        f"{method} conversion of <code>{html.escape(session.dense.spec)}</code>", tiles, footer
    )


def _log(lines: list[str], start: float):
    def progress_to(progress):
        def report(fraction: float, message: str) -> None:
            lines.append(f"{time.perf_counter() - start:7.1f} s  [{fraction:6.1%}]  {message}")
            progress(fraction, desc=message)

        return report

    return progress_to


@widgets.guarded("Could not convert", outputs=5)
def convert(session: Session, *values, progress=gr.Progress()):
    """Convert the session's model; a generator: the log streams while the job runs, and the last update is
    (Session, summary, log, yaml file, download path)."""
    from moe_core.pipeline import config_yaml, convert_run

    if session.dense is None:
        raise gr.Error(NO_MODEL.replace("**", ""), print_exception=False)
    cfg, d = run_config(session, values[:4], values[4:9], values[9], *values[10:])
    session.cancel.clear()
    start, lines = time.perf_counter(), []
    lines.append(f"{0.0:7.1f} s  {cfg.method} on {cfg.model.spec}, text {cfg.data.text}")
    log_only = lambda: (gr.skip(), gr.skip(), "\n".join(lines), gr.skip(), gr.skip())  # noqa: E731
    yield log_only()
    out = yield from widgets.while_running(
        log_only,
        convert_run,
        session.dense,
        cfg,
        active=d.per_layer,
        folder=session.workspace.path("converted"),
        progress=_log(lines, start)(progress),
        cancel=session.cancel,
    )
    seconds = time.perf_counter() - start
    lines.append(f"{seconds:7.1f} s  saved {out.folder.name}/ ({out.metrics['moe_layers']} MoE layers)")
    session = replace(
        session, moe=out.moe, run_config=out.run_config, calib_ids=out.calib_ids, metrics=out.metrics,
        sweep=None, plan=None, export=None,
    )  # fmt: skip
    path = session.workspace.path(CONFIG_FILE)
    path.write_text(config_yaml(cfg))
    yield (
        session,
        summary_html(session, seconds),
        "\n".join(lines),
        str(path),
        gr.DownloadButton(value=str(path), visible=True),
    )


def affinity_plot(session: Session) -> gr.Plot:
    """After a DIVE conversion, its domain affinity heatmap (cluster order, groups outlined); hidden else."""
    report = (session.metrics or {}).get("conversion") or {}
    if session.moe is None or not report.get("affinity"):
        return gr.Plot(visible=False)
    return gr.Plot(plots.affinity_heatmap(report["affinity"]), visible=True)


def cancel(session: Session) -> None:
    session.cancel.set()


@widgets.guarded("Could not load the run config")
def load_config(path, session: Session, n_options: int):
    """A YAML/JSON run config -> updates for the model source, data, design, method and option inputs."""
    from moe_core.config import load_config_file

    cfg = from_dict(ConvertRun, load_config_file(path))
    section = cfg.section()
    n_experts = getattr(section, "n_experts", None) or section.shape[2]
    n_shared = getattr(section, "n_shared", None)
    n_shared = section.shape[0] if n_shared is None and hasattr(section, "shape") else (n_shared or 0)
    active = getattr(section, "top_k", None) or section.shape[1]
    ratio = getattr(section, "shared_share", None)
    ratio = n_shared / n_experts if ratio is None else ratio
    options = [
        _to_input(k, _option_value(getattr(cfg, m), name)) for m, name, k in _option_fields(sections())
    ]
    if session.dense is None or session.dense.spec != cfg.model.spec:
        gr.Info(f"The config names the model {cfg.model.spec}: press Load in the Model tab to use it.")
    d = cfg.data
    design_values = [n_experts, ratio, "uniform", active, ""]
    return [
        cfg.model.spec,
        d.text,
        d.n_sequences,
        d.seq_len,
        d.seed,
        *design_values,
        cfg.method,
        *options[:n_options],
    ]


def _inputs(section: str, defaults: ConvertRun) -> list:
    """One input component per OPTIONS entry of a config section, holding the default value."""
    out = []
    for name, label, kind, help_text in OPTIONS.get(section, []):
        value = _to_input(kind, _option_value(getattr(defaults, section), name))
        if kind == "domains":
            out.append(gr.Textbox(value, label=label, info=help_text, lines=2))
        elif kind == "optional":
            out.append(gr.Number(None, label=label, info=help_text))
        elif kind is bool:
            out.append(gr.Checkbox(value, label=label, info=help_text))
        elif kind is str:
            out.append(gr.Textbox(value, label=label, info=help_text))
        elif isinstance(kind, list):
            out.append(gr.Radio(kind, value=value, label=label, info=help_text))
        else:
            out.append(gr.Number(value, label=label, info=help_text, precision=0 if kind is int else None))
    return out


def build(state: gr.State, data: DataTab, design_tab: DesignTab, source: gr.Dropdown) -> ConvertTab:
    from moe_core.methods import METHODS

    methods = list(METHODS)
    defaults = ConvertRun()
    with gr.Tab("Convert", id="convert"):
        status = gr.Markdown(NO_MODEL, elem_classes="moe-status")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2):
                method = gr.Radio(
                    [(TITLES.get(m, m), m) for m in methods],
                    value="cmoe",
                    label="Method",
                    info="Expert layout from the Design tab, calibration text from the Data tab.",
                )
                options = []
                for m in methods:
                    with gr.Accordion(f"{TITLES.get(m, m)} options", open=m == "cmoe") as acc:
                        gr.Markdown(ABOUT.get(m, ""), elem_classes="moe-help")
                        options += _inputs(m, defaults)
                    method.change(
                        lambda v, m=m: gr.Accordion(open=v == m),
                        method,
                        acc,
                        queue=False,
                        api_visibility="private",
                    )
                with gr.Accordion("Fine-tuning (optional, any method)", open=False):
                    gr.Markdown(ABOUT["finetune"], elem_classes="moe-help")
                    options += _inputs("finetune", defaults)
                with gr.Row():
                    button = gr.Button("Convert", variant="primary")
                    stop = gr.Button("Cancel", variant="stop")
                upload = gr.UploadButton("Load config file", file_types=[".yaml", ".yml", ".json"], size="sm")
            with gr.Column(scale=3):
                summary = gr.HTML(EMPTY)
                affinity = gr.Plot(visible=False, show_label=False)
                log = gr.Textbox(label="Log", lines=6, max_lines=12, interactive=False, autoscroll=True)
                yaml_box = gr.Code(
                    language="yaml", label="Run config (YAML)", lines=10, max_lines=18, interactive=False
                )
                cmd = gr.Code(
                    language="shell",
                    label="The same run from the command line",
                    lines=2,
                    wrap_lines=True,
                    show_line_numbers=False,
                    interactive=False,
                )
                config_file = gr.Textbox(visible=False)
                download = gr.DownloadButton("Download run config", visible=False, size="sm")
    inputs = [state, *data.inputs, *design_tab.inputs, method, *options]
    converted = button.click(
        convert,
        inputs,
        [state, summary, log, config_file, download],
        api_name="convert",
        show_progress_on=summary,
        **widgets.HEAVY,
    )
    converted.then(affinity_plot, state, affinity, api_visibility="private", **widgets.LIGHT)
    stop.click(cancel, state, None, queue=False, api_visibility="private")
    gr.on(
        [c.change for c in inputs[1:]],
        preview,
        inputs,
        [yaml_box, cmd],
        api_name="convert_preview",
        **widgets.LIGHT,
    )
    targets = [source, *data.inputs, *design_tab.inputs, method, *options]
    upload.upload(
        lambda path, session: load_config(path, session, len(options)),
        [upload, state],
        targets,
        api_name="load_run_config",
        **widgets.LIGHT,
    )
    return ConvertTab(status, method, options, summary, converted, [yaml_box, cmd])
