"""CMoE carving: dense equivalence, exact partitions, balanced optimal assignment, router, options."""

import itertools

import numpy as np
import pytest
import torch

from moe_core import Cancelled
from moe_core.config import CMoEConfig, ConvertRun, from_dict, parse_experts
from moe_core.methods import METHODS, convert
from moe_core.methods.cmoe import atopk_markers, balanced_assign, carve, distances, expert_sizes
from moe_core.model_io import tiny_model
from moe_core.moe import MoEMLP


def ids(n=3, t=24, seed=0):
    return torch.randint(0, 250, (n, t), generator=torch.Generator().manual_seed(seed))


def blocks(moe):
    return [moe.mlp(i) for i in range(moe.n_layers)]


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_every_expert_active_equals_dense(tiny, variant):
    """S1A7E8: the shared expert plus all 7 routed experts with unit gates is the dense FFN."""
    x = ids()
    moe = convert(tiny, x, CMoEConfig(experts="S1A7E8", variant=variant))
    assert all(isinstance(b, MoEMLP) for b in blocks(moe))
    torch.testing.assert_close(moe.model(x).logits, tiny.model(x).logits, rtol=1e-4, atol=1e-4)


def test_sparse_config_differs_from_dense_and_leaves_source_untouched():
    dense = tiny_model("qwen3")
    before = {k: v.clone() for k, v in dense.model.state_dict().items()}
    moe = convert(dense, ids(), CMoEConfig(experts="S1A1E8"))
    assert not any(isinstance(dense.mlp(i), MoEMLP) for i in range(dense.n_layers))
    assert all(torch.equal(v, dense.model.state_dict()[k]) for k, v in before.items())
    diff = (moe.model(ids()).logits - dense.model(ids()).logits).abs().max()
    assert diff > 1e-3 and torch.isfinite(moe.model(ids()).logits).all()


@pytest.mark.parametrize("intermediate,experts", [(192, "S2A2E8"), (190, "S2A2E8"), (190, "S0A3E8")])
def test_partition_covers_every_neuron_exactly_once(intermediate, experts):
    dense = tiny_model("llama", intermediate_size=intermediate)
    moe = convert(dense, ids(), CMoEConfig(experts=experts))
    n_shared, _, n_experts = parse_experts(experts)
    m, rest = divmod(intermediate, n_experts)
    for layer in moe.conversion.layers:
        sizes = layer["expert_sizes"]
        assert layer["shared_size"] + sum(sizes) == intermediate
        assert len(sizes) == n_experts - n_shared and max(sizes) - min(sizes) <= 1
        assert layer["shared_size"] == (n_shared * m + rest if n_shared else 0)
    # the blocks themselves hold every neuron once: all experts on -> dense outputs
    every = f"S{n_shared}A{n_experts - n_shared}E{n_experts}"
    full = convert(dense, ids(), CMoEConfig(experts=every))
    torch.testing.assert_close(full.model(ids()).logits, dense.model(ids()).logits, rtol=1e-4, atol=1e-4)


def test_carve_partition_and_representatives():
    g = torch.Generator().manual_seed(1)
    markers = (torch.rand(300, 100, generator=g) < torch.linspace(0.02, 0.4, 100)).float()  # (T, I)
    for metric in ("l1", "l2"):
        cut = carve(markers, n_shared=1, n_experts=5, iters=3, metric=metric)
        every = torch.cat([cut.shared, *cut.experts]).sort().values
        assert torch.equal(every, torch.arange(100))
        assert [e.numel() for e in cut.experts] == [20, 20, 20, 20]
        assert set(cut.shared.tolist()) == set(markers.mean(0).topk(20).indices.tolist())
        for rep, members in zip(cut.representatives.tolist(), cut.experts, strict=True):
            assert rep in members.tolist()


def test_balanced_assign_is_optimal_and_balanced():
    rng = np.random.default_rng(0)
    dist = rng.random((6, 3))
    got = balanced_assign(dist, [2, 2, 2])
    assert np.bincount(got).tolist() == [2, 2, 2]
    best = min(
        sum(dist[i, c] for i, c in enumerate(p))
        for p in itertools.product(range(3), repeat=6)
        if np.bincount(p, minlength=3).tolist() == [2, 2, 2]
    )
    assert np.isclose(sum(dist[i, c] for i, c in enumerate(got)), best)
    assert np.bincount(balanced_assign(rng.random((7, 3)), [3, 2, 2])).tolist() == [3, 2, 2]


