"""Routing policy tab: LaDiMo's per-layer accuracy-vs-throughput curves of the converted model, the Pareto
front, a target that picks a per-layer plan, and applying it to the session's model."""

from __future__ import annotations

import html
from dataclasses import asdict, replace

import gradio as gr

from views import plots, widgets
from views.state import Session, needs_whole_model

NO_MOE = "Convert a model in the **Convert** tab first; the sweep tries every routing policy on each of its layers."
READY = "Press **Sweep** to measure every routing policy on each layer."
NO_SWEEP = "Run a sweep to see this chart."
EMPTY = widgets.empty("No sweep yet: press <b>Sweep</b> (seconds for a tiny model, minutes for SmolLM2).")
TARGETS = [("at most this perplexity increase (%)", "ppl"), ("at least this active-FFN saving (%)", "saving")]


def _default_text() -> str:
    """The evaluation's text (WikiText-2 when present, else Python's docs): the sweep skips its scored head."""
    from moe_core.config import default_eval_text

    return default_eval_text()


def layer_plot(session: Session, layer):
    s = session.sweep
    if s is None:
        return plots.placeholder(NO_SWEEP)
    layers = sorted({p.layer for p in s.points})
    layer = min(layers, key=lambda i: abs(i - int(layer or 0)))
    policy = session.moe.mlp(layer).policy.label() if hasattr(session.moe.mlp(layer), "policy") else ""
    return plots.policy_curves([asdict(p) for p in s.layer_points(layer)], layer, policy)


def sweep_html(s) -> str:
    tiles = [
        widgets.tile(f"{len({p.layer for p in s.points})}", "layers swept"),
        widgets.tile(f"{len(s.points)}", "(layer, policy) points"),
        widgets.tile(f"{s.dense_ppl:.3f}", "dense perplexity (held out)"),
        widgets.tile(s.reference_policy, "converted model's policy"),
        widgets.tile(f"{s.seconds.get('total', 0):.1f} s", "sweep time"),
    ]
    order = ", ".join(map(str, s.sensitivity_order))
    footer = f'<div class="moe-bar-label">Layers from least to most sensitive: {html.escape(order)}.</div>'
    return widgets.card(f"Sweep of <code>{html.escape(s.model.rsplit('/', 1)[-1])}</code>", tiles, footer)


@widgets.guarded("Could not sweep", outputs=5)
def run(session: Session, text, n_windows, seq_len, repeats, progress=gr.Progress()):
    """Sweep the converted model: (Session, card, layer slider, policy curves, Pareto front)."""
    from moe_core.config import SweepConfig
    from moe_core.pipeline import sweep_model

    if session.moe is None:
        raise gr.Error(NO_MOE.replace("**", ""), print_exception=False)
    needs_whole_model(session, "The routing sweep")
    session.cancel.clear()
    cfg = SweepConfig(
        text=(text or _default_text()).strip(), n_windows=int(n_windows), seq_len=int(seq_len),
        timing_tokens=int(seq_len), repeats=int(repeats), throughput_points=1,
    )  # fmt: skip
    result = sweep_model(
        session.dense, session.moe, cfg, progress=lambda f, m: progress(f, desc=m), cancel=session.cancel
    )
    session = replace(session, sweep=result, plan=None)
    layers = sorted({p.layer for p in result.points})
    slider = gr.Slider(
        minimum=layers[0], maximum=max(layers[-1], layers[0] + 1), value=layers[0], visible=True
    )
    return (
        session,
        sweep_html(result),
        slider,
        layer_plot(session, layers[0]),
        plots.pareto(result.cumulative, result.dense_ppl),
    )


def plan_rows(plan, sweep) -> list[list]:
    rows = []
    for layer, label in plan.labels.items():
        p = sweep.point(layer, label)
        rows.append([layer, label, round(p.kl, 6), f"{p.active_saving:.1%}", round(p.throughput_ratio, 3)])
    return rows


def plan_html(plan) -> str:
    p = plan.predicted
    tiles = [
        widgets.tile(f"{p['active_ffn_reduction']:.1%}", "active FFN parameters saved"),
        widgets.tile(f"{p['ppl_increase']:+.2%}", "perplexity change (predicted)"),
        widgets.tile(f"x{p['throughput_ratio']:.3f}", "prefill throughput (predicted)"),
        widgets.tile(f"x{p['decode_throughput_ratio']:.3f}", "decode throughput (predicted)"),
    ]
    footer = '<div class="moe-bar-label">Predicted from the sweep; <b>Apply</b>, then measure in <b>Evaluate</b>.</div>'
    return widgets.card("Plan for the target", tiles, footer)


