"""Distillation recovery: the dense model teaches the converted one; budgets, cancel, resume, LoRA, cache."""

import types

import pytest
import torch

from moe_core import Cancelled
from moe_core import distill as distill_module
from moe_core.config import CMoEConfig, DistillConfig, RoutingConfig
from moe_core.distill import CHECKPOINT, distill, kl_loss, part_params, teacher_topk
from moe_core.methods import convert
from moe_core.model_io import tiny_model
from moe_core.moe import MoEMLP


def ids(dense, n, length=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, len(dense.tokenizer), (n, length), generator=g)


@pytest.fixture(scope="module")
def dense():
    return tiny_model("llama")


def converted(dense, native=False):
    routing = RoutingConfig(router="trained", form="native", refit=True) if native else None
    return convert(dense, ids(dense, 8, 64), CMoEConfig(experts="S1A1E4"), routing=routing)


def weights(moe):
    return {n: p.detach().clone() for n, p in moe.model.named_parameters()}


@pytest.mark.parametrize("native", [False, True])
def test_distillation_lowers_the_held_out_kl(dense, native):
    moe = converted(dense, native)
    flags = {n: p.requires_grad for n, p in moe.model.named_parameters()}
    cfg = DistillConfig(tokens=32 * 32, seq_len=32, batch_size=4, lr=3e-3, eval_every=4)
    stats = distill(moe, dense, cfg, ids(dense, 32), ids(dense, 2, seed=9))
    first, last = stats["held_out"][0][1], stats["held_out"][-1][1]
    assert stats["steps"] == 8 and stats["stopped"] == "tokens"
    assert last < first
    assert not moe.model.training
    assert {n: p.requires_grad for n, p in moe.model.named_parameters()} == flags  # restored as they were


def test_distillation_trains_when_called_under_no_grad(dense):
    """A conversion runs under torch.no_grad, and the distillation it ends with must still train."""
    moe = converted(dense)
    before = weights(moe)
    with torch.no_grad():
        cfg = DistillConfig(tokens=4 * 32, seq_len=32, lr=1e-2)
        distill(moe, dense, cfg, ids(dense, 4), ids(dense, 1, seed=9))
    assert any(not torch.equal(before[n], p) for n, p in moe.model.named_parameters())


def test_only_the_named_parts_change(dense):
    moe = converted(dense)
    before = weights(moe)
    cfg = DistillConfig(tokens=8 * 32, seq_len=32, train=("routers", "norms"), lr=1e-2)
    distill(moe, dense, cfg, ids(dense, 8), ids(dense, 1, seed=9))
    trained = set(part_params(moe.model, ("routers", "norms")))
    after = weights(moe)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= trained


def blocks(moe):
    return [m for m in moe.model.modules() if isinstance(m, MoEMLP)]


@pytest.mark.parametrize("native", [False, True])
def test_a_detached_router_input_keeps_the_router_gradient(dense, native):
    """Detaching changes only the hidden states' gradient, and only where the gates are the router's probabilities."""
    block = blocks(converted(dense, native))[0]
    x = torch.randn(16, block.hidden_size)
    grads = []
    for flowing in (True, False):
        block.router_input_grad = flowing
        xg = x.clone().requires_grad_(True)
        block.zero_grad(set_to_none=True)
        with torch.enable_grad():
            block(xg).square().sum().backward()
        router = [p.grad for p in block.router.parameters()]
        grads.append((xg.grad, torch.cat([torch.zeros(1) if g is None else g.flatten() for g in router])))
    (x_flow, r_flow), (x_cut, r_cut) = grads
    assert torch.allclose(r_flow, r_cut, atol=1e-6)  # the router trains the same either way
    assert (r_flow.abs().sum() > 0) == native  # unit gates: the router gets no gradient at all
    assert torch.allclose(x_flow, x_cut, atol=1e-6) != native


def test_distillation_detaches_the_router_input_and_restores_it(dense):
    moe = converted(dense, native=True)
    seen = []
    before = weights(moe)
    cfg = DistillConfig(tokens=4 * 32, seq_len=32, train=("routers",), lr=1e-2)
    on_step = lambda record: seen.append([b.router_input_grad for b in blocks(moe)])  # noqa: E731
    distill(moe, dense, cfg, ids(dense, 4), ids(dense, 1, seed=9), on_step=on_step)
    assert seen and not any(flag for step in seen for flag in step)
    assert all(b.router_input_grad for b in blocks(moe))
    assert any(not torch.equal(before[n], p) for n, p in moe.model.named_parameters() if "router" in n)


