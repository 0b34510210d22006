"""Design tab: the expert layout (E experts, a shared share, A active), checked and costed before anything runs;
or one active-FFN budget that each layer spends as its measured sensitivity says (CMoE)."""

from __future__ import annotations

import html
from dataclasses import dataclass, replace

import gradio as gr

from moe_core.config import ConvertRun
from views import plots, widgets
from views.data_tab import DataTab
from views.state import Session


def _defaults() -> dict:
    """The layout of ConvertRun's default CMoE: a 75% budget over 8 experts (budget mode; uniform would be its
    shape S3A3E8: S/E 3/8, A 3)."""
    cmoe = ConvertRun().cmoe
    n_shared, active, n_experts = cmoe.shape
    budget = cmoe.budget if cmoe.budget is not None else (n_shared + active) / n_experts
    return {
        "n_experts": n_experts, "shared_ratio": n_shared / n_experts,
        "mode": "budget" if cmoe.budget is not None else "uniform", "active": active,
        "per_layer": "", "budget": budget, "allocation": "", "servable": cmoe.servable,
    }  # fmt: skip


DEFAULTS = _defaults()
MODES = ["uniform", "per layer", "budget"]
N_INPUTS = len(DEFAULTS)  # the design inputs other tabs read, in DEFAULTS' order
NO_MODEL = widgets.empty("Load a model in the <b>Model</b> tab: the estimate needs its sizes.")
NO_SENSITIVITY = "Press Measure sensitivity to see how much each layer loses at each shape."
SEQ_LEN = 512  # attention FLOPs are counted over the mean context of a window this long
BUDGET_HELP = (
    "CMoE only. **Measure sensitivity** converts each layer alone at every candidate shape (S shared + A "
    "active of E slices) and measures the KL to the dense model on held-out text from the **Data** tab "
    "(fast mode, the default: at the middle shape, the others scaled by their output error), "
    "with the **Convert** tab's CMoE and routing options; the allocation then gives each layer the shape that "
    "loses least for the budget (a layer may stay dense). Moving the budget re-allocates at once. Without a "
    "measurement, **Convert** measures first. **Servable** keeps one shape in every converted layer (the others "
    "dense): the only kind of budget that Qwen2-MoE, and so vLLM and transformers without remote code, can "
    "load; choose the native routing form in the Convert tab too."
)


@dataclass(frozen=True)
class DesignTab:
    state: gr.State
    data: DataTab  # Measure sensitivity samples the Data tab's text
    n_experts: gr.Slider
    shared_ratio: gr.Slider
    mode: gr.Radio
    active: gr.Slider
    per_layer: gr.Textbox
    budget: gr.Slider
    allocation: gr.Textbox  # the budget's shape per layer, comma-separated; empty before a measurement
    servable: gr.Checkbox  # the budget allocates one shape (and dense layers): what serving engines load
    card: gr.HTML
    measure: gr.Button
    cancel: gr.Button
    figures: tuple  # sensitivity heatmap, allocation bars

    @property
    def inputs(self) -> tuple:
        return (self.n_experts, self.shared_ratio, self.mode, self.active, self.per_layer, self.budget,
                self.allocation, self.servable)  # fmt: skip

    def follow(self, loaded) -> None:
        """A new model clears the measured sensitivity and its allocation, and redraws the estimate."""
        loaded.then(
            on_model_loaded, [self.state, *self.inputs], [self.allocation, self.card, *self.figures],
            api_visibility="private",
        )  # fmt: skip

    def measure_with(self, extra: list, to_run) -> None:
        """Wire Measure sensitivity. It reads the Data tab's inputs, this tab's and ``extra`` (the Convert tab's),
        and ``to_run(session, data_values, design_values, extra_values)`` turns them into the ConvertRun whose
        data, cmoe and routing sections the measurement uses."""
        n_data = len(self.data.inputs)

        def measuring(session, *values, progress=gr.Progress()):
            data_values, design_values = values[:n_data], values[n_data : n_data + N_INPUTS]
            extra_values = values[n_data + N_INPUTS :]
            run = lambda: to_run(session, data_values, design_values, extra_values)  # noqa: E731
            return measure(session, run, design_values, progress=progress)

        self.measure.click(
            measuring, [self.state, *self.data.inputs, *self.inputs, *extra],
            [self.state, self.allocation, self.card, *self.figures], api_name="measure_sensitivity",
            show_progress_on=self.figures[0], **widgets.HEAVY,
        )  # fmt: skip
        # queue=False: a Cancel click must not wait behind the job it cancels.
        self.cancel.click(lambda s: s.cancel.set(), self.state, None, queue=False, api_visibility="private")


