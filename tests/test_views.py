"""Tab handlers of the web app, called without a server on a tiny model: data, design, convert (CMoE and
LaDiMo), routing policy, evaluate, compare and export, and the errors each one explains."""

from __future__ import annotations

import json
import shlex
import time
import zipfile
from dataclasses import replace

import gradio as gr
import numpy as np
import plotly.graph_objects as go
import pytest

from moe_core import design
from moe_core.cli import _run_config, build_parser
from moe_core.config import ConvertRun, from_dict, load_config_file, to_dict
from moe_core.methods import METHODS
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
from views.state import Session, Workspace

# Tiny models: one thread (63 s for this module against 69 s on two)
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = "builtin:tiny-llama"  # 2 layers, H=64, I=192
DATA = ["builtin:pydoc", 2, 32, 0]
DESIGN = [
    8,
    0.25,
    "uniform",
    2,
    "",
    design_tab.DEFAULTS["budget"],
    "",
    False,
]  # S2A2E8 (then the budget mode's budget, allocation, servable)


def layout(n_experts, ratio, mode, active, per_layer="", budget=0.5, allocation="", servable=False) -> list:
    """The Design tab's input values, in order."""
    return [n_experts, ratio, mode, active, per_layer, budget, allocation, servable]


def options(**changes) -> list:
    """Option values of the Convert tab's accordions, in build order, with defaults from ConvertRun."""
    defaults = ConvertRun()
    values = []
    for m, option in convert_tab._option_fields(convert_tab.sections()):
        default = convert_tab._to_input(option, option.get(getattr(defaults, m)))
        values.append(changes.get(f"{m}.{option.path}", default))
    return values


def converting(*args, **kwargs) -> tuple:
    """Run the Convert handler (a generator that streams its log) to the end: its last update."""
    return list(convert_tab.convert(*args, **kwargs))[-1]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> Session:
    session, _ = model_tab.load(
        TINY, "cpu", False, Session(workspace=Workspace(tmp_path_factory.mktemp("out")))
    )
    return session


@pytest.fixture(scope="module")
def converted(loaded) -> tuple:
    return converting(loaded, *DATA, *DESIGN, "cmoe", *options())


def test_data_preview_counts_tokens(loaded):
    card, text = data_tab.preview(loaded, *DATA)
    assert "calibration tokens" in card and ">64<" in card and text.strip()


def test_data_preview_needs_a_model_and_explains_bad_sources(loaded):
    with pytest.raises(gr.Error, match="Load a model"):
        data_tab.preview(Session(), *DATA)
    with pytest.raises(gr.Error, match="Unknown shared text source"):
        data_tab.preview(loaded, "shared:nope", 2, 32, 0)


def test_upload_moves_into_the_session_folder_and_becomes_a_file_source(tmp_path):
    upload = tmp_path / "gradio-cache" / "a.txt"
    upload.parent.mkdir()
    upload.write_text("some calibration text")
    session = Session(workspace=Workspace(tmp_path / "out"))
    target = session.workspace.path("uploads", "a.txt")
    assert data_tab.uploaded(str(upload), session).value == f"file:{target}"
    assert target.read_text() == "some calibration text" and not upload.parent.exists()
    session.workspace.cleanup()
    assert not target.exists()


def test_design_estimate_matches_the_conversion(loaded, converted):
    from moe_core.design import estimate

    e = estimate(loaded.dense, 8, 2, 2, seq_len=32)
    m = converted[0].metrics
    assert (e.moe_params, e.moe_active_params, e.moe_flops_per_token) == (
        m["total_params"],
        m["active_params"],
        m["flops_per_token"],
    )
    card = design_tab.show(loaded, *DESIGN)
    assert "S2A2E8" in card and "active params per token" in card


@pytest.mark.parametrize(
    ("design", "match"),
    [
        ([8, 0.25, "uniform", 7, ""], "choose 1..6"),
        ([400, 0.25, "uniform", 2, ""], "more than the 192 FFN neurons"),
        ([8, 0.25, "per layer", 2, "2,x"], "whole numbers"),
        ([8, 0.25, "per layer", 2, "2,2,2"], "one active count per layer"),
        ([2, 0.9, "uniform", 1, ""], "nothing is routed"),
    ],
)
def test_invalid_designs_are_explained_not_raised(loaded, design, match):
    card = design_tab.show(loaded, *design)
    assert "cannot be converted" in card and match in card


