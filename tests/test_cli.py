import json
import subprocess
import sys

from moe_core.cli import main
from moe_core.profiling import ActivationProfile


def test_profile_command_writes_profile_and_config(tmp_path, capsys):
    out = tmp_path / "prof"
    code = main(
        [
            "profile",
            "--model",
            "builtin:tiny-llama",
            "--text",
            "builtin:pydoc",
            "--n-sequences",
            "2",
            "--seq-len",
            "32",
            "--k-act",
            "4",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["layers"] == 2 and summary["tokens"] == 64 and summary["k_act"] == 4
    profile = ActivationProfile.load(out)
    assert profile.rates.shape == (2, 192)
    config = json.loads((out / "run_config.json").read_text())
    assert config["data"]["text"] == "builtin:pydoc" and config["profile"]["k_act"] == 4


def test_profile_command_reads_a_yaml_config_and_flags_override(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "model: {spec: builtin:tiny-qwen2}\ndata: {text: builtin:stdlib, n_sequences: 1, seq_len: 16}\n"
    )
    assert main(["profile", "--config", str(cfg), "--seq-len", "24", "--out", str(tmp_path / "p")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens"] == 24


def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys):
    assert main(["profile", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: Local path") and "Traceback" not in err
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps({"data": {"seq_len": 1}}))
    assert main(["profile", "--config", str(cfg)]) == 2
    assert "seq_len" in capsys.readouterr().err


def test_prepare_takes_the_model_from_a_config_and_honours_device(tmp_path, monkeypatch, capsys):
    """prepare used to ignore --config and --device; it has no text or output flags to ignore."""
    import pytest

    from moe_core import model_io
    from moe_core.cli import build_parser

    calls, real = [], model_io.load_model

    def record(spec, device="cpu", dtype="auto", trust_remote_code=False, progress=None):
        calls.append((spec, device, trust_remote_code))
        return real(spec)

    monkeypatch.setattr(model_io, "load_model", record)
    config = tmp_path / "run.yaml"
    config.write_text("model: {spec: builtin:tiny-llama, device: cpu}\nmethod: cmoe\n")
    assert main(["prepare", "--config", str(config)]) == 0
    assert main(["prepare", "--config", str(config), "--device", "cuda:1", "--trust-remote-code"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["model"] == "builtin:tiny-llama"
    assert calls == [("builtin:tiny-llama", "cpu", False), ("builtin:tiny-llama", "cuda:1", True)]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["prepare", "--text", "builtin:pydoc"])


def test_a_saved_run_config_round_trips_with_active_experts_plan_and_export(tmp_path, capsys):
    """run_config.json (as a conversion writes it, plus the export section an export adds) converts again to
    the same model: per-layer active experts and the routing plan applied; the export section is ignored."""
    import pytest
    import torch
    import yaml

    from moe_core.checkpoint import load_converted, read_json
    from moe_core.config import ConvertRun, from_dict, load_config_file
    from moe_core.model_io import load_model
    from moe_core.pipeline import config_yaml, convert_run

    topk = {"mode": "topk", "k": 3, "threshold": 0.5, "max_k": None}
    plan = {"policies": {"0": None, "1": topk}, "labels": {"0": "dense", "1": "top-3"}, "predicted": {}}
    tree = {
        "model": {"spec": "builtin:tiny-llama"},
        "data": {"text": "builtin:pydoc", "n_sequences": 2, "seq_len": 32},
        "cmoe": {"experts": "S1A2E4"},
        "routing": {"router": "method", "form": "analytic", "refit": False},
        "plan": plan | {"target": {}},
    }
    first = convert_run(load_model("builtin:tiny-llama"), from_dict(ConvertRun, tree), (1, 2), tmp_path / "a")
    saved = read_json(tmp_path / "a", "run_config.json") | {"export": {"format": "portable"}}
    assert saved["active_per_layer"] == [1, 2] and saved["plan"]["policies"]["1"] == topk
    (tmp_path / "saved.json").write_text(json.dumps(saved))
    with pytest.warns(UserWarning, match="'export' section is ignored"):
        cfg = from_dict(ConvertRun, load_config_file(tmp_path / "saved.json"))
    assert cfg.active_per_layer == (1, 2) and cfg.plan == first.run_config["plan"]
    assert from_dict(ConvertRun, yaml.safe_load(config_yaml(cfg))) == cfg  # the app's download too
    assert main(["convert", "--config", str(tmp_path / "saved.json"), "--out", str(tmp_path / "b")]) == 0
    assert "'export' section is ignored" in capsys.readouterr().err
    expected = {k: v for k, v in saved.items() if k != "export"} | {"out": str(tmp_path / "b")}
    assert read_json(tmp_path / "b", "run_config.json") == expected
    a, b = load_converted(tmp_path / "a"), load_converted(tmp_path / "b")
    assert not hasattr(b.mlp(0), "policy") and b.mlp(1).policy.k == 3  # layer 0 dense, layer 1 top-3
    ids = torch.arange(4, 36)[None]
    assert torch.equal(a.model(input_ids=ids).logits, b.model(input_ids=ids).logits)


def test_module_entry_point_help():
    out = subprocess.run(
        [sys.executable, "-m", "moe_core", "--help"], capture_output=True, text=True, check=True
    )
    assert "profile" in out.stdout


def test_convert_flags_express_routing_budget_and_distillation():
    """The command line the app shows reproduces the run config, new sections included, without --config."""
    import shlex

    from moe_core.cli import _run_config, build_parser, convert_overrides
    from moe_core.config import ConvertRun, from_dict
    from moe_core.pipeline import command_line

    tree = {
        "model": {"spec": "builtin:tiny-llama"},
        "data": {"text": "builtin:pydoc", "n_sequences": 2, "seq_len": 32},
        "cmoe": {"experts": "S2A2E8", "budget": 0.5, "shared_by": "magnitude", "cluster_on": "magnitude"},
        "routing": {"router": "trained", "form": "native", "refit": True, "max_tokens": 2048},
        "distill": {
            "enabled": True,
            "tokens": 4096,
            "lr": 3e-4,
            "max_minutes": 5.0,
            "train": ["experts", "routers"],
        },
        "out": "outputs/x",
    }
    cfg = from_dict(ConvertRun, tree)
    argv = shlex.split(command_line(cfg))
    assert "--config" not in argv and "--budget" in argv and "--routing-form" in argv and "--distill" in argv
    assert argv[argv.index("--routing-tokens") + 1] == "2048"
    args = build_parser().parse_args(argv[3:])
    assert _run_config(ConvertRun, args, convert_overrides(args, "cmoe")) == cfg


def test_the_default_layout_is_a_budget_and_a_shape_alone_turns_it_off():
    """CMoE's default is a 75% per-layer budget over 8 experts; --experts alone (or a config giving only the
    shape, as the Design tab's uniform mode does) means that shape in every layer; a written run config reloads
    as it was."""
    from moe_core.cli import _run_config, build_parser, convert_overrides
    from moe_core.config import CMoEConfig, ConvertRun, from_dict, to_dict

    assert (CMoEConfig().budget, CMoEConfig().experts) == (0.75, "S3A3E8")
    assert CMoEConfig(experts="S2A2E8").budget is None
    assert (CMoEConfig(budget=0.5).budget, CMoEConfig(budget=0.5).shape[2]) == (0.5, 8)
    assert CMoEConfig(layer_experts=("S1A1E8", "dense")).budget is None
    assert CMoEConfig(experts="S2A2E16", budget=0.5).shape == (2, 2, 16)
    for cfg in (ConvertRun(), from_dict(ConvertRun, {"cmoe": {"experts": "S2A2E8"}})):
        assert from_dict(ConvertRun, to_dict(cfg)) == cfg
    parse = build_parser().parse_args
    for argv, budget in (
        ([], 0.75),
        (["--experts", "S2A2E8"], None),
        (["--experts", "S2A2E8", "--budget", "0.5"], 0.5),
    ):
        args = parse(["convert", *argv])
        assert _run_config(ConvertRun, args, convert_overrides(args, "cmoe")).cmoe.budget == budget, argv


def test_top_k_of_another_method_does_not_reach_ladimo():
    """`--method cmoe --top-k 9`: --top-k is LaDiMo's or DIVE's flag, not read into their sections for CMoE."""
    from moe_core.cli import build_parser, convert_overrides

    args = build_parser().parse_args(["convert", "--method", "cmoe", "--top-k", "9", "--n-experts", "3"])
    extra = convert_overrides(args, "cmoe")
    assert "ladimo" not in extra and "dive" not in extra
    assert convert_overrides(args, "ladimo")["ladimo"] == {"n_experts": 3, "top_k": 9}
