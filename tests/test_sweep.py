"""Sweep: the cached restart path is exact, every (layer, policy) is measured, the picker meets its targets."""

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import single_thread

from moe_core.config import LaDiMoConfig, SweepConfig
from moe_core.methods import convert
from moe_core.model_io import tiny_model
from moe_core.moe import MoEMLP, RoutingPolicy
from moe_core.sweep import (
    DENSE,
    Plan,
    PolicyPoint,
    SweepResult,
    apply_plan,
    dense_cache,
    hull_segments,
    pick_plan,
    run_from,
    score,
    sweep,
)

CFG = SweepConfig(thresholds=(0.6,), timing_tokens=16, repeats=1, throughput_points=1)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def converted():
    with single_thread():  # module scope: the one_thread fixture does not cover it
        dense = tiny_model("llama", n_layers=3)
        calib = torch.randint(4, 250, (6, 48), generator=torch.Generator().manual_seed(0))
        moe = convert(
            dense,
            calib,
            LaDiMoConfig(n_experts=4, n_shared=0, top_k=2, steps=20, batch_tokens=96, train_k="range"),
            method="ladimo",
        )
        windows = torch.randint(4, 250, (2, 24), generator=torch.Generator().manual_seed(1))
        return dense, moe, windows, sweep(dense, moe, windows, CFG)


def test_restart_from_any_layer_reproduces_dense_logits():
    dense = tiny_model("qwen3", n_layers=3)
    windows = torch.randint(4, 250, (2, 20))
    cache = dense_cache(dense, windows, batch_size=1)
    full = dense.model(windows).logits[:, :-1].reshape(-1, dense.model.config.vocab_size)
    for layer in range(3):
        torch.testing.assert_close(run_from(dense, layer, cache), full, rtol=1e-4, atol=1e-4)
    assert score(full, cache)["kl"] < 1e-6


def test_every_layer_and_policy_has_a_point(converted):
    dense, moe, _, result = converted
    labels = [DENSE, "top-1", "top-2", "top-3", "top-4", "dyn-0.6"]
    assert [(p.layer, p.policy) for p in result.points] == list(itertools.product(range(3), labels))
    for p in result.points:
        assert all(math.isfinite(v) for v in (p.kl, p.dnll, p.block_ms, p.throughput_ratio))
        if p.policy == DENSE:
            assert (p.kl, p.dnll, p.agreement, p.active_saving, p.throughput_ratio) == (0, 0, 1, 0, 1)
        else:
            assert p.kl > 0 and p.mean_k >= 1
    k2 = result.point(1, "top-2")
    assert k2.mean_k == 2 and k2.active_saving == pytest.approx(
        1 - (0.5 * 3 * 64 * 192 + 4 * 64) / (3 * 64 * 192)
    )
    assert result.point(0, "top-1").kl > result.point(0, "top-4").kl  # fewer experts, further from dense


def test_a_sweep_point_equals_the_full_model_with_that_layer_converted(converted):
    dense, moe, windows, result = converted
    model = copy.deepcopy(dense.model)
    block = copy.deepcopy(moe.mlp(1))
    block.set_policy(RoutingPolicy("topk", k=1))
    dense.adapter.set_mlp(model, 1, block)
    ref = F.log_softmax(dense.model(windows).logits[:, :-1].float(), -1)
    logp = F.log_softmax(model(windows).logits[:, :-1].float(), -1)
    kl = float((ref.exp() * (ref - logp)).sum(-1).mean())
    assert result.point(1, "top-1").kl == pytest.approx(kl, rel=1e-3)


def test_cumulative_curve_converts_least_sensitive_layers_first(converted):
    _, _, _, result = converted
    kls = [result.point(i, "top-2").kl for i in result.sensitivity_order]
    assert kls == sorted(kls) and sorted(result.sensitivity_order) == [0, 1, 2]
    assert [c["k"] for c in result.cumulative] == [0, 1, 2, 3]
    assert result.cumulative[0]["kl"] == 0 and result.cumulative[-1]["active_ffn_reduction"] > 0.4
    assert result.cumulative[1]["layers"] == result.sensitivity_order[:1]
    assert result.cumulative[-1]["throughput_ratio_measured"] is not None


