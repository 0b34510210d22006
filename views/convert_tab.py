"""Convert tab: run a registered method on the Design tab's layout and the Data tab's text, with the routing step,
distillation (a live loss curve) and fine-tuning after it; show the run config as YAML and as the equivalent
`python -m moe_core convert` line, downloadable and loadable from a file."""

from __future__ import annotations

import html
import time
from dataclasses import dataclass, replace

import gradio as gr

from moe_core.config import DISTILL_PARTS, ConvertRun, RoutingConfig, from_dict
from moe_core.methods import METHODS, Layout, Option, choices
from views import plots, widgets
from views.data_tab import DataTab, data_config
from views.design_tab import DEFAULTS as DESIGN_DEFAULTS
from views.design_tab import N_INPUTS as N_DESIGN
from views.design_tab import Design, DesignTab, design
from views.state import CONVERTED, Session

NO_MODEL = (
    "Load a model in the **Model** tab first; the layout comes from **Design**, the text from **Data**."
)
EMPTY = widgets.empty(
    "No converted model yet: press <b>Convert</b>. Then evaluate, tune routing or export it."
)
CONFIG_FILE = "run_config.yaml"
TITLES = {
    "routing": "Routing",
    "distill": "Distillation",
    "finetune": "Fine-tuning",
}  # the steps after a method
ABOUT = {
    "routing": "After CMoE, DIVE or FLAP, layer by layer: a linear router trained on each token's best experts "
    "(oracle labels), a least-squares refit of the down projections, and the form the model is saved in. After "
    "converting, the summary shows the held-out error before and after, and the oracle bound. LaDiMo takes this "
    "step before it trains each layer (its oracle router init, native form) and not again after.",
    "distill": "After any method and the routing step: the dense model teaches the converted one (KL on the "
    "logits, text other than the evaluation set). It stops at the token or the time budget, whichever ends "
    "first; the loss curve draws as it trains. The saved model is the distilled one.",
    "finetune": "After any method: LoRA on attention and experts, CMoE's gate scales and aux-free balancing "
    "(CMoE §5.1), on text other than the evaluation set. The saved model is the tuned one.",
}
NO_STEP = "The loss curve appears after the first distillation step."


def _step(path: str, label: str, kind, help_text: str) -> Option:
    """An input of a step after the method (their flags are the command line's own)."""
    return Option(path, "", help_text, label, kind)


# The inputs of the steps after any method; each method's own inputs are its registry options (moe_core.methods)
# with tab=True (the layout fields come from the Design tab and are not repeated here).
STEPS = {
    "routing": [
        _step("router", "Router", choices(RoutingConfig, "router"),
              "trained: a linear router fitted to each token's best experts"),
        _step("form", "Routing form", choices(RoutingConfig, "form"),
              "native: Qwen2-MoE's routing, so the export to Qwen2-MoE (vLLM, SGLang, llama.cpp) is exact"),
        _step("refit", "Refit the down projections", bool, "least squares given the routing; seconds per layer"),
        _step("compensate", "Compensation biases", bool,
              "analytic form with a refit: a bias per expert, refitted too (holds FLAP's compensation)"),
    ],
    "distill": [
        _step("enabled", "Distil after converting", bool, "on by default: 16 steps, about 2 minutes for SmolLM2 on a CPU"),
        _step("tokens", "Token budget", int, "training tokens, one pass"),
        _step("max_minutes", "Minutes budget", "optional", "empty: no time limit"),
        _step("lr", "Learning rate", float, "Adam, warm-up then cosine decay"),
        _step("train", "Parts that train", "parts", "gate_scales and biases exist in CMoE and DIVE models"),
        _step("lora_r", "LoRA rank", int, "0: the matrices train in full; r > 0: LoRA factors, merged at the end"),
    ],
    "finetune": [
        _step("enabled", "Fine-tune after converting", bool, "minutes on a CPU for the defaults"),
        _step("text", "Text", str, "auto: shared:calib-wikipedia when present, else builtin:pydoc"),
        _step("n_sequences", "Sequences", int, "training windows"),
        _step("seq_len", "Tokens per sequence", int, "window length"),
        _step("lr", "Learning rate", float, "LoRA; the gate scales use their own rate"),
    ],
}  # fmt: skip


def title(section: str) -> str:
    """A method's or a step's title."""
    return METHODS[section].title if section in METHODS else TITLES.get(section, section)


def section_options(section: str) -> list[Option]:
    """The inputs of one config section in this tab: a method's tab options, or a step's."""
    if section in METHODS:
        return [o for o in METHODS[section].options if o.tab]
    return STEPS.get(section, [])