def test_lora_merges_and_leaves_a_plain_model(dense):
    moe = converted(dense)
    before = weights(moe)
    cfg = DistillConfig(tokens=8 * 32, seq_len=32, train=("experts", "shared"), lora_r=4, lr=1e-2)
    stats = distill(moe, dense, cfg, ids(dense, 8), ids(dense, 1, seed=9))
    names = [n for n, _ in moe.model.named_modules()]
    assert not any("lora" in n for n in names)
    after = weights(moe)
    assert set(after) == set(before)
    assert not torch.equal(
        before["model.layers.0.mlp.gate_up_proj"], after["model.layers.0.mlp.gate_up_proj"]
    )
    assert stats["trained_params"] > 0


def test_cancel_restores_the_model_exactly(dense):
    moe = converted(dense)
    before = weights(moe)
    calls = iter(range(100))
    with pytest.raises(Cancelled):
        distill(moe, dense, DistillConfig(tokens=16 * 32, seq_len=32, lr=1e-2), ids(dense, 16),
                ids(dense, 1, seed=9), cancel=lambda: next(calls) >= 2)  # fmt: skip
    after = weights(moe)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_a_killed_run_resumes_to_the_same_model(dense, tmp_path):
    cfg = DistillConfig(tokens=12 * 32, seq_len=32, batch_size=2, lr=1e-2, checkpoint_every=2, eval_every=100,
                         checkpoint_minutes=0)  # fmt: skip
    train, held = ids(dense, 12), ids(dense, 1, seed=9)
    whole = converted(dense)
    distill(whole, dense, cfg, train, held)

    killed = converted(dense)
    steps = iter(range(100))
    with pytest.raises(Cancelled):  # stands in for a kill after step 4 (its checkpoint is the last)
        distill(killed, dense, cfg, train, held, checkpoint=tmp_path, cancel=lambda: next(steps) >= 4)
    assert (tmp_path / CHECKPOINT).is_file()
    resumed = converted(dense)  # the same conversion again, as a restarted run does
    stats = distill(resumed, dense, cfg, train, held, checkpoint=tmp_path)
    assert stats["resumed_at"] == 4 and stats["steps"] == 6
    assert not (tmp_path / CHECKPOINT).exists()
    a, b = weights(whole), weights(resumed)
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)


def test_checkpoints_are_minutes_apart(dense, tmp_path):
    cfg = DistillConfig(
        tokens=8 * 32, seq_len=32, batch_size=2, lr=1e-2, checkpoint_every=1, checkpoint_minutes=60
    )
    steps = iter(range(100))  # four steps due a checkpoint each, all within the first hour: none written
    with pytest.raises(Cancelled):
        distill(converted(dense), dense, cfg, ids(dense, 8), ids(dense, 1, seed=9), checkpoint=tmp_path,
                cancel=lambda: next(steps) >= 3)  # fmt: skip
    assert not (tmp_path / CHECKPOINT).exists()


def test_a_checkpoint_of_another_run_is_ignored(dense, tmp_path):
    cfg = DistillConfig(
        tokens=8 * 32, seq_len=32, batch_size=2, lr=1e-2, checkpoint_every=1, checkpoint_minutes=0
    )
    train, held = ids(dense, 8), ids(dense, 1, seed=9)
    steps = iter(range(100))
    with pytest.raises(Cancelled):
        distill(
            converted(dense), dense, cfg, train, held, checkpoint=tmp_path, cancel=lambda: next(steps) >= 2
        )
    other = DistillConfig(
        tokens=8 * 32, seq_len=32, batch_size=2, lr=5e-3, checkpoint_every=1, checkpoint_minutes=0
    )
    stats = distill(converted(dense), dense, other, train, held, checkpoint=tmp_path)
    assert "resumed_at" not in stats and stats["steps"] == 4


def test_time_budget_stops_early(dense):
    cfg = DistillConfig(tokens=64 * 32, seq_len=32, batch_size=1, max_minutes=1e-9)
    stats = distill(converted(dense), dense, cfg, ids(dense, 64), ids(dense, 1, seed=9))
    assert stats["stopped"] == "time" and stats["steps"] == 1


def test_a_run_its_time_budget_ends_has_annealed(dense, monkeypatch):
    """The learning rate decays by whichever budget is further spent: cut by time at a fifth of its steps, the
    run still ends at the floor (a tenth of distill.lr), halfway through its time at the cosine's midpoint."""
    clock = iter(range(10**6))  # each reading of the distillation's clock is one second later
    monkeypatch.setattr(
        distill_module, "time", types.SimpleNamespace(perf_counter=lambda: float(next(clock)))
    )
    records = []
    cfg = DistillConfig(tokens=160 * 32, seq_len=32, batch_size=1, lr=1e-3, max_minutes=0.5, eval_every=1000,
                        teacher_dtype="float32")  # fmt: skip
    stats = distill(
        converted(dense), dense, cfg, ids(dense, 160), ids(dense, 1, seed=9), on_step=records.append
    )
    assert stats["stopped"] == "time" and 25 <= stats["steps"] <= 35
    lrs = {r["step"]: r["lr"] for r in records}
    assert lrs[stats["steps"]] == pytest.approx(1e-4, rel=0.02)
    assert lrs[16] == pytest.approx(5.5e-4, rel=0.1)