def test_results_save_and_load(converted, tmp_path):
    _, _, _, result = converted
    back = SweepResult.load(result.save(tmp_path))
    assert back.points == result.points and back.cumulative == result.cumulative
    assert len((tmp_path / "points.csv").read_text().splitlines()) == len(result.points) + 1
    plan = pick_plan(result, min_active_reduction=0.2)
    assert Plan.load(plan.save(tmp_path / "plan.json")) == plan


def test_apply_plan_sets_policies_and_restores_dense_layers(converted):
    dense, moe, windows, result = converted
    plan = Plan({0: None, 1: {"mode": "topk", "k": 1, "threshold": 0.5, "max_k": None}}, {}, {}, {})
    planned = apply_plan(moe, plan, dense)
    assert type(planned.mlp(0)).__name__ == "LlamaMLP" and planned.mlp(1).policy == RoutingPolicy("topk", k=1)
    assert planned.mlp(2).policy == moe.mlp(2).policy and moe.mlp(1).policy.k == 2  # moe itself untouched
    torch.testing.assert_close(planned.mlp(0)(torch.ones(3, 64)), dense.mlp(0)(torch.ones(3, 64)))
    with pytest.raises(ValueError, match="pass the source dense model"):
        apply_plan(moe, plan)


# ---------------------------------------------------------------------------------------------
# The picker on synthetic curves


