"""Model copies without weight copies (issue 15.2): a conversion shares every tensor it does not replace with
the dense model, and no later stage (distillation, fine-tuning, DIVE retraining, LaDiMo training, routing
refits, routing plans) writes into the dense model: it stays bit-for-bit as it was."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from moe_core.checkpoint import load_converted, save_converted
from moe_core.config import (
    CMoEConfig,
    DistillConfig,
    DIVEConfig,
    DIVERetrainConfig,
    FinetuneConfig,
    LaDiMoConfig,
    RoutingConfig,
)
from moe_core.distill import PARTS, distill
from moe_core.finetune import finetune
from moe_core.methods import convert
from moe_core.model_io import tiny_model
from moe_core.moe import MoEMLP
from moe_core.plumbing import shell_copy, unshare
from moe_core.reconstruct import ReconstructSettings, reconstruct_model
from moe_core.sweep import Plan, apply_plan

ROOT = Path(__file__).resolve().parents[1]
NATIVE = RoutingConfig(router="trained", form="native", refit=True)
FINETUNE = FinetuneConfig(n_sequences=4, seq_len=16, batch_size=2, lr=1e-2, scale_lr=1e-2)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny tensors: one thread is fastest on a busy machine."""


def ids(n=4, t=32, seed=0):
    return torch.randint(4, 260, (n, t), generator=torch.Generator().manual_seed(seed))  # (N, T)


def snapshot(model) -> dict[str, torch.Tensor]:
    """Every parameter (under each of its names) and buffer, cloned."""
    out = {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}
    return out | {f"buffer:{n}": b.clone() for n, b in model.named_buffers(remove_duplicate=False)}


def assert_unchanged(model, before: dict[str, torch.Tensor]) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    moved = [n for n in before if before[n].dtype != after[n].dtype or not torch.equal(before[n], after[n])]
    assert not moved, f"the dense model changed: {moved}"


def ptr(model, name: str) -> int:
    return model.get_parameter(name).data_ptr()


def differs(a, b, name: str) -> bool:
    return not torch.equal(a.model.get_parameter(name), b.model.get_parameter(name))


# ---------------------------------------------------------------------------------------------
# The helpers


def test_shell_copy_shares_storage_not_modules_flags_or_buffers():
    dense = tiny_model("gemma")  # tied embeddings
    model = dense.model
    copy = shell_copy(model)
    for (name, p), (name2, q) in zip(model.named_parameters(), copy.named_parameters(), strict=True):
        assert name == name2 and p.data_ptr() == q.data_ptr() and p is not q and torch.equal(p, q)
    assert copy.lm_head.weight is copy.get_input_embeddings().weight  # still tied
    assert all(b.data_ptr() != c.data_ptr() for b, c in zip(model.buffers(), copy.buffers(), strict=True))
    assert not set(map(id, model.modules())) & set(map(id, copy.modules()))
    copy.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    assert model.model.layers[0].self_attn.q_proj.weight.requires_grad  # flags are the copy's own
    before = snapshot(model)
    copy.to(torch.float64)  # replaces the copy's tensors (param.data = ...): the original keeps its own
    copy.model.layers[0].mlp = torch.nn.Identity()
    assert_unchanged(model, before)
    assert isinstance(model.model.layers[0].mlp, torch.nn.Module) and not isinstance(
        model.model.layers[0].mlp, torch.nn.Identity
    )


def test_unshare_clones_what_it_selects_once_and_keeps_ties():
    model = tiny_model("gemma").model
    copy = shell_copy(model)
    head = "lm_head.weight"
    n = unshare(copy, lambda name, _p: name == head or name.endswith("q_proj.weight"))
    assert n == 1 + len(copy.model.layers)  # the tied head is one tensor under two names
    assert copy.lm_head.weight is copy.get_input_embeddings().weight  # both names get the one clone
    assert ptr(copy, head) != ptr(model, head) and torch.equal(copy.lm_head.weight, model.lm_head.weight)
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    assert ptr(copy, q) != ptr(model, q) and ptr(copy, k) == ptr(model, k)
    with torch.no_grad():
        copy.get_parameter(q).add_(1.0)
        copy.lm_head.weight.mul_(2.0)
    assert not torch.equal(copy.get_parameter(q), model.get_parameter(q))
    assert not torch.equal(copy.lm_head.weight, model.lm_head.weight)


def test_a_conversion_shares_attention_and_embeddings_and_owns_its_moe_blocks():
    dense = tiny_model("llama")
    moe = convert(dense, ids(4, 32), CMoEConfig(experts="S1A1E4", layers=(0,)))
    shared = [
        n for n, _ in dense.model.named_parameters() if ".mlp." not in n
    ]  # attention, norms, embeddings
    assert any("self_attn" in n for n in shared) and any("embed_tokens" in n for n in shared)
    assert all(ptr(moe.model, n) == ptr(dense.model, n) for n in shared)
    assert isinstance(moe.mlp(0), MoEMLP) and not isinstance(moe.mlp(1), MoEMLP)
    dense_ptrs = {p.data_ptr() for p in dense.model.parameters()}
    assert not {p.data_ptr() for p in moe.mlp(0).parameters()} & dense_ptrs  # the converted MLP: new memory
    assert all(p.data_ptr() in dense_ptrs for p in moe.mlp(1).parameters())  # the unconverted one: shared
    assert moe.mlp(1) is not dense.mlp(1)


