"""Light fine-tuning: u trains (the released code's bug would freeze it), LoRA merges away, b balances."""

from __future__ import annotations

import pytest
import torch
from test_evaluate import moe_copy

from moe_core import Cancelled
from moe_core.config import FinetuneConfig
from moe_core.finetune import (
    _blocks,
    _mask_expert_padding,
    _unload_nested,
    finetune,
    lora_config,
    training_ids,
)
from moe_core.model_io import tiny_model
from moe_core.moe import MoEMLP

FAST = FinetuneConfig(n_sequences=4, seq_len=16, batch_size=2, lr=1e-2, scale_lr=1e-2)


@pytest.fixture
def moe():
    return moe_copy(tiny_model("llama"))


@pytest.fixture
def ids():
    return torch.randint(4, 260, (4, 16), generator=torch.Generator().manual_seed(2))  # (N, T)


def snapshot(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def no_peft_left(model) -> bool:
    return not any(type(m).__module__.startswith("peft") for m in model.modules())


def test_get_peft_model_freezes_u(moe):
    """The bug this module fixes: peft freezes every non-LoRA parameter, the CMoE scales u included."""
    from peft import get_peft_model

    block = next(iter(_blocks(moe.model).values()))
    assert block.gate_scale.requires_grad
    get_peft_model(moe.model, lora_config(moe.model, FAST))
    assert not block.gate_scale.requires_grad


def test_u_trains_and_b_balances(moe, ids):
    stats = finetune(moe, ids, FAST)
    for block in _blocks(moe.model).values():
        assert block.gate_scale.abs().max() > 0  # frozen (the released code) it would still be exactly 0
        assert block.selection_bias.abs().max() > 0
        assert block.balance_gamma == 0.0  # training-only
    assert stats["u_abs_mean"] > 0 and stats["steps"] == 2 and stats["tokens"] == ids.numel()


def test_result_is_a_plain_model_with_moe_blocks(moe, ids):
    before = snapshot(moe.model)
    flags = {n: p.requires_grad for n, p in moe.model.named_parameters()}
    finetune(moe, ids, FAST)
    after = snapshot(moe.model)
    assert no_peft_left(moe.model) and not hasattr(moe.model, "peft_config")
    assert after.keys() == before.keys()  # no lora_A / base_layer entries left
    assert all(isinstance(moe.mlp(i), MoEMLP) for i in range(moe.n_layers))
    assert {n: p.requires_grad for n, p in moe.model.named_parameters()} == flags
    assert not moe.model.training
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    for name in (
        "self_attn.q_proj.weight",
        "mlp.gate_up_proj",
        "mlp.down_proj",
        "mlp.shared_expert.up_proj.weight",
    ):
        assert f"model.layers.0.{name}" in changed  # LoRA on attention, routed and shared experts merged in


def test_loss_decreases_on_a_repeated_batch(moe, ids):
    batch = ids[:1].repeat(12, 1)  # the same sequence 6 steps in a row
    stats = finetune(moe, batch, FinetuneConfig(batch_size=2, lr=1e-2, balance_gamma=0.0))
    assert stats["losses"][-1] < stats["losses"][0] - 0.1


def test_merged_weights_reproduce_the_lora_model(moe, ids):
    """Merging (stacked expert tensors and the shared expert's Linears nested in them) changes no logit."""
    from peft import get_peft_model

    peft_model = get_peft_model(moe.model, lora_config(moe.model, FAST))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)  # B starts at 0: make every adapter matter
        peft_model.eval()
        expected = peft_model(input_ids=ids).logits
        _unload_nested(moe.model, merge=True)
        peft_model.merge_and_unload()
        assert no_peft_left(moe.model)
        torch.testing.assert_close(moe.model(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_padding_of_narrow_experts_stays_zero(ids):
    """Zero-padded columns of a narrow expert get no LoRA delta, even after a training step and a merge."""
    from peft import get_peft_model

    moe = moe_copy(tiny_model("llama"), sizes=[48, 40, 36, 30])
    peft_model = get_peft_model(moe.model, lora_config(moe.model, FAST))
    _mask_expert_padding(peft_model, _blocks(moe.model))
    lora = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)  # B starts at 0: without the mask the padding would leak at once
    peft_model(input_ids=ids, labels=ids).loss.backward()
    torch.optim.Adam(lora, lr=1e-2).step()
    _unload_nested(moe.model, merge=True)
    peft_model.merge_and_unload()
    for block in _blocks(moe.model).values():
        for e, n in enumerate(block.expert_sizes):
            assert torch.count_nonzero(block.down_proj[e, :, n:]) == 0


def test_cancel_restores_the_model(moe, ids):
    before = snapshot(moe.model)
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 1  # let one step run, then cancel

    with pytest.raises(Cancelled):
        finetune(moe, ids, FAST, cancel=cancel)
    assert no_peft_left(moe.model)
    after = snapshot(moe.model)
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in moe.model.parameters())