@dataclass(frozen=True)
class Design:
    n_experts: int
    n_shared: int
    active: int  # uniform A (per-layer: the smallest, for methods that take one k)
    per_layer: tuple[int, ...] | None  # A per layer when set per layer
    budget: float | None = None  # budget mode: the active FFN share, averaged over layers (CMoE)
    layer_experts: tuple[str, ...] | None = None  # budget mode, once measured: one shape per layer
    servable: bool = False  # budget mode: one shape in every converted layer, the rest dense

    @property
    def experts(self) -> str:
        return f"S{self.n_shared}A{self.active}E{self.n_experts}"


def parse_allocation(text: str) -> tuple[str, ...] | None:
    """'S2A1E8, dense, ...' -> ('S2A1E8', 'dense', ...); empty -> None. ValueError for a malformed shape."""
    from moe_core.config import parse_experts

    shapes = tuple(p.strip() for p in str(text or "").replace(";", ",").split(",") if p.strip())
    for shape in shapes:
        if shape.lower() != "dense":
            parse_experts(shape)
    return shapes or None


def shape_experts(shape: str) -> int | None:
    """E of an SxAyEz shape; None for dense."""
    from moe_core.config import parse_experts

    return None if shape.lower() == "dense" else parse_experts(shape)[2]


def design(
    session: Session,
    n_experts,
    shared_ratio,
    mode,
    active,
    per_layer,
    budget=None,
    allocation="",
    servable=False,
) -> Design:
    """The design the inputs describe, validated against the loaded model (ValueError says what to change)."""
    from moe_core.design import check_design, parse_per_layer, shared_count

    n_experts = int(n_experts)
    n_shared = shared_count(n_experts, float(shared_ratio))
    layers = session.dense.n_layers if session.dense is not None else 1
    neurons = session.dense.model.config.intermediate_size if session.dense is not None else 10**9
    if mode == "per layer":
        values = parse_per_layer(per_layer or str(int(active)), layers)
        values = check_design(neurons, layers, n_experts, n_shared, list(values))
        return Design(n_experts, n_shared, min(values), values)
    if mode == "budget":
        d = _budget_design(session, n_experts, n_shared, neurons, layers, active, budget, allocation)
        converted = set(d.layer_experts or ()) - {"dense"}
        if servable and len(converted) > 1:
            raise ValueError(
                f"The allocation has {len(converted)} shapes; a servable budget has one: move the budget or press "
                "Measure sensitivity again."
            )
        return replace(d, servable=bool(servable))
    check_design(neurons, layers, n_experts, n_shared, int(active))
    return Design(n_experts, n_shared, int(active), None)


def _budget_design(session, n_experts, n_shared, neurons, layers, active, budget, allocation) -> Design:
    from moe_core.design import check_design

    # A is not used (each layer gets its own shape) but cmoe.experts must stay valid: clamp it.
    active = min(max(int(active), 1), max(n_experts - n_shared, 1))
    check_design(neurons, layers, n_experts, n_shared, active)
    budget = float(budget)
    if not 1 / n_experts <= budget < 1:
        raise ValueError(
            f"An active budget of {budget:.0%} is outside what {n_experts} experts allow: the smallest shape runs "
            f"1/{n_experts} = {1 / n_experts:.1%} of each FFN, and a budget of 100% is the dense model. "
            f"Choose {1 / n_experts:.1%} .. 99%."
        )
    shapes = parse_allocation(allocation)
    if shapes is not None:
        if session.dense is not None and len(shapes) != layers:
            raise ValueError(
                f"The allocation has {len(shapes)} shapes for a {layers}-layer model: press Measure sensitivity."
            )
        wrong = {shape_experts(s) for s in shapes} - {None, n_experts}
        if wrong:
            raise ValueError(
                f"The allocation uses E{wrong.pop()}, the design E{n_experts}: press Measure sensitivity again."
            )
    return Design(n_experts, n_shared, active, None, round(budget, 4), shapes)