AFTER = ("routing", "distill", "finetune")  # the sections that apply after any method, in build order
SWITCHED = ("distill", "finetune")  # sections with an `enabled` switch: off, the run keeps their defaults


def sections() -> list[str]:
    """The config sections with inputs in this tab, in build order: every method, then routing, distillation
    and fine-tuning."""
    return [*METHODS, *AFTER]


@dataclass(frozen=True)
class ConvertTab:
    status: gr.Markdown
    method: gr.Radio
    options: list  # one component per (section, option) of _option_fields(sections()), in order
    summary: gr.HTML
    loss: gr.Plot  # the distillation's loss curve, live while it trains
    converted: object  # the convert event's Dependency
    preview_outputs: list  # YAML and command boxes
    # loss curve, routing errors, DIVE affinity: each shown only for the conversion it belongs to
    figures: tuple

    def follow(self, loaded, state: gr.State) -> None:
        """A new model has no conversion yet: hide the previous one's figures."""
        loaded.then(after_figures, state, list(self.figures), api_visibility="private", **widgets.LIGHT)


def _option_fields(names: list[str]) -> list[tuple[str, Option]]:
    """(section, option) of every option component, in the order they are built."""
    return [(m, o) for m in names for o in section_options(m)]


def _to_config(option: Option, value):
    """An input's value as its config field wants it."""
    kind = option.kind
    if kind == "list":
        return option.from_text(str(value or ""))
    if kind == "optional":  # a textbox: a browser's empty number field would send 0, not "unset"
        text = str(value if value is not None else "").strip()
        try:
            return float(text) if text else None
        except ValueError:
            raise ValueError(f"'{text}' is not a number: give one, or leave the field empty.") from None
    if kind == "parts":
        return list(value or [])
    if kind is str:
        return str(value).strip()
    return kind(value) if kind in (int, float, bool) else value


def _to_input(option: Option, value):
    kind = option.kind
    if kind == "list":
        return option.to_text(value)
    if kind == "parts":
        return list(value)
    if kind == "optional":
        return "" if value is None else f"{value:g}"
    return value


def split(values) -> tuple:
    """The Convert tab's input values (the state aside) -> (data values, design values, method, option values)."""
    n_data = len(DataTab.__dataclass_fields__)
    data, rest = values[:n_data], values[n_data:]
    return data, rest[:N_DESIGN], rest[N_DESIGN], rest[N_DESIGN + 1 :]


def run_config(
    session: Session, data_values, design_values, method, *option_values
) -> tuple[ConvertRun, Design]:
    """The ConvertRun the inputs describe (validated), and the Design it took the layout from."""
    d = design(session, *design_values)
    names = sections()
    sections_ = {m: {} for m in names}
    for (m, option), value in zip(_option_fields(names), option_values, strict=True):
        if value is None and option.kind != "optional":
            raise ValueError(f"{title(m)} option '{option.path}' is empty: give a value.")
        option.put(sections_[m], _to_config(option, value))
    for m in SWITCHED:  # a step that does not run keeps its defaults (the YAML leaves it out)
        if not sections_[m]["enabled"]:
            sections_[m] = {"enabled": False}
    entry = METHODS[method]
    if d.budget is not None and not entry.budget:
        budgeted = ", ".join(m.title for m in METHODS.values() if m.budget)
        raise ValueError(
            f"The Design tab's budget mode gives each layer its own shape, which {entry.title} does not take: "
            f"choose {budgeted}, or set the Design tab to uniform or per layer."
        )
    ratio = float(design_values[1])
    layout = Layout(d.n_experts, d.n_shared, d.active, ratio, d.budget, d.layer_experts, d.servable)
    sections_[method] |= entry.from_layout(layout)
    model = {"spec": session.dense.spec if session.dense is not None else "builtin:smollm2-135m"}
    if session.dense is not None:
        model["device"] = session.dense.device.type
    if session.max_memory is not None:
        model["max_memory"] = session.max_memory
    tree = {
        "model": model,
        "data": vars(data_config(*data_values)),
        "method": method,
        "out": "outputs/convert",
        "active_per_layer": d.per_layer,  # None unless the Design tab sets A per layer
        **{m: sections_[m] for m in AFTER},
    }
    tree[method] = sections_[method]  # the other methods keep their defaults
    return from_dict(ConvertRun, tree), d