def test_profile_histogram_marks_the_shared_cutoff(loaded):
    session = profile_tab.run(loaded, *DATA[:3], 5, 0, 0)[0]
    rate, _ = profile_tab.layer_figures(session, 0, 8, 0.25)
    assert any("shared | routed" in a.text for a in rate.layout.annotations)
    routed, shared = rate.data  # stacked on the same bins: all neurons, shared ones in amber
    assert sum(shared.y) == design.shared_cutoff(session.profile, 0, 8, 0.25)["shared_size"]
    assert sum(routed.y) + sum(shared.y) == session.profile.rates.shape[1]
    rate, _ = profile_tab.layer_figures(session, 0, 8, 0.0)  # no shared expert: no line
    assert not any("shared | routed" in a.text for a in rate.layout.annotations)


def test_convert_fills_the_session_and_writes_a_loadable_run_config(converted):
    session, summary, log, config_path, _, loss = converted
    assert loss.visible and "distill" in session.metrics  # distillation is on by default: its loss curve
    assert session.moe is not None and session.metrics["moe_layers"] == 2
    assert "CMoE conversion" in summary and "MoE layers" in summary
    assert "layer 2/2" in log and "saved" in log
    cfg = from_dict(ConvertRun, load_config_file(config_path))
    assert cfg.method == "cmoe" and cfg.cmoe.experts == "S2A2E8" and cfg.data.seq_len == 32


def test_command_line_reproduces_the_run_config(loaded, tmp_path):
    yaml_text, line = convert_tab.preview(
        loaded, *DATA, *DESIGN, "cmoe", *options(**{"cmoe.kmeans_iters": 3})
    )
    (tmp_path / "run_config.yaml").write_text(yaml_text)
    argv = shlex.split(line.replace("run_config.yaml", str(tmp_path / "run_config.yaml")))
    assert (
        argv[:4] == ["python", "-m", "moe_core", "convert"] and "--config" in argv
    )  # kmeans_iters has no flag
    args = build_parser().parse_args(argv[3:])
    extra = {
        "method": args.method,
        "cmoe": {"experts": args.experts, "variant": args.variant, "k_act": args.k_act},
    }
    cfg, _ = convert_tab.run_config(loaded, DATA, DESIGN, "cmoe", *options(**{"cmoe.kmeans_iters": 3}))
    assert _run_config(ConvertRun, args, extra) == cfg
    _, plain = convert_tab.preview(loaded, *DATA, *DESIGN, "cmoe", *options())
    assert "--config" not in plain  # defaults: flags alone say it all


def test_invalid_convert_inputs_are_explained(loaded):
    yaml_text, _ = convert_tab.preview(loaded, *DATA, *layout(8, 0.25, "uniform", 9), "cmoe", *options())
    assert yaml_text.startswith("# Not a valid run yet") and "choose 1..6" in yaml_text
    with pytest.raises(gr.Error, match="choose 1..6"):
        converting(loaded, *DATA, *layout(8, 0.25, "uniform", 9), "cmoe", *options())
    with pytest.raises(gr.Error, match="Load a model"):
        converting(Session(), *DATA, *DESIGN, "cmoe", *options())


def test_the_convert_log_streams_while_the_job_runs(loaded):
    updates = list(convert_tab.convert(loaded, *DATA, *DESIGN, "cmoe", *options()))
    first, last = updates[0], updates[-1]
    skip = type(gr.skip())
    assert (
        isinstance(first[0], skip) and isinstance(first[1], skip) and "cmoe on builtin:tiny-llama" in first[2]
    )
    assert last[0].moe is not None and last[2].startswith(first[2]) and "saved converted/" in last[2]


def test_while_running_yields_until_the_job_ends_and_returns_or_raises_its_outcome():
    from views import widgets

    ticks = []

    def job(seconds):
        time.sleep(seconds)
        return "done"

    runner = widgets.while_running(lambda: ticks.append(1) or len(ticks), job, 0.35, every=0.1)
    updates = []
    with pytest.raises(StopIteration) as stop:
        while True:
            updates.append(next(runner))
    assert stop.value.value == "done" and updates == list(range(1, len(updates) + 1)) and len(updates) >= 2
    failing = widgets.while_running(lambda: None, job, "not a number", every=0.1)
    with pytest.raises(TypeError):
        list(failing)


