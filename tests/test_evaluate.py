"""Evaluation: perplexity recipe, KL / agreement, parameter accounting, expert load, reports, lm-eval."""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch

from moe_core import evaluate as ev
from moe_core.model_io import DenseModel, tiny_model
from moe_core.moe import MoEMLP, Router, RoutingPolicy

H, INTER, N_SHARED, SIZES, K = 64, 192, 32, [40, 40, 40, 40], 2  # tiny_model's sizes; a known partition


def moe_copy(dense, k: int = K, sizes=SIZES, n_shared: int = N_SHARED, gate_mode: str = "cmoe") -> DenseModel:
    """A converted copy of a tiny model: every layer cut into shared + routed experts, random cmoe router."""
    model = copy.deepcopy(dense.model)
    act_name = dense.adapter.act_name(model)
    for i in range(dense.n_layers):
        w_gate, w_up, w_down = dense.adapter.weights(dense.mlp(i))
        perm = torch.randperm(w_gate.shape[0], generator=torch.Generator().manual_seed(i))
        shared, rest = perm[:n_shared], perm[n_shared:]
        experts = list(rest[: sum(sizes)].split(sizes))
        router = Router(w_gate.shape[1], len(sizes), "cmoe", dense.adapter.act_fn(dense.mlp(i)))
        torch.nn.init.normal_(router.weight, std=0.5)
        torch.nn.init.normal_(router.up_weight, std=0.5)
        block = MoEMLP.from_dense(
            w_gate, w_up, w_down, act_name, shared, experts, router, RoutingPolicy("topk", k=k), gate_mode
        )
        dense.adapter.set_mlp(model, i, block)
    return DenseModel(model, dense.tokenizer, dense.adapter, dense.spec + "+moe")


@pytest.fixture
def dense():
    return tiny_model("llama")


@pytest.fixture
def windows():
    return torch.randint(4, 260, (3, 24), generator=torch.Generator().manual_seed(1))  # (W, T)


def test_identical_models_have_equal_perplexity_zero_kl_full_agreement(dense, windows):
    twin = DenseModel(copy.deepcopy(dense.model), dense.tokenizer, dense.adapter, "twin")
    scores = ev.compare_logits(dense, twin, windows)
    assert scores["kl"] == pytest.approx(0.0, abs=1e-6)
    assert scores["agreement"] == 1.0
    assert scores["ppl"] == pytest.approx(scores["ppl_ref"], rel=1e-6)
    assert scores["ppl"] == pytest.approx(ev.perplexity(dense, windows), rel=1e-6)
    assert scores["tokens"] == 3 * 23


def test_perplexity_is_exp_of_the_mean_next_token_loss(dense, windows):
    """Non-overlapping windows, every predicted token weighted equally: the HF loss per window, averaged."""
    with torch.no_grad():
        losses = [dense.model(w[None], labels=w[None]).loss for w in windows]
    assert ev.perplexity(dense, windows, batch_size=2) == pytest.approx(
        math.exp(float(torch.stack(losses).mean())), rel=1e-5
    )


def test_perturbed_model_has_positive_kl(dense, windows):
    moe = moe_copy(dense, k=1)
    scores = ev.compare_logits(dense, moe, windows)
    assert scores["kl"] > 1e-4
    assert 0.0 <= scores["agreement"] <= 1.0
    assert scores["ppl"] != pytest.approx(scores["ppl_ref"])


def test_all_experts_active_matches_dense(dense, windows):
    """With every neuron in some expert and all experts on (unit gates), the MoE is the dense model."""
    moe = moe_copy(dense, k=4, sizes=[40, 40, 40, 40])
    scores = ev.compare_logits(dense, moe, windows)
    assert scores["kl"] < 1e-8 and scores["agreement"] == 1.0


def test_cached_reference_logits_give_the_same_scores(dense, windows):
    moe = moe_copy(dense, k=1)
    live = ev.compare_logits(dense, moe, windows)
    ref = ev.reference_logits(dense, windows, batch_size=2)
    assert ref.logits.shape == (3, 23, dense.model.config.vocab_size) and ref.logits.dtype == torch.float16
    cached = ev.compare_logits(ref, moe, windows)
    assert cached["ppl_ref"] == pytest.approx(live["ppl_ref"], rel=1e-6)
    assert cached["ppl"] == pytest.approx(live["ppl"], rel=1e-6)
    assert cached["kl"] == pytest.approx(live["kl"], rel=1e-2, abs=1e-4)
    assert cached["agreement"] == pytest.approx(live["agreement"], abs=2 / 69)
    with pytest.raises(ValueError, match="same windows"):
        ev.compare_logits(ref, moe, windows[:2])


def test_param_report_on_a_known_partition(dense):
    dense_report = ev.param_report(dense)
    assert dense_report["active_params"] == dense_report["total_params"]
    assert dense_report["active_ffn_share"] == 1.0 and dense_report["moe_layers"] == 0

    report = ev.param_report(moe_copy(dense))
    L, E = dense.n_layers, len(SIZES)
    router = 2 * E * H  # cmoe router: W_gate^R and W_up^R rows
    assert report["ffn_params"] == L * (3 * H * (N_SHARED + sum(SIZES)) + router)
    assert report["ffn_active_params"] == L * (3 * H * (N_SHARED + K * 40) + router)
    assert report["active_ffn_share"] == pytest.approx((N_SHARED + K * 40 + router / (3 * H)) / INTER)
    new = L * (router + E)  # the routers and the gate scales u are parameters the dense model lacks
    assert report["total_params"] == dense_report["total_params"] + new
    assert report["total_params"] - report["active_params"] == L * 3 * H * 40 * (E - K)
    saved_flops = dense_report["flops_per_token"] - report["flops_per_token"]
    assert saved_flops == 2 * (L * 3 * H * 40 * (E - K) - new)


