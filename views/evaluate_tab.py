"""Evaluate tab: the converted model against its dense source on the same text; every run of the session
side by side (perplexity, KL, agreement, lm-eval tasks, measured speed, active parameters)."""

from __future__ import annotations

from dataclasses import replace

import gradio as gr

from views import plots, widgets
from views.state import CONVERTED, Session

NO_MOE = (
    "Convert a model in the **Convert** tab first; evaluation compares it with the dense model it came from."
)
READY = "Press **Evaluate** to score it against the dense model on the same text."
EMPTY = widgets.empty("No evaluation yet: convert a model, then press <b>Evaluate</b>.")
NO_RUNS = "Evaluate a converted model to see this chart."
COLUMNS = ["run", "model", "text", "tokens", "perplexity", "KL (nats/token)", "top-1 agreement",
           "active params", "FLOPs / token", "prefill tokens/s", "prefill vs dense", "decode tokens/s",
           "decode vs dense"]  # fmt: skip


def _tasks() -> list[str]:
    from moe_core.evaluate import available_tasks

    try:
        return available_tasks()
    except (ValueError, OSError):
        return []


def _label(session: Session) -> str:
    run = session.run_config or {}
    method = run.get("method", "moe")
    section = run.get(method, {})
    layout = section.get("experts") or f"E{section.get('n_experts', '?')}k{section.get('top_k', '?')}"
    if section.get("budget"):  # a shape per layer: the budget says what it is
        layout = f"{'servable ' if section.get('servable') else ''}budget {section['budget']:.0%}"
    plan = " +plan" if run.get("plan") else ""  # a run config always has the key, None without a plan
    return f"#{len(session.evals) + 1} {method} {layout}{plan}"


def _speed(r: dict, key: str, ndigits: int | None = None, ratio: bool = False) -> float | None:
    """A run's measured speed (``key``: tokens_per_s, decode_tokens_per_s, ref_...), or its ratio to the dense
    model's; None where nothing was timed (a streamed evaluation)."""
    if key not in r:
        return None
    value = r[key] / r[f"ref_{key}"] if ratio else r[key]
    return round(value, ndigits)


def runs_table(evals: tuple[dict, ...]) -> list[list]:
    """Rows for the runs table: the dense reference of the first run, then every run of the session."""
    rows = []
    for i, r in enumerate(evals):
        tokens = r["n_windows"] * r["seq_len"]
        if i == 0:
            rows.append(["dense", r["reference"], r["text"], tokens, round(r["ppl_ref"], 3), 0.0, 1.0,
                         r["ref_active_params"], "", _speed(r, "ref_tokens_per_s"), 1.0,
                         _speed(r, "ref_decode_tokens_per_s", 1), 1.0])  # fmt: skip
        rows.append([
            r["label"], r["model"].rsplit("/", 1)[-1], r["text"], tokens, round(r["ppl"], 3), round(r["kl"], 5),
            round(r["agreement"], 4), r["active_params"], r.get("flops_per_token"), _speed(r, "tokens_per_s"),
            _speed(r, "tokens_per_s", 3, ratio=True), _speed(r, "decode_tokens_per_s", 1),
            _speed(r, "decode_tokens_per_s", 3, ratio=True),
        ])  # fmt: skip
    return rows


def lm_eval_rows(evals: tuple[dict, ...]) -> list[list]:
    rows = []
    for r in evals:
        for task, metrics in r.get("lm_eval", {}).items():
            for name, value in metrics.items():
                ref = r.get("ref_lm_eval", {}).get(task, {}).get(name)
                rows.append(
                    [
                        r["label"],
                        task,
                        name,
                        round(value, 4),
                        None if ref is None else round(ref, 4),
                        r["limit"],
                    ]
                )
    return rows


def charts(evals: tuple[dict, ...]):
    """(perplexity, tokens/s, active params) bar charts: dense first, then each run."""
    if not evals:
        empty = plots.placeholder(NO_RUNS)
        return empty, empty, empty
    labels = ["dense"] + [r["label"] for r in evals]
    first = evals[0]
    ppl = [first["ppl_ref"]] + [r["ppl"] for r in evals]
    speed = {  # each run against the dense model measured in the same run
        "prefill": [1.0] + [_speed(r, "tokens_per_s", 4, ratio=True) for r in evals],
        "decode": [1.0] + [_speed(r, "decode_tokens_per_s", 4, ratio=True) for r in evals],
    }
    active = [first["ref_active_params"] / 1e6] + [r["active_params"] / 1e6 for r in evals]
    return (
        plots.bars("Perplexity (lower is better)", labels, ppl, "perplexity"),
        plots.grouped_bars("Measured speed vs dense (higher is faster)", labels, speed, "x dense", fmt=".2f"),
        plots.bars("Active parameters per token", labels, active, "millions"),
    )