def test_ladimo_with_per_layer_active_experts(loaded):
    """Per-layer A is part of the run config: the downloaded YAML carries it and loads back to the same inputs."""
    opts = options(**{"ladimo.steps": 2})
    design = layout(4, 0.0, "per layer", 2, "1, 3")
    session, _, _, config_path, *_ = converting(loaded, *DATA, *design, "ladimo", *opts)
    policies = [session.moe.mlp(i).policy.k for i in range(2)]
    assert policies == [1, 3] and session.run_config["active_per_layer"] == (1, 3)
    assert from_dict(ConvertRun, load_config_file(config_path)).active_per_layer == (1, 3)
    values = convert_tab.load_config(config_path, loaded, len(opts))
    assert values[5:8] == design[:3] and values[9] == "1, 3" and values[13] == "ladimo"  # E, S/E, mode, A's


def test_load_config_file_fills_the_inputs(loaded, tmp_path):
    config_path = tmp_path / "run.yaml"
    config_path.write_text(convert_tab.preview(loaded, *DATA, *DESIGN, "cmoe", *options())[0])
    values = convert_tab.load_config(config_path, loaded, len(options()))
    assert values[0] == TINY and values[1:5] == DATA and values[5:13] == DESIGN
    assert values[13] == "cmoe"


def test_fine_tuning_from_the_convert_tab(loaded, tmp_path):
    """The fine-tuning accordion: the run config, the command line, the tuned model's summary, loading back."""
    tune = {"finetune.enabled": True, "finetune.text": "builtin:pydoc", "finetune.n_sequences": 2}
    opts = options(**tune, **{"finetune.seq_len": 16})
    cfg, _ = convert_tab.run_config(loaded, DATA, DESIGN, "cmoe", *opts)
    assert cfg.finetune.enabled and (cfg.finetune.n_sequences, cfg.finetune.seq_len) == (2, 16)
    yaml_text, line = convert_tab.preview(loaded, *DATA, *DESIGN, "cmoe", *opts)
    assert "--finetune" in line and "enabled: true" in yaml_text
    session, summary, _, config_path, *_ = converting(loaded, *DATA, *DESIGN, "cmoe", *opts)
    tuned = session.metrics["finetune"]
    assert len(tuned["losses"]) == 1 and "fine-tuning loss" in summary  # 2 sequences, batch 2: one step
    values = convert_tab.load_config(config_path, loaded, len(opts))
    n_tune = len(convert_tab.STEPS["finetune"])
    assert values[-n_tune:] == opts[-n_tune:] == [True, "builtin:pydoc", 2, 16, 5e-4]
    plain = convert_tab.run_config(loaded, DATA, DESIGN, "cmoe", *options())[0]
    assert not plain.finetune.enabled


def test_load_config_file_rejects_a_bad_file(tmp_path, loaded):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: nope\n")
    with pytest.raises(gr.Error, match="Unknown method 'nope'"):
        convert_tab.load_config(str(bad), loaded, len(options()))


def test_cancel_leaves_the_session_as_it_was(loaded):
    def progress(fraction, desc=None):
        loaded.cancel.set()

    with pytest.warns(UserWarning, match="cancelled"):
        out = converting(loaded, *DATA, *DESIGN, "cmoe", *options(), progress=progress)
    assert len(out) == 6 and all(isinstance(o, type(gr.skip())) for o in out)
    loaded.cancel.clear()


def test_evaluate_adds_a_run_side_by_side(converted):
    session = converted[0]
    out = evaluate_tab.run(session, "builtin:pydoc", 2, 64, [], 5)
    session, card, rows, lm_rows, *figs = out
    assert len(session.evals) == 1 and "perplexity" in card
    assert [r[0] for r in rows] == ["dense", "#1 cmoe S2A2E8"] and rows[1][5] > 0  # KL > 0
    assert len(rows[1]) == len(evaluate_tab.COLUMNS) and "decode" in card
    speed = dict(zip(evaluate_tab.COLUMNS, rows[1], strict=True))
    assert speed["decode tokens/s"] > 0 and speed["decode vs dense"] > 0 and speed["prefill vs dense"] > 0
    assert all(isinstance(f, go.Figure) for f in figs) and len(figs[0].data[0].x) == 2
    assert [trace.name for trace in figs[1].data] == ["prefill", "decode"]  # speed vs dense, grouped
    again = evaluate_tab.run(session, "builtin:pydoc", 2, 64, [], 5)
    assert [r[0] for r in again[2]] == ["dense", "#1 cmoe S2A2E8", "#2 cmoe S2A2E8"]


