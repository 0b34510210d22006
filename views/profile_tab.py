"""Profile tab: which FFN neurons fire on the user's text, per layer (CMoE activation rates)."""

from __future__ import annotations

import html
import shlex
import time
from dataclasses import dataclass, replace

import gradio as gr
import numpy as np

from moe_core.config import ProfileConfig
from views import data_tab, plots, widgets
from views.data_tab import DataTab, data_config
from views.state import Session

NO_MODEL = "Load a model in the **Model** tab first."
NO_PROFILE = "Run a profile to see this chart."
NO_SUMMARY = widgets.empty("No profile yet: press <b>Profile</b>. A new model clears the old profile.")
DEFAULTS = {**data_tab.DEFAULTS, "k_act": 10}
DEFAULTS = {k: DEFAULTS[k] for k in ("text", "n_sequences", "seq_len", "k_act", "seed")}  # the CLI's order


@dataclass(frozen=True)
class ProfileTab:
    state: gr.State
    inputs: tuple  # text, n_sequences, seq_len, k_act, seed
    outputs: list  # what `on_model_loaded` returns, in order
    layer: gr.Slider
    histograms: list  # rate plot, h plot
    profiled: object  # the profile event's Dependency

    def follow(self, loaded) -> None:
        """Reset this tab whenever a model loads (the old profile belongs to the old model)."""
        loaded.then(on_model_loaded, [self.state, *self.inputs], self.outputs, api_visibility="private")

    def use_design(self, n_experts, shared_ratio) -> None:
        """Draw the Design tab's shared/routed cut-off on the rate histogram, and redraw when it changes."""
        inputs = [self.state, self.layer, n_experts, shared_ratio]
        self.layer.change(layer_figures, inputs, self.histograms, api_name="show_layer", **widgets.LIGHT)
        self.profiled.then(layer_figures, inputs, self.histograms, api_visibility="private", **widgets.LIGHT)
        gr.on(
            [n_experts.change, shared_ratio.change],
            layer_figures,
            inputs,
            self.histograms,
            api_visibility="private",
            **widgets.LIGHT,
        )


def status_text(session: Session) -> str:
    if session.dense is None:
        return NO_MODEL
    d = session.dense
    cfg = d.model.config
    return (
        f"Model **{d.spec}**: {d.n_layers} layers x {cfg.intermediate_size} FFN neurons. "
        "Calibration text comes from the **Data** tab; press **Profile**."
    )


def command(session: Session, text: str, n_sequences, seq_len, k_act, seed) -> str:
    """The CLI line that computes the same profile, so a click can be repeated headless."""
    spec = session.dense.spec if session.dense is not None else "builtin:smollm2-135m"
    args = ["python", "-m", "moe_core", "profile", "--model", spec, "--text", text or DEFAULTS["text"]]
    args += ["--n-sequences", n_sequences, "--seq-len", seq_len, "--k-act", k_act, "--seed", seed]
    if session.dense is not None and session.dense.device.type != "cpu":
        args += ["--device", session.dense.device.type]
    if session.max_memory is not None:
        args += ["--max-memory", session.max_memory]
    return shlex.join(
        [str(int(a)) if isinstance(a, float) else str(a) for a in args + ["--out", "outputs/profile"]]
    )


def layer_figures(session: Session, layer, n_experts=None, shared_ratio=None):
    """(rate histogram, h histogram) of one layer, from the stored profile; nothing is recomputed.

    With a design (n_experts, shared_ratio) the rate histogram colours the neurons its shared expert would
    hold: the ones the default carving ranks highest (design.shared_cutoff), counted in the same rate bins.
    """
    from moe_core.design import shared_cutoff

    p = session.profile
    if p is None:
        return plots.placeholder(NO_PROFILE), plots.placeholder(NO_PROFILE)
    layer = min(max(int(layer or 0), 0), p.n_layers - 1)
    uniform = p.k_act / p.rates.shape[1]
    cutoff = None
    if n_experts:
        try:
            cutoff = shared_cutoff(p, layer, int(n_experts), float(shared_ratio or 0))
        except ValueError:
            cutoff = None  # an invalid design is explained on the Design tab
    counts, edges = p.rate_histogram(layer, bins=50)
    if cutoff is not None:
        cutoff["shared_counts"] = np.histogram(p.rates[layer][cutoff["shared"]].numpy(), bins=edges)[0]
    return (
        plots.rate_histogram(counts, edges, layer, uniform, cutoff),
        plots.h_histogram(*p.h_histogram(layer), layer),
    )


def summary_html(session: Session, seconds: float, preview: dict) -> str:
    """The profile card: what was measured and how skewed the activation rates are."""
    s, t = session.profile.summary(), preview["seq_len"]
    tokens = f"{preview['n_tokens']:,}" + (" (estimated)" if preview["tokens_estimated"] else "")
    tiles = [
        widgets.tile(f"{s['tokens']:,}", f"tokens profiled ({s['tokens'] // t} x {t})"),
        widgets.tile(f"{s['k_act']} / {s['neurons_per_layer']}", "K_a: neurons marked active per token"),
        widgets.tile(f"{s['uniform_rate']:.2%}", "uniform rate K_a/I"),
        widgets.tile(f"{s['median_rate']:.2%}", "median rate"),
        widgets.tile(f"{s['max_rate']:.1%}", "max rate"),
        widgets.tile(f"{s['share_of_neurons_above_10x_uniform']:.1%}", "neurons above 10x uniform"),
    ]
    footer = (
        f'<div class="moe-bar-label">Text <code>{html.escape(s["text"])}</code>: {preview["n_docs"]:,} '
        f"documents, {tokens} tokens. Took {seconds:.1f} s.</div>"
    )
    return widgets.card(f"Activation profile of <code>{html.escape(s['model'])}</code>", tiles, footer)