def synthetic(costs: dict[int, dict[str, tuple[float, float]]], c: float = 1.0) -> SweepResult:
    """A SweepResult from {layer: {policy: (kl, saving)}}; a dense point is added to each layer."""
    points = []
    for layer, options in costs.items():
        for label, (kl, saving) in {DENSE: (0.0, 0.0), **options}.items():
            spec = (
                None
                if label == DENSE
                else {"mode": "topk", "k": int(label[-1]), "threshold": 0.5, "max_k": None}
            )
            points.append(
                PolicyPoint(layer, label, spec, kl, kl, 1.0, 4.0, saving, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
            )
    return SweepResult("m", "d", len(costs), 4, 100, "top-2", 10.0, 100.0, 10.0, points, kl_to_logppl=c)


CURVES = {
    0: {"top-3": (0.001, 0.25), "top-2": (0.004, 0.5), "top-1": (0.05, 0.75)},
    1: {"top-3": (0.02, 0.25), "top-2": (0.06, 0.5), "top-1": (0.2, 0.75)},
    2: {"top-3": (0.002, 0.25), "top-2": (0.03, 0.5), "top-1": (0.04, 0.75)},  # top-2 is off the hull
    3: {"top-3": (0.5, 0.25), "top-2": (0.9, 0.5), "top-1": (1.5, 0.75)},
}


def brute_force(result, target_saving=None, max_kl=None):
    """The exact optimum over all policy combinations: (kl, saving)."""
    options = [[(p.kl, p.active_saving) for p in result.layer_points(i)] for i in range(result.n_layers)]
    best = None
    for combo in itertools.product(*options):
        kl, saving = sum(c[0] for c in combo), sum(c[1] for c in combo) / result.n_layers
        if target_saving is not None and saving >= target_saving and (best is None or kl < best[0]):
            best = (kl, saving)
        if max_kl is not None and kl <= max_kl and (best is None or saving > best[1]):
            best = (kl, saving)
    return best


@pytest.mark.parametrize("target", [0.1, 0.2, 0.3, 0.45])
def test_min_active_reduction_is_met_near_the_optimum(target):
    result = synthetic(CURVES)
    plan = pick_plan(result, min_active_reduction=target)
    assert plan.predicted["active_ffn_reduction"] >= target
    optimum = brute_force(result, target_saving=target)
    assert plan.predicted["kl_sum"] <= optimum[0] * 1.5 + 1e-3
    assert plan.labels[3] == DENSE  # the sensitive layer stays dense


@pytest.mark.parametrize("max_increase", [0.005, 0.02, 0.05, 0.2])
def test_max_ppl_increase_is_respected(max_increase):
    result = synthetic(CURVES, c=1.3)
    plan = pick_plan(result, max_ppl_increase=max_increase)
    assert plan.predicted["ppl_increase"] <= max_increase + 1e-12
    assert math.exp(1.3 * plan.predicted["kl_sum"]) - 1 == pytest.approx(plan.predicted["ppl_increase"])
    optimum = brute_force(result, max_kl=math.log1p(max_increase) / 1.3)
    assert plan.predicted["active_ffn_reduction"] >= optimum[1] - 0.25 / 4  # within one move of the best


def test_greedy_starts_with_the_cheapest_saving():
    plan = pick_plan(synthetic(CURVES), min_active_reduction=0.05)
    assert plan.labels == {0: "top-3", 1: DENSE, 2: DENSE, 3: DENSE}
    assert plan.policies[1] is None and plan.policies[0]["k"] == 3


def test_hull_moves_have_non_increasing_ratios():
    result = synthetic(CURVES)
    for layer in range(4):
        moves = hull_segments(result.layer_points(layer))
        ratios = [m.ratio for m in moves]
        assert ratios == sorted(ratios, reverse=True) and moves[-1].end.active_saving == 0.75
    assert [m.end.policy for m in hull_segments(result.layer_points(2))] == ["top-3", "top-1"]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({}, "exactly one target"),
        ({"max_ppl_increase": 0.1, "min_active_reduction": 0.2}, "exactly one target"),
        ({"min_active_reduction": 1.5}, r"in \(0, 1\)"),
        ({"min_active_reduction": 0.9}, "at most 75.0%"),
    ],
)
def test_bad_targets_say_what_to_do(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pick_plan(synthetic(CURVES), **kwargs)


def test_sweep_refuses_a_model_without_moe_layers():
    dense = tiny_model("llama")
    with pytest.raises(ValueError, match="no MoE layers"):
        sweep(dense, dense, torch.randint(4, 250, (1, 16)), CFG)


def test_moe_blocks_in_points_are_left_as_converted(converted):
    _, moe, _, _ = converted
    assert all(isinstance(moe.mlp(i), MoEMLP) and moe.mlp(i).policy.k == 2 for i in range(3))


def test_the_sweep_never_tunes_on_the_windows_perplexity_is_scored_on():
    """On WikiText-2 the held-out windows start past the scored head, whatever the window length; fewer skipped
    windows are refused with the reason. Other texts may skip less."""
    from moe_core.config import EVAL_TEXT, SCORED_TOKENS, EvalConfig
    from moe_core.data import eval_windows, load_documents, shared_data_dir
    from moe_core.sweep import held_out_windows

    eval_default = EvalConfig(text=EVAL_TEXT)
    assert eval_default.n_windows * eval_default.seq_len <= SCORED_TOKENS  # evaluation's default windows
    assert SweepConfig().skip_windows * SweepConfig().seq_len >= SCORED_TOKENS
    assert SweepConfig(seq_len=32).skip_windows == SCORED_TOKENS // 32  # counted in tokens, not windows
    with pytest.raises(ValueError, match="score perplexity on"):
        SweepConfig(text=EVAL_TEXT, skip_windows=SCORED_TOKENS // 256 - 1)
    assert SweepConfig(text="builtin:pydoc", skip_windows=0).skip_windows == 0
    if shared_data_dir() is None:
        return
    tokenizer = tiny_model("llama").tokenizer
    cfg = SweepConfig(seq_len=32, n_windows=2)
    windows = eval_windows(load_documents(EVAL_TEXT), tokenizer, 32, cfg.skip_windows + 2, source=EVAL_TEXT)
    assert torch.equal(held_out_windows(tokenizer, cfg), windows[-2:])  # the first ones past the scored head


def test_timings_wait_for_cuda_kernels(monkeypatch):
    """time_pair synchronises CUDA before and after each timed call (asynchronous kernels would read ~0)."""
    from moe_core import sweep as sweep_module

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append("sync"))
    sweep_module.time_pair(lambda: calls.append("a"), lambda: calls.append("b"), repeats=2)
    timed = calls[2:]  # after the two warm-up calls
    assert timed == ["sync", "a", "sync", "sync", "b", "sync"] * 2