def test_expert_load_sums_to_tokens_times_k(dense, windows):
    moe = moe_copy(dense)
    load = ev.expert_load(moe, windows, batch_size=2)
    assert sorted(load) == list(range(dense.n_layers))
    for counts in load.values():
        assert len(counts) == len(SIZES) and sum(counts) == windows.numel() * K
    assert not any(b.track_load for b in ev.moe_blocks(moe).values())
    summary = ev.load_summary(load)
    assert all(r >= 1.0 for r in summary["max_over_mean"].values())


def test_evaluate_report_round_trips(dense, windows, tmp_path):
    moe = moe_copy(dense)
    report = ev.evaluate(dense, moe, windows, text="test")
    assert report.n_windows == 3 and report.seq_len == 24
    assert report.ppl_ref == pytest.approx(ev.perplexity(dense, windows), rel=1e-6)
    assert report.ppl == pytest.approx(ev.perplexity(moe, windows), rel=1e-6)
    assert sum(report.expert_load[0]) == windows.numel() * K
    assert 0 < report.summary()["flops_ratio"] < 1
    report.save(tmp_path)
    assert ev.EvalReport.load(tmp_path) == report


def test_evaluate_without_reference_and_cancel(dense, windows):
    report = ev.evaluate(None, dense, windows)
    assert report.kl is None and report.reference is None and report.expert_load == {}
    from moe_core import Cancelled

    with pytest.raises(Cancelled):
        ev.perplexity(dense, windows, cancel=lambda: True)


@pytest.mark.parametrize("bad", [torch.zeros(5, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long)])
def test_bad_windows_raise(dense, bad):
    with pytest.raises(ValueError, match="eval_windows"):
        ev.perplexity(dense, bad)


def test_decode_step_seconds_times_every_new_token(dense):
    seen = []
    times = ev.decode_step_seconds(dense.model, torch.randint(0, 250, (1, 6)), 5, on_step=seen.append)
    assert len(times) == 5 and seen == times and all(t > 0 for t in times)


def test_measure_speed_times_both_models_prefill_and_decode(dense):
    speed = ev.measure_speed(dense, dense, seq_len=16, decode_tokens=3, prompt_len=4, repeats=2)
    assert set(speed) == {
        "tokens_per_s",
        "ref_tokens_per_s",
        "decode_tokens_per_s",
        "ref_decode_tokens_per_s",
    }
    assert all(v > 0 for v in speed.values())


def test_measure_speed_can_be_cancelled(dense):
    from moe_core import Cancelled

    with pytest.raises(Cancelled):
        ev.measure_speed(dense, dense, seq_len=16, decode_tokens=2, prompt_len=4, cancel=lambda: True)


def test_unknown_lm_eval_task_names_the_available_ones(dense):
    pytest.importorskip("lm_eval")
    try:
        known = ev.available_tasks()
    except ValueError:
        pytest.skip("no shared lm_eval_tasks folder on this machine")
    assert "arc_easy_local" in known
    with pytest.raises(ValueError, match="arc_easy_local"):
        ev.lm_eval_tasks(dense, ["arc_easy"], limit=2)


@pytest.mark.slow
def test_lm_eval_on_a_local_task(dense):
    """lm-eval's HFLM drives the in-memory model on a local task file, offline."""
    pytest.importorskip("lm_eval")
    try:
        ev.default_task_dir()
    except ValueError:
        pytest.skip("no shared lm_eval_tasks folder on this machine")
    start = time.perf_counter()
    res = ev.lm_eval_tasks(dense, ["arc_easy_local"], limit=2, batch_size=4, max_length=256)
    assert 0.0 <= res["arc_easy_local"]["acc"] <= 1.0
    assert time.perf_counter() - start < 120


def test_eval_cli_on_a_converted_folder(tmp_path, capsys):
    """`python -m moe_core eval` on a converted folder: the source model is the reference; metrics.json."""
    import json

    from moe_core.checkpoint import save_converted
    from moe_core.cli import main
    from moe_core.config import CMoEConfig
    from moe_core.methods import convert

    dense = tiny_model("llama")
    ids = torch.randint(4, 260, (2, 32), generator=torch.Generator().manual_seed(3))
    moe = convert(dense, ids, CMoEConfig(experts="S1A1E4"))
    save_converted(moe, tmp_path / "conv", {"model": {"spec": "builtin:tiny-llama"}})
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(tmp_path / "conv"), "--text", "builtin:pydoc", "--windows", "2"]
    assert main([*argv, "--seq-len", "32", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["reference"] == "builtin:tiny-llama" and summary["kl"] > 0
    report = ev.EvalReport.load(out)
    assert report.n_windows == 2 and sum(report.expert_load[0]) == 2 * 32
    assert summary["speed"]["decode_tokens_per_s"] > 0 and report.speed == summary["speed"]
    assert main([*argv, "--seq-len", "32", "--no-speed", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["speed"] == {}
    assert ev.EvalReport.load(out).speed == {}
    assert main(["eval", "--model", "builtin:tiny-llama", "--tasks", "no_such_task", "--out", str(out)]) == 2
