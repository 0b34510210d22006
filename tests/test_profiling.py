import pytest
import torch

from moe_core import Cancelled
from moe_core.model_io import tiny_model
from moe_core.profiling import ActivationProfile, atopk_counts, ffn_hidden, profile_model


def test_atopk_marks_exactly_k_per_token():
    h = torch.tensor([[0.1, -5.0, 2.0, 0.0], [3.0, 0.2, -0.1, -4.0]])
    counts = atopk_counts(h, 2)
    assert counts.tolist() == [1.0, 1.0, 1.0, 1.0]  # token 0 -> {1, 2}; token 1 -> {0, 3}


def test_profile_matches_a_full_forward_with_hooks(tiny):
    """Layer-by-layer profiling sees the same FFN inputs as an ordinary forward pass."""
    ids = torch.randint(0, 250, (3, 20))
    profile = profile_model(tiny, ids, k_act=5, batch_size=2)
    seen = []
    hooks = [
        tiny.mlp(i).register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, 64)))
        for i in range(tiny.n_layers)
    ]
    try:
        tiny.model(ids)
    finally:
        for h in hooks:
            h.remove()
    for i, x in enumerate(seen):
        h = ffn_hidden(tiny.adapter, tiny.mlp(i), x)
        torch.testing.assert_close(profile.rates[i], atopk_counts(h, 5) / 60)
        torch.testing.assert_close(profile.mean_abs[i], h.abs().mean(0), rtol=1e-4, atol=1e-6)
    assert profile.n_tokens == 60
    assert torch.allclose(profile.rates.sum(1), torch.full((tiny.n_layers,), 5.0))


def test_hooks_are_removed_even_on_cancel():
    dense = tiny_model("llama")
    calls = iter([False, True])  # cancel between layer 0 and layer 1, while layer 0's hook existed
    with pytest.raises(Cancelled):
        profile_model(dense, torch.randint(0, 250, (1, 8)), cancel=lambda: next(calls))
    for i in range(dense.n_layers):
        assert (
            not dense.mlp(i)._forward_pre_hooks
            and not dense.adapter.layers(dense.model)[i]._forward_pre_hooks
        )


def test_histograms_and_save_load(tmp_path):
    dense = tiny_model("phi3")
    profile = profile_model(dense, torch.randint(0, 250, (2, 16)), k_act=3, text_spec="builtin:pydoc")
    counts, edges = profile.rate_histogram(1, bins=20)
    assert counts.sum() == 192 and len(edges) == 21
    h_counts, h_edges = profile.h_histogram(0)
    assert h_counts.sum() == 32 * 192 and len(h_edges) == len(h_counts) + 1
    again = ActivationProfile.load(profile.save(tmp_path / "p"))
    torch.testing.assert_close(again.rates, profile.rates)
    assert again.summary() == profile.summary()


def test_invalid_k_act():
    with pytest.raises(ValueError, match="K_a"):
        profile_model(tiny_model("llama"), torch.randint(0, 250, (1, 8)), k_act=0)


@pytest.mark.slow
def test_default_model_profile_short_sample(smollm2):
    ids = smollm2.tokenizer(
        "The quick brown fox jumps over the lazy dog. " * 8, return_tensors="pt"
    ).input_ids
    profile = profile_model(smollm2, ids, k_act=10)
    assert profile.rates.shape == (30, 1536)
    # CMoE's observation: a few neurons fire for almost every token, most rarely.
    assert float(profile.rates.max()) > 0.5 and float(profile.rates.median()) < 0.01


@pytest.mark.parametrize(
    "carving",
    [{}, {"shared_by": "rate", "cluster_on": "markers"}, {"shared_by": "rate", "variant": "paper"}],
    ids=["magnitude", "rate-code", "rate-paper"],
)
def test_the_drawn_shared_expert_is_the_one_carving_builds(tiny, carving):
    """The Profile tab colours design.shared_cutoff's neurons: the very set CMoE's carving puts in the shared
    expert, whatever statistic it ranks by (the tabs drew raw-h rates while carving ranked cosine rates)."""
    from moe_core.config import CMoEConfig
    from moe_core.design import shared_cutoff
    from moe_core.methods.cmoe import carve_block

    ids = torch.randint(0, 250, (3, 20))
    profile = profile_model(tiny, ids, k_act=5, cosine=True)
    seen = []
    hook = tiny.mlp(0).register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, 64)))
    try:
        tiny.model(ids)
    finally:
        hook.remove()
    cfg = CMoEConfig(experts="S2A2E8", k_act=5, **carving)
    block, _ = carve_block(tiny, 0, seen[0], cfg)
    shared_w_gate = block.shared_expert.gate_proj.weight
    w_gate = tiny.adapter.weights(tiny.mlp(0))[0]
    carved = {int((w_gate == row).all(-1).nonzero()) for row in shared_w_gate}  # rows back to neuron ids
    cut = shared_cutoff(profile, 0, 8, 0.25, cfg)
    assert set(cut["shared"].nonzero().squeeze(1).tolist()) == carved and cut["shared_size"] == len(carved)
