"""MoE Studio web app: `python app.py` serves http://127.0.0.1:7860 (MOE_STUDIO_HOST/PORT or --host/--port).

build_app() assembles one module per tab from views/; per-session data lives in one gr.State.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import gradio as gr

from moe_core.model_io import DEFAULT_MODEL
from views import (
    compare_tab,
    convert_tab,
    data_tab,
    design_tab,
    evaluate_tab,
    export_tab,
    model_tab,
    profile_tab,
    routing_tab,
)
from views.state import OUTPUT_ROOT, Session

CSS = Path(__file__).parent / "assets" / "style.css"
THEME = gr.themes.Soft(primary_hue="indigo")
HEADER = """# MoE Studio
Turn a dense decoder LLM into a Mixture-of-Experts model: load it, pick calibration text, see which FFN neurons
fire, design the experts, convert, tune the routing, measure against the dense model, and export."""


def build_app(default_model: str | None = None) -> gr.Blocks:
    """The whole UI; each tab is built by its own module and shares the session state.

    default_model: the source loaded when a page opens (MOE_STUDIO_MODEL, else the builtin SmolLM2).
    """
    default_model = default_model or os.environ.get("MOE_STUDIO_MODEL", DEFAULT_MODEL)
    with gr.Blocks(title="MoE Studio", analytics_enabled=False) as demo:
        # Deep-copied per browser session; the session's output folder goes when the session ends.
        state = gr.State(Session(), delete_callback=lambda s: s.workspace.cleanup())
        gr.Markdown(HEADER, elem_classes="moe-header")
        with gr.Tabs():
            model = model_tab.build(state, demo, default_model)
            data = data_tab.build(state)
            profile = profile_tab.build(state, data)
            design = design_tab.build(state)
            convert = convert_tab.build(state, data, design, model.source)
            routing_tab.build(state)
            evaluate_tab.build(state)
            compare_tab.build(state)
            export_tab.build(state)
        profile.follow(model.loaded)
        profile.use_design(design.n_experts, design.shared_ratio)
        model.loaded.then(design_tab.show, [state, *design.inputs], design.card, api_visibility="private")
        convert_inputs = [state, *data.inputs, *design.inputs, convert.method, *convert.options]
        model.loaded.then(
            convert_tab.preview, convert_inputs, convert.preview_outputs, api_visibility="private"
        )
    return demo


def launch(demo: gr.Blocks, host: str, port: int, **kwargs):
    """Queue (heavy jobs one at a time: they share the "heavy" concurrency id) and serve. Files are served from
    the app's output folder only; theme and CSS go to launch() in Gradio 6."""
    demo.queue(default_concurrency_limit=1)
    OUTPUT_ROOT.mkdir(parents=True, exist_ok=True)
    return demo.launch(
        server_name=host,
        server_port=port,
        theme=THEME,
        css_paths=[CSS],
        allowed_paths=[str(OUTPUT_ROOT)],
        **kwargs,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=os.environ.get("MOE_STUDIO_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("MOE_STUDIO_PORT", "7860")))
    parser.add_argument(
        "--model", default=None, help="model loaded when a page opens (default: SmolLM2-135M)"
    )
    args = parser.parse_args(argv)
    launch(build_app(args.model), args.host, args.port)


if __name__ == "__main__":
    main()
