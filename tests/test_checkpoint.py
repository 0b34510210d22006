"""Converted checkpoints reload to identical logits; the convert command writes one."""

import json

import pytest
import torch

from moe_core.checkpoint import NotAConvertedCheckpoint, load_converted, save_converted
from moe_core.cli import load_calibration, main
from moe_core.config import CMoEConfig, ConvertRun, from_dict
from moe_core.methods import convert
from moe_core.model_io import tiny_model
from moe_core.moe import MoEMLP

IDS = torch.randint(0, 250, (2, 20), generator=torch.Generator().manual_seed(0))


def assert_same_model(a, b):
    torch.testing.assert_close(a.model(IDS).logits, b.model(IDS).logits, rtol=0, atol=0)
    assert [type(a.mlp(i)) for i in range(a.n_layers)] == [type(b.mlp(i)) for i in range(b.n_layers)]


def test_roundtrip_every_family(tiny, tmp_path):
    moe = convert(tiny, IDS, CMoEConfig(experts="S2A2E8", variant="code"))
    save_converted(moe, tmp_path / "ck", {"method": "cmoe"}, {"seconds": 1.0})
    again = load_converted(tmp_path / "ck")
    assert_same_model(again, moe)
    assert again.run_config == {"method": "cmoe"} and again.metrics == {"seconds": 1.0}
    assert again.adapter == moe.adapter
    assert again.tokenizer("def f(x): pass")["input_ids"] == moe.tokenizer("def f(x): pass")["input_ids"]


def test_roundtrip_unequal_experts_paper_variant_and_partial_layers(tmp_path):
    dense = tiny_model("gemma", intermediate_size=190, n_layers=3)  # tied LM head, 190 % 8 != 0
    moe = convert(dense, IDS, CMoEConfig(experts="S0A3E8", variant="paper", layers=[0, 2]))
    moe.mlp(2).gate_scale.data.fill_(0.5)  # trained-looking state must survive too
    moe.mlp(2).selection_bias.fill_(0.01)
    save_converted(moe, tmp_path / "ck", {}, None)
    meta = json.loads((tmp_path / "ck" / "moe_layers.json").read_text())
    assert sorted(meta["layers"]) == ["0", "2"] and meta["tied"] == {
        "lm_head.weight": "model.embed_tokens.weight"
    }
    again = load_converted(tmp_path / "ck")
    assert_same_model(again, moe)
    assert again.model.lm_head.weight.data_ptr() == again.model.model.embed_tokens.weight.data_ptr()
    assert again.mlp(0).expert_sizes == [24] * 6 + [23] * 2


def test_folder_contents_and_overwrite(tmp_path):
    moe = convert(tiny_model("qwen2"), IDS, CMoEConfig(experts="S1A1E4"))
    out = tmp_path / "ck"
    save_converted(moe, out, {"run": 1}, {"ppl": 2.0})
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "moe_layers.json", "run_config.json", "metrics.json"} <= names
    save_converted(moe, out, {"run": 2}, None)  # replacing an earlier checkpoint is fine
    assert json.loads((out / "run_config.json").read_text()) == {"run": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary folders left


def test_refuses_folders_that_are_not_checkpoints(tmp_path):
    with pytest.raises(NotAConvertedCheckpoint, match="not a converted"):
        load_converted(tmp_path)
    (tmp_path / "notes.txt").write_text("keep me")
    moe = convert(tiny_model("llama"), IDS, CMoEConfig(experts="S1A1E4"))
    with pytest.raises(ValueError, match="not a converted checkpoint"):
        save_converted(moe, tmp_path, {}, None)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_cli_convert_writes_a_reloadable_folder(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(
        "model: {spec: 'builtin:tiny-llama'}\ndata: {text: 'builtin:pydoc', n_sequences: 2, seq_len: 32}\n"
        "cmoe: {experts: S3A3E8, variant: paper}\n"
    )
    out = tmp_path / "out"
    rc = main(["convert", "--config", str(config), "--experts", "S1A2E4", "--no-distill", "--out", str(out)])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["active_ffn_share"] < 1 and summary["out"] == str(out)
    run = from_dict(ConvertRun, json.loads((out / "run_config.json").read_text()))
    assert run.cmoe.experts == "S1A2E4" and run.cmoe.variant == "paper"  # flag over file, file over default
    assert json.loads((out / "metrics.json").read_text())["conversion"]["layers"]
    dense, ids = load_calibration(run.model, run.data)
    again = load_converted(out)
    assert isinstance(again.mlp(0), MoEMLP)
    assert_same_model(again, convert(dense, ids, run.cmoe, routing=run.routing))


def test_cli_convert_reports_bad_config(tmp_path, capsys):
    rc = main(
        ["convert", "--model", "builtin:tiny-llama", "--experts", "S4A1E4", "--out", str(tmp_path / "o")]
    )
    assert rc == 2 and "S <= E-1" in capsys.readouterr().err


def test_a_conversion_returns_its_declared_result_and_a_checkpoint_loads_it_whole(tmp_path):
    """Every method returns a ConvertedModel (report, run config, metrics, plan as declared fields), and a saved
    one loads back with the same report and plan: nothing is attached to a DenseModel and read with getattr."""
    from moe_core.methods import METHODS
    from moe_core.model_io import ConvertedModel
    from moe_core.pipeline import convert_run
    from moe_core.sweep import Plan

    dense = tiny_model("llama")
    for name in METHODS:
        moe = convert(dense, IDS, method=name)
        assert isinstance(moe, ConvertedModel) and moe.conversion.method == name, name
        assert not isinstance(dense, ConvertedModel)  # the source is untouched
        save_converted(moe, tmp_path / name, {"method": name}, {"conversion": moe.conversion.as_dict()})
        assert type(load_converted(tmp_path / name).conversion) is type(moe.conversion), name
    plan = {"policies": {"0": None, "1": {"mode": "topk", "k": 1}}, "labels": {"0": "dense", "1": "k=1"}}
    run = from_dict(ConvertRun, {"model": {"spec": "builtin:tiny-llama"}, "data": {"n_sequences": 2,
                                 "seq_len": 16, "text": "builtin:pydoc"}, "plan": plan})  # fmt: skip
    out = convert_run(dense, run, folder=tmp_path / "ck")
    assert out.moe.plan == Plan.from_dict(plan) and out.moe.run_config["plan"]["labels"] == plan["labels"]
    again = load_converted(tmp_path / "ck")
    assert isinstance(again, ConvertedModel)
    plain = lambda x: json.loads(json.dumps(x))  # noqa: E731 (tuples come back as lists, as from any JSON)
    assert type(again.conversion) is type(out.moe.conversion) and again.plan == out.moe.plan
    assert again.conversion.as_dict() == plain(out.moe.conversion.as_dict())
    assert again.run_config == plain(out.run_config) and again.metrics == plain(out.metrics)
    assert_same_model(again, out.moe)
    again.save(tmp_path / "copy")  # its own run config and metrics go with it
    assert load_converted(tmp_path / "copy").run_config == again.run_config
