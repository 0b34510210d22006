"""Compare tab: the same prompt through the dense and the converted model, side by side, with tokens/s."""

from __future__ import annotations

import gradio as gr

from views import widgets
from views.state import Session

NO_MOE = "Convert a model in the **Convert** tab first; both models then continue the same prompt greedily."
READY = "Type a prompt and press **Generate with both**."
PROMPT = "The three most useful things to know about mixture-of-experts models are"


def speed_html(title: str, g) -> str:
    tiles = [
        widgets.tile(f"{g.tokens_per_s:,.1f}", "new tokens / s"),
        widgets.tile(f"{g.new_tokens}", "new tokens"),
        widgets.tile(f"{g.seconds:.2f} s", f"wall time ({g.prompt_tokens}-token prompt)"),
    ]
    return widgets.card(title, tiles)


@widgets.guarded("Could not generate", outputs=4)
def run(session: Session, prompt: str, max_new_tokens, progress=gr.Progress()):
    """Greedy continuations of both models: (dense text, dense card, MoE text, MoE card)."""
    from moe_core.generation import generate

    if session.moe is None:
        raise gr.Error(NO_MOE.replace("**", ""), print_exception=False)
    progress(0.0, desc="Dense model")
    dense = generate(session.dense, prompt, int(max_new_tokens))
    progress(0.5, desc="Converted model")
    moe = generate(session.moe, prompt, int(max_new_tokens))
    return dense.text, speed_html("Dense", dense), moe.text, speed_html("Converted (MoE)", moe)


def status_text(session: Session) -> str:
    return widgets.converted_status(session, NO_MOE, READY)


def build(state: gr.State) -> gr.Markdown:
    with gr.Tab("Compare", id="compare"):
        status = gr.Markdown(NO_MOE, elem_classes="moe-status")
        with gr.Row():
            prompt = gr.Textbox(PROMPT, label="Prompt", lines=2, scale=4)
            with gr.Column(scale=1):
                n = gr.Slider(1, 256, value=32, step=1, label="New tokens")
                button = gr.Button("Generate with both", variant="primary")
        with gr.Row(equal_height=False):
            with gr.Column():
                dense_card = gr.HTML(widgets.empty("Dense model: press <b>Generate with both</b>."))
                dense_text = gr.Textbox(label="Dense continuation", lines=8, interactive=False)
            with gr.Column():
                moe_card = gr.HTML(widgets.empty("Converted model: press <b>Generate with both</b>."))
                moe_text = gr.Textbox(label="Converted continuation", lines=8, interactive=False)
    button.click(
        run,
        [state, prompt, n],
        [dense_text, dense_card, moe_text, moe_card],
        api_name="compare",
        **widgets.HEAVY,
    )
    return status