def estimate_html(session: Session, d: Design) -> str:
    from moe_core.design import estimate

    e = estimate(
        session.dense, d.n_experts, d.n_shared, list(d.per_layer or [d.active] * session.dense.n_layers)
    )
    routed = d.n_experts - d.n_shared
    active_text = ", ".join(map(str, e.active)) if d.per_layer else str(d.active)
    tiles = [
        widgets.tile(
            d.experts if not d.per_layer else f"S{d.n_shared} E{d.n_experts}",
            "layout: S shared, A active, E experts",
        ),
        widgets.tile(f"{e.shared_size} + {routed} x {e.expert_size:g}", "neurons: shared + routed x size"),
        widgets.tile(active_text, "routed experts active per token"),
        widgets.tile(f"{e.active_ffn_share:.1%}", "of the FFN runs per token"),
        widgets.tile(
            f"{widgets.millions(e.moe_active_params)}",
            f"active params per token (dense {widgets.millions(e.dense_active_params)})",
        ),
        widgets.tile(
            f"{e.moe_flops_per_token / e.dense_flops_per_token:.1%}",
            f"FLOPs per token vs dense ({e.moe_flops_per_token / 1e6:,.1f} of {e.dense_flops_per_token / 1e6:,.1f} MFLOP)",
        ),
    ]
    footer = (
        f'<div class="moe-bar-label">Total parameters after conversion: {widgets.millions(e.moe_params)} '
        f"(dense {widgets.millions(e.dense_params)}; routers added). FLOPs: 2 per weight met, plus attention over "
        f"a {SEQ_LEN}-token window. Measured numbers come from the <b>Evaluate</b> tab.</div>"
    )
    title = f"Estimate for <code>{html.escape(session.dense.spec)}</code>"
    return widgets.card(title, tiles, footer)


def budget_html(session: Session, d: Design) -> str:
    """The budget mode's card: the budget, and once measured the allocation's active share and predicted KL."""
    from moe_core.budget import allocation_summary

    kind = "Servable budget (one shape, other layers dense)" if d.servable else "Per-layer budget"
    title = f"{kind} for <code>{html.escape(session.dense.spec)}</code>"
    tiles = [widgets.tile(f"{d.budget:.1%}", "active FFN budget (mean over layers)")]
    sens = session.sensitivity
    if d.layer_experts is None or sens is None or sens.n_layers != len(d.layer_experts):
        tiles.append(widgets.tile(f"E{d.n_experts}", "equal slices per FFN"))
        note = (
            "Not measured yet: <b>Convert</b> measures each layer's sensitivity first (about a second per layer "
            "and shape on a tiny model, 6 minutes for SmolLM2 on a 2-core CPU), or press <b>Measure sensitivity</b> "
            "to see it here."
            if d.layer_experts is None
            else "Allocation loaded from a run config: <b>Convert</b> uses it as it is."
        )
        return widgets.card(title, tiles, f'<div class="moe-bar-label">{note}</div>')
    s = allocation_summary(sens, list(d.layer_experts))
    dense = sum(shape == "dense" for shape in d.layer_experts)
    tiles += [
        widgets.tile(f"{s['active_share']:.1%}", "of the FFN runs per token (the allocation)"),
        widgets.tile(f"{s['predicted_kl_sum']:.3g}", "predicted KL: sum of the layers' KL (nats/token)"),
        widgets.tile(f"{len(set(d.layer_experts) - {'dense'})}", "distinct shapes"),
        widgets.tile(f"{dense}", "layers kept dense"),
        widgets.tile(
            f"{sens.seconds / 60:.1f} min" if sens.seconds >= 120 else f"{sens.seconds:.3g} s",
            f"measured on {sens.tokens:,} held-out tokens",
        ),
    ]
    footer = (
        '<div class="moe-bar-label">The Convert tab\'s run config carries this allocation '
        "(<code>cmoe.layer_experts</code>): converting does not measure again. Measured numbers come from "
        "the <b>Evaluate</b> tab.</div>"
    )
    return widgets.card(title, tiles, footer)


