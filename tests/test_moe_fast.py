"""The fast MoEMLP kernels (host loop for decode, grouped matmuls for prefill) equal the reference."""

import pytest
import torch

from moe_core.model_io import tiny_model
from moe_core.moe import HOST_LOOP_MAX_PAIRS, MoEMLP, RoutingPolicy
from tests.test_moe import block_from

POLICIES = [
    RoutingPolicy("topk", k=1),
    RoutingPolicy("topk", k=3),
    RoutingPolicy("dynamic", threshold=0.6),
    RoutingPolicy("dynamic", threshold=0.9, max_k=2),
]


def routed_block(policy, gate_mode="cmoe", n_shared=24, n_experts=6, bias=True):
    """Tiny Llama layer 1 cut into experts, with non-trivial gates, selection bias and expert bias."""
    dense = tiny_model("llama")
    expert_bias = torch.randn(n_experts, 64) if bias else None
    block = block_from(dense, 1, n_shared, n_experts, policy, gate_mode=gate_mode, expert_bias=expert_bias)
    torch.nn.init.normal_(block.gate_scale, std=1.0)
    block.selection_bias.normal_(std=0.05)
    return block


def forbid_loop(block, monkeypatch):
    """Make the differentiable loop raise, so a test proves a fast kernel ran."""

    def fail(*_):
        raise AssertionError("the loop path ran instead of a fast kernel")

    monkeypatch.setattr(block, "_routed", fail)


@pytest.mark.parametrize("gate_mode", ["cmoe", "prob", "renorm"])
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.label())
@pytest.mark.parametrize("n_tokens", [1, 2, 37, 300], ids=lambda n: f"T{n}")
def test_fast_kernels_equal_reference_float32(gate_mode, policy, n_tokens, monkeypatch):
    block = routed_block(policy, gate_mode)  # widths 28: rows 16-byte aligned, so grouped_mm is eligible
    x = torch.randn(n_tokens, 64)
    expected = block.forward_reference(x)
    forbid_loop(block, monkeypatch)
    with torch.inference_mode():
        got = block(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_tokens", [1, 64])
def test_fast_kernels_in_bfloat16_track_float32(n_tokens):
    block = routed_block(RoutingPolicy("topk", k=2))
    x = torch.randn(n_tokens, 64)
    with torch.inference_mode():
        expected32, idx32 = block(x), block.route(x)[0]
        block16, x16 = block.to(torch.bfloat16), x.to(torch.bfloat16)
        got, reference16, idx16 = block16(x16), block16.forward_reference(x16), block16.route(x16)[0]
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, reference16, rtol=2e-2, atol=2e-2)
    same = (idx16 == idx32).all(-1)  # bf16 may flip a near-tied routing choice; compare the rest
    assert same.float().mean() > 0.8
    torch.testing.assert_close(got.float()[same], expected32[same], rtol=5e-2, atol=5e-2)


def test_unaligned_widths_fall_back_to_the_loop():
    block = routed_block(RoutingPolicy("topk", k=2), n_shared=13, n_experts=7)  # widths 25: not aligned
    x = torch.randn(3, 40, 64)
    assert not block._grouped_mm_ok(x)
    with torch.inference_mode():
        torch.testing.assert_close(block(x), block.forward_reference(x), rtol=1e-5, atol=1e-5)


def test_decode_sizes_use_the_host_loop(monkeypatch):
    block = routed_block(RoutingPolicy("topk", k=2))
    monkeypatch.setattr(block, "_routed_grouped", lambda *_: pytest.fail("grouped_mm ran for a decode step"))
    forbid_loop(block, monkeypatch)
    with torch.inference_mode():
        block(torch.randn(HOST_LOOP_MAX_PAIRS // 2, 64))


def test_training_keeps_the_differentiable_path():
    block = routed_block(RoutingPolicy("topk", k=2), gate_mode="prob")
    x = torch.randn(5, 64, requires_grad=True)
    block(x).sum().backward()
    assert block.router.weight.grad.abs().sum() > 0 and block.gate_up_proj.grad.abs().sum() > 0
    assert x.grad is not None


@pytest.mark.parametrize("family", ["llama", "gemma", "phi3"])
def test_generate_with_kv_cache_matches_dense_when_every_expert_is_on(family):
    """Decode (host loop) and prefill (grouped_mm) inside a real model: all experts on = the dense model."""
    dense = tiny_model(family)
    ids = torch.randint(0, 250, (1, 12))
    with torch.inference_mode():
        expected = dense.model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        dense_logits = dense.model(ids).logits
        for i in range(dense.n_layers):
            block = block_from(dense, i, 32, 4, RoutingPolicy("topk", k=4))
            assert isinstance(block, MoEMLP) and block._grouped_mm_ok(ids.float())
            dense.adapter.set_mlp(dense.model, i, block)
        got = dense.model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        torch.testing.assert_close(dense.model(ids).logits, dense_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(got, expected)
