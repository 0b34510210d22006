"""The fast MoEMLP kernels (fused CPU decode, host loop, grouped matmuls for prefill) equal the reference."""

import copy
import pickle

import pytest
import torch
import torch.utils._python_dispatch
from safetensors.torch import load_file, save_file

from moe_core import moe_fast
from moe_core.model_io import tiny_model
from moe_core.moe import MoEMLP, RoutingPolicy
from moe_core.moe_fast import DECODE_MAX_PAIRS, HOST_LOOP_MAX_PAIRS, grouped_mm_ok
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
    if gate_mode == "prob":  # the native form: Qwen2-MoE's sigmoid gate on the shared expert
        block.add_shared_gate()
        torch.nn.init.normal_(block.shared_gate.weight, std=0.3)
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
    assert not grouped_mm_ok(block, x)
    with torch.inference_mode():
        torch.testing.assert_close(block(x), block.forward_reference(x), rtol=1e-5, atol=1e-5)


def test_bfloat16_decode_uses_the_host_loop(monkeypatch):
    block = routed_block(RoutingPolicy("topk", k=2)).to(torch.bfloat16)
    monkeypatch.setattr(
        moe_fast, "routed_grouped", lambda *_: pytest.fail("grouped_mm ran for a decode step")
    )
    monkeypatch.setattr(moe_fast, "decode", lambda *_: pytest.fail("the float32 decode path ran in bfloat16"))
    forbid_loop(block, monkeypatch)
    with torch.inference_mode():
        block(torch.randn(HOST_LOOP_MAX_PAIRS // 2, 64, dtype=torch.bfloat16))


def only_decode(block, monkeypatch):
    """Make every other inference path raise, so a test proves the fused CPU decode path ran."""
    for name in ("route", "_routed"):
        monkeypatch.setattr(block, name, lambda *_, name=name: pytest.fail(f"{name} ran for a decode step"))
    for name in ("routed_few", "routed_grouped"):
        monkeypatch.setattr(
            moe_fast, name, lambda *_, name=name: pytest.fail(f"{name} ran for a decode step")
        )


DECODE_CASES = [  # (policy, tokens): at most DECODE_MAX_PAIRS (token, expert) pairs
    (RoutingPolicy("topk", k=1), 1),
    (RoutingPolicy("topk", k=1), 4),
    (RoutingPolicy("topk", k=2), DECODE_MAX_PAIRS // 2),
    (RoutingPolicy("topk", k=3), 1),
    (RoutingPolicy("topk", k=2), 2),
    (RoutingPolicy("dynamic", threshold=0.6), 1),
    (RoutingPolicy("dynamic", threshold=0.9, max_k=2), 3),
]


@pytest.mark.parametrize("router_kind,abs_scores", [("linear", False), ("cmoe", False), ("cmoe", True)])
@pytest.mark.parametrize("n_shared,shared_gate", [(0, False), (13, False), (13, True)])
@pytest.mark.parametrize("gate_mode", ["cmoe", "prob", "renorm"])
@pytest.mark.parametrize(
    "policy,n_tokens", DECODE_CASES, ids=lambda c: c.label() if hasattr(c, "label") else f"T{c}"
)
def test_fused_decode_equals_reference(
    router_kind, abs_scores, n_shared, shared_gate, gate_mode, policy, n_tokens, monkeypatch
):
    """Every router kind, gate mode and policy; with and without a shared expert (gated or not); unequal
    expert widths (7 experts from 179 or 192 neurons: zero padding that the decode views skip); temperature;
    expert bias."""
    dense = tiny_model("llama")
    block = block_from(dense, 1, n_shared, 7, policy, router_kind, gate_mode, expert_bias=torch.randn(7, 64))
    if shared_gate:
        block.add_shared_gate()
        torch.nn.init.normal_(block.shared_gate.weight, std=0.3)
    block.router.abs_scores = abs_scores
    torch.nn.init.normal_(block.gate_scale, std=1.0)
    block.selection_bias.normal_(std=0.05)
    block.temperature = 0.7
    x = torch.randn(n_tokens, 1, 64)
    expected = block.forward_reference(x)
    only_decode(block, monkeypatch)
    with torch.inference_mode():
        got = block(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_more_pairs_than_the_decode_limit_use_grouped_matmuls(monkeypatch):
    block = routed_block(RoutingPolicy("topk", k=1))
    monkeypatch.setattr(
        moe_fast, "decode", lambda *_: pytest.fail("the decode path ran for a prefill-sized batch")
    )
    x = torch.randn(DECODE_MAX_PAIRS + 1, 64)
    with torch.inference_mode():
        torch.testing.assert_close(block(x), block.forward_reference(x), rtol=1e-5, atol=1e-5)


def test_fused_decode_parameters_alias_one_matrix_and_follow_updates():
    block = routed_block(RoutingPolicy("topk", k=2))
    x = torch.randn(1, 64)
    with torch.inference_mode():
        block(x)
    fused = block._decode_weights.fused_t.t()
    shared, router = block.shared_expert, block.router
    assert shared.gate_proj.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    assert router.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    with torch.no_grad():  # an in-place update (an optimiser step) reaches the fused matrix
        shared.up_proj.weight.mul_(-2.0)
        router.weight.add_(torch.randn_like(router.weight))
    with torch.inference_mode():
        torch.testing.assert_close(block(x), block.forward_reference(x), rtol=1e-5, atol=1e-5)
    before = block._decode_weights
    router.weight = torch.nn.Parameter(torch.randn_like(router.weight))  # a re-bound parameter: rebuilt
    with torch.inference_mode():
        torch.testing.assert_close(block(x), block.forward_reference(x), rtol=1e-5, atol=1e-5)
    assert block._decode_weights is not before


def test_training_after_fused_decode_updates_the_fused_weights():
    """Decoding under inference_mode must not leave inference tensors behind: training still works after."""
    block = routed_block(RoutingPolicy("topk", k=2), gate_mode="prob")
    x = torch.randn(1, 64)
    with torch.inference_mode():
        block(x)
    block.train()
    optimiser = torch.optim.SGD(block.parameters(), lr=0.1)
    block(torch.randn(8, 64)).pow(2).sum().backward()
    assert (
        block.shared_expert.gate_proj.weight.grad.abs().sum() > 0 and block.router.weight.grad.abs().sum() > 0
    )
    optimiser.step()
    block.eval()
    with torch.inference_mode():
        torch.testing.assert_close(block(x), block.forward_reference(x), rtol=1e-5, atol=1e-5)


def test_fused_decode_state_dict_saves_and_loads(tmp_path):
    block = routed_block(RoutingPolicy("topk", k=2))
    x = torch.randn(1, 64)
    with torch.inference_mode():
        expected = block(x)
    save_file(block.state_dict(), str(tmp_path / "block.safetensors"))  # views of one matrix: still saveable
    again = MoEMLP.from_spec(block.spec()).eval()
    again.load_state_dict(load_file(str(tmp_path / "block.safetensors")))
    with torch.inference_mode():
        torch.testing.assert_close(again(x), expected)


def test_decoded_block_deep_copies_and_pickles():
    block = routed_block(RoutingPolicy("topk", k=2))
    x = torch.randn(1, 64)
    with torch.inference_mode():
        expected = block(x)
    for again in (copy.deepcopy(block), pickle.loads(pickle.dumps(block))):
        assert again._decode_weights is None  # the cache stays behind; the copy builds its own
        with torch.inference_mode():
            torch.testing.assert_close(again(x), expected)
        assert again._decode_weights is not None


def test_fused_decode_tracks_load():
    block = routed_block(RoutingPolicy("topk", k=2))
    x = torch.randn(2, 64)
    block.track_load = True
    with torch.inference_mode():
        block(x)
    idx = block.route(x)[0]
    assert block.load_counts.tolist() == torch.bincount(idx.reshape(-1), minlength=6).float().tolist()
    assert (block.tokens_seen, block.slots_used) == (2, 4)


def test_wrapped_shared_projection_falls_back_to_the_host_loop(monkeypatch):
    """A shared projection that is not a plain Linear (as LoRA wraps it) is not fused."""

    class Wrapped(torch.nn.Linear):
        pass

    block = routed_block(RoutingPolicy("topk", k=2))
    old = block.shared_expert.gate_proj
    block.shared_expert.gate_proj = Wrapped(old.in_features, old.out_features, bias=False)
    block.shared_expert.gate_proj.weight.data.copy_(old.weight)
    monkeypatch.setattr(moe_fast, "decode", lambda *_: pytest.fail("a wrapped projection was fused"))
    x = torch.randn(1, 64)
    with torch.inference_mode():
        torch.testing.assert_close(block(x), block.forward_reference(x), rtol=1e-5, atol=1e-5)


def test_training_keeps_the_differentiable_path():
    block = routed_block(RoutingPolicy("topk", k=2), gate_mode="prob")
    x = torch.randn(5, 64, requires_grad=True)
    block(x).sum().backward()
    assert block.router.weight.grad.abs().sum() > 0 and block.gate_up_proj.grad.abs().sum() > 0
    assert x.grad is not None


@pytest.mark.parametrize(
    "policy",
    [RoutingPolicy("topk", k=1), RoutingPolicy("topk", k=2), RoutingPolicy("dynamic", threshold=0.6)],
)
def test_training_gradients_equal_the_reference(policy):
    """The sorted, one-gather training path: the gradients of the every-expert reference, for the input, the
    experts, their biases and gate scales (unused slots of the dynamic policy included)."""
    block = routed_block(policy)
    x = torch.randn(2, 13, 64)
    weights = torch.randn(2, 13, 64)
    grads = []
    for forward in (block.forward, block.forward_reference):
        xi = x.clone().requires_grad_(True)
        block.zero_grad(set_to_none=True)
        (forward(xi) * weights).sum().backward()
        grads.append([xi.grad, block.gate_up_proj.grad, block.down_proj.grad, block.expert_bias.grad,
                      block.gate_scale.grad])  # fmt: skip
    for got, expected in zip(*grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


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
            assert isinstance(block, MoEMLP) and grouped_mm_ok(block, ids.float())
            dense.adapter.set_mlp(dense.model, i, block)
        got = dense.model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        torch.testing.assert_close(dense.model(ids).logits, dense_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(got, expected)


def test_a_converted_model_runs_under_torch_compile():
    """torch.compile traces the dense parts; each MoE block runs eagerly inside the graph (a graph break)."""
    from moe_core.config import CMoEConfig
    from moe_core.methods import convert

    dense = tiny_model("llama", n_layers=1)
    ids = torch.randint(4, 260, (2, 16), generator=torch.Generator().manual_seed(3))
    moe = convert(dense, ids, CMoEConfig(experts="S1A1E4"))
    compiled = torch.compile(moe.model)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(ids).logits, moe.model(ids).logits, rtol=1e-4, atol=1e-4)


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Every aten op dispatched inside the block."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("k", [1, 3])
def test_fused_decode_runs_four_plus_five_k_kernels(k, monkeypatch):
    """The decode step's promise, counted instead of timed: one matmul + activation for the shared expert and
    router, the shared down projection, then 2 matmuls + activation + addmm_ per chosen expert."""
    block = routed_block(RoutingPolicy("topk", k=k), bias=False)
    x = torch.randn(1, 64)
    with torch.inference_mode():
        block(x)  # builds the fused weights
        with _OpCounter() as fused:
            block(x)
        monkeypatch.setattr(moe_fast, "DECODE_MAX_PAIRS", 0)  # the host loop it replaced
        with _OpCounter() as loop:
            block(x)
    compute = [
        op for op in fused.ops if op in {"mm", "addmm_", "silu_", "mul_", "linear", "addmm", "mul", "silu"}
    ]
    assert len(compute) == 4 + 5 * k, fused.ops
    assert len(fused.ops) < len(loop.ops) * 0.65, (fused.ops, loop.ops)


def test_adding_the_shared_gate_keeps_the_output_and_round_trips_through_the_spec(tmp_path):
    block = routed_block(RoutingPolicy("topk", k=2), "prob")
    x = torch.randn(5, 64)
    with torch.no_grad():
        before = block.forward_reference(x)
        block.add_shared_gate()
        torch.testing.assert_close(block.forward_reference(x), before, rtol=1e-6, atol=1e-6)
        torch.nn.init.normal_(block.shared_gate.weight, std=0.3)
        expected = block.forward_reference(x)
    rebuilt = MoEMLP.from_spec(block.spec())
    assert rebuilt.shared_gate is not None
    save_file(block.state_dict(), str(tmp_path / "b.safetensors"))
    rebuilt.load_state_dict(load_file(str(tmp_path / "b.safetensors")))
    with torch.inference_mode():
        torch.testing.assert_close(rebuilt.eval()(x), expected, rtol=1e-5, atol=1e-5)