def cmoe_run(session: Session, data_values, design_values, extra_values) -> ConvertRun:
    """The run the inputs describe with CMoE as the method, whatever is picked (the Design tab's measurement:
    extra_values are the method and option values)."""
    return run_config(session, data_values, design_values, "cmoe", *extra_values[1:])[0]


def preview(session: Session, *values):
    """(YAML, command line) of the current inputs, or the reason they do not make a valid run."""
    from moe_core.pipeline import command_line, config_yaml

    try:
        data, design_values, method, options = split(values)
        cfg, d = run_config(session, data, design_values, method, *options)
    except ValueError as exc:
        return f"# Not a valid run yet:\n# {exc}", f"# {exc}"
    note = ""
    if d.budget is not None and d.layer_experts is None:
        note = "  # measures each layer's sensitivity first, then allocates the budget"
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


def routing_reports(metrics: dict | None) -> list[dict]:
    """The routing step's per-layer reports of a conversion (CMoE keeps them per carved layer, LaDiMo per trained
    layer, DIVE and FLAP in a list of their own); empty when no routing step ran."""
    report = (metrics or {}).get("conversion") or {}
    # a list of their own (DIVE, FLAP), or each layer's: CMoE's "routing", LaDiMo's "routing_step" (its
    # "routing" is the routing profile)
    layers = report.get("layers", [])
    found = report.get("routing") or [layer.get("routing_step") or layer.get("routing") for layer in layers]
    return [r for r in found if isinstance(r, dict) and "error_before" in r]


def _mean(reports: list[dict], key: str) -> float:
    return sum(r[key] for r in reports) / len(reports)


def _after_tiles(m: dict) -> list[str]:
    """Tiles for what ran after the method: the routing step, distillation, fine-tuning, a measured budget."""
    tiles = []
    reports = routing_reports(m)
    if reports:
        before, after = _mean(reports, "error_before"), _mean(reports, "error")
        tiles += [
            widgets.tile(
                f"{before:.3f} → {after:.3f}", "held-out relative error, before → after the routing step"
            ),
            widgets.tile(
                f"{_mean(reports, 'error_oracle'):.3f}", "oracle bound (each token to its best experts)"
            ),
            widgets.tile(f"{_mean(reports, 'oracle_overlap'):.0%}", "router picks the oracle's experts"),
        ]
    distilled = m.get("distill")
    if distilled:
        held = distilled["held_out"]
        stopped = ", time budget reached" if distilled.get("stopped") == "time" else ""
        tiles.append(
            widgets.tile(
                f"{held[0][1]:.3g} → {held[-1][1]:.3g}",
                f"held-out KL, distillation: {distilled['steps']} steps, {distilled['tokens']:,} tokens in "
                f"{distilled['seconds']:.1f} s{stopped}",
            )
        )
    tuned = m.get("finetune")
    if tuned:
        tiles.append(
            widgets.tile(
                f"{tuned['loss_first']:.2f} → {tuned['loss_last']:.2f}",
                f"fine-tuning loss, {len(tuned['losses'])} steps in {tuned['seconds']:.0f} s",
            )
        )
    budget = m.get("budget")
    if budget:
        tiles.append(
            widgets.tile(
                f"{budget['active_share']:.1%}",
                f"active share allocated for a {budget['budget']:.0%} budget (sensitivity measured first)",
            )
        )
    return tiles


def summary_html(session: Session, seconds: float) -> str:
    m, run = session.metrics, session.run_config
    method = title(run["method"])
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
        *_after_tiles(m),
    ]
    per_layer = run.get("active_per_layer")
    footer = (
        f'<div class="moe-bar-label">Layout {html.escape(widgets.layout_text(run))}'
        + (f", A per layer {html.escape(str(per_layer))}" if per_layer else "")
        + (
            ". Next: <b>Evaluate</b> against the dense model (it reads the saved layers one at a time)."
            if session.source is not None
            else ". Next: <b>Evaluate</b> against the dense model, tune <b>Routing policy</b>, or <b>Export</b>."
        )
        + "</div>"
    )
    return widgets.card(
        f"{method} conversion of <code>{html.escape(session.dense.spec)}</code>", tiles, footer
    )


def loss_figure(steps: list[int], losses: list[float], held: list) -> object:
    """The distillation curve from per-step losses and (step, held-out KL) pairs."""
    return plots.loss_curve(steps, losses, [int(s) for s, _ in held], [float(k) for _, k in held])


