"""Compare tab: the same prompt through the dense and the converted model, side by side, with tokens/s."""

from __future__ import annotations

import gradio as gr

from views import widgets
from views.state import Session, needs_whole_model

NO_MOE = "Convert a model in the **Convert** tab first; both models then continue the same prompt greedily."
READY = "Type a prompt and press **Generate with both**."
PROMPT = "In two sentences, what is a mixture-of-experts language model?"


def speed_html(title: str, g, extra: list[str] | None = None) -> str:
    prompt = f"{g.prompt_tokens}-token prompt" + (", chat template" if g.chat else "")
    tiles = [
        widgets.tile(f"{g.tokens_per_s:,.1f}", "new tokens / s"),
        widgets.tile(f"{g.new_tokens}", "new tokens"),
        widgets.tile(f"{g.seconds:.2f} s", f"wall time ({prompt})"),
        *(extra or []),
    ]
    return widgets.card(title, tiles)


@widgets.guarded("Could not generate", outputs=4)
def run(session: Session, prompt: str, max_new_tokens, chat=True, progress=gr.Progress()):
    """Greedy continuations of both models: (dense text, dense card, MoE text, MoE card)."""
    from moe_core.generation import generate, shared_prefix

    if session.moe is None:
        raise gr.Error(NO_MOE.replace("**", ""), print_exception=False)
    needs_whole_model(session, "Generation")
    progress(0.0, desc="Dense model")
    dense = generate(session.dense, prompt, int(max_new_tokens), chat=bool(chat))
    progress(0.5, desc="Converted model")
    moe = generate(session.moe, prompt, int(max_new_tokens), chat=bool(chat))
    same = shared_prefix(dense, moe)
    speed = moe.tokens_per_s / dense.tokens_per_s if dense.tokens_per_s else 0.0
    extra = [
        widgets.tile(f"x{speed:.2f}", "speed vs dense (this prompt)"),
        widgets.tile(f"{same} / {max(dense.new_tokens, 1)}", "first tokens identical to dense"),
    ]
    return dense.text, speed_html("Dense", dense), moe.text, speed_html("Converted (MoE)", moe, extra)


def status_text(session: Session) -> str:
    return widgets.converted_status(session, NO_MOE, READY)


def build(state: gr.State) -> gr.Markdown:
    with gr.Tab("Compare", id="compare"):
        status = gr.Markdown(NO_MOE, elem_classes="moe-status")
        with gr.Row():
            prompt = gr.Textbox(PROMPT, label="Prompt", lines=2, scale=4)
            with gr.Column(scale=1):
                n = gr.Slider(1, 256, value=32, step=1, label="New tokens")
                chat = gr.Checkbox(
                    True, label="Chat template", info="instruct models; plain text without one"
                )
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
        [state, prompt, n, chat],
        [dense_text, dense_card, moe_text, moe_card],
        api_name="compare",
        **widgets.HEAVY,
    )
    return status
