"""The routing rule has one implementation, MoEMLP.route; the copies that must exist elsewhere agree with it:
the CPU decode's host routing (moe_fast.route_host), the self-contained remote-code template an exact export
ships (it cannot import moe_core), and Qwen2-MoE's weights the portable export writes for a native block."""

import importlib.util

import pytest
import torch

from moe_core.export.routing import native_weights
from moe_core.moe import RoutingPolicy
from moe_core.moe_fast import DecodeWeights, route_host
from tests.test_moe_fast import POLICIES, routed_block

TEMPLATE = "moe_core/templates/modeling_moe_studio.py"
CASES = [(p, g, r) for p in POLICIES for g in ("cmoe", "prob", "renorm") for r in ("linear", "cmoe")]


def _template():
    spec = importlib.util.spec_from_file_location("modeling_moe_studio_under_test", TEMPLATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _block(policy, gate_mode, router_kind, temperature=1.0):
    block = routed_block(policy, gate_mode)
    if router_kind == "cmoe":  # CMoE's activation router, |scores|
        from moe_core.moe import Router

        block.router = Router(64, block.n_experts, "cmoe", block.act_fn, abs_scores=True)
        torch.nn.init.normal_(block.router.weight, std=0.5)
        torch.nn.init.normal_(block.router.up_weight, std=0.5)
    block.temperature = temperature
    return block


def _dense_gates(idx, gates, n_experts):  # (T, K) -> (T, E), unused slots (-1) dropped
    out = torch.zeros(idx.shape[0], n_experts + 1)
    return out.scatter_add_(1, idx.clamp(min=-1) % (n_experts + 1), gates.float())[:, :-1]


@pytest.mark.parametrize(
    "policy,gate_mode,router_kind", CASES, ids=lambda v: getattr(v, "label", lambda: v)()
)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_template_routes_as_route(policy, gate_mode, router_kind, temperature):
    block = _block(policy, gate_mode, router_kind, temperature)
    twin = _template().MoEBlock(block.spec())
    missing, unexpected = twin.load_state_dict(block.state_dict(), strict=False)
    assert not missing and not unexpected
    x = torch.randn(97, 64)
    with torch.no_grad():
        idx, gates, _ = block.route(x)
        t_idx, t_gates = twin.route(x)
        assert torch.equal(t_idx, idx)
        torch.testing.assert_close(t_gates, gates, rtol=0, atol=0)
        torch.testing.assert_close(twin(x), block.forward_reference(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "policy,gate_mode,router_kind", CASES, ids=lambda v: getattr(v, "label", lambda: v)()
)
def test_host_routing_of_the_decode_step_routes_as_route(policy, gate_mode, router_kind):
    block = _block(policy, gate_mode, router_kind, temperature=0.8)
    block._decode_weights = DecodeWeights(block)  # route_host reads whether scores are taken as |s|
    x = torch.randn(23, 64)
    with torch.no_grad():
        idx, gates, _ = block.route(x)
        choices = route_host(block, block.router(x).tolist())
    expected = _dense_gates(idx, gates, block.n_experts)
    got = torch.zeros_like(expected)
    for t, chosen in enumerate(choices):
        for e, g in chosen:
            got[t, e] = g
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)  # host maths in float64


@pytest.mark.parametrize("k", [1, 2, 3])
def test_qwen2_moe_weights_of_a_native_block_are_route(k):
    """The portable export writes Qwen2-MoE's routing: for a native block (linear router, prob gates, no
    selection bias) it is route() itself, which is why that export is exact."""
    block = routed_block(RoutingPolicy("topk", k=k), "prob")
    block.selection_bias.zero_()
    x = torch.randn(50, 64)
    with torch.no_grad():
        idx, gates, _ = block.route(x)
        qwen = native_weights(block.router(x), k, norm=False)
    torch.testing.assert_close(qwen, _dense_gates(idx, gates, block.n_experts), rtol=0, atol=1e-7)
