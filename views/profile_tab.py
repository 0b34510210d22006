"""Profile tab: which FFN neurons fire on the user's text, per layer (CMoE activation rates)."""

from __future__ import annotations

import html
import shlex
import time
from dataclasses import dataclass, replace

import gradio as gr

from moe_core.config import DataConfig, ProfileConfig
from views import plots, widgets
from views.state import Session

NO_MODEL = "Load a model in the **Model** tab first."
NO_PROFILE = "Run a profile to see this chart."
NO_SUMMARY = widgets.empty("No profile yet: press <b>Profile</b>. A new model clears the old profile.")
SOURCE_FORMS = (
    "Also: shared:<name>, a local file (txt, jsonl, csv, parquet; file:<path>#field) or hub:<dataset>."
)
# Small enough to finish in seconds on the default model on a laptop CPU; the CLI defaults are larger.
DEFAULTS = {"text": "builtin:pydoc", "n_sequences": 4, "seq_len": 256, "k_act": 10, "seed": 0}


@dataclass(frozen=True)
class ProfileTab:
    state: gr.State
    inputs: tuple  # text, n_sequences, seq_len, k_act, seed
    outputs: list  # what `on_model_loaded` returns, in order

    def follow(self, loaded) -> None:
        """Reset this tab whenever a model loads (the old profile belongs to the old model)."""
        loaded.then(on_model_loaded, [self.state, *self.inputs], self.outputs, api_visibility="private")


def describe_source(spec: str) -> str:
    """One line under the text picker: the description of a known source, else how specs are written."""
    from moe_core.data import available_sources

    known = dict(available_sources())
    return known.get((spec or "").strip(), SOURCE_FORMS)


def status_text(session: Session) -> str:
    if session.dense is None:
        return NO_MODEL
    d = session.dense
    cfg = d.model.config
    return (
        f"Model **{d.spec}**: {d.n_layers} layers x {cfg.intermediate_size} FFN neurons. "
        "Choose calibration text and press **Profile**."
    )


def command(session: Session, text: str, n_sequences, seq_len, k_act, seed) -> str:
    """The CLI line that computes the same profile, so a click can be repeated headless."""
    spec = session.dense.spec if session.dense is not None else "builtin:smollm2-135m"
    args = ["python", "-m", "moe_core", "profile", "--model", spec, "--text", text or DEFAULTS["text"]]
    args += ["--n-sequences", n_sequences, "--seq-len", seq_len, "--k-act", k_act, "--seed", seed]
    if session.dense is not None and session.dense.device.type != "cpu":
        args += ["--device", session.dense.device.type]
    return shlex.join(
        [str(int(a)) if isinstance(a, float) else str(a) for a in args + ["--out", "outputs/profile"]]
    )


def layer_figures(session: Session, layer):
    """(rate histogram, h histogram) of one layer, from the stored profile; nothing is recomputed."""
    p = session.profile
    if p is None:
        return plots.placeholder(NO_PROFILE), plots.placeholder(NO_PROFILE)
    layer = min(max(int(layer or 0), 0), p.n_layers - 1)
    uniform = p.k_act / p.rates.shape[1]
    return (
        plots.rate_histogram(*p.rate_histogram(layer, bins=50), layer, uniform),
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


def _calibration(session: Session, data: DataConfig):
    """Token ids (N, T) sampled from the text source, and a preview of that text."""
    from moe_core.data import load_documents, sample_sequences, text_preview

    docs = load_documents(data.text, model=session.dense, seed=data.seed)
    tok = session.dense.tokenizer
    ids = sample_sequences(docs, tok, data.n_sequences, data.seq_len, data.seed, source=data.text)
    return ids, {**text_preview(docs, tok), "seq_len": data.seq_len}


def run(session: Session, text, n_sequences, seq_len, k_act, seed, layer, progress=gr.Progress()):
    """Profile the session's model: (Session, summary, preview text, layer slider, 3 figures)."""
    from moe_core.profiling import Cancelled, profile_model

    if session.dense is None:
        raise gr.Error(NO_MODEL.replace("**", ""), print_exception=False)
    session.cancel.clear()
    start = time.perf_counter()
    try:
        data = DataConfig((text or DEFAULTS["text"]).strip(), int(n_sequences), int(seq_len), int(seed))
        k_act = ProfileConfig(int(k_act)).k_act
        progress(0, desc=f"Reading {data.text}")
        ids, preview = _calibration(session, data)
        profile = profile_model(
            session.dense,
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


def _inputs() -> tuple:
    from moe_core.data import available_sources

    text = gr.Dropdown(
        [spec for spec, _ in available_sources()],
        value=DEFAULTS["text"],
        allow_custom_value=True,
        label="Calibration text",
        info=describe_source(DEFAULTS["text"]),
    )
    with gr.Row():
        n = gr.Slider(1, 64, value=DEFAULTS["n_sequences"], step=1, label="Sequences")
        t = gr.Slider(16, 2048, value=DEFAULTS["seq_len"], step=16, label="Tokens per sequence")
    with gr.Row():
        k = gr.Number(DEFAULTS["k_act"], precision=0, minimum=1, label="K_a (active neurons per token)")
        seed = gr.Number(DEFAULTS["seed"], precision=0, label="Seed")
    return text, n, t, k, seed


def build(state: gr.State) -> ProfileTab:
    """The Profile tab: inputs and a summary on top, per-layer charts below."""
    with gr.Tab("Profile", id="profile"):
        status = gr.Markdown(NO_MODEL, elem_classes="moe-status")
        with gr.Row():
            with gr.Column(scale=2):
                inputs = _inputs()
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
    figures = [heat_plot, rate_plot, h_plot]
    profile_btn.click(
        run,
        [state, *inputs, layer],
        [state, summary, preview, layer, *figures],
        api_name="profile",
        show_progress_on=summary,  # one progress bar, where the result will appear
    )
    # queue=False: a Cancel click must not wait behind the job it cancels.
    cancel_btn.click(cancel, state, None, queue=False, api_visibility="private")
    layer.change(
        layer_figures,
        [state, layer],
        [rate_plot, h_plot],
        api_name="show_layer",
        concurrency_limit=None,
        show_progress="hidden",
    )
    gr.on(
        [c.change for c in inputs],
        command,
        [state, *inputs],
        cmd,
        queue=False,
        api_visibility="private",
        show_progress="hidden",
    )
    # Only the hint changes, not the value, so this does not fire the change event again.
    inputs[0].change(
        lambda spec: gr.Dropdown(info=describe_source(spec)),
        inputs[0],
        inputs[0],
        queue=False,
        api_visibility="private",
        show_progress="hidden",
    )
    return ProfileTab(state, inputs, [status, profile_btn, summary, layer, *figures, cmd])