def live_loss(records: list[dict]):
    """The curve of the steps recorded so far (distill's on_step records)."""
    held = [(r["step"], r["held_out_kl"]) for r in records if "held_out_kl" in r]
    return loss_figure([r["step"] for r in records], [r["loss"] for r in records], held)


def loss_plot(session: Session) -> gr.Plot:
    """After a conversion with distillation, its whole curve (the held-out KL from step 0); hidden else."""
    distilled = (session.metrics or {}).get("distill")
    if session.moe is None or not distilled:
        return gr.Plot(visible=False)
    losses = distilled["losses"]
    return gr.Plot(loss_figure(list(range(1, len(losses) + 1)), losses, distilled["held_out"]), visible=True)


def after_figures(session: Session) -> tuple:
    """(loss curve, routing errors, DIVE affinity) of the session's conversion; each hidden when it has none."""
    return loss_plot(session), routing_plot(session), affinity_plot(session)


def routing_plot(session: Session) -> gr.Plot:
    """After a conversion with a routing step, its per-layer held-out errors; hidden else."""
    reports = routing_reports(session.metrics) if session.moe is not None else []
    if not reports:
        return gr.Plot(visible=False)
    fig = plots.routing_errors(
        [r["layer"] for r in reports],
        [r["error_before"] for r in reports],
        [r["error"] for r in reports],
        [r["error_oracle"] for r in reports],
    )
    return gr.Plot(fig, visible=True)


def _log(lines: list[str], start: float):
    def progress_to(progress):
        def report(fraction: float, message: str) -> None:
            lines.append(f"{time.perf_counter() - start:7.1f} s  [{fraction:6.1%}]  {message}")
            progress(fraction, desc=message)

        return report

    return progress_to


