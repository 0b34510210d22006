"""Design tab: the expert layout (E experts, a shared share, A active), checked and costed before anything runs."""

from __future__ import annotations

import html
from dataclasses import dataclass

import gradio as gr

from views import widgets
from views.state import Session

DEFAULTS = {"n_experts": 8, "shared_ratio": 0.25, "mode": "uniform", "active": 2, "per_layer": ""}
MODES = ["uniform", "per layer"]
NO_MODEL = widgets.empty("Load a model in the <b>Model</b> tab: the estimate needs its sizes.")
SEQ_LEN = 512  # attention FLOPs are counted over the mean context of a window this long


@dataclass(frozen=True)
class DesignTab:
    n_experts: gr.Slider
    shared_ratio: gr.Slider
    mode: gr.Radio
    active: gr.Slider
    per_layer: gr.Textbox
    card: gr.HTML

    @property
    def inputs(self) -> tuple:
        return self.n_experts, self.shared_ratio, self.mode, self.active, self.per_layer


@dataclass(frozen=True)
class Design:
    n_experts: int
    n_shared: int
    active: int  # uniform A (per-layer: the smallest, for methods that take one k)
    per_layer: tuple[int, ...] | None  # A per layer when set per layer

    @property
    def experts(self) -> str:
        return f"S{self.n_shared}A{self.active}E{self.n_experts}"


def design(session: Session, n_experts, shared_ratio, mode, active, per_layer) -> Design:
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
    check_design(neurons, layers, n_experts, n_shared, int(active))
    return Design(n_experts, n_shared, int(active), None)


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


def show(session: Session, n_experts, shared_ratio, mode, active, per_layer):
    """The estimate card, or why the design cannot work (a message, not an exception: this runs on every edit)."""
    if session.dense is None:
        return NO_MODEL
    try:
        return estimate_html(session, design(session, n_experts, shared_ratio, mode, active, per_layer))
    except ValueError as exc:
        return widgets.problem("This design cannot be converted", str(exc))


def build(state: gr.State) -> DesignTab:
    with gr.Tab("Design", id="design"):
        gr.Markdown(
            "Carve every FFN into **E** experts: a share of them **shared** (always on), the rest **routed**, "
            "of which **A** run per token. The estimate updates as you edit; nothing runs until **Convert**.",
            elem_classes="moe-status",
        )
        with gr.Row(equal_height=False):
            with gr.Column(scale=2):
                n = gr.Slider(2, 64, value=DEFAULTS["n_experts"], step=1, label="Experts per FFN (E)")
                ratio = gr.Slider(
                    0, 0.95, value=DEFAULTS["shared_ratio"], step=0.05, label="Shared ratio (S / E, rounded)"
                )
                mode = gr.Radio(MODES, value=DEFAULTS["mode"], label="Active experts")
                active = gr.Slider(
                    1, 63, value=DEFAULTS["active"], step=1, label="Routed experts per token (A)"
                )
                per_layer = gr.Textbox(
                    DEFAULTS["per_layer"],
                    label="A per layer",
                    placeholder="e.g. 2,2,3,4: one value per layer (one value: every layer)",
                    visible=False,
                )
            with gr.Column(scale=3):
                card = gr.HTML(NO_MODEL)
    inputs = [n, ratio, mode, active, per_layer]
    mode.change(
        lambda m: gr.Textbox(visible=m == "per layer"), mode, per_layer, queue=False, api_visibility="private"
    )
    gr.on(
        [c.change for c in inputs], show, [state, *inputs], card, api_name="design_estimate", **widgets.LIGHT
    )
    return DesignTab(n, ratio, mode, active, per_layer, card)
