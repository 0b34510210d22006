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
