"""Data tab: the calibration text every later step samples from (profile, convert), with a preview."""

from __future__ import annotations

import contextlib
import html
import shutil
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from moe_core.config import DataConfig
from views import widgets
from views.state import Session

SOURCE_FORMS = (
    "Also: shared:<name>, a local file (txt, jsonl, json, csv, parquet; file:<path>#field), hub:<dataset> "
    "(needs network), or upload a file below."
)


def _defaults() -> dict:
    """The run config's calibration (32 x 512 tokens: what the routing step's least squares need), with
    ``auto`` shown as the text it stands for."""
    from moe_core.data import default_text

    data = DataConfig()
    text = default_text() if data.text == "auto" else data.text
    return {"text": text, "n_sequences": data.n_sequences, "seq_len": data.seq_len, "seed": data.seed}


DEFAULTS = _defaults()
EMPTY = widgets.empty(
    "Press <b>Preview</b> to read the text and count its tokens with the loaded model's tokenizer."
)
UPLOAD_TYPES = [".txt", ".jsonl", ".json", ".csv", ".parquet"]


@dataclass(frozen=True)
class DataTab:
    text: gr.Dropdown
    n_sequences: gr.Slider
    seq_len: gr.Slider
    seed: gr.Number

    @property
    def inputs(self) -> tuple:
        return self.text, self.n_sequences, self.seq_len, self.seed


def describe_source(spec: str) -> str:
    """One line under the text picker: the description of a known source, else how specs are written."""
    from moe_core.data import available_sources

    return dict(available_sources()).get((spec or "").strip(), SOURCE_FORMS)


def data_config(text, n_sequences, seq_len, seed) -> DataConfig:
    return DataConfig((text or DEFAULTS["text"]).strip(), int(n_sequences), int(seq_len), int(seed or 0))


def preview_html(data: DataConfig, info: dict) -> str:
    tokens = f"{info['n_tokens']:,}" + (" (est.)" if info["tokens_estimated"] else "")
    tiles = [
        widgets.tile(f"{info['n_docs']:,}", "documents"),
        widgets.tile(f"{info['n_chars']:,}", "characters"),
        widgets.tile(tokens, "tokens in the text"),
        widgets.tile(f"{data.n_sequences} x {data.seq_len}", "sampled: sequences x tokens"),
        widgets.tile(f"{data.n_sequences * data.seq_len:,}", "calibration tokens"),
    ]
    return widgets.card(f"Calibration text <code>{html.escape(data.text)}</code>", tiles)


@widgets.guarded("Could not read the calibration text", outputs=2)
def preview(session: Session, text, n_sequences, seq_len, seed, progress=gr.Progress()):
    """Read the source and sample the calibration sequences: (card html, first characters of the text)."""
    from moe_core.pipeline import calibration

    if session.dense is None:
        raise gr.Error(
            "Load a model in the Model tab first: token counts need its tokenizer.", print_exception=False
        )
    data = data_config(text, n_sequences, seq_len, seed)
    progress(0, desc=f"Reading {data.text}")
    _, info = calibration(session.dense, data)
    return preview_html(data, info), info["preview"]


@widgets.guarded("Could not use the uploaded file")
def uploaded(path, session: Session) -> gr.Dropdown:
    """An uploaded file becomes a file: source. It moves out of Gradio's shared upload cache into this
    session's own folder (removed with the session), after a size check."""
    from moe_core.data import check_file_size

    if not path:
        return gr.skip()
    source = Path(path)
    try:
        check_file_size(source, "Upload")
        target = session.workspace.path("uploads", source.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    finally:  # Gradio's copy goes now; its folder too when empty
        source.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            source.parent.rmdir()
    return gr.Dropdown(
        value=f"file:{target}", allow_custom_value=True, info="Uploaded file; press Preview to check it."
    )


def build(state: gr.State) -> DataTab:
    from moe_core.data import available_sources

    with gr.Tab("Data", id="data"):
        gr.Markdown(
            "Calibration text: the tokens the **Profile** and **Convert** steps run through the model. "
            "Text like the one the model will serve gives experts that fit it.",
            elem_classes="moe-status",
        )
        with gr.Row(equal_height=False):
            with gr.Column(scale=2):
                text = gr.Dropdown(
                    [spec for spec, _ in available_sources()],
                    value=DEFAULTS["text"],
                    allow_custom_value=True,
                    label="Calibration text",
                    info=describe_source(DEFAULTS["text"]),
                )
                upload = gr.File(
                    label="Or upload a text file", file_types=UPLOAD_TYPES, type="filepath", height=90
                )
                with gr.Row():
                    n = gr.Slider(1, 256, value=DEFAULTS["n_sequences"], step=1, label="Sequences")
                    t = gr.Slider(16, 2048, value=DEFAULTS["seq_len"], step=16, label="Tokens per sequence")
                seed = gr.Number(DEFAULTS["seed"], precision=0, label="Seed (which windows are sampled)")
                button = gr.Button("Preview", variant="primary")
            with gr.Column(scale=3):
                card = gr.HTML(EMPTY)
                sample = gr.Textbox(label="Start of the text", lines=12, max_lines=12, interactive=False)
    button.click(preview, [state, text, n, t, seed], [card, sample], api_name="preview_data", **widgets.HEAVY)
    upload.upload(uploaded, [upload, state], text, queue=False, api_visibility="private")
    text.change(
        lambda spec: gr.Dropdown(info=describe_source(spec)),
        text,
        text,
        queue=False,
        api_visibility="private",
        show_progress="hidden",
    )
    return DataTab(text, n, t, seed)