def test_the_evaluate_tab_and_the_eval_command_share_one_evaluation_and_its_defaults(loaded, monkeypatch):
    """Both call moe_core.pipeline.evaluate_pair; the tab's initial inputs are EvalConfig's defaults."""
    from moe_core import pipeline
    from moe_core.cli import main
    from moe_core.config import EvalConfig

    with gr.Blocks() as demo:
        evaluate_tab.build(gr.State(Session()))
    labels = ("Perplexity text", "Windows", "Tokens per window", "lm-eval: documents per task")
    inputs = {b.label: b.value for b in demo.blocks.values() if getattr(b, "label", None) in labels}
    defaults = EvalConfig()
    assert [inputs[label] for label in labels] == [
        defaults.text,
        defaults.n_windows,
        defaults.seq_len,
        defaults.limit,
    ]
    seen = []

    def record(ref, moe, cfg=None, progress=None, cancel=None):
        seen.append(cfg)
        raise RuntimeError("recorded")

    monkeypatch.setattr(pipeline, "evaluate_pair", record)
    with pytest.raises(gr.Error, match="recorded"):
        evaluate_tab.run(replace(loaded, moe=loaded.dense), *[inputs[label] for label in labels[:3]], [],
                         inputs[labels[3]])  # fmt: skip
    assert main(["eval", "--model", TINY]) == 1  # the recorder's error, after the CLI reached it
    assert seen == [defaults, defaults]


def test_evaluate_needs_a_converted_model_and_known_tasks(loaded, converted):
    with pytest.raises(gr.Error, match="Convert a model"):
        evaluate_tab.run(loaded, "builtin:pydoc", 2, 64, [], 5)
    with pytest.raises(gr.Error, match="Unknown lm-eval task|No local lm-eval task folder"):
        evaluate_tab.run(converted[0], "builtin:pydoc", 2, 64, ["no_such_task"], 5)


def test_compare_generates_with_both_models(converted):
    dense_text, dense_card, moe_text, moe_card = compare_tab.run(converted[0], "Hello", 4)
    assert "new tokens / s" in dense_card and "new tokens / s" in moe_card
    assert "first tokens identical to dense" in moe_card and "speed vs dense" in moe_card
    assert isinstance(dense_text, str) and isinstance(moe_text, str)
    with pytest.raises(gr.Error, match="prompt is empty"):
        compare_tab.run(converted[0], "  ", 4)


def test_routing_sweep_pick_and_apply(converted):
    session, card, slider, curves, front = routing_tab.run(converted[0], "builtin:pydoc", 1, 64, 1)
    assert session.sweep is not None and "layers swept" in card and isinstance(curves, go.Figure)
    assert slider.visible and (slider.minimum, slider.maximum) == (0, 1)  # tiny-llama's two layers
    session, plan_card, rows, front = routing_tab.pick(session, "saving", 55)
    assert len(rows) == 2 and "active FFN parameters saved" in plan_card and len(front.data) == 2
    session, message = routing_tab.apply(session)
    assert "Applied" in message and "plan" in session.run_config
    with pytest.raises(gr.Error, match="No plan reaches"):
        routing_tab.pick(session, "saving", 99)


def test_routing_layer_slider_is_hidden_until_a_sweep():
    """Before a sweep there is no layer range to show (it used to read 0-1 whatever the model)."""
    with gr.Blocks() as demo:
        routing_tab.build(gr.State(Session()))
    (layer,) = [b for b in demo.blocks.values() if isinstance(b, gr.Slider) and b.label == "Layer"]
    assert not layer.visible


def test_export_builds_a_zip_and_a_model_card(converted):
    session, result, card, download = export_tab.build_export(converted[0], "portable", True)
    assert session.export.zip_path.is_file() and "export-portable.zip" in str(download.value)
    assert "# export-portable" in card and "Qwen2MoeForCausalLM" in card and "vs the internal model" in result
    names = zipfile.ZipFile(session.export.zip_path).namelist()
    assert "export-portable/config.json" in names and "export-portable/README.md" in names


def test_export_needs_a_converted_model(loaded):
    with pytest.raises(gr.Error, match="Convert a model"):
        export_tab.build_export(loaded, "exact", True)


def test_unexpected_errors_become_messages():
    from views import widgets

    @widgets.guarded("Doing it")
    def broken():
        raise RuntimeError("boom")

    with pytest.raises(gr.Error, match="RuntimeError: boom. The app is still running") as info:
        broken()
    assert "Traceback" not in str(info.value)


