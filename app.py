"""MoE Studio web app: `python app.py` serves http://127.0.0.1:7860 (--host/--port, MOE_STUDIO_HOST/PORT, or
Gradio's own GRADIO_SERVER_NAME/PORT, in that order of precedence).

A login with --auth user:password or MOE_STUDIO_AUTH; uploads up to MOE_STUDIO_MAX_FILE_MB (512) megabytes.

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
    widgets,
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
    # delete_cache: Gradio's copies of uploads and downloads older than an hour go, checked every 10 minutes.
    with gr.Blocks(title="MoE Studio", analytics_enabled=False, delete_cache=(600, 3600)) as demo:
        # Deep-copied per browser session; the session's output folder goes when the session ends.
        state = gr.State(Session(), delete_callback=lambda s: s.workspace.cleanup())
        gr.Markdown(HEADER, elem_classes="moe-header")
        with gr.Tabs():
            model = model_tab.build(state, demo, default_model)
            data = data_tab.build(state)
            profile = profile_tab.build(state, data)
            design = design_tab.build(state, data)
            convert = convert_tab.build(state, data, design, model.source)
            routing_status, plan_applied = routing_tab.build(state)
            statuses = {
                convert.status: convert_tab.status_text,
                routing_status: routing_tab.status_text,
                evaluate_tab.build(state): evaluate_tab.status_text,
                compare_tab.build(state): compare_tab.status_text,
                export_tab.build(state): export_tab.status_text,
            }
        profile.follow(model.loaded)
        profile.use_design(design.n_experts, design.shared_ratio)
        design.follow(model.loaded)
        convert.follow(model.loaded, state)
        convert_inputs = [state, *data.inputs, *design.inputs, convert.method, *convert.options]
        model.loaded.then(
            convert_tab.preview, convert_inputs, convert.preview_outputs, api_visibility="private"
        )
        # The grey status lines say what the session holds now: after a load, a conversion or an applied plan.
        for event in (model.loaded, convert.converted, plan_applied):
            event.then(
                lambda session: [text(session) for text in statuses.values()],
                state,
                list(statuses),
                api_visibility="private",
                **widgets.LIGHT,
            )
    return demo


def parse_auth(value: str | None) -> tuple[str, str] | None:
    """'user:password' -> (user, password); None or '' -> None (no login). ValueError when malformed."""
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not (sep and user and password):
        raise ValueError("auth must be user:password (both non-empty), e.g. MOE_STUDIO_AUTH=alice:s3cret.")
    return user, password


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, auth=None, **kwargs):
    """Queue and serve. Heavy jobs run one at a time (they share the "heavy" concurrency id) and a waiting
    browser sees its place in the queue. Only the app's output folder is served (Gradio's own upload cache
    aside); uploads over the size limit are refused; with ``auth`` (user, password) a login comes first.
    Theme and CSS go to launch() in Gradio 6."""
    from moe_core.data import max_file_bytes

    demo.queue(default_concurrency_limit=1)
    OUTPUT_ROOT.mkdir(parents=True, exist_ok=True)
    return demo.launch(
        server_name=host,
        server_port=port,
        auth=auth,
        theme=THEME,
        css_paths=[CSS],
        allowed_paths=[str(OUTPUT_ROOT)],
        max_file_size=max_file_bytes(),
        **kwargs,
    )


def _env(*names: str, default: str) -> str:
    """The first of the environment variables ``names`` that is set and not empty, else ``default``."""
    return next((os.environ[n] for n in names if os.environ.get(n, "").strip()), default)


def main(argv: list[str] | None = None) -> None:
    """Serve the app. Host and port: the flags, else MOE_STUDIO_HOST/PORT, else GRADIO_SERVER_NAME/PORT (what
    Gradio deployments such as Spaces and containers set), else 127.0.0.1:7860."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--host",
        default=_env("MOE_STUDIO_HOST", "GRADIO_SERVER_NAME", default="127.0.0.1"),
        help="interface to listen on (default: MOE_STUDIO_HOST, else GRADIO_SERVER_NAME, else 127.0.0.1: this "
        "machine only; 0.0.0.0 opens it to the network)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=_env("MOE_STUDIO_PORT", "GRADIO_SERVER_PORT", default="7860"),  # argparse applies type=int
        help="port (default: MOE_STUDIO_PORT, else GRADIO_SERVER_PORT, else 7860)",
    )
    parser.add_argument(
        "--model", default=None, help="model loaded when a page opens (default: SmolLM2-135M)"
    )
    parser.add_argument(
        "--auth",
        default=os.environ.get("MOE_STUDIO_AUTH"),
        help="user:password to require a login (or MOE_STUDIO_AUTH); recommended with a non-local --host",
    )
    args = parser.parse_args(argv)
    try:
        auth = parse_auth(args.auth)
    except ValueError as exc:
        parser.error(str(exc))
    launch(build_app(args.model), args.host, args.port, auth=auth)


if __name__ == "__main__":
    main()
