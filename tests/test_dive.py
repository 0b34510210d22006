"""DIVE: FLAP scores and bias compensation, mining and clustering, expert assembly, two-stage retraining, CLI."""

import json

import numpy as np
import pytest
import torch

from moe_core import Cancelled
from moe_core.checkpoint import load_converted, save_converted
from moe_core.cli import main
from moe_core.config import (
    DIVE_BUILTIN_DOMAINS,
    DIVE_DOMAINS,
    ConvertRun,
    DIVEConfig,
    DIVERetrainConfig,
    RoutingConfig,
    from_dict,
    parse_domains,
    to_dict,
)
from moe_core.data import SHARED_SOURCES
from moe_core.finetune import dive_retrain, norm_params, train_experts, train_router
from moe_core.methods import METHODS, convert
from moe_core.methods.dive import (
    assemble,
    cluster_domains,
    compensation_bias,
    flap_prune,
    flap_stats,
    fluctuation_scores,
    keep_channels,
    n_kept,
    prune_ffn,
)
from moe_core.model_io import tiny_model
from moe_core.moe import MoEMLP

METHOD_ROUTING = RoutingConfig(router="method", form="analytic", refit=False)  # DIVE's own gates and biases
RETRAIN = DIVERetrainConfig(stage1_steps=6, stage2_steps=6, batch_size=2, router_lr=5e-2, lr=1e-2)


def ids(n=4, t=24, seed=0):
    return torch.randint(4, 260, (n, t), generator=torch.Generator().manual_seed(seed))  # (N, T)


@pytest.fixture
def domains(tmp_path):
    """Four small, unlike domains: prose, code, arithmetic, a repeated verse (no shared data needed)."""
    (tmp_path / "sums.txt").write_text("\n".join(f"{a} + {b} = {a + b}" for a in range(60) for b in range(9)))
    (tmp_path / "verse.txt").write_text("The quick brown fox jumps over the lazy dog. " * 400)
    return (
        "builtin:pydoc",
        "builtin:stdlib",
        f"sums=file:{tmp_path / 'sums.txt'}",
        f"file:{tmp_path / 'verse.txt'}",
    )


def small(domains, **kw) -> DIVEConfig:
    base = {"domains": domains, "n_experts": 2, "n_sequences": 3, "seq_len": 32, "max_chars": 20_000}
    return DIVEConfig(**(base | {"retrain": DIVERetrainConfig(stage1_steps=0, stage2_steps=0)} | kw))


def down_inputs(dense, x, layer=0) -> torch.Tensor:
    """What layer's down_proj receives on x (N, T): (N*T, I)."""
    seen = []
    mlp = dense.mlp(layer)
    handle = mlp.down_proj.register_forward_pre_hook(
        lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]))
    )
    with torch.no_grad():
        dense.model(x)
    handle.remove()
    return torch.cat(seen)


def state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(before, after) -> set:
    return {k for k in before if not torch.equal(before[k], after[k])}


# ---------------------------------------------------------------------------------------------
# FLAP


def test_flap_stats_are_the_down_proj_input_mean_and_variance():
    dense, x = tiny_model("llama"), ids()
    stats, seen = flap_stats(dense, x, batch_size=3), down_inputs(dense, x)
    torch.testing.assert_close(stats.mean[0], seen.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.var[0], seen.var(0), rtol=1e-4, atol=1e-7)  # unbiased, 1 / (N - 1)
    w_down = dense.adapter.weights(dense.mlp(0))[2]
    expected = seen.var(0) * (w_down**2).sum(0)  # var(X_j) * ||W_down[:, j]||^2
    torch.testing.assert_close(fluctuation_scores(stats.var[0], w_down), expected, rtol=1e-4, atol=1e-9)


def test_keep_channels_takes_the_top_scores_with_the_papers_count():
    assert keep_channels(torch.tensor([3.0, 1.0, 2.0, 5.0]), 0.5).tolist() == [0, 3]
    assert keep_channels(torch.ones(4), 0.5).tolist() == [0, 1]  # ties: lower index, deterministic
    assert keep_channels(torch.tensor([3.0, 1.0, 2.0, 5.0]), 0.5, exclude=torch.tensor([3])).tolist() == [
        0,
        2,
    ]
    assert n_kept(100, 0.29) == 71 and n_kept(192, 0.75) == 48 and n_kept(10, 0.0) == 10