def test_dive_accordion_makes_a_valid_run_and_command_line(loaded, tmp_path):
    opts = options(**{"dive.n_sequences": 2, "dive.retrain.stage1_steps": 0, "dive.retrain.stage2_steps": 1})
    design = layout(2, 0.0, "uniform", 1)
    cfg, _ = convert_tab.run_config(loaded, DATA, design, "dive", *opts)
    assert (cfg.dive.n_experts, cfg.dive.top_k, cfg.dive.n_sequences) == (2, 1, 2)
    assert cfg.dive.retrain.stage2_steps == 1 and cfg.dive.prune_ratio == 0.5  # empty: 1 - 0.5 / A
    yaml_text, line = convert_tab.preview(loaded, *DATA, *design, "dive", *opts)
    (tmp_path / "run_config.yaml").write_text(yaml_text)
    argv = shlex.split(line.replace("run_config.yaml", str(tmp_path / "run_config.yaml")))
    args = build_parser().parse_args(argv[3:])
    assert _run_config(ConvertRun, args, {"method": "dive"}) == cfg
    values = convert_tab.load_config(str(tmp_path / "run_config.yaml"), loaded, len(opts))
    fields = [(m, option.path) for m, option in convert_tab._option_fields(convert_tab.sections())]
    expected = ["0.5" if f == ("dive", "prune_ratio") else v for f, v in zip(fields, opts, strict=True)]
    assert values[13] == "dive" and values[14:] == expected  # the prune ratio comes back resolved


def test_dive_convert_draws_the_affinity_heatmap_in_cluster_order(loaded, tmp_path):
    (tmp_path / "sums.txt").write_text("\n".join(f"{a} + {b} = {a + b}" for a in range(60) for b in range(9)))
    domains = f"docs=builtin:pydoc, code=builtin:stdlib, sums=file:{tmp_path / 'sums.txt'}"
    opts = options(**{"dive.domains": domains, "dive.n_sequences": 2, "dive.retrain.stage1_steps": 0,
                      "dive.retrain.stage2_steps": 0})  # fmt: skip
    session = converting(loaded, *DATA, *layout(2, 0.0, "uniform", 1), "dive", *opts)[0]
    saved = json.loads((session.workspace.path("converted") / "metrics.json").read_text())
    plot = convert_tab.affinity_plot(session)
    fig = go.Figure(json.loads(plot.value["plot"]))  # what the browser receives
    aff = session.metrics["conversion"]["affinity"]
    assert saved["conversion"]["affinity"] == aff and sorted(aff["names"]) == ["code", "docs", "sums"]
    ordered = [aff["names"][i] for i in aff["order"]]
    assert plot.visible and len(aff["groups"]) == 2 and [n for g in aff["groups"] for n in g] == ordered
    left, right = fig.data
    assert list(left.x) == list(left.y) == list(right.x) == list(right.y) == ordered
    np.testing.assert_allclose(left.z, np.asarray(aff["normalised"])[np.ix_(aff["order"], aff["order"])])
    np.testing.assert_allclose(right.z, np.asarray(aff["correlation"])[np.ix_(aff["order"], aff["order"])])
    assert (left.xaxis, left.yaxis, right.xaxis, right.yaxis) == ("x", "y", "x2", "y2")
    assert fig.layout.yaxis.autorange == "reversed" and fig.layout.yaxis2.autorange == "reversed"
    boxes = sorted((s.xref, s.x0, s.x1, s.y0, s.y1) for s in fig.layout.shapes)  # each group, both heatmaps
    spans, start = [], -0.5
    for g in aff["groups"]:
        spans.append((start, start + len(g), start, start + len(g)))
        start += len(g)
    assert boxes == sorted((ref, *span) for ref in ("x", "x2") for span in spans)
    assert all(f"expert {g}: {', '.join(m)}" in fig.layout.title.text for g, m in enumerate(aff["groups"]))
    assert not convert_tab.affinity_plot(loaded).visible  # nothing converted: hidden
    cmoe = replace(session, metrics={**session.metrics, "conversion": {"method": "cmoe"}})
    assert not convert_tab.affinity_plot(cmoe).visible


# ---------------------------------------------------------------------------------------------
# Routing, distillation and the per-layer budget

ROUTING = {"routing.router": "trained", "routing.form": "native", "routing.refit": True}
DISTILL = {"distill.enabled": True, "distill.tokens": 512, "distill.max_minutes": "1.5", "distill.lr": 2e-4,
           "distill.train": ["experts", "routers"], "distill.lora_r": 4}  # fmt: skip