def test_distances_match_cdist():
    feats = (torch.rand(40, 64) < 0.3).float()
    centroids = torch.rand(5, 64)
    for metric, p in (("l1", 1), ("l2", 2)):
        expected = torch.cdist(feats.double(), centroids.double(), p=p)
        torch.testing.assert_close(distances(feats, centroids, metric), expected, rtol=1e-5, atol=1e-5)


def test_expert_sizes_remainder_placement():
    assert expert_sizes(190, 2, 8) == (2 * 23 + 6, [23] * 6)
    assert expert_sizes(190, 0, 8) == (0, [24] * 6 + [23] * 2)
    with pytest.raises(ValueError, match="fewer than the 16 experts"):
        expert_sizes(10, 0, 16)


def test_atopk_markers_mark_k_per_token():
    dense = tiny_model("llama")
    w_gate, w_up, _ = dense.adapter.weights(dense.mlp(0))
    for normalise in (False, True):
        markers = atopk_markers(torch.randn(50, 64), w_gate, w_up, torch.nn.SiLU(), 7, normalise)
        assert markers.shape == (50, 192) and (markers.sum(1) == 7).all()


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_router_built_from_representatives(variant):
    dense = tiny_model("llama")
    moe = convert(dense, ids(), CMoEConfig(experts="S2A2E8", variant=variant))
    w_gate, w_up, _ = dense.adapter.weights(dense.mlp(1))
    block, reps = moe.mlp(1), moe.conversion.layers[1]["representatives"]
    rows_g, rows_u = w_gate[reps], w_up[reps]
    if variant == "code":
        rows_g, rows_u = (
            torch.nn.functional.normalize(rows_g, dim=-1),
            torch.nn.functional.normalize(rows_u, dim=-1),
        )
    torch.testing.assert_close(block.router.weight, rows_g)
    torch.testing.assert_close(block.router.up_weight, rows_u)
    assert block.router.abs_scores == (variant == "code") and block.gate_mode == "cmoe"
    assert block.policy.k == 2 and not block.gate_scale.any() and not block.selection_bias.any()
    for j, rep in enumerate(reps):  # the representative neuron is a member of its own expert
        w_expert = block.gate_up_proj[j, : block.expert_sizes[j]]
        assert (w_expert == w_gate[rep]).all(1).any()


def test_sequential_changes_only_later_layers():
    dense = tiny_model("mistral", n_layers=3)
    seq = convert(dense, ids(), CMoEConfig(experts="S1A1E4", sequential=True))
    par = convert(dense, ids(), CMoEConfig(experts="S1A1E4", sequential=False))
    same = [
        all(
            torch.equal(a, b)
            for a, b in zip(seq.mlp(i).state_dict().values(), par.mlp(i).state_dict().values(), strict=True)
        )
        for i in range(3)
    ]
    assert same[0] and not all(same[1:])


def test_layer_subset_and_iterations():
    dense = tiny_model("gemma", n_layers=3)
    moe = convert(dense, ids(), CMoEConfig(experts="S2A2E8", layers=[1], kmeans_iters=5))
    assert [isinstance(b, MoEMLP) for b in blocks(moe)] == [False, True, False]
    assert [r["layer"] for r in moe.conversion.layers] == [1]
    with pytest.raises(ValueError, match="do not exist"):
        convert(dense, ids(), CMoEConfig(layers=[3]))
    with pytest.raises(ValueError, match="k_act"):
        convert(dense, ids(), CMoEConfig(k_act=500))


def test_cancel_and_progress():
    seen = []
    convert(tiny_model("llama"), ids(), progress=lambda f, m: seen.append(f))
    assert seen[-1] == 1.0
    with pytest.raises(Cancelled):
        convert(tiny_model("llama"), ids(), cancel=lambda: True)


@pytest.mark.parametrize(
    "text,message",
    [
        ("S2A2", "not of the form"),
        ("2-2-8", "not of the form"),
        ("S8A1E8", "S <= E-1"),
        ("S2A7E8", "1..6"),
        ("S1A0E8", "1..7"),
        ("S0A1E1", "at least 2 experts"),
    ],
)
def test_experts_string_errors(text, message):
    with pytest.raises(ValueError, match=message):
        CMoEConfig(experts=text)