def test_flap_ratio_zero_equals_dense(tiny):
    x = ids()
    pruned = flap_prune(tiny, flap_stats(tiny, x), 0.0)
    assert all(isinstance(pruned.mlp(i), MoEMLP) for i in range(pruned.n_layers))
    torch.testing.assert_close(pruned.model(x).logits, tiny.model(x).logits, rtol=1e-4, atol=1e-4)


def test_bias_compensation_is_the_removed_channels_mean_contribution():
    dense, x = tiny_model("llama"), ids()
    stats, seen = flap_stats(dense, x), down_inputs(dense, x)
    w_down = dense.adapter.weights(dense.mlp(0))[2]
    kept, bias = prune_ffn(w_down, (stats.mean[0], stats.var[0]), 0.5)
    assert kept.numel() == 96
    removed_out = seen @ w_down.T - seen[:, kept] @ w_down[:, kept].T  # (T, H): what pruning drops
    torch.testing.assert_close(bias, removed_out.mean(0), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(compensation_bias(w_down, stats.mean[0], torch.arange(192)), torch.zeros(64))
    # so the pruned FFN keeps the dense FFN's mean output over the calibration tokens exactly
    mlp_in = []
    handle = dense.mlp(0).register_forward_pre_hook(lambda m, a: mlp_in.append(a[0].reshape(-1, 64)))
    with torch.no_grad():
        dense.model(x)
    handle.remove()
    block = flap_prune(dense, stats, 0.5).mlp(0)
    with torch.no_grad():
        dense_out, pruned_out = dense.mlp(0)(mlp_in[0]), block(mlp_in[0])
    torch.testing.assert_close(pruned_out.mean(0), dense_out.mean(0), rtol=1e-4, atol=1e-5)
    assert (pruned_out - dense_out).abs().max() > 1e-3  # but it is a pruned FFN, not the dense one


# ---------------------------------------------------------------------------------------------
# Mining and clustering


def two_families_ppl() -> np.ndarray:
    """a, b help each other, c, d help each other: rows (calibration) x columns (evaluation)."""
    return np.array(
        [
            [10.0, 11.0, 30.0, 31.0],
            [10.5, 10.2, 29.0, 32.0],
            [25.0, 26.0, 12.0, 12.5],
            [24.0, 27.0, 12.3, 12.1],
        ]
    )


def test_clustering_finds_the_families_deterministically():
    names = ["a", "b", "c", "d"]
    first = cluster_domains(names, two_families_ppl(), 2)
    assert sorted(sorted(g) for g in first.groups) == [["a", "b"], ["c", "d"]]
    assert first == cluster_domains(names, two_families_ppl(), 2)
    assert sorted(first.order) == [0, 1, 2, 3] and len(first.linkage) == 3
    norm = np.array(first.normalised)
    assert (
        np.allclose(norm.max(axis=0), 1.0) and (norm <= 1.0).all()
    )  # 1 = best calibration source per column
    assert [g for g in cluster_domains(names, two_families_ppl(), 4).groups if len(g) != 1] == []
    with pytest.raises(ValueError, match="cannot form 5 groups"):
        cluster_domains(names, two_families_ppl(), 5)


def test_convert_mines_clusters_and_is_deterministic(domains):
    dense = tiny_model("llama")
    before = state(dense.model)
    cfg = small(domains, n_experts=3, top_k=1)
    moe = convert(dense, ids(), cfg, method="dive")
    again = convert(dense, ids(), cfg, method="dive")
    assert not changed(before, state(dense.model)) and not isinstance(dense.mlp(0), MoEMLP)
    aff = moe.conversion.affinity
    assert aff == again.conversion.affinity and not changed(state(moe.model), state(again.model))
    assert np.array(aff["ppl"]).shape == (4, 4) and len(aff["groups"]) == 3
    assert sorted(n for g in aff["groups"] for n in g) == sorted(["pydoc", "stdlib", "sums", "verse"])
    assert [aff["names"][i] for i in aff["order"]] == [n for g in aff["groups"] for n in g]
    layer = moe.conversion.layers[0]
    assert layer["expert_sizes"] == [96, 96, 96] and 0 < layer["mean_overlap"] < 1
    json.dumps(moe.conversion.as_dict())  # plain data, for metrics.json and the app's heatmap


def test_mining_walks_the_layers_and_scores_what_the_whole_pruned_model_scores():
    """The affinity matrix runs every domain's held-out windows through layer i, then i + 1 (it streams); each
    entry is the perplexity of the whole model with every FFN pruned on that domain (flap_prune)."""
    from moe_core.evaluate import perplexity
    from moe_core.methods.dive import affinity_matrix

    dense = tiny_model("llama")
    stats = {name: flap_stats(dense, ids(seed=s)) for name, s in (("a", 1), ("b", 2), ("c", 3))}
    heldout = {"a": ids(2, 16, seed=4), "b": ids(3, 16, seed=5), "c": ids(1, 16, seed=6)}
    ppl = affinity_matrix(dense, stats, heldout, 0.5, batch_size=2)
    for i, name in enumerate(stats):
        pruned = flap_prune(dense, stats[name], 0.5)
        whole = [perplexity(pruned, heldout[other], batch_size=2) for other in stats]
        np.testing.assert_allclose(ppl[i], whole, rtol=1e-5)
    assert len(set(np.round(ppl.ravel(), 6))) > 3  # the domains and prunings differ


def test_without_retraining_the_routing_step_runs_as_each_layer_is_built(domains):
    """No retraining: experts assembled and routed in one walk (so it streams), the same model as assembling
    first and routing after; with retraining, the routing pass follows the retraining."""
    from moe_core.methods.dive import assemble_routed
    from moe_core.reconstruct import reconstruct_model

    dense, groups = tiny_model("llama"), group_stats(tiny_model("llama"))
    cfg = small(domains, n_experts=3, top_k=1)
    settings = RoutingConfig().settings(0)
    walked, layers, routed = assemble_routed(dense, ids(), groups, cfg, routing=settings)
    after, _ = assemble(dense, groups, cfg)
    reports = reconstruct_model(after, dense, ids(), settings)
    assert len(routed) == len(layers) == dense.n_layers and routed == reports
    for name, tensor in after.model.state_dict().items():
        torch.testing.assert_close(walked.model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    moe = convert(dense, ids(), small(domains, retrain=RETRAIN), method="dive", routing=RoutingConfig())
    assert len(moe.conversion.routing) == dense.n_layers and moe.conversion.retrain


# ---------------------------------------------------------------------------------------------
# Expert reconstruction


def group_stats(dense):
    return [flap_stats(dense, ids(seed=s)) for s in (1, 2, 3)]


def test_experts_are_the_groups_flap_pruned_ffns(domains):
    dense, groups = tiny_model("qwen2"), group_stats(tiny_model("qwen2"))
    cfg = small(domains, n_experts=3, top_k=2)
    moe, _ = assemble(dense, groups, cfg)
    x = torch.randn(5, 64)
    w_gate, w_up, w_down = dense.adapter.weights(dense.mlp(1))
    block = moe.mlp(1)
    assert block.n_experts == 3 and block.policy.k == 2 and block.gate_mode == "renorm"
    assert block.shared_expert is None and block.router.noise_weight is not None
    for e, stats in enumerate(groups):
        kept, bias = prune_ffn(w_down, (stats.mean[1], stats.var[1]), cfg.prune_ratio)
        assert torch.equal(block.gate_up_proj[e, :48], w_gate[kept]) and torch.equal(
            block.expert_bias[e], bias
        )
        flap_block = flap_prune(dense, stats, cfg.prune_ratio).mlp(1)
        with torch.no_grad():  # expert e is exactly FLAP pruned on group e's text
            torch.testing.assert_close(block._expert(e, x), flap_block._expert(0, x))


@pytest.mark.parametrize("shared_share,ratio", [(0.0, 0.0), (0.25, 0.25)])
def test_unpruned_experts_reproduce_dense_whatever_the_router(domains, shared_share, ratio):
    """Gates sum to one, so experts keeping every (non-shared) channel give the dense FFN."""
    dense, x = tiny_model("llama"), ids()
    groups = group_stats(dense)
    cfg = small(domains, n_experts=3, top_k=2, prune_ratio=ratio, shared_share=shared_share)
    moe, _ = assemble(dense, groups, cfg, all_stats=groups[0] + groups[1])
    torch.testing.assert_close(moe.model(x).logits, dense.model(x).logits, rtol=1e-4, atol=1e-4)


def test_shared_expert_and_routed_experts_never_share_a_channel(domains):
    dense = tiny_model("llama")
    groups = group_stats(dense)
    cfg = small(domains, n_experts=3, prune_ratio=0.75, shared_share=0.25)
    moe, layers = assemble(dense, groups, cfg, all_stats=groups[0] + groups[1] + groups[2])
    block = moe.mlp(0)
    assert block.shared_size == 48 and block.expert_sizes == [48, 48, 48] and layers[0]["shared_size"] == 48
    shared_rows = {tuple(r.tolist()) for r in block.shared_expert.gate_proj.weight}
    for e in range(3):
        assert not shared_rows & {tuple(r.tolist()) for r in block.gate_up_proj[e, :48]}


# ---------------------------------------------------------------------------------------------
# Retraining


@pytest.fixture
def dive_moe(domains):
    dense = tiny_model("llama")
    return assemble(dense, group_stats(dense), small(domains, n_experts=3, top_k=2))[0]


def test_stage1_trains_only_the_routers_and_lowers_the_loss(dive_moe):
    before, flags = state(dive_moe.model), {n: p.requires_grad for n, p in dive_moe.model.named_parameters()}
    stats = train_router(dive_moe, ids(n=2), RETRAIN)
    moved = changed(before, state(dive_moe.model))
    assert moved and all(".mlp.router." in k for k in moved)
    assert any(k.endswith("router.noise_weight") for k in moved)  # W_noise trains too (the code)
    assert stats["steps"] == 6 and stats["loss_last"] < stats["loss_first"]
    block = dive_moe.mlp(0)
    assert (block.policy.k, block.gate_mode, block.temperature) == (
        2,
        "renorm",
        1.0,
    )  # inference routing back
    assert {n: p.requires_grad for n, p in dive_moe.model.named_parameters()} == flags
    assert not dive_moe.model.training


def test_stage1_runs_every_expert_at_the_temperature(dive_moe):
    seen = []
    dive_moe.mlp(0).register_forward_pre_hook(
        lambda m, a: seen.append((m.policy.k, m.gate_mode, m.temperature))
    )
    train_router(dive_moe, ids(n=2), RETRAIN)
    assert set(seen) == {(3, "prob", 0.5)}  # top-2 model: t = 0.5 (code); 0.05 for top-1
    assert DIVERetrainConfig().stage1_temperature(1) == 0.05


def test_stage2_freezes_attention_and_embeddings_and_lowers_the_loss(dive_moe):
    before = state(dive_moe.model)
    stats = train_experts(dive_moe, ids(n=2), RETRAIN)
    moved = changed(before, state(dive_moe.model))
    assert not any("self_attn" in k or "embed_tokens" in k for k in moved)
    for name in ("mlp.gate_up_proj", "mlp.down_proj", "mlp.router.weight", "input_layernorm.weight"):
        assert f"model.layers.0.{name}" in moved  # LoRA merged into the experts; router, norms trained fully
    assert "model.norm.weight" in moved and "model.layers.0.mlp.expert_bias" not in moved
    assert stats["loss_last"] < stats["loss_first"] and stats["full_params"] == sum(
        p.numel() for p in norm_params(dive_moe.model)
    ) + sum(p.numel() for i in range(2) for p in dive_moe.mlp(i).router.parameters())
    assert not any(type(m).__module__.startswith("peft") for m in dive_moe.model.modules())
    assert sorted(before) == sorted(state(dive_moe.model))


def test_stage2_leaves_top1_routers_alone(domains):
    """A top-1 gate p / p is 1: only rounding reaches the router, which Adam would blow up into real steps."""
    dense = tiny_model("llama")
    moe = assemble(dense, group_stats(dense), small(domains, n_experts=3, top_k=1))[0]
    before = state(moe.model)
    train_experts(moe, ids(n=2), RETRAIN)
    moved = changed(before, state(moe.model))
    assert "model.layers.0.mlp.gate_up_proj" in moved and not any(".router." in k for k in moved)


def test_norms_inside_attention_stay_frozen():
    qwen3 = tiny_model("qwen3").model
    names = {id(p): n for n, p in qwen3.named_parameters()}
    picked = [names[id(p)] for p in norm_params(qwen3)]
    assert "model.norm.weight" in picked and not any("self_attn" in n for n in picked)
    assert any("q_norm" in n for n in names.values())


def test_cancel_leaves_the_model_as_it_was(dive_moe):
    before = state(dive_moe.model)
    calls = {"n": 0}

    def cancel_at_third_check():
        calls["n"] += 1
        return calls["n"] >= 3

    for stage in (train_router, train_experts):
        calls["n"] = 0
        with pytest.raises(Cancelled):
            stage(dive_moe, ids(n=2), RETRAIN, cancel=cancel_at_third_check)
        assert not changed(before, state(dive_moe.model)) and sorted(before) == sorted(state(dive_moe.model))
        assert dive_moe.mlp(0).gate_mode == "renorm" and not dive_moe.model.training


def test_cancel_stops_the_conversion(domains):
    with pytest.raises(Cancelled):
        convert(tiny_model("llama"), ids(), small(domains), method="dive", cancel=lambda: True)


def test_flap_baseline_retrains_without_a_router_stage():
    dense, x = tiny_model("llama"), ids()
    flap = flap_prune(dense, flap_stats(dense, x), 0.5)
    out = dive_retrain(flap, ids(n=2), RETRAIN)
    assert list(out) == ["stage2"] and out["stage2"]["loss_last"] < out["stage2"]["loss_first"]


# ---------------------------------------------------------------------------------------------
# Export


def test_exact_export_is_identical_and_portable_drops_only_the_expert_biases(dive_moe, tmp_path):
    """Exact keeps everything. Qwen2-MoE experts have no bias: portable drops them, says so and is marked
    approximate, while the rest (noisy router at inference, softmax over the top-2) maps exactly."""
    from moe_core.export import ExportConfig, compare, export_model, reload_logits
    from moe_core.export.routing import BIAS_DROPPED, plan_routing

    train_router(dive_moe, ids(n=2), RETRAIN)  # a trained noisy router, as after stage 1
    x, calib = ids(n=1, t=40, seed=7), ids(n=4, t=32, seed=8)
    with torch.no_grad():
        ref, ref_gen = (
            dive_moe.model(x).logits,
            dive_moe.model.generate(x[:, :6], max_new_tokens=8, do_sample=False),
        )
    exact, portable = (
        export_model(dive_moe, tmp_path / fmt, ExportConfig(format=fmt, verify=False), calib_ids=calib)
        for fmt in ("exact", "portable")
    )
    with torch.no_grad():
        for i in range(dive_moe.n_layers):
            dive_moe.mlp(i).expert_bias.zero_()
        unbiased = dive_moe.model(x).logits
    loaded = reload_logits([(exact.folder, True), (portable.folder, False)], x, x[:, :6], 8)
    assert exact.exact_by_construction and loaded[0]["class"] == "MoEStudioForCausalLM"
    assert compare(ref, loaded[0]["logits"], x)["max_abs_logit_diff"] <= 1e-5
    assert torch.equal(loaded[0]["generated"], ref_gen)
    assert loaded[1]["class"] == "Qwen2MoeForCausalLM" and not portable.exact_by_construction
    assert portable.notes == [f"{BIAS_DROPPED} (layers 0-1)"]
    assert portable.routing["layers_exact"] == 2 and portable.routing["layers_bias_dropped"] == 2
    card = (portable.folder / "README.md").read_text()
    assert "expert biases dropped in 2" in card and BIAS_DROPPED in card
    assert compare(ref, loaded[1]["logits"], x)["max_abs_logit_diff"] > 1e-3  # the biases mattered
    assert compare(unbiased, loaded[1]["logits"], x)["max_abs_logit_diff"] <= 1e-5  # nothing else was lost
    assert plan_routing(dive_moe).exact  # without biases the portable export is exact


# ---------------------------------------------------------------------------------------------
# Config, Python and command line end to end


def test_domains_parse_in_every_form_and_bad_configs_say_how_to_fix():
    assert parse_domains({"m": "shared:calib-math"}) == (("m", "shared:calib-math"),)
    assert parse_domains(["shared:calib-math", "c=file:/x/y.txt", ["p", "builtin:pydoc"]]) == (
        ("math", "shared:calib-math"),
        ("c", "file:/x/y.txt"),
        ("p", "builtin:pydoc"),
    )
    with pytest.raises(ValueError, match="cannot make 3 groups"):
        DIVEConfig(domains=("builtin:pydoc", "builtin:stdlib"), n_experts=3)
    with pytest.raises(ValueError, match="unique"):
        DIVEConfig(domains=("a=builtin:pydoc", "a=builtin:stdlib"), n_experts=2)
    with pytest.raises(ValueError, match="top_k"):
        DIVEConfig(n_experts=2, top_k=3)
    with pytest.raises(ValueError, match="exceed the FFN"):
        DIVEConfig(prune_ratio=0.25, shared_share=0.5)
    assert DIVEConfig(top_k=2).prune_ratio == 0.75 and DIVEConfig().prune_ratio == 0.5  # half the FFN active
    run = from_dict(ConvertRun, json.loads(json.dumps(to_dict(ConvertRun(method="dive")))))
    assert run.dive == DIVEConfig() and "dive" in METHODS


def test_default_domains_are_the_shared_corpora_else_the_fast_builtins(monkeypatch, tmp_path):
    root = tmp_path / "data"
    for _, spec in DIVE_DOMAINS:
        path = root / SHARED_SOURCES[spec.removeprefix("shared:")][0]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text('{"text": "a document"}\n')
    monkeypatch.setenv("MOE_STUDIO_DATA", str(root))
    assert DIVEConfig().domains == DIVE_DOMAINS and DIVEConfig().n_experts == 4
    path.unlink()  # one of the six missing: the builtins, not five corpora
    assert DIVEConfig().domains == DIVE_BUILTIN_DOMAINS
    monkeypatch.setenv("MOE_STUDIO_DATA", str(tmp_path / "missing"))
    cfg = DIVEConfig()
    assert cfg.domains == (("pydoc", "builtin:pydoc"), ("stdlib", "builtin:stdlib"))
    assert (cfg.n_experts, cfg.top_k, cfg.prune_ratio) == (2, 1, 0.5)  # n_experts: min(4, domains)
    assert DIVEConfig(domains=("builtin:pydoc", "builtin:stdlib", "builtin:model")).n_experts == 3
    assert from_dict(ConvertRun, json.loads(json.dumps(to_dict(ConvertRun(method="dive"))))).dive == cfg
    with pytest.raises(
        ValueError, match=r"1 domain\(s\) cannot make 2 groups. Add domains \(dive.domains\).$"
    ):
        DIVEConfig(domains=("builtin:pydoc",))
    with pytest.raises(ValueError, match="cannot make 3 groups"):  # an explicit count is never lowered
        DIVEConfig(n_experts=3)


def test_dive_with_default_domains_converts_without_the_shared_data(monkeypatch, tmp_path):
    monkeypatch.setenv("MOE_STUDIO_DATA", str(tmp_path / "missing"))
    tiny = DIVEConfig(n_sequences=2, seq_len=32, max_chars=20_000, retrain=RETRAIN)  # only sizes set
    moe = convert(tiny_model("llama"), ids(), ConvertRun(method="dive", dive=tiny))
    aff = moe.conversion.affinity
    assert aff["names"] == ["pydoc", "stdlib"] and sorted(aff["groups"]) == [["pydoc"], ["stdlib"]]
    assert moe.mlp(0).n_experts == 2 and moe.mlp(0).policy.k == 1 and moe.mlp(0).expert_sizes == [96, 96]
    assert set(moe.conversion.retrain) == {"stage1", "stage2"} and moe.conversion.config["n_experts"] == 2


def test_python_convert_saves_and_reloads_identical_logits(domains, tmp_path):
    """DIVE's own routing (expert biases, which the default native form drops) saves and reloads exactly."""
    run = ConvertRun(method="dive", dive=small(domains, retrain=RETRAIN), routing=METHOD_ROUTING)
    moe = convert(tiny_model("qwen2"), ids(), run)
    assert set(moe.conversion.retrain) == {"stage1", "stage2"}
    save_converted(moe, tmp_path / "m", to_dict(run), {"conversion": moe.conversion.as_dict()})
    again = load_converted(tmp_path / "m")
    assert again.mlp(0).expert_bias is not None
    torch.testing.assert_close(again.model(ids()).logits, moe.model(ids()).logits, rtol=0, atol=0)


def test_cli_convert_end_to_end_and_reload(domains, tmp_path, capsys):
    out = tmp_path / "dive"
    argv = ["convert", "--model", "builtin:tiny-llama", "--method", "dive", "--text", "builtin:pydoc"]
    argv += ["--n-sequences", "4", "--seq-len", "24", "--domains", ",".join(domains), "--n-experts", "3"]
    argv += ["--top-k", "1", "--stage1-steps", "2", "--stage2-steps", "2", "--out", str(out)]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == "dive"
    moe = load_converted(out)
    assert moe.run_config["dive"]["n_experts"] == 3 and moe.run_config["dive"]["prune_ratio"] == 0.5
    assert len(moe.metrics["conversion"]["affinity"]["groups"]) == 3
    block = moe.mlp(0)
    assert block.n_experts == 3 and block.policy.k == 1 and block.expert_sizes == [96] * 3
    assert torch.isfinite(moe.model(ids()).logits).all()
    assert main(argv[:-2] + ["--n-experts", "5", "--out", str(tmp_path / "x")]) == 2
    assert "cannot make 5 groups" in capsys.readouterr().err