def test_without_expert_lora_dropout_is_allowed_and_routed_experts_stay(moe, ids):
    before = snapshot(moe.model)
    finetune(moe, ids, FinetuneConfig(batch_size=2, expert_lora=False, lora_dropout=0.1))
    after = snapshot(moe.model)
    assert torch.equal(before["model.layers.0.mlp.gate_up_proj"], after["model.layers.0.mlp.gate_up_proj"])
    assert not torch.equal(before["model.layers.0.mlp.gate_scale"], after["model.layers.0.mlp.gate_scale"])


def test_prob_gates_leave_u_alone(ids):
    moe = moe_copy(tiny_model("llama"), gate_mode="prob")
    finetune(moe, ids, FAST)
    assert all(b.gate_scale.abs().max() == 0 for b in _blocks(moe.model).values())


def test_config_refuses_dropout_on_expert_lora():
    with pytest.raises(ValueError, match="lora_dropout"):
        FinetuneConfig(lora_dropout=0.1)
    with pytest.raises(ValueError, match="lr"):
        FinetuneConfig(lr=0)


def test_training_ids_follow_the_config():
    dense = tiny_model("llama")
    cfg = FinetuneConfig(text="builtin:pydoc", n_sequences=3, seq_len=20)
    ids = training_ids(dense, cfg)
    assert ids.shape == (3, 20) and torch.equal(ids, training_ids(dense, cfg))


def test_auto_text_falls_back_to_a_builtin_without_the_shared_data(monkeypatch, tmp_path):
    from moe_core.finetune import training_text

    assert training_text(FinetuneConfig(text="builtin:stdlib")) == "builtin:stdlib"
    monkeypatch.setenv("MOE_STUDIO_DATA", str(tmp_path / "absent"))
    assert training_text(FinetuneConfig()) == "builtin:pydoc"
    monkeypatch.setenv("MOE_STUDIO_DATA", str(tmp_path))
    assert training_text(FinetuneConfig()) == "shared:calib-wikipedia"


def test_cli_convert_fine_tunes_when_asked(tmp_path, capsys):
    import json

    from moe_core.checkpoint import load_converted
    from moe_core.cli import main

    config = tmp_path / "run.yaml"
    config.write_text(
        "model: {spec: 'builtin:tiny-llama'}\ndata: {text: 'builtin:pydoc', n_sequences: 2, seq_len: 32}\n"
        "finetune: {text: 'builtin:pydoc', n_sequences: 4, seq_len: 32, scale_lr: 0.1}\n"
        "routing: {router: method, form: analytic, refit: false}\n"  # CMoE's gates 1 + p u: u trains
    )
    out = tmp_path / "out"
    assert (
        main(["convert", "--config", str(config), "--experts", "S1A1E4", "--finetune", "--out", str(out)])
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finetune"]["steps"] == 2 and metrics["finetune"]["loss_last"] > 0
    assert json.loads((out / "run_config.json").read_text())["finetune"]["enabled"] is True
    u = load_converted(out).mlp(0).gate_scale
    assert u.abs().max() > 0  # the saved model is the tuned one: u starts at 0


def test_a_run_config_with_finetune_is_honoured_by_the_app_pipeline_and_its_command_line(tmp_path):
    import shlex

    from moe_core.cli import _run_config, build_parser
    from moe_core.config import ConvertRun, from_dict
    from moe_core.pipeline import command_line, convert_run

    tree = {
        "model": {"spec": "builtin:tiny-llama"},
        "data": {"text": "builtin:pydoc", "n_sequences": 2, "seq_len": 32},
        "cmoe": {"experts": "S1A1E4"},
        "finetune": {"enabled": True},
        "out": str(tmp_path / "o"),
    }
    cfg = from_dict(ConvertRun, tree)
    dense = tiny_model("llama")
    outcome = convert_run(
        dense, from_dict(ConvertRun, tree | {"finetune": {"enabled": True, "n_sequences": 2}})
    )
    assert outcome.metrics["finetune"]["steps"] == 1
    argv = shlex.split(command_line(cfg))
    assert "--finetune" in argv and "--config" not in argv  # flags alone say it all
    args = build_parser().parse_args(argv[3:])
    assert (
        _run_config(ConvertRun, args, {"finetune": {"enabled": True}, "cmoe": {"experts": "S1A1E4"}}) == cfg
    )
