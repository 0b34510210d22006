"""Layer-wise routing (oracle labels, trained routers, least-squares refits), per-layer budgets."""

import itertools
import math

import pytest
import torch

from moe_core.budget import Sensitivity, active_share, allocate, candidate_shapes, measure_sensitivity
from moe_core.config import CMoEConfig, RoutingConfig
from moe_core.methods import convert
from moe_core.methods.cmoe import carve_block
from moe_core.model_io import tiny_model
from moe_core.moe import RoutingPolicy
from moe_core.reconstruct import (
    ReconstructSettings,
    expert_outputs,
    linear_router,
    oracle_experts,
    oracle_routing,
    reconstruct_block,
    refit_down,
    relative_error,
    to_native,
    train_router,
)


def calibration(dense, n=8, length=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, len(dense.tokenizer), (n, length), generator=g)


def layer_data(dense, layer=1, n=8):
    """(x, y): what the MLP of ``layer`` receives on random tokens, and what it returns."""
    from moe_core.layerwise import capture_layer_inputs, ffn_inputs, run_layer

    inputs = capture_layer_inputs(dense, calibration(dense, n))
    layers = dense.adapter.layers(dense.model)
    for i in range(layer):
        inputs = run_layer(layers[i], inputs)
    x = ffn_inputs(layers[layer], dense.mlp(layer), inputs)
    with torch.no_grad():
        return x, dense.mlp(layer)(x)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", intermediate_size=192)


def test_oracle_sets_are_the_best_sets(llama):
    x, y = layer_data(llama)
    block, _ = carve_block(llama, 1, x, CMoEConfig(experts="S1A2E6"))
    x, y = x[:40], y[:40]
    got = oracle_experts(block, x, y, 2)
    o, target = expert_outputs(block, x), y - block.shared(x)
    for t in range(len(x)):
        errors = {
            s: float((target[t] - o[t, list(s)].sum(0)).pow(2).sum())
            for s in itertools.combinations(range(5), 2)
        }
        best = min(errors.values())
        assert errors[tuple(sorted(got[t].tolist()))] <= best * (1 + 1e-4) + 1e-6


def test_greedy_oracle_is_used_for_many_sets_and_is_close(llama, monkeypatch):
    import moe_core.reconstruct as rec

    x, y = layer_data(llama)
    block, _ = carve_block(llama, 1, x, CMoEConfig(experts="S0A3E12"))
    exhaustive = oracle_experts(block, x, y, 3)
    monkeypatch.setattr(rec, "EXHAUSTIVE_MAX_SETS", 1)
    greedy = oracle_experts(block, x, y, 3)

    def err(sets):
        return relative_error(rec._routed_by(block, x, sets), y)

    assert err(exhaustive) <= err(greedy) + 1e-6
    assert err(greedy) < 1.2 * err(exhaustive)


@pytest.mark.parametrize("batch", [16384, 300])  # full batch; minibatches in passes over the 2000 tokens
def test_router_learns_separable_labels(batch):
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 3
    labels = torch.randint(0, 4, (2000,), generator=g)
    x = centres[labels] + torch.randn(2000, 16, generator=g) * 0.3
    w = train_router(x, labels[:, None], 4, batch=batch)
    assert float(((x @ w.T).argmax(-1) == labels).float().mean()) > 0.98
    assert torch.equal(w, train_router(x, labels[:, None], 4, batch=batch))  # seeded


def test_refit_recovers_known_down_projections(llama):
    x, _ = layer_data(llama, n=16)
    block, _ = carve_block(llama, 1, x, CMoEConfig(experts="S1A2E4"))
    with torch.no_grad():
        target = block(x)
        block.down_proj.normal_(std=0.1)
        block.shared_expert.down_proj.weight.normal_(std=0.1)
    assert relative_error(block(x), target) > 0.5
    refit_down(block, x, target, ridge=1e-9)
    assert relative_error(block(x), target) < 1e-6


def dense_features(block, x):
    """The block output's linear features as one dense (T, D) matrix, zeros included: what refit_down's
    block-by-block normal equations must equal."""
    feats = []
    if block.shared_expert is not None:
        s = block.shared_expert
        h = s.act_fn(s.gate_proj(x)) * s.up_proj(x)
        feats.append(h * torch.sigmoid(block.shared_gate(x)) if block.shared_gate is not None else h)
    idx, gates, _ = block.route(x)
    weights = torch.zeros(x.shape[0], block.n_experts)
    for slot in range(idx.shape[1]):
        used = idx[:, slot] >= 0
        weights[used, idx[used, slot]] += gates[used, slot]
    width = block.down_proj.shape[-1]
    for e, n in enumerate(block.expert_sizes):
        g = x @ block.gate_up_proj[e, :n].T
        u = x @ block.gate_up_proj[e, width : width + n].T
        feats.append(block.act_fn(g) * u * weights[:, e : e + 1])
    if block.expert_bias is not None:
        feats.append(weights)
    return torch.cat(feats, dim=1).double()


