"""FLAP as a registered method (moe_core/methods/flap.py): the baseline pruning, run like any conversion."""

from __future__ import annotations

import json

import pytest
import torch

from moe_core.checkpoint import load_converted
from moe_core.cli import main
from moe_core.config import ConvertRun, RoutingConfig, from_dict
from moe_core.methods import METHODS, Layout, convert
from moe_core.methods.dive import flap_prune, flap_stats
from moe_core.methods.flap import FLAPConfig
from moe_core.model_io import load_model
from moe_core.moe import MoEMLP
from moe_core.pipeline import convert_run
from moe_core.reconstruct import reconstruct_model

TINY = "builtin:tiny-llama"  # 2 layers, H=64, I=192


@pytest.fixture(scope="module")
def dense():
    return load_model(TINY)


def ids(n=4, t=32, seed=0):
    return torch.randint(4, 260, (n, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_flap_method_is_the_flap_baseline(dense):
    """Without the routing step the method is exactly flap_prune on the same statistics."""
    x = ids()
    moe = convert(dense, x, FLAPConfig(prune_ratio=0.25), method="flap")
    ref = flap_prune(dense, flap_stats(dense, x), 0.25)
    blocks = [m for m in moe.model.modules() if isinstance(m, MoEMLP)]
    assert len(blocks) == 2 and all(b.n_experts == 1 and b.expert_sizes == [144] for b in blocks)
    torch.testing.assert_close(moe.model(x).logits, ref.model(x).logits, rtol=0, atol=0)
    assert moe.conversion.method == "flap" and moe.conversion.layers[0]["kept"] == 144


@torch.no_grad()
def test_the_routing_step_inside_flaps_walk_is_the_routing_pass_after_it(dense):
    """Each block refitted as soon as it is pruned gives the model that pruning everything, then running the
    routing pass over the pruned model, gives (the refit's inputs come from the refitted layers before it)."""
    x = ids(8)
    settings = RoutingConfig().settings(0)
    moe = convert(dense, x, FLAPConfig(prune_ratio=0.5), method="flap", routing=RoutingConfig())
    ref = flap_prune(dense, flap_stats(dense, x), 0.5)
    reports = reconstruct_model(ref, dense, x, settings)
    assert [r["error"] for r in moe.conversion.routing] == [r["error"] for r in reports]
    for name, tensor in ref.model.state_dict().items():
        torch.testing.assert_close(moe.model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)


@torch.no_grad()
def test_ratio_zero_keeps_the_dense_model(dense):
    x = ids(2)
    moe = convert(dense, x, FLAPConfig(prune_ratio=0.0), method="flap")
    torch.testing.assert_close(moe.model(x).logits, dense.model(x).logits, rtol=1e-5, atol=1e-5)


def test_bad_ratio_says_what_to_give():
    with pytest.raises(ValueError, match=r"share of FFN channels dropped, in \[0, 1\)"):
        FLAPConfig(prune_ratio=1.0)


@torch.no_grad()
def test_a_flap_run_saves_reloads_and_counts_the_share_of_the_dense_ffn(dense, tmp_path):
    """Through convert_run (the app's and the command line's path) with the default routing step: the
    refit lowers the error, the active share is the kept share of the dense FFN, the folder reloads."""
    base = {"model": {"spec": TINY}, "data": {"text": "builtin:pydoc", "n_sequences": 4, "seq_len": 32}}
    plain = from_dict(ConvertRun, {**base, "method": "flap", "routing": {"router": "method", "refit": False}})
    routed = from_dict(ConvertRun, {**base, "method": "flap"})
    a = convert_run(dense, plain)
    b = convert_run(dense, routed, folder=tmp_path / "flap")
    x = a.calib_ids[:2]
    ref = dense.model(x).logits
    err = [(o.moe.model(x).logits - ref).abs().mean() for o in (a, b)]
    assert err[1] < err[0]
    assert b.metrics["active_ffn_share"] == pytest.approx(0.75, abs=0.01)
    assert b.metrics["total_params"] < sum(p.numel() for p in dense.model.parameters())
    back = load_converted(tmp_path / "flap")
    torch.testing.assert_close(back.model(x).logits, b.moe.model(x).logits, rtol=1e-5, atol=1e-5)


def test_convert_command_runs_flap(tmp_path, capsys):
    out = tmp_path / "flap"
    argv = ["convert", "--model", TINY, "--text", "builtin:pydoc", "--n-sequences", "2", "--seq-len", "32"]
    assert main([*argv, "--method", "flap", "--prune-ratio", "0.5", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == "flap" and summary["active_ffn_share"] == pytest.approx(0.5, abs=0.01)
    saved = json.loads((out / "run_config.json").read_text())
    assert saved["method"] == "flap" and saved["flap"]["prune_ratio"] == 0.5


def test_a_prune_ratio_flag_fills_only_the_run_methods_section():
    from moe_core.cli import build_parser, convert_overrides

    args = build_parser().parse_args(["convert", "--method", "flap", "--prune-ratio", "0.4"])
    assert "flap" in METHODS and convert_overrides(args, "flap")["flap"] == {"prune_ratio": 0.4}
    with pytest.warns(UserWarning, match="--prune-ratio is an option of DIVE, FLAP, not of CMoE"):
        assert set(convert_overrides(args, "cmoe")) == {"method"}


def test_the_design_layout_sets_the_kept_share():
    """FLAP keeps the share of each FFN that the designed MoE runs per token: (S + A) / E."""
    values = METHODS["flap"].from_layout(Layout(n_experts=8, n_shared=3, active=3, shared_ratio=0.375))
    assert values == {"prune_ratio": 0.25}