def test_config_parsing_and_registry():
    assert parse_experts(" s3a3e8 ") == (3, 3, 8)
    run = from_dict(ConvertRun, {"cmoe": {"experts": "S2A2E16", "layers": [3, 1, 3]}, "out": "x"})
    assert run.section().shape == (2, 2, 16) and run.cmoe.layers == (1, 3)
    for bad in ({"cmoe": {"variant": "fast"}}, {"method": "nope"}, {"cmoe": {"colour": 1}}):
        with pytest.raises(ValueError):
            from_dict(ConvertRun, bad)
    assert {"cmoe", "ladimo"} <= set(METHODS)
    with pytest.raises(ValueError, match="Unknown conversion method"):
        convert(tiny_model("llama"), ids(), method="nope")


def test_progress_names_the_per_layer_shapes_of_a_budget_not_the_unused_default():
    from moe_core.methods.cmoe import _shapes_label

    assert _shapes_label(CMoEConfig(experts="S2A2E8")) == "S2A2E8"
    budget = CMoEConfig(layer_experts=("dense", "S1A1E8", "S2A1E8", "S1A1E8"))
    assert _shapes_label(budget) == "per-layer (S1A1E8, S2A1E8)"
    assert _shapes_label(CMoEConfig(layer_experts=("dense", "S3A1E8"))) == "S3A1E8"


def test_token_experts_find_overlapping_neuron_sets_that_a_partition_cannot():
    """Four token groups, each needing its own window of 10 neurons, windows overlapping by 5; 10 neurons no
    group needs. A partition into 4 experts of 10 cannot hold two overlapping windows; cutting experts around
    the token groups finds each window, shares the overlaps and leaves the unneeded neurons out."""
    from moe_core.methods.cmoe import carve_features, token_experts

    g = torch.Generator().manual_seed(0)
    windows = [range(0, 10), range(5, 15), range(15, 25), range(20, 30)]
    feats = torch.rand(40, 400, generator=g) * 0.01  # (I, T): background contributions
    for j, window in enumerate(windows):
        feats[list(window), j * 100 : (j + 1) * 100] += 1.0 + torch.rand(10, 100, generator=g)
    partition = carve_features(feats, feats.mean(1), n_shared=0, n_experts=4, iters=3, metric="cosine")
    cut = token_experts(feats, partition)

    def captured(c):  # each token's best expert's share of its contribution, averaged
        member = torch.zeros(4, 40)
        for j, e in enumerate(c.experts):
            member[j, e] = 1.0
        share = feats.T / feats.T.sum(1, keepdim=True)
        return float((share @ member.T).max(1).values.mean())

    assert sorted(tuple(e.tolist()) for e in cut.experts) == [tuple(w) for w in windows]
    assert [e.numel() for e in cut.experts] == [10, 10, 10, 10]  # sizes kept
    assert captured(cut) > captured(partition) + 0.2
    for rep, members in zip(cut.representatives.tolist(), cut.experts, strict=True):
        assert rep in members.tolist()


def test_token_experts_skip_the_shared_neurons_and_only_cut_top1_layers():
    """cluster_on=tokens: a top-1 layer's routed experts avoid the shared expert and may overlap; a layer that
    routes two experts per token keeps the magnitude partition (token groups measured worse there)."""
    dense, x = tiny_model("llama", intermediate_size=96), ids(4, 32)
    one = convert(dense, x, CMoEConfig(experts="S2A1E8", cluster_on="tokens"))
    for layer in one.conversion.layers:
        assert layer["shared_size"] == 24 and layer["expert_sizes"] == [12] * 6
    two = {
        mode: convert(dense, x, CMoEConfig(experts="S2A2E8", cluster_on=mode))
        for mode in ("tokens", "magnitude")
    }
    torch.testing.assert_close(two["tokens"].model(x).logits, two["magnitude"].model(x).logits)
    from moe_core.methods.cmoe import carve_features, magnitude_features, token_experts

    mlp = dense.mlp(0)
    w_gate, w_up, w_down = dense.adapter.weights(mlp)
    h = torch.randn(200, dense.model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    feats = magnitude_features(h, w_gate, w_up, w_down, dense.adapter.act_fn(mlp))
    cut = token_experts(feats, carve_features(feats, feats.mean(1), 2, 8, 1, "cosine"))
    shared = set(cut.shared.tolist())
    assert all(not shared & set(e.tolist()) for e in cut.experts)
    with pytest.raises(ValueError, match="markers, magnitude or tokens"):
        CMoEConfig(cluster_on="neurons")
