"""Export tab: write the converted model in a format other tools load, zip it, and preview its model card."""

from __future__ import annotations

import html
from dataclasses import replace

import gradio as gr

from views import widgets
from views.state import CONVERTED, Session

NO_MOE = "Convert a model in the **Convert** tab first (and optionally apply a routing plan)."
READY = "Pick a format and press **Build export**."
EMPTY = widgets.empty("No export yet: pick a format and press <b>Build export</b>.")
FORMATS = [
    ("portable: Qwen2-MoE, stock transformers and vLLM, no remote code", "portable"),
    ("exact: identical logits, needs trust_remote_code", "exact"),
    ("llama.cpp: Qwen2-MoE laid out for convert_hf_to_gguf", "llamacpp"),
    ("GGUF: one file for llama.cpp (llama-cli, llama-server), no conversion script", "gguf"),
]
GGUF_TYPES = [
    ("f16: half the size of f32", "f16"),
    ("q8_0: about a quarter of f32 (8-bit blocks); its rounding flips more routing choices", "q8_0"),
    ("f32: full size, the closest to transformers", "f32"),
]


def result_html(r) -> str:
    f = r.fidelity or {}
    tiles = [widgets.tile(r.format, f"format ({r.architecture})")]
    if r.gguf:
        tiles.append(widgets.tile(f"{r.gguf['bytes'] / 2**20:.0f} MiB", f"{r.gguf['file']}, read back"))
    if f.get("check") == "structure":  # a streamed exact export: checked against its own class, not reloaded
        tiles += [
            widgets.tile("identical", "the converted tensors, copied"),
            widgets.tile(str(f["tensors"]), f"tensors {f['loaded_class']} expects"),
        ]
    elif f:
        tiles += [
            widgets.tile("identical" if f["identical"] else "approximate", "vs the internal model"),
            widgets.tile(f"{f['max_abs_logit_diff']:.2g}", "max |logit difference|"),
            widgets.tile(f"{f['kl']:.2g}", "KL, nats/token"),
            widgets.tile(f"{f['top1_agreement']:.1%}", "top-1 agreement"),
        ]
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in r.notes)
    how = (
        "Written and checked one decoder layer at a time (the model streams)."
        if f.get("streamed")
        else "Reloaded with AutoModelForCausalLM in a clean process."
    )
    footer = f'<div class="moe-bar-label">{how}<ul>{notes}</ul></div>'
    return widgets.card(f"Export <code>{html.escape(r.folder.name)}</code>", tiles, footer)


@widgets.guarded("Could not export", outputs=4)
def build_export(
    session: Session, fmt: str, fit_router: bool, gguf_type: str = "f16", progress=gr.Progress()
):
    """Export the session's converted model: (Session, result card, model card markdown, zip path)."""
    from moe_core.export import ExportConfig, export_model
    from moe_core.export.streamed import export_streamed

    if session.moe is None:
        raise gr.Error(NO_MOE.replace("**", ""), print_exception=False)
    cfg = ExportConfig(format=fmt, fit_router=bool(fit_router), zip=True, gguf_type=gguf_type)
    out, report = session.workspace.path(f"export-{fmt}"), lambda f, m: progress(f, desc=m)
    session.cancel.clear()
    if session.source is not None:  # the model streams: so does its export, from the saved conversion
        result = export_streamed(
            session.workspace.path(CONVERTED), out, cfg, progress=report, cancel=session.cancel
        )
        return _shown(session, result)
    run = dict(session.run_config or {})
    if session.plan is not None:
        run["plan"] = session.plan.to_dict()
    result = export_model(
        session.moe, out, cfg, calib_ids=session.calib_ids, calib_text=run.get("data", {}).get("text"),
        run_config=run, source_metrics=session.metrics, progress=report, cancel=session.cancel,
    )  # fmt: skip
    return _shown(session, result)


def _shown(session: Session, result):
    """(Session with the export, result card, model card markdown, zip download) for the tab."""
    card = (result.folder / "README.md").read_text()
    return (
        replace(session, export=result),
        result_html(result),
        card,
        gr.DownloadButton(value=str(result.zip_path), visible=True),
    )


def cancel(session: Session) -> None:
    session.cancel.set()


EXACT = "Its routing has a Qwen2-MoE form: **portable** (and llama.cpp, GGUF) reproduce it exactly. " + READY
APPROXIMATE = (
    "Its routing has no Qwen2-MoE form ({reason}): only **exact** reproduces it (trust_remote_code); portable, "
    "llama.cpp and GGUF approximate it and measure by how much (convert with routing form *native* to serve it "
    "exactly without remote code). " + READY
)


PER_LAYER = (
    "Its layers route among different numbers of experts (a per-layer budget: {counts}), and Qwen2-MoE takes one "
    "count for every layer: only **exact** exports it (trust_remote_code). To serve it with vLLM or llama.cpp, "
    "convert with a *servable* budget (Design tab: one shape, the other layers dense) or one shape everywhere "
    "(uniform), in routing form *native*. " + READY
)


STREAMED = (
    "The model streams, and so does its export: one decoder layer at a time, from the saved conversion. **exact** "
    "always; portable, llama.cpp and GGUF where the routing is exact in Qwen2-MoE (routing form *native*). "
    + READY
)


def status_text(session: Session) -> str:
    from moe_core.evaluate import moe_blocks
    from moe_core.export.routing import approximation_reasons

    if session.source is not None:  # the blocks are on the meta device: their routing is read at export
        return widgets.converted_status(session, NO_MOE, STREAMED)
    blocks = moe_blocks(session.moe).values() if session.moe is not None else []
    counts = sorted({b.n_experts for b in blocks})
    reasons = [r for b in blocks for r in approximation_reasons(b)]
    ready = APPROXIMATE.format(reason=reasons[0]) if reasons else EXACT
    if len(counts) > 1:
        ready = PER_LAYER.format(counts=", ".join(f"{c} routed" for c in counts))
    return widgets.converted_status(session, NO_MOE, ready)


def build(state: gr.State) -> gr.Markdown:
    with gr.Tab("Export", id="export"):
        status = gr.Markdown(NO_MOE, elem_classes="moe-status")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2):
                fmt = gr.Radio(FORMATS, value="portable", label="Format")
                fit = gr.Checkbox(
                    True,
                    label="Fit routers where the format approximates them",
                    info="portable / llama.cpp: a linear router fitted on the calibration tokens (else naive).",
                )
                gguf_type = gr.Radio(
                    GGUF_TYPES, value="f16", label="GGUF type", info="GGUF: the matrices' type"
                )
                with gr.Row():
                    button = gr.Button("Build export", variant="primary")
                    stop = gr.Button("Cancel", variant="stop")
                download = gr.DownloadButton("Download zip", visible=False, variant="secondary")
            with gr.Column(scale=3):
                result = gr.HTML(EMPTY)
        with gr.Accordion("Model card (README.md of the export)", open=True):
            card = gr.Markdown(
                "The model card appears here after an export.", elem_classes="moe-card-preview"
            )
    button.click(
        build_export,
        [state, fmt, fit, gguf_type],
        [state, result, card, download],
        api_name="export",
        show_progress_on=result,
        **widgets.HEAVY,
    )
    stop.click(cancel, state, None, queue=False, api_visibility="private")
    return status