BUDGET = layout(8, 0.25, "budget", 2, "", 0.5, "S2A1E8, dense", True)  # tiny-llama has 2 layers; servable


def test_every_choice_input_offers_the_config_default():
    """A radio whose default is not one of its choices is refused by Gradio when the form is sent."""
    defaults = ConvertRun()
    for m, option in convert_tab._option_fields(convert_tab.sections()):
        if isinstance(option.kind, tuple):
            assert option.get(getattr(defaults, m)) in option.kind, (m, option)


def test_routing_distill_and_budget_round_trip_through_a_config_file(loaded, tmp_path):
    """Inputs -> YAML -> Load config file -> the same inputs, for every new input."""
    opts = options(**ROUTING, **DISTILL)
    cfg, _ = convert_tab.run_config(loaded, DATA, BUDGET, "cmoe", *opts)
    assert (cfg.routing.router, cfg.routing.form, cfg.routing.refit) == ("trained", "native", True)
    assert (
        cfg.distill.enabled and cfg.distill.train == ("experts", "routers") and cfg.distill.max_minutes == 1.5
    )
    assert cfg.cmoe.budget == 0.5 and cfg.cmoe.layer_experts == ("S2A1E8", "dense")
    (tmp_path / "run.yaml").write_text(convert_tab.preview(loaded, *DATA, *BUDGET, "cmoe", *opts)[0])
    values = convert_tab.load_config(str(tmp_path / "run.yaml"), loaded, len(opts))
    fields = [(m, option.path) for m, option in convert_tab._option_fields(convert_tab.sections())]
    auto = 14 + fields.index(("dive", "prune_ratio"))  # empty (auto) comes back resolved, as DIVE will run it
    assert values[:auto] + values[auto + 1 :] == [
        TINY,
        *DATA,
        *BUDGET,
        "cmoe",
        *opts[: auto - 14],
        *opts[auto - 13 :],
    ]
    assert from_dict(ConvertRun, load_config_file(tmp_path / "run.yaml")) == cfg
    # defaults with the uniform layout: no budget (a shape alone turns it off), distillation on, default routing
    plain = convert_tab.run_config(loaded, DATA, DESIGN, "cmoe", *options())[0]
    assert plain.cmoe.budget is None and plain.routing == ConvertRun().routing and plain.distill.enabled
    assert plain.distill == ConvertRun().distill


@pytest.mark.parametrize("allocation", ["", "S2A1E8, dense"])
@pytest.mark.parametrize("servable", [False, True])
def test_command_line_reproduces_routing_budget_and_distill(loaded, tmp_path, allocation, servable):
    """The command line preview, run through the CLI's own parser, gives the run config back."""
    from moe_core.cli import convert_overrides

    design = layout(8, 0.25, "budget", 2, "", 0.45, allocation, servable)
    opts = options(**ROUTING, **DISTILL)
    yaml_text, line = convert_tab.preview(loaded, *DATA, *design, "cmoe", *opts)
    (tmp_path / "run_config.yaml").write_text(yaml_text)
    argv = shlex.split(line.split("  #")[0].replace("run_config.yaml", str(tmp_path / "run_config.yaml")))
    args = build_parser().parse_args(argv[3:])
    cfg, _ = convert_tab.run_config(loaded, DATA, design, "cmoe", *opts)
    assert _run_config(ConvertRun, args, convert_overrides(args, args.method)) == cfg
    assert (
        "--budget 0.45" in line
        and "--routing-form native" in line
        and "--distill-train experts,routers" in line
    )
    # without an allocation the flags say it all, and the note says the conversion measures first
    assert ("--config" in line) == bool(allocation) and ("measures each layer" in line) == (not allocation)
    assert ("--servable" in line) == servable and cfg.cmoe.servable == servable


