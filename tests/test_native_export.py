"""The native routing form (Qwen2-MoE's) is what the portable export serves: exact for every method."""

from __future__ import annotations

import json

import pytest
import torch

from moe_core.config import CMoEConfig, DIVEConfig, LaDiMoConfig, RoutingConfig
from moe_core.export import ExportConfig, export_model
from moe_core.export.routing import plan_routing
from moe_core.methods import convert
from moe_core.model_io import tiny_model

NATIVE = RoutingConfig(router="trained", form="native", refit=True)
CONFIGS = {
    "cmoe": CMoEConfig(experts="S2A2E8"),
    "ladimo": LaDiMoConfig(n_experts=8, n_shared=2, top_k=2, steps=5, batch_tokens=64),
    "dive": DIVEConfig(
        domains=("a=builtin:pydoc", "b=builtin:stdlib"),
        top_k=1,
        n_sequences=2,
        seq_len=64,
        eval_windows=1,
        max_chars=60_000,
    ),  # fmt: skip
}


def ids(n=8, length=64, seed=0):
    return torch.randint(4, 250, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def dense():
    return tiny_model("llama", n_layers=3)


def native_model(dense, method):
    moe = convert(dense, ids(), CONFIGS[method], method=method, routing=NATIVE)
    for i in range(moe.n_layers):
        block = moe.mlp(i)
        assert block.gate_mode == "prob" and block.router.kind == "linear"
        assert (block.shared_gate is not None) == (block.shared_expert is not None)
        assert block.expert_bias is None and not bool(block.selection_bias.abs().max() > 0)
    return moe


@pytest.mark.parametrize("method", list(CONFIGS))
def test_native_form_exports_exactly(dense, method, tmp_path):
    moe = native_model(dense, method)
    plan = plan_routing(moe)
    assert plan.exact, plan.summary()
    result = export_model(moe, tmp_path / "out", ExportConfig(format="portable"), calib_ids=ids(2, seed=3))
    f = result.fidelity
    assert result.exact_by_construction and f["identical"] and f["max_abs_logit_diff"] <= 1e-4
    assert f["loaded_class"] == "Qwen2MoeForCausalLM" and f["clean_process"]


def test_servable_budget_exports_exactly_with_dense_layers(dense, tmp_path):
    """A servable budget's model (one shape, some layers dense) in the native form is Qwen2-MoE with
    mlp_only_layers: exact in the portable export."""
    cfg = CMoEConfig(budget=0.6, layer_experts=("S2A2E8", "dense", "S2A2E8"), servable=True)
    moe = convert(dense, ids(), cfg, routing=NATIVE)
    result = export_model(moe, tmp_path / "out", ExportConfig(format="portable"), calib_ids=ids(2, seed=3))
    f = result.fidelity
    assert result.exact_by_construction and f["identical"] and f["max_abs_logit_diff"] <= 1e-4
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["mlp_only_layers"] == [1]
    with pytest.raises(ValueError, match="one shape"):
        CMoEConfig(budget=0.6, layer_experts=("S2A2E8", "S1A1E8", "dense"), servable=True)


def test_analytic_cmoe_is_approximated_and_says_so(dense, tmp_path):
    moe = convert(dense, ids(), CONFIGS["cmoe"])
    result = export_model(moe, tmp_path / "out", ExportConfig(format="portable"), calib_ids=ids(2, seed=3))
    assert not result.exact_by_construction and not result.fidelity["identical"]
    assert "approximation of" in (tmp_path / "out" / "README.md").read_text()


def test_native_form_exports_exactly_to_the_exact_format_too(dense, tmp_path):
    """The remote-code template runs the shared expert's sigmoid gate as MoEMLP does."""
    moe = native_model(dense, "cmoe")
    result = export_model(moe, tmp_path / "out", ExportConfig(format="exact"), calib_ids=ids(2, seed=3))
    assert result.fidelity["identical"] and result.fidelity["max_abs_logit_diff"] <= 1e-4


def test_engine_layout_padding_and_card(dense, tmp_path):
    """lm_head written, widths padded to 128 (exact), the card names the engines and what was checked."""
    import json

    moe = native_model(dense, "cmoe")
    cfg = ExportConfig(format="portable", width_align=128)
    result = export_model(moe, tmp_path / "out", cfg, calib_ids=ids(2, seed=3))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["moe_intermediate_size"] % 128 == 0 and config["shared_expert_intermediate_size"] % 128 == 0
    assert config["tie_word_embeddings"] is False and config["norm_topk_prob"] is False
    assert result.fidelity["identical"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Serving engines" in card and "vllm serve" in card and "sglang.launch_server" in card
    assert "SmolLM2" not in card  # a tiny Llama's card carries no other model's measurements
    with pytest.raises(ValueError, match="multiple of 8"):
        ExportConfig(width_align=100)


def test_a_unit_gate_top1_block_reaches_the_native_form_at_its_limit(dense):
    """Unit gates (the analytic form) are the native form's limit as its router sharpens: a top-1 analytic block
    put in the native form with a sharp router gives the same outputs, and it is a native block."""
    from moe_core.reconstruct import to_native_limit

    analytic = convert(dense, ids(), CMoEConfig(experts="S1A1E4"), routing=RoutingConfig(router="trained"))
    x = torch.randn(64, dense.model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    for i in range(analytic.n_layers):
        block = analytic.mlp(i)
        with torch.no_grad():
            before = block(x)
            to_native_limit(block, scale=1e4)
            torch.testing.assert_close(block(x), before, rtol=1e-4, atol=1e-5)
        assert block.gate_mode == "prob" and block.shared_gate is not None
    with pytest.raises(ValueError, match="top-1"):
        to_native_limit(
            convert(dense, ids(), CONFIGS["cmoe"], routing=RoutingConfig(router="trained")).mlp(0)
        )


@pytest.mark.parametrize("experts", ["S1A1E4", "S1A2E4"])
def test_a_top1_native_conversion_recovers_with_unit_gates_then_goes_native(dense, experts, tmp_path):
    """With one routed expert per token and distillation on, the routing step and distillation run in the
    analytic form and the saved model is native after (exact in the portable export); with two, in the
    native form throughout."""
    from moe_core.config import ConvertRun, from_dict
    from moe_core.pipeline import convert_run, recovers_with_unit_gates

    tree = {
        "model": {"spec": "builtin:tiny-llama"},
        "data": {"text": "builtin:pydoc", "n_sequences": 4, "seq_len": 32},
        "cmoe": {"experts": experts},
        "routing": {"form": "native"},
        "distill": {"text": "builtin:pydoc", "tokens": 64, "seq_len": 32, "eval_windows": 1},
    }
    cfg = from_dict(ConvertRun, tree)
    top1 = experts == "S1A1E4"
    assert recovers_with_unit_gates(cfg, dense.n_layers) == top1
    assert not recovers_with_unit_gates(from_dict(ConvertRun, tree | {"distill": {"enabled": False}}), 3)
    out = convert_run(dense, cfg)
    assert ("native_after_recovery" in out.metrics) == top1
    assert {out.moe.mlp(i).gate_mode for i in range(out.moe.n_layers)} == {"prob"}
    result = export_model(
        out.moe, tmp_path / "out", ExportConfig(format="portable"), calib_ids=ids(2, seed=3)
    )
    assert result.exact_by_construction and result.fidelity["max_abs_logit_diff"] <= 1e-4
