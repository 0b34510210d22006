"""LaDiMo distillation: dense start, training forward = MoEMLP, training helps, balancing, pipeline, CLI."""

import json

import pytest
import torch

from moe_core import Cancelled
from moe_core.config import ConvertRun, LaDiMoConfig, from_dict
from moe_core.methods import METHODS, convert
from moe_core.methods.ladimo import (
    balance_loss,
    build_block,
    masked_forward,
    relative_mse,
    selection_mask,
    train_block,
)
from moe_core.model_io import tiny_model
from moe_core.moe import MoEMLP, RoutingPolicy

FAST = {"steps": 20, "batch_tokens": 64}


pytestmark = pytest.mark.usefixtures("one_thread")


def ids(n=4, t=32, seed=0):
    return torch.randint(4, 250, (n, t), generator=torch.Generator().manual_seed(seed))


def calib_x(dense, n=256, seed=0):
    return torch.randn(n, dense.model.config.hidden_size, generator=torch.Generator().manual_seed(seed))


SPLIT = {"router_init": "random", "partition": "contiguous"}  # the E-scaled start: dense with every expert on


@pytest.mark.parametrize(
    "cfg", [LaDiMoConfig(n_experts=4, n_shared=0, **SPLIT), LaDiMoConfig(n_experts=5, n_shared=1, **SPLIT)]
)
def test_all_experts_with_uniform_router_equals_dense(tiny, cfg):
    """Every expert on and p = 1/E: the E-scaled experts sum to the dense FFN, on every family."""
    x = calib_x(tiny)
    block = build_block(tiny, 0, x, cfg, torch.Generator().manual_seed(0))
    torch.nn.init.zeros_(block.router.weight)
    block.set_policy(RoutingPolicy("topk", k=block.n_experts))
    torch.testing.assert_close(block(x), tiny.mlp(0)(x), rtol=1e-4, atol=1e-5)
    assert sum(block.expert_sizes) + block.shared_size == tiny.model.config.intermediate_size