def show(session: Session, *values):
    """The estimate card for the Design tab's input ``values`` (as :func:`design` takes them), or why the design
    cannot work (a message, not an exception: this runs on every edit)."""
    if session.dense is None:
        return NO_MODEL
    try:
        d = design(session, *values)
        return budget_html(session, d) if d.budget is not None else estimate_html(session, d)
    except ValueError as exc:
        return widgets.problem("This design cannot be converted", str(exc))


def figures(session: Session, allocation: str = "", budget=None) -> tuple:
    """(sensitivity heatmap, allocation bars) from the stored measurement; placeholders before one."""
    from moe_core.budget import active_share

    sens = session.sensitivity
    if sens is None:
        return plots.placeholder(NO_SENSITIVITY), plots.placeholder(
            "The allocation appears after a measurement."
        )
    try:
        shapes = parse_allocation(allocation)
    except ValueError:
        shapes = None
    if shapes is None or len(shapes) != sens.n_layers:
        return plots.sensitivity_heatmap(sens.kl, sens.shapes), plots.placeholder(
            "No allocation for this design: press Measure sensitivity again."
        )
    shares = [active_share(s) for s in shapes]
    return (
        plots.sensitivity_heatmap(sens.kl, sens.shapes, list(shapes)),
        plots.allocation_bars(list(shapes), shares, float(budget)),
    )


def allocation_text(session: Session, n_experts, budget, servable=False) -> str:
    """The measured sensitivity's allocation for this budget (one shape when ``servable``), comma-separated
    ('' when there is no measurement for E = n_experts, or the budget is out of range: the card says why)."""
    from moe_core.budget import allocate

    sens = session.sensitivity
    if sens is None or shape_experts(sens.shapes[0]) != int(n_experts):
        return ""
    try:
        return ", ".join(allocate(sens, float(budget), servable=bool(servable)))
    except ValueError:
        return ""


def reallocate(session: Session, n_experts, budget, servable=False):
    """The budget slider moved (or E, or Servable): (allocation, heatmap, bars); allocate is instant, nothing
    is measured."""
    text = allocation_text(session, n_experts, budget, servable)
    return text, *figures(session, text, budget)


@widgets.guarded("Could not measure the sensitivity", outputs=5)
def measure(session: Session, to_run, design_values=None, progress=gr.Progress()):
    """Measure every layer's sensitivity for the ConvertRun ``to_run()`` builds (its data, cmoe and routing
    sections; cmoe.budget from the design, whose input values are ``design_values``): (Session, allocation,
    card, heatmap, bars)."""
    from moe_core.budget import Sensitivity, plan_budget
    from moe_core.pipeline import calibration
    from moe_core.streaming import layers_of

    if session.dense is None:
        raise gr.Error("Load a model in the Model tab first.", print_exception=False)
    cfg = to_run()
    if cfg.cmoe.budget is None:
        raise gr.Error(
            "Choose the budget mode first: the measurement is for a per-layer budget.", print_exception=False
        )
    cfg = replace(cfg, method="cmoe", cmoe=replace(cfg.cmoe, layer_experts=None))
    session.cancel.clear()
    progress(0, desc=f"Reading {cfg.data.text}")
    ids, _ = calibration(session.dense, cfg.data)
    # the conversion's own recipe (held-out windows, routing step): what it would measure, it measures here
    with layers_of(session.dense, session.source) as dense:  # a streamed model: one decoder layer at a time
        plan = plan_budget(dense, cfg, ids, progress=lambda f, m: progress(f, desc=m), cancel=session.cancel)
    session = replace(session, sensitivity=Sensitivity(**plan["sensitivity"]))
    text = ", ".join(plan["layer_experts"])
    values = list(design_values or [cfg.cmoe.shape[2], 0.0, "budget", 1, "", cfg.cmoe.budget, "", False])
    values[6] = text
    return session, text, show(session, *values), *figures(session, text, cfg.cmoe.budget)


def on_model_loaded(session: Session, *values):
    """(allocation, card, heatmap, bars) for a freshly loaded model: the old measurement is gone."""
    values = list(values)
    values[6] = ""
    return "", show(session, *values), *figures(session)


def _visibility(mode: str) -> tuple:
    budget = mode == "budget"
    return (gr.Slider(visible=not budget), gr.Textbox(visible=mode == "per layer"), gr.Column(visible=budget),
            gr.Column(visible=budget))  # fmt: skip