def card(r: dict) -> str:
    tiles = [
        widgets.tile(f"{r['ppl']:.3f}", f"perplexity (dense {r['ppl_ref']:.3f})"),
        widgets.tile(f"{r['ppl'] / r['ppl_ref'] - 1:+.1%}", "perplexity change"),
        widgets.tile(f"{r['kl']:.4f}", "KL(dense || MoE), nats/token"),
        widgets.tile(f"{r['agreement']:.1%}", "top-1 agreement with dense"),
    ]
    if "tokens_per_s" in r:
        tiles += [
            widgets.tile(
                f"{r['tokens_per_s']:,.0f}", f"tokens/s prefill (dense {r['ref_tokens_per_s']:,.0f})"
            ),
            widgets.tile(
                f"{r['decode_tokens_per_s']:,.1f}",
                f"tokens/s decode, batch 1 (dense {r['ref_decode_tokens_per_s']:,.1f})",
            ),
        ]
        timing = "speed measured now, in this process, on this machine"
    else:
        timing = (
            "streamed one decoder layer at a time, so no speed was measured (it would need the whole model)"
        )
    tiles.append(widgets.tile(f"{r.get('flops_ratio', 0):.1%}", "FLOPs per token vs dense"))
    footer = (
        f'<div class="moe-bar-label">{r["n_windows"]} windows x {r["seq_len"]} tokens of <code>{r["text"]}</code>; '
        f"{timing} ({r['seconds']:.1f} s scoring).</div>"
    )
    return widgets.card(f"Run {r['label']}", tiles, footer)


def _outputs(session: Session, latest: str):
    return (session, latest, runs_table(session.evals), lm_eval_rows(session.evals), *charts(session.evals))


def result_row(report, limit: int) -> dict:
    """An EvalReport as one run of the session: its summary with the speed and reference figures flattened."""
    return {
        **report.summary(),
        "flops_per_token": report.params.get("flops_per_token"),
        "ref_active_params": report.ref_params.get("active_params"),
        **report.speed,
        "limit": limit,
    }


@widgets.guarded("Could not evaluate", outputs=7)
def run(session: Session, text, n_windows, seq_len, tasks, limit, progress=gr.Progress()):
    """Score the converted model against the dense one: (Session, card, runs, lm-eval rows, 3 charts).

    The library's one evaluation (moe_core.pipeline.evaluate_pair) on an EvalConfig of these inputs; every
    other setting, like the inputs' initial values, is EvalConfig's default, as on the command line."""
    from moe_core.config import EvalConfig
    from moe_core.pipeline import evaluate_pair

    if session.moe is None:
        raise gr.Error(NO_MOE.replace("**", ""), print_exception=False)
    session.cancel.clear()
    cfg = EvalConfig(
        text=(text or "auto").strip(), n_windows=int(n_windows), seq_len=int(seq_len),
        tasks=tuple(tasks or ()), limit=int(limit or EvalConfig.limit),
    )  # fmt: skip
    progress_ = lambda f, m: progress(f, desc=m)  # noqa: E731
    if session.source is None:
        report = evaluate_pair(session.dense, session.moe, cfg, progress=progress_, cancel=session.cancel)
    else:  # the converted folder, one decoder layer at a time, against the streamed source
        from moe_core.config import ModelConfig
        from moe_core.pipeline import evaluate_streamed

        folder = ModelConfig(
            spec=str(session.workspace.path(CONVERTED)), device=session.dense.device.type,
            max_memory=session.max_memory,
        )  # fmt: skip
        report = evaluate_streamed(folder, cfg, session.dense.spec, progress=progress_, cancel=session.cancel)
    result = result_row(report, cfg.limit) | {"label": _label(session)}
    session = replace(session, evals=(*session.evals, result))
    return _outputs(session, card(result))


def cancel(session: Session) -> None:
    session.cancel.set()


def status_text(session: Session) -> str:
    return widgets.converted_status(session, NO_MOE, READY)


def build(state: gr.State) -> gr.Markdown:
    from moe_core.config import EvalConfig
    from moe_core.data import available_sources

    tasks, defaults = _tasks(), EvalConfig()  # the command line's defaults
    with gr.Tab("Evaluate", id="evaluate"):
        status = gr.Markdown(NO_MOE, elem_classes="moe-status")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2):
                text = gr.Dropdown(
                    [s for s, _ in available_sources()], value=defaults.text, allow_custom_value=True,
                    label="Perplexity text", info="Consecutive non-overlapping windows (the WikiText-2 recipe).",
                )  # fmt: skip
                with gr.Row():
                    n = gr.Slider(1, 64, value=defaults.n_windows, step=1, label="Windows")
                    t = gr.Slider(32, 2048, value=defaults.seq_len, step=32, label="Tokens per window")
                task_box = gr.CheckboxGroup(
                    tasks,
                    label="lm-eval tasks (local task files)",
                    info="Scored for both models; minutes each on a CPU." if tasks else
                    "No local task folder found (set MOE_STUDIO_DATA to the shared data folder).",
                )  # fmt: skip
                limit = gr.Number(defaults.limit, precision=0, minimum=1, label="lm-eval: documents per task")
                with gr.Row():
                    button = gr.Button("Evaluate", variant="primary")
                    stop = gr.Button("Cancel", variant="stop")
            with gr.Column(scale=3):
                latest = gr.HTML(EMPTY)
        runs = gr.Dataframe(headers=COLUMNS, label="Runs of this session (first row: the dense model)",
                            interactive=False, wrap=True)  # fmt: skip
        lm_rows = gr.Dataframe(
            headers=["run", "task", "metric", "MoE", "dense", "documents"], label="lm-eval", interactive=False
        )
        with gr.Row():
            ppl_plot = gr.Plot(plots.placeholder(NO_RUNS), show_label=False)
            speed_plot = gr.Plot(plots.placeholder(NO_RUNS), show_label=False)
            params_plot = gr.Plot(plots.placeholder(NO_RUNS), show_label=False)
    button.click(
        run,
        [state, text, n, t, task_box, limit],
        [state, latest, runs, lm_rows, ppl_plot, speed_plot, params_plot],
        api_name="evaluate",
        show_progress_on=latest,
        **widgets.HEAVY,
    )
    stop.click(cancel, state, None, queue=False, api_visibility="private")
    return status