@pytest.mark.parametrize("partition", ["contiguous", "cmoe", "magnitude"])
def test_split_covers_every_neuron_once(partition):
    dense = tiny_model("llama", intermediate_size=190)
    cfg = LaDiMoConfig(n_experts=8, n_shared=2, partition=partition, k_act=4, router_init="random")
    block = build_block(dense, 1, calib_x(dense), cfg, torch.Generator().manual_seed(0))
    assert block.shared_size + sum(block.expert_sizes) == 190 and max(block.expert_sizes) <= 24
    torch.nn.init.zeros_(block.router.weight)
    block.set_policy(RoutingPolicy("topk", k=6))
    x = calib_x(dense, 16, seed=1)
    # shared + every routed slice at p = 1/6 times the 6x scale: the dense FFN again
    torch.testing.assert_close(block(x), dense.mlp(1)(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("gate_mode", ["prob", "renorm"])
def test_training_forward_equals_block_reference(gate_mode):
    dense = tiny_model("qwen3")
    cfg = LaDiMoConfig(n_experts=6, n_shared=1, gate_mode=gate_mode, **SPLIT)
    block = build_block(dense, 0, calib_x(dense), cfg, torch.Generator().manual_seed(0))
    torch.nn.init.normal_(block.router.weight, std=0.3)
    x = calib_x(dense, 40, seed=2)
    for k in (1, 3, 5):
        block.set_policy(RoutingPolicy("topk", k=k))
        y, probs, mask = masked_forward(block, x, torch.full((40,), k))
        assert mask.sum(-1).eq(k).all()
        torch.testing.assert_close(y, block.forward_reference(x), rtol=1e-5, atol=1e-5)


def test_selection_mask_takes_each_tokens_top_k():
    probs = torch.softmax(torch.randn(30, 6), -1)
    k = torch.randint(1, 7, (30,))
    mask = selection_mask(probs, k)
    assert torch.equal(mask.sum(-1), k)
    for t in range(30):  # every chosen expert beats every unchosen one
        if k[t] < 6:
            assert probs[t][mask[t]].min() >= probs[t][~mask[t]].max()


def test_training_reduces_held_out_mse():
    dense = tiny_model("llama")
    moe = convert(
        dense,
        ids(8, 64),
        LaDiMoConfig(n_experts=4, n_shared=0, top_k=2, steps=40, batch_tokens=128),
        method="ladimo",
    )
    for layer in moe.conversion.layers:
        assert layer["val_mse"] < 0.97 * layer["val_mse_init"]
        assert layer["loss_last"] < layer["loss_first"]


def test_training_over_every_k_serves_every_policy():
    """train_k range (one block for every policy the adaptive router may pick): more experts, closer to the FFN."""
    cfg = LaDiMoConfig(n_experts=4, n_shared=0, top_k=2, steps=40, batch_tokens=128, train_k="range", **SPLIT)
    moe = convert(tiny_model("llama"), ids(8, 64), cfg, method="ladimo")
    for layer in moe.conversion.layers:
        assert layer["val_mse_all"] < layer["val_mse"]


def test_block_trained_on_a_layer_beats_its_init():
    dense = tiny_model("gemma")
    x = calib_x(dense, 512)
    y = dense.mlp(1)(x).detach()
    cfg = LaDiMoConfig(n_experts=4, n_shared=0, top_k=1, steps=60, batch_tokens=128, train_k="range", **SPLIT)
    gen = torch.Generator().manual_seed(0)
    block = build_block(dense, 1, x, cfg, gen)
    before = [relative_mse(block, x, y, k) for k in (1, 2)]
    with torch.enable_grad():
        stats = train_block(block, x, y, cfg, gen)
    after = [relative_mse(block, x, y, k) for k in (1, 2)]
    assert all(a < 0.9 * b for a, b in zip(after, before, strict=True)), (before, after, stats)


def test_balance_loss_is_one_when_balanced_and_e_when_collapsed():
    uniform = torch.full((8, 4), 0.25)
    round_robin = torch.arange(8)[:, None] % 4 == torch.arange(4)  # (8, 4): each expert takes 2 tokens
    assert balance_loss(uniform, round_robin) == pytest.approx(1.0)
    collapsed = torch.tensor([[1.0, 0, 0, 0]]).expand(8, 4)
    assert balance_loss(collapsed, collapsed.bool()) == pytest.approx(4.0)


def test_aux_loss_balances_a_skewed_router():
    """A router that sends every token to expert 0 spreads the load once the balance term is trained."""
    dense = tiny_model("llama")
    x = calib_x(dense, 512) + 3.0  # a shared mean direction every token has
    y = dense.mlp(0)(x).detach()
    gen = torch.Generator().manual_seed(0)

    def top1_share(cfg):
        block = build_block(dense, 0, x, cfg, torch.Generator().manual_seed(0))
        with torch.no_grad():
            block.router.weight[0] = x.mean(0) / x.mean(0).norm() * 0.5  # expert 0 wins every token
        before = torch.bincount(block.router(x).argmax(-1), minlength=4).max() / len(x)
        with torch.enable_grad():
            train_block(block, x, y, cfg, gen)
        return float(before), float(torch.bincount(block.router(x).argmax(-1), minlength=4).max() / len(x))

    common = {
        "n_experts": 4,
        "n_shared": 0,
        "top_k": 1,
        "steps": 60,
        "batch_tokens": 128,
        "lr": 1e-6,
        "train_k": "range",
        **SPLIT,
    }
    before, balanced = top1_share(LaDiMoConfig(aux_weight=1.0, **common))
    _, skewed = top1_share(LaDiMoConfig(aux_weight=0.0, **common))
    assert before == 1.0 and balanced < 0.5 and balanced < skewed


def test_convert_through_the_registry_leaves_the_source_untouched():
    dense = tiny_model("qwen2", n_layers=3)
    before = {k: v.clone() for k, v in dense.model.state_dict().items()}
    cfg = LaDiMoConfig(n_experts=4, n_shared=0, top_k=3, layers=(1,), **FAST)
    moe = METHODS["ladimo"].convert(dense, ids(), cfg)
    assert [type(moe.mlp(i)).__name__ for i in range(3)] == ["Qwen2MLP", "MoEMLP", "Qwen2MLP"]
    assert moe.mlp(1).policy == RoutingPolicy("topk", k=3) and moe.mlp(1).gate_mode == "prob"
    assert all(torch.equal(v, dense.model.state_dict()[k]) for k, v in before.items())
    report = moe.conversion.as_dict()
    assert report["method"] == "ladimo" and [r["layer"] for r in report["layers"]] == [1]
    routing = report["layers"][0]["routing"]
    assert len(routing["mean_sorted_p"]) == 4 and sum(routing["mean_sorted_p"]) == pytest.approx(1, abs=1e-3)
    logits = moe.model(ids()).logits
    assert torch.isfinite(logits).all() and (logits - dense.model(ids()).logits).abs().max() > 1e-4


def test_dynamic_policy_and_run_config_section():
    run = from_dict(ConvertRun, {"method": "ladimo", "ladimo": {"n_experts": 4, "threshold": 0.7, **FAST}})
    moe = convert(tiny_model("llama"), ids(), run)
    assert all(moe.mlp(i).policy == RoutingPolicy("dynamic", threshold=0.7) for i in range(2))


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"n_experts": 4, "n_shared": 0, "top_k": 5}, "top_k must be 1..4"),
        ({"n_experts": 4, "n_shared": 4}, "n_shared"),
        ({"partition": "random"}, "partition"),
        ({"gate_mode": "cmoe"}, "gate_mode"),
        ({"threshold": 1.5}, "threshold"),
        ({"layers": [-1]}, "layers"),
    ],
)
def test_invalid_config_says_how_to_fix(bad, message):
    with pytest.raises(ValueError, match=message):
        from_dict(LaDiMoConfig, bad)


