import pytest
import torch

from moe_core.moe import MoEMLP, Router, RoutingPolicy


def random_partition(n_neurons: int, n_shared: int, n_experts: int, seed: int = 0):
    perm = torch.randperm(n_neurons, generator=torch.Generator().manual_seed(seed))
    shared, rest = perm[:n_shared], perm[n_shared:]
    return shared, list(rest.tensor_split(n_experts))  # unequal sizes when not divisible


def block_from(
    dense,
    layer: int,
    n_shared: int,
    n_experts: int,
    policy=None,
    router_kind="linear",
    gate_mode="cmoe",
    **kw,
):
    mlp = dense.mlp(layer)
    w_gate, w_up, w_down = dense.adapter.weights(mlp)
    act = dense.adapter.act_fn(mlp)
    shared, experts = random_partition(w_gate.shape[0], n_shared, n_experts)
    router = Router(w_gate.shape[1], n_experts, router_kind, act)
    torch.nn.init.normal_(router.weight, std=0.5)
    if router.up_weight is not None:
        torch.nn.init.normal_(router.up_weight, std=0.5)
    policy = policy or RoutingPolicy("topk", k=n_experts)
    act_name = dense.adapter.act_name(dense.model)
    return MoEMLP.from_dense(w_gate, w_up, w_down, act_name, shared, experts, router, policy, gate_mode, **kw)


@pytest.mark.parametrize("n_shared,n_experts", [(0, 4), (32, 5), (64, 7)])
def test_all_experts_active_reproduces_dense_mlp(tiny, n_shared, n_experts):
    """The first invariant: every expert on, unit gates -> the dense MLP, on every family."""
    block = block_from(tiny, 0, n_shared, n_experts, router_kind="cmoe")
    x = torch.randn(3, 11, 64)
    torch.testing.assert_close(block(x), tiny.mlp(0)(x), rtol=1e-5, atol=1e-5)


def test_whole_model_with_moe_layers_matches_dense(tiny):
    ids = torch.randint(0, 250, (2, 16))
    dense_logits = tiny.model(ids).logits
    for i in range(tiny.n_layers):
        tiny.adapter.set_mlp(tiny.model, i, block_from(tiny, i, 16, 4))
    torch.testing.assert_close(tiny.model(ids).logits, dense_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("gate_mode", ["cmoe", "prob", "renorm"])
@pytest.mark.parametrize(
    "policy",
    [
        RoutingPolicy("topk", k=1),
        RoutingPolicy("topk", k=3),
        RoutingPolicy("dynamic", threshold=0.6),
        RoutingPolicy("dynamic", threshold=0.9, max_k=2),
    ],
)
def test_fast_path_equals_reference(gate_mode, policy):
    from moe_core.model_io import tiny_model

    dense = tiny_model("llama")
    block = block_from(dense, 1, 24, 6, policy, gate_mode=gate_mode, expert_bias=torch.randn(6, 64))
    torch.nn.init.normal_(block.gate_scale, std=1.0)
    block.selection_bias.normal_(std=0.05)
    x = torch.randn(2, 9, 64)
    torch.testing.assert_close(block(x), block.forward_reference(x), rtol=1e-5, atol=1e-5)


def test_dynamic_policy_picks_smallest_set_reaching_threshold():
    from moe_core.model_io import tiny_model

    block = block_from(tiny_model("llama"), 0, 0, 5, RoutingPolicy("dynamic", threshold=0.7))
    x = torch.randn(50, 64)
    idx, gates, probs = block.route(x)
    for t in range(50):
        chosen = idx[t][idx[t] >= 0]
        mass = probs[t, chosen].sum()
        assert mass >= 0.7 - 1e-6 or len(chosen) == 5
        if len(chosen) > 1:  # dropping the weakest chosen expert must fall below the threshold
            assert mass - probs[t, chosen].min() < 0.7
        assert len(chosen) >= 1


def test_topk_larger_than_experts_is_refused():
    from moe_core.model_io import tiny_model

    with pytest.raises(ValueError, match="top-5"):
        block_from(tiny_model("llama"), 0, 0, 4, RoutingPolicy("topk", k=5))


def test_spec_roundtrip_rebuilds_identical_block():
    from moe_core.model_io import tiny_model

    block = block_from(tiny_model("gemma"), 0, 16, 4, RoutingPolicy("topk", k=2), router_kind="cmoe")
    again = MoEMLP.from_spec(block.spec())
    again.load_state_dict(block.state_dict())
    x = torch.randn(7, 64)
    torch.testing.assert_close(again(x), block(x))


def test_balancing_moves_bias_against_overloaded_experts():
    from moe_core.model_io import tiny_model

    block = block_from(tiny_model("llama"), 0, 0, 4, RoutingPolicy("topk", k=1))
    with torch.no_grad():
        block.router.weight.zero_()
        block.router.weight[2] += 1.0  # expert 2 wins for most tokens
    block.train()
    block.balance_gamma = 1e-3
    x = torch.randn(64, 64).abs()
    block(x)
    assert block.selection_bias[2] < 0 and (block.selection_bias[[0, 1, 3]] > 0).all()


def test_load_tracking_and_param_counts():
    from moe_core.model_io import tiny_model

    block = block_from(tiny_model("llama"), 0, 32, 4, RoutingPolicy("topk", k=2))
    block.track_load = True
    block(torch.randn(10, 64))
    assert block.load_counts.sum() == 20 and block.mean_active_experts() == 2.0
    counts = block.param_counts()
    assert counts["total"] == 3 * 64 * 192 + counts["router"]
    assert counts["active"] == 3 * 64 * (32 + 2 * 40) + counts["router"]


def test_a_cast_keeps_the_routing_state_in_float32(tiny):
    """.to(bfloat16) casts the experts only: at |b| >= 0.5 a bfloat16 selection bias would not move by
    CMoE's balancing step (gamma 1e-3), and the router's scores would round."""
    block = block_from(tiny, 0, 16, 4, RoutingPolicy("topk", k=1), router_kind="cmoe").to(torch.bfloat16)
    assert (
        block.gate_up_proj.dtype == torch.bfloat16
        and block.shared_expert.down_proj.weight.dtype == torch.bfloat16
    )
    routing = [block.selection_bias, block.gate_scale, block.load_counts, *block.router.parameters()]
    assert all(t.dtype == torch.float32 for t in routing)
    block.selection_bias.fill_(0.5)
    block.train()
    block.balance_gamma = 1e-3
    with torch.no_grad():
        block(torch.randn(32, 64, dtype=torch.bfloat16))
    assert (block.selection_bias != 0.5).any()


@pytest.mark.parametrize("tokens", [3, 9, 400])  # the decode, host-loop and grouped paths without autograd
@pytest.mark.parametrize("grad", [False, True])
def test_a_block_runs_under_bfloat16_autocast(tokens, grad):
    """Mixed precision: under torch.autocast the shared expert's output is bfloat16 and the routed experts'
    outputs are added into it in that dtype, on every path, close to float32."""
    from moe_core.model_io import tiny_model

    block = block_from(tiny_model("llama"), 1, 24, 6, RoutingPolicy("topk", k=2))
    x = torch.randn(1, tokens, 64)
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x)
    if grad:
        y.float().sum().backward()
        assert block.gate_up_proj.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(y.float(), block(x), rtol=0.05, atol=0.05)