def build(state: gr.State, data: DataTab) -> DesignTab:
    """The Design tab; ``data`` (the Data tab) is where Measure sensitivity reads its text. The Convert tab
    wires the measurement (:meth:`DesignTab.measure_with`): it holds the CMoE and routing options."""
    with gr.Tab("Design", id="design"):
        gr.Markdown(
            "Carve every FFN into **E** experts: a share of them **shared** (always on), the rest **routed**, "
            "of which **A** run per token. Or give one **budget** and let each layer take the shape it can "
            "afford. The estimate updates as you edit; nothing runs until **Convert**.",
            elem_classes="moe-status",
        )
        with gr.Row(equal_height=False):
            with gr.Column(scale=2):
                n = gr.Slider(2, 64, value=DEFAULTS["n_experts"], step=1, label="Experts per FFN (E)")
                ratio = gr.Slider(
                    0, 0.95, value=DEFAULTS["shared_ratio"], step=0.05, label="Shared ratio (S / E, rounded)"
                )
                mode = gr.Radio(
                    MODES,
                    value=DEFAULTS["mode"],
                    label="Active experts",
                    info="uniform: A everywhere; per layer: one A each; budget: a shape per layer from measurements",
                )
                budget_mode = (
                    DEFAULTS["mode"] == "budget"
                )  # the default layout (a budget) sets what shows first
                active = gr.Slider(
                    1, 63, value=DEFAULTS["active"], step=1, label="Routed experts per token (A)",
                    visible=not budget_mode,
                )  # fmt: skip
                per_layer = gr.Textbox(
                    DEFAULTS["per_layer"],
                    label="A per layer",
                    placeholder="e.g. 2,2,3,4: one value per layer (one value: every layer)",
                    visible=DEFAULTS["mode"] == "per layer",
                )
                with gr.Column(visible=budget_mode) as budget_box:
                    budget = gr.Slider(
                        0.05, 0.95, value=DEFAULTS["budget"], step=0.01,
                        label="Active FFN budget (share of the FFN that runs per token, mean over layers)",
                    )  # fmt: skip
                    gr.Markdown(BUDGET_HELP, elem_classes="moe-help")
                    with gr.Row():
                        measure_btn = gr.Button("Measure sensitivity", variant="primary")
                        cancel_btn = gr.Button("Cancel", variant="stop")
                    servable = gr.Checkbox(
                        DEFAULTS["servable"],
                        label="Servable: one shape in every converted layer, the others dense",
                        info="what vLLM and transformers load without remote code (Qwen2-MoE has one expert "
                        "count and one top-k); a free allocation exports only as exact",
                    )
                    allocation = gr.Textbox(
                        DEFAULTS["allocation"],
                        label="Shape per layer (the allocation the Convert tab uses)",
                        placeholder="empty: Convert measures first",
                        lines=2,
                        interactive=False,
                    )
            with gr.Column(scale=3):
                card = gr.HTML(NO_MODEL)
                with gr.Column(visible=DEFAULTS["mode"] == "budget") as plot_box:
                    heat = gr.Plot(plots.placeholder(NO_SENSITIVITY), show_label=False)
                    bars = gr.Plot(
                        plots.placeholder("The allocation appears after a measurement."), show_label=False
                    )
    inputs = [n, ratio, mode, active, per_layer, budget, allocation, servable]
    mode.change(
        _visibility, mode, [active, per_layer, budget_box, plot_box], queue=False, api_visibility="private"
    )
    gr.on(
        [c.change for c in inputs], show, [state, *inputs], card, api_name="design_estimate", **widgets.LIGHT
    )
    # .input: the user moved it (a loaded run config sets the slider and its allocation together)
    gr.on(
        [budget.input, n.input, servable.input], reallocate, [state, n, budget, servable], [allocation, heat, bars],
        api_name="reallocate", **widgets.LIGHT,
    )  # fmt: skip
    return DesignTab(
        state,
        data,
        n,
        ratio,
        mode,
        active,
        per_layer,
        budget,
        allocation,
        servable,
        card,
        measure_btn,
        cancel_btn,
        (heat, bars),
    )