def test_teacher_dtype(dense):
    """float32 or bfloat16 as asked; auto: bfloat16 only where this device's bfloat16 matmuls are faster. A
    bfloat16 teacher's loss is close to the float32 one's."""
    assert distill_module.teacher_dtype(dense, DistillConfig(teacher_dtype="float32")) == torch.float32
    assert distill_module.teacher_dtype(dense, DistillConfig(teacher_dtype="bfloat16")) == torch.bfloat16
    faster = distill_module._bf16_faster("cpu")
    auto = distill_module.teacher_dtype(dense, DistillConfig())
    assert auto == (torch.bfloat16 if faster else torch.float32)
    moe, batch, cfg = converted(dense), ids(dense, 2), DistillConfig(tokens=64, seq_len=32)
    loss = {dtype: distill_module._step(moe.model, dense, cfg, batch, None, dtype).item()
            for dtype in (torch.float32, torch.bfloat16)}  # fmt: skip
    assert loss[torch.float32] > 0 and loss[torch.bfloat16] == pytest.approx(loss[torch.float32], rel=0.05)
    with pytest.raises(ValueError, match="teacher_dtype"):
        DistillConfig(teacher_dtype="fp8")


def test_cached_teacher_top_k(dense, tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_STUDIO_CACHE", str(tmp_path))
    train = ids(dense, 4)
    values, indices = teacher_topk(dense, train, 8, batch_size=2)
    assert values.shape == (4, 32, 8) and indices.dtype == torch.int32
    assert list((tmp_path / "teacher-topk").glob("*.pt"))
    with torch.no_grad():
        full = dense.model(input_ids=train).logits
    assert torch.equal(indices[0, 0].long().sort().values, full[0, 0].topk(8).indices.sort().values)
    logits = torch.randn(2, 5, 260) * 3
    student = torch.randn(2, 5, 260)
    every = logits.topk(260)
    exact = kl_loss(student, logits)
    torch.testing.assert_close(kl_loss(student, topk=(every.values, every.indices)), exact)

    moe, calls = converted(dense), []
    cfg = DistillConfig(tokens=4 * 32, seq_len=32, batch_size=2, teacher_topk=8, lr=3e-3, eval_every=100)
    before = weights(moe)
    handle = dense.model.register_forward_hook(lambda m, a, o: calls.append(1))
    try:  # the cache is there: the teacher runs only for the two held-out measurements
        distill(moe, dense, cfg, train, ids(dense, 1, seed=9))
    finally:
        handle.remove()
    assert len(calls) == 2
    assert not torch.equal(
        before["model.layers.0.mlp.down_proj"], weights(moe)["model.layers.0.mlp.down_proj"]
    )


def plain_kl(student, teacher):
    ref = torch.log_softmax(teacher.float(), dim=-1)
    return (ref.exp() * (ref - torch.log_softmax(student.float(), dim=-1))).sum(-1).mean()


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_fused_kl_equals_the_plain_formula_and_its_gradient(scale):
    """Chunked (KL_ROWS rows at a time, a partial last chunk here) with the gradient written in the forward."""
    teacher = torch.randn(3, 70, 300) * 3
    grads = []
    for kl in (kl_loss, plain_kl):
        start = torch.randn(3, 70, 300, generator=torch.Generator().manual_seed(1)) * 2
        student = start.requires_grad_(True)
        loss = kl(student, teacher)
        (scale * loss).backward()
        grads.append((loss.detach(), student.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-9)


def test_hidden_state_term_runs(dense):
    cfg = DistillConfig(tokens=4 * 32, seq_len=32, batch_size=2, hidden_weight=1.0, lr=1e-3)
    stats = distill(converted(dense), dense, cfg, ids(dense, 4), ids(dense, 1, seed=9))
    assert stats["steps"] == 2 and all(v > 0 for v in stats["losses"])


def test_bad_config_is_explained():
    with pytest.raises(ValueError, match="unknown part"):
        DistillConfig(train=("experts", "everything"))
    with pytest.raises(ValueError, match="cover one window"):
        DistillConfig(tokens=10, seq_len=256)