def _layers(session: Session):
    """The session's model for a stage that reads it layer by layer: a streamed one reads each decoder layer from
    its shards when its turn comes (moe_core.streaming.reading)."""
    from moe_core.streaming import layers_of

    return layers_of(session.dense, session.source)


def run(session: Session, text, n_sequences, seq_len, k_act, seed, layer, progress=gr.Progress()):
    """Profile the session's model: (Session, summary, preview text, layer slider, 3 figures)."""
    from moe_core.profiling import Cancelled, profile_model

    if session.dense is None:
        raise gr.Error(NO_MODEL.replace("**", ""), print_exception=False)
    session.cancel.clear()
    start = time.perf_counter()
    try:
        from moe_core.pipeline import calibration

        data = data_config(text, n_sequences, seq_len, seed)
        k_act = ProfileConfig(int(k_act)).k_act
        progress(0, desc=f"Reading {data.text}")
        ids, preview = calibration(session.dense, data)
        preview["seq_len"] = data.seq_len
        with _layers(session) as dense:
            profile = profile_model(
                dense,
                ids,
                k_act=k_act,
                text_spec=data.text,
                progress=lambda f, m: progress(f, desc=m),
                cancel=session.cancel,
            )
    except Cancelled:
        gr.Warning("Profiling cancelled; the previous profile is kept.")
        return (gr.skip(),) * 7
    except (ValueError, OSError) as exc:  # TextSourceError, config checks: the message says what to do
        raise gr.Error(str(exc), title="Could not profile", print_exception=False) from None
    session = replace(session, profile=profile)
    summary = summary_html(session, time.perf_counter() - start, preview)
    slider = gr.Slider(maximum=profile.n_layers - 1, value=min(int(layer or 0), profile.n_layers - 1))
    heatmap = plots.rate_heatmap(profile.rates.numpy(), profile.n_tokens, k_act / profile.rates.shape[1])
    return session, summary, preview["preview"], slider, heatmap, *layer_figures(session, layer)


def cancel(session: Session) -> None:
    session.cancel.set()


def on_model_loaded(session: Session, *inputs):
    """A new model drops the old profile: (status, button, summary, slider, 3 placeholders, command)."""
    n_layers = session.dense.n_layers if session.dense is not None else 1
    empty = plots.placeholder(NO_PROFILE)
    ready = gr.Button(interactive=session.dense is not None)
    slider = gr.Slider(maximum=max(n_layers - 1, 1), value=0)
    return status_text(session), ready, NO_SUMMARY, slider, empty, empty, empty, command(session, *inputs)


def build(state: gr.State, data: DataTab) -> ProfileTab:
    """The Profile tab: K_a and a summary on top, per-layer charts below (text from the Data tab)."""
    with gr.Tab("Profile", id="profile"):
        status = gr.Markdown(NO_MODEL, elem_classes="moe-status")
        with gr.Row():
            with gr.Column(scale=2):
                k = gr.Number(
                    DEFAULTS["k_act"], precision=0, minimum=1, label="K_a (active neurons per token)"
                )
                gr.Markdown(
                    "CMoE marks the K_a neurons with the largest |h| of each token as active; a neuron's "
                    "activation rate is the share of tokens where it is marked.",
                    elem_classes="moe-help",
                )
                with gr.Row():
                    profile_btn = gr.Button("Profile", variant="primary", interactive=False)
                    cancel_btn = gr.Button("Cancel", variant="stop")
            with gr.Column(scale=3):
                summary = gr.HTML(NO_SUMMARY)
                cmd = gr.Code(
                    command(Session(), *DEFAULTS.values()),
                    language="shell",
                    lines=2,
                    wrap_lines=True,
                    show_line_numbers=False,
                    label="The same run from the command line",
                    interactive=False,
                )
                with gr.Accordion("Calibration text preview", open=False):
                    preview = gr.Textbox(show_label=False, lines=8, max_lines=8, interactive=False)
        layer = gr.Slider(0, 1, value=0, step=1, label="Layer")
        with gr.Row():
            rate_plot = gr.Plot(plots.placeholder(NO_PROFILE), show_label=False)
            h_plot = gr.Plot(plots.placeholder(NO_PROFILE), show_label=False)
        heat_plot = gr.Plot(plots.placeholder(NO_PROFILE), show_label=False)
    inputs = (data.text, data.n_sequences, data.seq_len, k, data.seed)
    figures = [heat_plot, rate_plot, h_plot]
    profiled = profile_btn.click(
        run,
        [state, *inputs, layer],
        [state, summary, preview, layer, *figures],
        api_name="profile",
        show_progress_on=summary,  # one progress bar, where the result will appear
        **widgets.HEAVY,
    )
    # queue=False: a Cancel click must not wait behind the job it cancels.
    cancel_btn.click(cancel, state, None, queue=False, api_visibility="private")
    gr.on(
        [c.change for c in inputs],
        command,
        [state, *inputs],
        cmd,
        queue=False,
        api_visibility="private",
        show_progress="hidden",
    )
    outputs = [status, profile_btn, summary, layer, *figures, cmd]
    return ProfileTab(state, inputs, outputs, layer, [rate_plot, h_plot], profiled)