@widgets.guarded("Could not convert", outputs=6)
def convert(session: Session, *values, progress=gr.Progress()):
    """Convert the session's model; a generator: the log (and a distillation's loss curve) stream while the job
    runs, and the last update is (Session, summary, log, yaml file, download path, loss curve)."""
    from moe_core.pipeline import config_yaml, convert_run

    if session.dense is None:
        raise gr.Error(NO_MODEL.replace("**", ""), print_exception=False)
    data, design_values, method, options = split(values)
    cfg, d = run_config(session, data, design_values, method, *options)
    if session.source is not None:
        from moe_core.streaming import check_streamable

        try:
            check_streamable(cfg)
        except ValueError as exc:
            raise ValueError(
                f"{exc} Here: turn distillation off (the Recovery options), and choose CMoE, LaDiMo, or DIVE with both "
                "retraining stages at 0 steps."
            ) from None
    session.cancel.clear()
    start, lines, records, drawn, shown = time.perf_counter(), [], [], [0], [0]
    lines.append(f"{0.0:7.1f} s  {cfg.method} on {cfg.model.spec}, text {cfg.data.text}")

    def update():
        curve, log = gr.skip(), gr.skip()
        if len(records) != drawn[0]:  # redraw only when a step has ended since the last update
            drawn[0] = len(records)
            curve = gr.Plot(live_loss(list(records)), visible=True)
        if len(lines) != shown[0]:  # resend the log only when it has grown (it reaches hundreds of lines)
            shown[0] = len(lines)
            log = "\n".join(lines)
        return gr.skip(), gr.skip(), log, gr.skip(), gr.skip(), curve

    first = (
        gr.Plot(plots.placeholder(NO_STEP), visible=True) if cfg.distill.enabled else gr.Plot(visible=False)
    )
    yield *update()[:5], first
    out = yield from widgets.while_running(
        update,
        convert_run,
        session.dense,
        cfg,
        folder=session.workspace.path(CONVERTED),
        progress=_log(lines, start)(progress),
        cancel=session.cancel,
        on_step=records.append,
        source=session.source,
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
        loss_plot(session),
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
    entry = METHODS[cfg.method]
    options = [_to_input(o, o.get(getattr(cfg, m))) for m, o in _option_fields(sections())]
    if entry.to_layout is None:  # the method takes no expert layout: the Design tab keeps its own
        layout = [gr.skip()] * N_DESIGN
    else:
        n_experts, active, ratio = entry.to_layout(cfg.section())
        layout = [n_experts, ratio, *_budget_inputs(cfg, active)]
    if session.dense is None or session.dense.spec != cfg.model.spec:
        gr.Info(f"The config names the model {cfg.model.spec}: press Load in the Model tab to use it.")
    if cfg.plan is not None:
        gr.Warning(
            "The config carries a routing plan: `python -m moe_core convert --config` applies it after converting; "
            "here, convert, then sweep and apply a plan in the Routing policy tab."
        )
    d = cfg.data
    return [
        cfg.model.spec,
        d.text,
        d.n_sequences,
        d.seq_len,
        d.seed,
        *layout,
        cfg.method,
        *options[:n_options],
    ]


def _budget_inputs(cfg: ConvertRun, active: int) -> list:
    """(mode, A, A per layer, budget, allocation, servable) of the Design tab for a loaded run config."""
    c = cfg.cmoe
    off = [DESIGN_DEFAULTS["budget"], "", DESIGN_DEFAULTS["servable"]]
    if cfg.active_per_layer is not None:
        return ["per layer", active, ", ".join(map(str, cfg.active_per_layer)), *off]
    if cfg.method != "cmoe" or c.budget is None:
        if cfg.method == "cmoe" and c.layer_experts is not None:
            gr.Warning(
                "The config gives cmoe.layer_experts without cmoe.budget: the Design tab shows budgets only, so "
                "these shapes are dropped; run that config from the command line to use them."
            )
        return ["uniform", active, "", *off]
    return ["budget", active, "", c.budget, ", ".join(c.layer_experts or ()), c.servable]


def _inputs(section: str, defaults: ConvertRun) -> list:
    """One input component per option of a config section (:func:`section_options`), holding the default."""
    out = []
    for option in section_options(section):
        kind, label, help_text = option.kind, option.label, option.help
        value = _to_input(option, option.get(getattr(defaults, section)))
        if kind == "list":
            out.append(gr.Textbox(value, label=label, info=help_text, lines=2))
        elif kind == "optional":
            out.append(gr.Textbox(value, label=label, info=help_text, placeholder="empty"))
        elif kind == "parts":
            out.append(gr.CheckboxGroup(list(DISTILL_PARTS), value=value, label=label, info=help_text))
        elif kind is bool:
            out.append(gr.Checkbox(value, label=label, info=help_text))
        elif kind is str:
            out.append(gr.Textbox(value, label=label, info=help_text))
        elif isinstance(kind, tuple):
            out.append(gr.Radio(list(kind), value=value, label=label, info=help_text))
        else:
            out.append(gr.Number(value, label=label, info=help_text, precision=0 if kind is int else None))
    return out


def build(state: gr.State, data: DataTab, design_tab: DesignTab, source: gr.Dropdown) -> ConvertTab:
    methods = list(METHODS)
    defaults = ConvertRun()
    with gr.Tab("Convert", id="convert"):
        status = gr.Markdown(NO_MODEL, elem_classes="moe-status")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2):
                method = gr.Radio(
                    [(title(m), m) for m in methods],
                    value="cmoe",
                    label="Method",
                    info="Expert layout from the Design tab, calibration text from the Data tab.",
                )
                options = []
                for m in methods:
                    with gr.Accordion(f"{title(m)} options", open=m == "cmoe") as acc:
                        gr.Markdown(METHODS[m].about, elem_classes="moe-help")
                        options += _inputs(m, defaults)
                    method.change(
                        lambda v, m=m: gr.Accordion(open=v == m),
                        method,
                        acc,
                        queue=False,
                        api_visibility="private",
                    )
                for section, heading in (("routing", "Routing (any method)"),
                                         ("distill", "Distillation (any method, on by default)"),
                                         ("finetune", "Fine-tuning (optional, any method)")):  # fmt: skip
                    with gr.Accordion(heading, open=False):
                        gr.Markdown(ABOUT[section], elem_classes="moe-help")
                        options += _inputs(section, defaults)
                with gr.Row():
                    button = gr.Button("Convert", variant="primary")
                    stop = gr.Button("Cancel", variant="stop")
                upload = gr.UploadButton("Load config file", file_types=[".yaml", ".yml", ".json"], size="sm")
            with gr.Column(scale=3):
                summary = gr.HTML(EMPTY)
                loss = gr.Plot(visible=False, show_label=False)
                errors = gr.Plot(visible=False, show_label=False)
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
        [state, summary, log, config_file, download, loss],
        api_name="convert",
        show_progress_on=summary,
        **widgets.HEAVY,
    )
    converted.then(affinity_plot, state, affinity, api_visibility="private", **widgets.LIGHT)
    converted.then(routing_plot, state, errors, api_visibility="private", **widgets.LIGHT)
    design_tab.measure_with([method, *options], cmoe_run)
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
    return ConvertTab(
        status, method, options, summary, loss, converted, [yaml_box, cmd], (loss, errors, affinity)
    )
