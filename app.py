"""MoE Studio web app: `python app.py` serves http://127.0.0.1:7860 (MOE_STUDIO_HOST/PORT or --host/--port).

build_app() assembles one module per tab from views/; per-session data lives in one gr.State.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import gradio as gr

from views import model_tab, profile_tab
from views.state import Session

CSS = Path(__file__).parent / "assets" / "style.css"
HEADER = """# MoE Studio
Turn a dense decoder LLM into a Mixture-of-Experts model: load it, see which FFN neurons fire on your text,
then carve the FFNs into experts."""


def build_app() -> gr.Blocks:
    """The whole UI; each tab is built by its own module and shares the session state."""
    with gr.Blocks(title="MoE Studio", analytics_enabled=False) as demo:
        state = gr.State(Session())  # deep-copied per browser session by Gradio
        gr.Markdown(HEADER, elem_classes="moe-header")
        with gr.Tabs():
            model = model_tab.build(state, demo)
            profile = profile_tab.build(state)
        profile.follow(model.loaded)
    return demo


def launch(demo: gr.Blocks, host: str, port: int, **kwargs):
    """Queue (one job at a time: a CPU has no room for two) and serve; theme and CSS go here in Gradio 6."""
    demo.queue(default_concurrency_limit=1)
    return demo.launch(
        server_name=host,
        server_port=port,
        theme=gr.themes.Soft(primary_hue="indigo"),
        css_paths=[CSS],
        **kwargs,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=os.environ.get("MOE_STUDIO_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("MOE_STUDIO_PORT", "7860")))
    args = parser.parse_args(argv)
    launch(build_app(), args.host, args.port)


if __name__ == "__main__":
    main()