def test_budget_mode_measures_allocates_and_feeds_the_run_config(loaded):
    from moe_core.budget import allocate
    from views.state import new_model

    design = layout(8, 0.25, "budget", 2, "", 0.5, "")
    cfg, d = convert_tab.run_config(loaded, DATA, design, "cmoe", *options())
    assert cfg.cmoe.budget == 0.5 and cfg.cmoe.layer_experts is None  # before a measurement: the budget only
    assert "Not measured yet" in design_tab.show(loaded, *design)
    session, allocation, card, heat, bars = design_tab.measure(
        loaded, lambda: convert_tab.cmoe_run(loaded, DATA, design, ["ladimo", *options()]), design
    )
    sens = session.sensitivity
    assert sens.n_layers == 2 and len(sens.shapes) == 7 and loaded.sensitivity is None
    shapes = allocation.split(", ")
    assert shapes == allocate(sens, 0.5) and "(the allocation)" in card and "measured on" in card
    assert list(heat.data[0].x) == sens.shapes and len(heat.layout.shapes) == sum(
        s != "dense" for s in shapes
    )
    assert list(bars.data[0].customdata) == shapes and bars.layout.shapes[0].y0 == 0.5  # the budget line
    # the budget slider re-allocates from the stored measurement; a tighter budget, smaller shapes
    tight, _, tight_bars = design_tab.reallocate(session, 8, 0.2)
    assert tight.split(", ") == allocate(sens, 0.2) and sum(tight_bars.data[0].y) <= 0.2 * 2 + 1e-9
    assert design_tab.reallocate(session, 16, 0.5)[0] == ""  # measured for E8: E16 needs a new measurement
    # Servable: one shape (and dense layers), carried to the run config; a mixed allocation is refused
    one = design_tab.reallocate(session, 8, 0.4, True)[0]
    assert (
        one.split(", ") == allocate(sens, 0.4, servable=True) and len(set(one.split(", ")) - {"dense"}) == 1
    )
    cfg, _ = convert_tab.run_config(
        session, DATA, layout(8, 0.25, "budget", 2, "", 0.4, one, True), "cmoe", *options()
    )
    assert cfg.cmoe.servable and cfg.cmoe.layer_experts == tuple(one.split(", "))
    assert "Servable budget" in design_tab.show(session, *layout(8, 0.25, "budget", 2, "", 0.4, one, True))
    mixed = design_tab.show(session, *layout(8, 0.25, "budget", 2, "", 0.5, "S2A1E8, S1A1E8", True))
    assert "a servable budget has one" in mixed
    # the run config carries the allocation drawn: converting does not measure again
    measured = layout(8, 0.25, "budget", 2, "", 0.5, allocation)
    cfg, _ = convert_tab.run_config(session, DATA, measured, "cmoe", *options())
    assert cfg.cmoe.layer_experts == tuple(shapes)
    out = converting(session, *DATA, *measured, "cmoe", *options())
    assert list(out[0].run_config["cmoe"]["layer_experts"]) == shapes and "budget" not in out[0].metrics
    assert "one shape per layer" in out[1] and out[0].sensitivity is sens
    assert new_model(session, loaded.dense).sensitivity is None  # a new model drops the measurement
    empty = design_tab.on_model_loaded(new_model(session, loaded.dense), *measured)
    assert empty[0] == "" and "Not measured yet" in empty[1]


def test_budget_mode_errors_are_messages(loaded):
    low = layout(8, 0.25, "budget", 2, "", 0.1, "")
    assert "cannot be converted" in design_tab.show(loaded, *low) and "smallest shape" in design_tab.show(
        loaded, *low
    )
    three = layout(8, 0.25, "budget", 2, "", 0.5, "S2A1E8, S2A1E8, dense")
    assert "3 shapes for a 2-layer model" in design_tab.show(loaded, *three)
    yaml_text, _ = convert_tab.preview(loaded, *DATA, *BUDGET, "ladimo", *options())
    assert yaml_text.startswith("# Not a valid run yet") and "choose CMoE" in yaml_text
    with pytest.raises(gr.Error, match="choose CMoE"):
        converting(loaded, *DATA, *BUDGET, "ladimo", *options())
    with pytest.raises(gr.Error, match="Load a model"):
        design_tab.measure(Session(), lambda: None)
    with pytest.raises(gr.Error, match="budget mode"):
        design_tab.measure(loaded, lambda: convert_tab.cmoe_run(loaded, DATA, DESIGN, ["cmoe", *options()]))
    with pytest.raises(gr.Error, match="smallest shape"):
        design_tab.measure(loaded, lambda: convert_tab.cmoe_run(loaded, DATA, low, ["cmoe", *options()]))
    not_a_number = convert_tab.preview(
        loaded, *DATA, *DESIGN, "cmoe", *options(**{**DISTILL, "distill.max_minutes": "soon"})
    )
    assert "'soon' is not a number" in not_a_number[0]
    with pytest.raises(gr.Error, match="distill.train is empty"):
        converting(loaded, *DATA, *DESIGN, "cmoe", *options(**{**DISTILL, "distill.train": []}))

    def progress(fraction, desc=None):
        loaded.cancel.set()

    budget = layout(8, 0.25, "budget", 2)
    with pytest.warns(UserWarning, match="cancelled"):
        out = design_tab.measure(
            loaded,
            lambda: convert_tab.cmoe_run(loaded, DATA, budget, ["cmoe", *options()]),
            progress=progress,
        )
    assert len(out) == 5 and all(isinstance(o, type(gr.skip())) for o in out)
    loaded.cancel.clear()