def test_no_whole_model_deepcopy_in_moe_core():
    """`git grep deepcopy moe_core`: copying one MLP block is fine, a whole model (``x.model``) is not."""
    whole = re.compile(r"deepcopy\(\s*[\w.]*\bmodel\s*\)")
    hits = [
        f"{path.relative_to(ROOT)}:{i}"
        for path in sorted((ROOT / "moe_core").rglob("*.py"))
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if whole.search(line)
    ]
    assert not hits, f"whole-model deep copies: {hits}; use moe_core.plumbing.shell_copy"


# ---------------------------------------------------------------------------------------------
# The dense model stays exactly as it was through every stage


def test_cmoe_distillation_fine_tuning_plans_and_refits_leave_the_dense_model_alone():
    dense = tiny_model("llama")
    before = snapshot(dense.model)
    moe = convert(dense, ids(4, 32), CMoEConfig(experts="S1A1E4", layers=(0,)), routing=NATIVE)
    full = DistillConfig(tokens=4 * 32, seq_len=32, batch_size=2, train=PARTS, lr=1e-2, eval_every=100)
    distill(moe, dense, full, ids(4, 32, seed=1), ids(2, 32, seed=2))
    attn, norm = "model.layers.1.self_attn.q_proj.weight", "model.layers.1.input_layernorm.weight"
    assert differs(moe, dense, attn) and differs(moe, dense, norm)  # training wrote into the copy's own
    lora = DistillConfig(
        tokens=4 * 32, seq_len=32, batch_size=2, lr=1e-2, eval_every=100, lora_r=4,
        train=("experts", "shared", "attention", "norms"),
    )  # fmt: skip
    distill(moe, dense, lora, ids(4, 32, seed=3), ids(2, 32, seed=2))
    moe2 = convert(dense, ids(4, 32), CMoEConfig(experts="S1A1E4", layers=(0,)))
    finetune(moe2, ids(4, 16, seed=4), FINETUNE)  # LoRA merged into attention and the unconverted MLP
    assert differs(moe2, dense, attn) and differs(moe2, dense, "model.layers.1.mlp.down_proj.weight")
    assert_unchanged(dense.model, before)

    # a routing plan's copy shares the converted model's weights; refitting or tuning it leaves both alone
    kept = snapshot(moe2.model)
    plan = Plan({0: {"mode": "topk", "k": 1}}, {0: "top-1"}, {}, {})
    planned = apply_plan(moe2, plan, dense)
    settings = ReconstructSettings(router="trained", form="native", refit=True)
    reconstruct_model(planned, dense, ids(4, 32), settings)
    finetune(planned, ids(4, 16, seed=5), FINETUNE)
    assert differs(planned, moe2, "model.layers.0.mlp.down_proj")
    assert_unchanged(moe2.model, kept)
    assert_unchanged(dense.model, before)


def test_dive_conversion_routing_and_retraining_leave_the_dense_model_alone():
    dense = tiny_model("llama")
    before = snapshot(dense.model)
    retrain = DIVERetrainConfig(stage1_steps=2, stage2_steps=2, batch_size=2, router_lr=5e-2, lr=1e-2)
    cfg = DIVEConfig(
        domains=("builtin:pydoc", "builtin:stdlib"), n_experts=2, top_k=2, n_sequences=2, seq_len=32,
        max_chars=20_000, retrain=retrain,
    )  # fmt: skip
    moe = convert(dense, ids(), cfg, method="dive", routing=NATIVE)
    assert set(moe.conversion.retrain) == {"stage1", "stage2"}
    assert differs(moe, dense, "model.norm.weight")  # stage 2 trains every norm
    assert ptr(moe.model, "model.layers.0.self_attn.q_proj.weight") == ptr(
        dense.model, "model.layers.0.self_attn.q_proj.weight"
    )  # attention stays frozen, and shared
    distill(moe, dense, DistillConfig(tokens=2 * 32, seq_len=32, batch_size=2, train=PARTS, lr=1e-2),
            ids(2, 32, seed=1), ids(2, 32, seed=2))  # fmt: skip
    assert_unchanged(dense.model, before)


def test_ladimo_training_and_distillation_leave_the_dense_model_alone():
    dense = tiny_model("llama")
    before = snapshot(dense.model)
    cfg = LaDiMoConfig(n_experts=4, n_shared=0, top_k=2, steps=4, batch_tokens=64)
    moe = convert(dense, ids(4, 32), cfg, method="ladimo")
    lora = DistillConfig(tokens=2 * 32, seq_len=32, batch_size=2, train=PARTS, lora_r=4, lr=1e-2)
    distill(moe, dense, lora, ids(2, 32, seed=1), ids(2, 32, seed=2))
    assert differs(moe, dense, "model.layers.0.self_attn.o_proj.weight")
    assert_unchanged(dense.model, before)


# ---------------------------------------------------------------------------------------------
# Saving while the weights are shared with another model


@pytest.mark.parametrize("family", ["llama", "gemma"])  # gemma: tied embeddings
def test_a_converted_model_sharing_the_dense_weights_saves_and_reloads(family, tmp_path):
    dense = tiny_model(family)
    moe = convert(dense, ids(4, 32), CMoEConfig(experts="S1A1E4", layers=(0,)))
    embed = "model.embed_tokens.weight"
    assert ptr(moe.model, embed) == ptr(dense.model, embed)
    save_converted(moe, tmp_path / "ckpt", {"method": "cmoe"})
    back = load_converted(tmp_path / "ckpt")
    x = ids(2, 16, seed=7)
    with torch.no_grad():
        assert torch.equal(moe.model(x).logits, back.model(x).logits)
    if family == "gemma":
        assert back.model.lm_head.weight.data_ptr() == back.model.get_input_embeddings().weight.data_ptr()