@pytest.mark.parametrize("case", ["top1", "top2", "bias", "native", "dynamic"])
def test_refit_solves_the_dense_normal_equations(llama, case):
    """The refit builds the normal matrix only where features can be non-zero (an expert's columns on its own
    tokens); its solution is the ridge solution of the dense feature matrix, whatever the routing."""
    from moe_core.reconstruct import add_expert_bias

    x, y = layer_data(llama, n=16)
    block, _ = carve_block(llama, 1, x, CMoEConfig(experts="S1A2E4" if case == "top2" else "S1A1E4"))
    with torch.no_grad():
        if case == "bias":
            add_expert_bias(block)
        if case == "native":
            to_native(block, torch.randn(block.n_experts, 64) * 0.5)
        if case == "dynamic":
            block.router = linear_router(torch.randn(block.n_experts, 64))
            block.policy = RoutingPolicy("dynamic", threshold=0.6)
        refit_down(block, x, y, ridge=1e-3, chunk=100)  # several chunks, some experts absent from some
        phi = dense_features(block, x)
    gram = phi.T @ phi
    n_hidden = gram.shape[0] - (block.n_experts if case == "bias" else 0)
    gram.diagonal().add_(1e-3 * gram.diagonal()[:n_hidden].mean())
    want = torch.linalg.solve(gram, phi.T @ y.double()).T  # (H, D)
    got = [block.shared_expert.down_proj.weight]
    got += [block.down_proj[e, :, :n] for e, n in enumerate(block.expert_sizes)]
    got += [block.expert_bias.T] if case == "bias" else []
    torch.testing.assert_close(torch.cat(got, dim=1).double(), want, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("form", ["analytic", "native"])
def test_reconstruct_beats_the_analytic_router(llama, form):
    x, y = layer_data(llama, n=32)
    block, _ = carve_block(llama, 1, x, CMoEConfig(experts="S2A2E8"))
    info = reconstruct_block(block, x, y, ReconstructSettings(router="trained", form=form, refit=True))
    assert info["error"] < info["error_before"]
    assert info["error_oracle"] <= info["error"] + 1e-6
    assert info["oracle_overlap"] > 2 / 6  # better than chance
    if form == "native":
        assert block.gate_mode == "prob" and block.router.kind == "linear" and block.shared_gate is not None


def test_compensation_biases_lower_the_refit_error_and_save(llama, tmp_path):
    """routing.compensate: the refit also fits a bias per routed expert (FLAP's compensation is one such fit),
    so on the tokens it fits the error can only go down; the biases run on every path and reload."""
    x, y = layer_data(llama, n=32)
    errors = {}
    for compensate in (False, True):
        block, _ = carve_block(llama, 1, x, CMoEConfig(experts="S2A2E8"))
        settings = ReconstructSettings(router="trained", refit=True, holdout=0.01, compensate=compensate)
        reconstruct_block(block, x, y, settings)
        errors[compensate] = relative_error(block(x), y)
        assert (block.expert_bias is not None) == compensate
    assert errors[True] < errors[False]
    with torch.inference_mode():
        torch.testing.assert_close(block(x[:1]), block.forward_reference(x[:1]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="compensate"):
        RoutingConfig(form="native", compensate=True)


def test_to_native_keeps_a_linear_prob_block_exact(llama):
    x, _ = layer_data(llama)
    block, _ = carve_block(llama, 1, x, CMoEConfig(experts="S2A2E8"))
    w = torch.randn(6, 64) * 0.1
    to_native(block, w)
    with torch.no_grad():
        before = block(x)
        block.add_shared_gate()  # already gated: no change
        torch.testing.assert_close(block(x), before)
    assert torch.equal(block.router.weight, w)


def test_convert_with_routing_and_the_oracle_bound(llama):
    ids = calibration(llama, 16)
    cfg = CMoEConfig(experts="S2A2E8")
    moe = convert(llama, ids, cfg, routing=RoutingConfig(router="trained", refit=True))
    layers = moe.conversion.layers
    assert all(
        "routing" in info and info["routing"]["error"] < info["routing"]["error_before"] for info in layers
    )
    from moe_core.evaluate import perplexity

    windows = calibration(llama, 2, seed=5)
    routed = perplexity(moe, windows)
    with oracle_routing(moe, llama):
        bound = perplexity(moe, windows)
    assert perplexity(moe, windows) == pytest.approx(routed)  # routing is back afterwards
    assert bound != pytest.approx(routed)


def test_native_router_is_sharpened_to_the_best_scale(llama):
    """The native form tries router scales, each with a refit, and keeps the one with the least held-out
    error; the experts chosen per token do not move."""
    import copy

    from moe_core.reconstruct import sharpen_router

    x, y = layer_data(llama, n=16)
    block, _ = carve_block(llama, 1, x, CMoEConfig(experts="S1A1E4"))
    report = reconstruct_block(block, x, y, ReconstructSettings(form="native", sharpen=(1.0,)), layer=1)
    assert "router_scale" not in report  # one scale: nothing to choose
    xt, yt, xv, yv = x[:400], y[:400], x[400:], y[400:]
    before = block.route(xv)[0]
    errors = {}
    for a in (1.0, 3.0, 20.0):
        trial = copy.deepcopy(block)
        with torch.no_grad():
            trial.router.weight.mul_(a)
        refit_down(trial, xt, yt)
        with torch.no_grad():
            errors[a] = relative_error(trial(xv), yv)
    chosen = sharpen_router(block, xt, yt, xv, yv, (1.0, 3.0, 20.0))
    assert chosen == min(errors, key=errors.get)
    with torch.no_grad():
        assert relative_error(block(xv), yv) == pytest.approx(errors[chosen], rel=1e-5)
    assert torch.equal(block.route(xv)[0], before)
    report = reconstruct_block(
        carve_block(llama, 1, x, CMoEConfig(experts="S1A1E4"))[0], x, y, ReconstructSettings(form="native"), 1
    )
    assert report["router_scale"] in ReconstructSettings().sharpen


def test_ladimo_routes_each_layer_before_it_trains_and_not_again(llama):
    """LaDiMo's routing step is its oracle initialisation, inside its layer loop; no routing section re-routes
    what it trained (a second step after training measured worse on SmolLM2, 65.67 -> 66.71 .. 75.27)."""
    from moe_core.config import LaDiMoConfig

    ids = calibration(llama, 8)
    cfg = LaDiMoConfig(steps=2, top_k=2)
    models = [
        convert(llama, ids, cfg, method="ladimo", routing=routing)
        for routing in (None, RoutingConfig(), RoutingConfig(router="trained", form="native"))
    ]
    for moe in models:
        layers = moe.conversion.layers
        assert len(layers) == llama.n_layers and all("error" in info["routing_step"] for info in layers)
        assert not moe.conversion.routing  # no second pass
        assert moe.mlp(0).gate_mode == "prob" and moe.mlp(0).router.kind == "linear"
        for name, tensor in models[0].model.state_dict().items():
            torch.testing.assert_close(moe.model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    with_split = convert(llama, ids, LaDiMoConfig(steps=2, top_k=2, router_init="random"), method="ladimo")
    assert all("routing_step" not in info for info in with_split.conversion.layers)  # no oracle init, no step


# ---------------------------------------------------------------------------------------------
# Budgets


def test_allocation_is_optimal_and_within_budget():
    g = torch.Generator().manual_seed(0)
    shapes = candidate_shapes(8)
    kl = (torch.rand(4, len(shapes), generator=g) * torch.linspace(1, 0.1, len(shapes))).tolist()
    sens = Sensitivity(shapes, kl, tokens=10)
    for budget in (0.3, 0.5, 0.8):
        chosen = allocate(sens, budget)
        assert sum(active_share(s) for s in chosen) / 4 <= budget + 1e-9
        options = shapes + ["dense"]
        best = math.inf
        for combo in itertools.product(range(len(options)), repeat=4):
            share = sum(active_share(options[c]) for c in combo) / 4
            if share <= budget + 1e-9:
                best = min(best, sum(0.0 if c == len(shapes) else kl[i][c] for i, c in enumerate(combo)))
        got = sum(0.0 if s == "dense" else kl[i][shapes.index(s)] for i, s in enumerate(chosen))
        assert got == pytest.approx(best)


def test_servable_allocation_is_the_best_single_shape():
    """servable: one shape in every converted layer (Qwen2-MoE's form), the best such choice, never better
    than the free allocation."""
    g = torch.Generator().manual_seed(1)
    shapes = candidate_shapes(8)
    kl = (torch.rand(5, len(shapes), generator=g) * torch.linspace(1, 0.1, len(shapes))).tolist()
    sens = Sensitivity(shapes, kl, tokens=10)

    def summed(chosen):
        return sum(0.0 if s == "dense" else kl[i][shapes.index(s)] for i, s in enumerate(chosen))

    for budget in (0.3, 0.5, 0.8):
        chosen = allocate(sens, budget, servable=True)
        assert len(set(chosen) - {"dense"}) == 1 and sum(map(active_share, chosen)) / 5 <= budget + 1e-9
        best = math.inf
        for c, shape in enumerate(shapes):
            for converted in itertools.product((False, True), repeat=5):
                share = sum(active_share(shape) if on else 1.0 for on in converted) / 5
                if share <= budget + 1e-9:
                    best = min(best, sum(kl[i][c] for i, on in enumerate(converted) if on))
        assert summed(chosen) == pytest.approx(best)
        assert summed(chosen) >= summed(allocate(sens, budget)) - 1e-12


def test_allocation_refuses_an_impossible_budget():
    sens = Sensitivity(candidate_shapes(8), [[0.1] * 7] * 3, tokens=10)
    with pytest.raises(ValueError, match="below the smallest shape"):
        allocate(sens, 0.05)


def test_sensitivity_is_measured_per_layer_and_shape(llama):
    shapes = ["S0A1E4", "S1A2E4"]
    sens = measure_sensitivity(
        llama, calibration(llama, 4), calibration(llama, 2, seed=3), CMoEConfig(), shapes=shapes
    )
    assert len(sens.kl) == llama.n_layers and all(len(row) == 2 for row in sens.kl)
    assert all(v >= 0 for row in sens.kl for v in row)
    assert sum(row[1] for row in sens.kl) < sum(row[0] for row in sens.kl)  # 3/4 active loses less than 1/4


@torch.no_grad()
def test_sensitivity_is_the_kl_of_the_whole_model_with_that_layer_alone_converted(llama):
    """Checked against the plain forward of a copy of the model with one MLP swapped for the carved block (the
    measurement walks the layers once, every held-out set through layer i, then layer i + 1)."""
    import copy

    from moe_core.config import parse_experts

    shapes = ["S0A1E4", "S1A2E4"]
    calib, held = calibration(llama, 4), calibration(llama, 2, seed=3)
    cfg = CMoEConfig()
    sens = measure_sensitivity(llama, calib, held, cfg, shapes=shapes)
    ref = torch.log_softmax(llama.model(held).logits[:, :-1].float(), -1).flatten(0, 1)
    for i in (0, llama.n_layers - 1):
        x, _ = layer_data(llama, layer=i, n=4)  # what layer i's MLP receives on calib
        for c, shape in enumerate(shapes):
            block, _ = carve_block(llama, i, x, cfg, parse_experts(shape))
            model = copy.deepcopy(llama.model)
            llama.adapter.layers(model)[i].mlp = block
            logp = torch.log_softmax(model(held).logits[:, :-1].float(), -1).flatten(0, 1)
            kl = float((ref.exp() * (ref - logp)).sum(-1).mean())
            assert sens.kl[i][c] == pytest.approx(kl, rel=1e-4, abs=1e-7), (i, shape)


def test_fast_sensitivity_measures_the_middle_shape_and_scales_the_rest(llama):
    shapes = ["S0A1E4", "S1A1E4", "S1A2E4"]
    calib, held = calibration(llama, 4), calibration(llama, 2, seed=3)
    full = measure_sensitivity(llama, calib, held, CMoEConfig(), shapes=shapes)
    fast = measure_sensitivity(llama, calib, held, CMoEConfig(), shapes=shapes, mode="fast")
    assert fast.mode == "fast" and full.mode == "full"
    for f, g in zip(fast.kl, full.kl, strict=True):
        assert f[1] == pytest.approx(g[1], rel=1e-5)  # measured through the tail, as in full
        assert f[0] > f[1] > f[2] > 0  # scaled by output error: fewer active neurons, more error
    with pytest.raises(ValueError, match="fast or full"):
        measure_sensitivity(llama, calib, held, CMoEConfig(), shapes=shapes, mode="quick")


def test_per_layer_shapes_carve_each_layer_at_its_own_counts(llama):
    cfg = CMoEConfig(layer_experts=("S1A1E4", "dense"))
    moe = convert(llama, calibration(llama, 4), cfg)
    assert moe.mlp(0).shared_size == 48 and moe.mlp(0).policy == RoutingPolicy("topk", k=1)
    assert not hasattr(moe.mlp(1), "expert_sizes")  # dense