def test_routing_step_and_a_tiny_distillation_show_in_the_summary(loaded, monkeypatch):
    """The loss curve draws while the distillation trains, and stays; the routing step's errors are tiles
    and a per-layer plot."""
    from views import widgets

    tick = widgets.while_running
    monkeypatch.setattr(widgets, "while_running", lambda *a, **k: tick(*a, **(k | {"every": 0.01})))
    tiny = {**DISTILL, "distill.tokens": 2048, "distill.max_minutes": ""}  # 8 windows of 256: 2 steps
    updates = list(convert_tab.convert(loaded, *DATA, *DESIGN, "cmoe", *options(**ROUTING, **tiny)))
    live = [u[5] for u in updates[1:-1] if isinstance(u[5], gr.Plot)]
    assert live and all(p.visible for p in live)  # drawn from the steps recorded so far
    first = go.Figure(json.loads(live[0].value["plot"]))
    assert list(first.data[0].x) == list(range(1, len(first.data[0].x) + 1))
    session, summary, *_, loss = updates[-1]
    distilled = session.metrics["distill"]
    assert distilled["steps"] == 2 and "held-out KL, distillation: 2 steps" in summary
    final = go.Figure(json.loads(loss.value["plot"]))
    assert loss.visible and list(final.data[0].y) == distilled["losses"] and list(final.data[1].x) == [0, 2]
    reports = convert_tab.routing_reports(session.metrics)
    assert len(reports) == 2 and "before → after the routing step" in summary and "oracle bound" in summary
    errors = convert_tab.routing_plot(session)
    fig = go.Figure(json.loads(errors.value["plot"]))
    assert errors.visible and [t.name for t in fig.data] == ["before", "after", "oracle bound"]
    assert list(fig.data[1].y) == [r["error"] for r in reports]
    assert not convert_tab.routing_plot(replace(session, metrics={"conversion": {"layers": []}})).visible


def test_export_status_says_whether_portable_is_exact(loaded):
    """A native-form model exports exactly to Qwen2-MoE; CMoE's own routing only through the exact format."""
    from moe_core.config import CMoEConfig, RoutingConfig
    from moe_core.methods import convert

    ids = loaded.dense.tokenizer("def f(x): return x * 2\n" * 12, return_tensors="pt").input_ids[:, :64]
    native = convert(loaded.dense, ids, CMoEConfig(experts="S2A2E8"), routing=RoutingConfig(form="native"))
    plain = convert(loaded.dense, ids, CMoEConfig(experts="S2A2E8"), routing=None)
    assert "reproduce it exactly" in export_tab.status_text(replace(loaded, moe=native))
    text = export_tab.status_text(replace(loaded, moe=plain))
    assert "no Qwen2-MoE form" in text and "not a linear map" in text
    budget = convert(loaded.dense, ids, CMoEConfig(layer_experts=("S1A1E8", "S4A2E8")), routing=None)
    text = export_tab.status_text(replace(loaded, moe=budget))  # 7 and 4 routed experts: no Qwen2-MoE config
    assert "only **exact** exports it" in text and "4 routed, 7 routed" in text


@pytest.mark.parametrize("name", list(METHODS))
def test_every_registered_method_is_a_convert_tab_choice(loaded, name):
    """The Convert tab offers every method of the registry, with its options, and applies the Design tab's
    layout to its section the way its registry entry says."""
    from moe_core.methods import Layout

    design_values = layout(2, 0.5, "uniform", 1)  # S1A1E2: DIVE's default domains make two groups anywhere
    cfg, d = convert_tab.run_config(loaded, DATA, design_values, name, *options())
    entry = METHODS[name]
    expected = entry.from_layout(Layout(d.n_experts, d.n_shared, d.active, 0.5))
    section = to_dict(cfg)[name]
    assert cfg.method == name and all(section[k] == v for k, v in expected.items() if k != "domains")
    n_tab = sum(o.tab for o in entry.options)
    assert len(convert_tab.section_options(name)) == n_tab
    assert entry.title in widgets.converted_status(
        replace(loaded, moe=object(), run_config=to_dict(cfg)), "", ""
    )