@widgets.guarded("Could not pick a plan", outputs=4)
def pick(session: Session, target: str, value):
    """A per-layer plan for the target: (Session, plan card, plan rows, Pareto front with the plan)."""
    from moe_core.sweep import pick_plan

    if session.sweep is None:
        raise gr.Error("Run a sweep first: the plan is picked from its curves.", print_exception=False)
    share = float(value) / 100
    plan = pick_plan(
        session.sweep, **({"max_ppl_increase": share} if target == "ppl" else {"min_active_reduction": share})
    )
    s = session.sweep
    return (
        replace(session, plan=plan),
        plan_html(plan),
        plan_rows(plan, s),
        plots.pareto(s.cumulative, s.dense_ppl, plan.predicted),
    )


@widgets.guarded("Could not apply the plan", outputs=2)
def apply(session: Session):
    """Set each layer's routing policy from the plan (layers it keeps dense get the dense FFN back)."""
    from moe_core.sweep import apply_plan

    if session.plan is None:
        raise gr.Error("Pick a plan first.", print_exception=False)
    moe = apply_plan(session.moe, session.plan, session.dense)
    moe.run_config = {**(session.run_config or {}), "plan": session.plan.to_dict()}
    moe.metrics = session.metrics
    labels = ", ".join(f"{i}: {label}" for i, label in session.plan.labels.items())
    gr.Info("Plan applied: Evaluate, Compare and Export now use the planned model.")
    session = replace(session, moe=moe, run_config=moe.run_config, export=None)
    return session, f"Applied to the session's converted model. Layers: {labels}."


def status_text(session: Session) -> str:
    return widgets.converted_status(session, NO_MOE, READY)


def build(state: gr.State) -> tuple[gr.Markdown, object]:
    """The tab; returns its status line and the apply event (other tabs follow the applied plan)."""
    from moe_core.config import SCORED_TOKENS
    from moe_core.data import available_sources

    skip = f"The sweep skips the first {SCORED_TOKENS:,} tokens, which Evaluate and the benchmarks score."
    with gr.Tab("Routing policy", id="routing"):
        status = gr.Markdown(NO_MOE, elem_classes="moe-status")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2):
                text = gr.Dropdown(
                    [s for s, _ in available_sources()], value=_default_text(), allow_custom_value=True,
                    label="Held-out text", info=skip,
                )  # fmt: skip
                with gr.Row():
                    n = gr.Slider(1, 16, value=2, step=1, label="Windows")
                    t = gr.Slider(32, 1024, value=128, step=32, label="Tokens per window")
                repeats = gr.Slider(1, 9, value=3, step=1, label="Timing repeats (median)")
                with gr.Row():
                    button = gr.Button("Sweep", variant="primary")
                    stop = gr.Button("Cancel", variant="stop")
            with gr.Column(scale=3):
                summary = gr.HTML(EMPTY)
        # hidden until a sweep gives it the swept layers' range (before that any range would be made up)
        layer = gr.Slider(0, 1, value=0, step=1, label="Layer", visible=False)
        with gr.Row():
            curves = gr.Plot(plots.placeholder(NO_SWEEP), show_label=False)
            front = gr.Plot(plots.placeholder(NO_SWEEP), show_label=False)
        with gr.Row(equal_height=False):
            with gr.Column(scale=2):
                target = gr.Radio(TARGETS, value="ppl", label="Target")
                value = gr.Number(5, label="Target value (%)", minimum=0)
                with gr.Row():
                    pick_btn = gr.Button("Pick plan", variant="primary")
                    apply_btn = gr.Button("Apply plan")
                applied = gr.Markdown("")
            with gr.Column(scale=3):
                plan_card = gr.HTML(widgets.empty("Pick a plan to see what it predicts."))
                plan_table = gr.Dataframe(
                    headers=["layer", "policy", "KL", "active FFN saved", "throughput x"], interactive=False
                )
    button.click(
        run, [state, text, n, t, repeats], [state, summary, layer, curves, front], api_name="sweep",
        show_progress_on=summary, **widgets.HEAVY,
    )  # fmt: skip
    stop.click(lambda s: s.cancel.set(), state, None, queue=False, api_visibility="private")
    layer.change(layer_plot, [state, layer], curves, api_name="sweep_layer", **widgets.LIGHT)
    pick_btn.click(pick, [state, target, value], [state, plan_card, plan_table, front], api_name="pick_plan")
    applied_event = apply_btn.click(apply, state, [state, applied], api_name="apply_plan", **widgets.HEAVY)
    return status, applied_event