def test_more_experts_than_neurons_is_refused():
    with pytest.raises(ValueError, match="fewer experts"):
        convert(tiny_model("llama", intermediate_size=6), ids(), LaDiMoConfig(n_experts=8), method="ladimo")


def test_cancel_stops_the_conversion():
    with pytest.raises(Cancelled):
        convert(tiny_model("llama"), ids(), LaDiMoConfig(**FAST), method="ladimo", cancel=lambda: True)


def test_progress_moves_within_each_layer():
    seen = []
    cfg = LaDiMoConfig(n_experts=4, top_k=2, steps=60, batch_tokens=64)
    convert(tiny_model("llama"), ids(), cfg, method="ladimo", progress=lambda f, m: seen.append((f, m)))
    fractions, messages = [f for f, _ in seen], [m for _, m in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert "LaDiMo: layer 1/2, step 25/60" in messages and "LaDiMo: layer 2/2, step 50/60" in messages
    assert 0 < fractions[0] < 0.5  # before the first layer ends


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    from moe_core.checkpoint import load_converted, save_converted

    moe = convert(tiny_model("mistral"), ids(), LaDiMoConfig(n_experts=4, top_k=2, **FAST), method="ladimo")
    folder = save_converted(moe, tmp_path / "m", {"method": "ladimo"})
    back = load_converted(folder)
    assert isinstance(back.mlp(0), MoEMLP)
    torch.testing.assert_close(back.model(ids()).logits, moe.model(ids()).logits, rtol=0, atol=0)


def test_cli_convert_then_sweep_with_a_target(tmp_path, capsys):
    from moe_core.checkpoint import load_converted
    from moe_core.cli import main

    common = ["--model", "builtin:tiny-llama", "--text", "builtin:pydoc", "--n-sequences", "2"]
    common += ["--seq-len", "48", "--n-experts", "8", "--top-k", "2", "--steps", "10"]
    assert main(["convert", "--method", "ladimo", *common, "--out", str(tmp_path / "conv")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == "ladimo" and summary["active_ffn_share"] < 0.6
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(
        "sweep: {text: builtin:pydoc, skip_windows: 1, n_windows: 1, seq_len: 32, timing_tokens: 16, repeats: 1}\n"
    )
    args = ["sweep", "--config", str(cfg), "--model", str(tmp_path / "conv"), "--out", str(tmp_path / "sw")]
    assert main([*args, "--min-active-reduction", "0.3"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["plan"]["predicted"]["active_ffn_reduction"] >= 0.3
    assert {p.name for p in (tmp_path / "sw").iterdir()} >= {"sweep.json", "points.csv", "plan.json", "model"}
    # the planned model's run config converts again, to the same model (it was a SweepRun convert refused)
    again = [
        "convert",
        "--config",
        str(tmp_path / "sw" / "model" / "run_config.json"),
        "--out",
        str(tmp_path / "re"),
    ]
    assert main(again) == 0
    planned, rebuilt = load_converted(tmp_path / "sw" / "model"), load_converted(tmp_path / "re")
    assert rebuilt.run_config["plan"] == planned.run_config["plan"] is not None
    torch.testing.assert_close(rebuilt.model(ids()).logits, planned.model(ids()).logits, rtol=0, atol=1e-5)


def test_oracle_start_is_native_and_training_keeps_it_native():
    """The default start: router on oracle labels, refitted down projections, Qwen2-MoE's form."""
    dense = tiny_model("llama")
    x = calib_x(dense, 512)
    y = dense.mlp(1)(x).detach()
    cfg = LaDiMoConfig(n_experts=8, n_shared=2, top_k=2, steps=40, batch_tokens=128)
    gen = torch.Generator().manual_seed(0)
    block = build_block(dense, 1, x, cfg, gen, y)
    assert block.gate_mode == "prob" and block.router.kind == "linear" and block.shared_gate is not None
    k_T = torch.full((64,), 2)
    torch.testing.assert_close(
        masked_forward(block, x[:64], k_T)[0], block.forward_reference(x[:64]), rtol=1e-5, atol=1e-5
    )
    before = relative_mse(block, x, y, 2)
    with torch.enable_grad():
        train_block(block, x, y, cfg, gen)
    assert relative_mse(block, x, y, 2) < before
    assert block.gate_mode == "prob" and block.selection_bias.abs().max() == 0
