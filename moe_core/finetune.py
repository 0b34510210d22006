"""Light fine-tuning of a converted model: LoRA + CMoE's trainable gate scales + aux-loss-free balancing;
and DIVE's two retraining stages (:func:`dive_retrain`, at the end of this module).

CMoE (arXiv 2502.04416, §4.3 eq. 9 and §5.1): LoRA (r 8, alpha 32) on attention q/k/v/o and every expert
projection; the per-expert scale u of g = 1 + p * u trains with its own Adam learning rate (1e-3); the
selection bias b follows the sign rule after every forward pass (overloaded experts lose gamma = 1e-3,
under-loaded ones gain it; MoEMLP applies it in train mode); Adam betas (0.9, 0.95), no schedule;
causal-LM loss with labels = input_ids; LoRA merged at the end, so the result is the plain model again.

Differences from the released code, on purpose:
- u trains. ``get_peft_model`` freezes every parameter without ``lora_`` in its name, so the released code
  puts u in an Adam group but never updates it (it stays 0, gates stay exactly 1); we re-enable it.
- routed experts get LoRA too: they are stacked tensors (E, 2I, H) / (E, H, I), which peft >= 0.17 adapts
  with ``target_parameters`` (one rank-r pair per expert); the shared expert's Linear layers and the
  attention projections use ordinary LoRA.
- LoRA dropout defaults to 0 (code: 0.1): peft cannot apply dropout to a parameter-level LoRA, and one
  LoRA config covers both kinds. ``expert_lora=False`` allows dropout (then routed experts stay frozen).
- the learning rate: the paper's 5.95e-5 is for ~1000 steps of 2 x 2048 tokens; a CPU budget of a few
  dozen steps of 2 x 256 tokens needs a larger one (FinetuneConfig.lr, measured in benchmarks/cmoe_quality.py).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable

import torch

from .config import DIVERetrainConfig, FinetuneConfig
from .moe import MoEMLP, RoutingPolicy
from .plumbing import unshare_params
from .profiling import check_cancel

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
DENSE_FFN = ("gate_proj", "up_proj", "down_proj", "gate_up_proj")  # shared expert; unconverted MLPs; Phi-3
ADAM_BETAS = (0.9, 0.95)  # paper and code


def _blocks(model) -> dict[str, MoEMLP]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MoEMLP)}


def lora_config(model, cfg: FinetuneConfig):
    """A peft LoraConfig for this model: attention + dense-FFN Linears, and each MoEMLP's stacked experts."""
    from peft import LoraConfig

    expert_params = []
    if cfg.expert_lora:
        expert_params = [f"{n}.{p}" for n in _blocks(model) for p in ("gate_up_proj", "down_proj")]
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        bias="none",
        target_modules=list(ATTENTION + DENSE_FFN),
        target_parameters=expert_params or None,
    )


def _own_written(model, linears: tuple[str, ...] = (), norms: bool = False) -> None:
    """Before a stage writes into ``model`` in place, give it its own copy of what it writes: every MoE block's
    tensors (trained, merged into, padding zeroed), the Linears whose names end in ``linears`` (LoRA merges)
    and, with ``norms``, the norms. A converted model shares the rest with the dense one (plumbing.shell_copy),
    which must stay exactly as it was: it is the teacher, the reference, and the next conversion's source."""
    owned = [p for block in _blocks(model).values() for p in block.parameters()]
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in linears:
            owned += list(module.parameters(recurse=False))
    if norms:
        owned += norm_params(model)
    unshare_params(model, owned)


def _mask_expert_padding(peft_model, blocks: dict[str, MoEMLP]) -> None:
    """Keep zero-padded expert columns at zero: an expert narrower than the stack stays exactly that narrow.

    Padded neurons of expert e are down_proj[e, :, n_e:]; their LoRA delta is B_e A_e[:, n_e:], so zeroing
    those columns of A_e (and their gradient) keeps the padding inert while training and after merging.
    """
    from peft.tuners.lora.layer import ParamWrapper

    for module in peft_model.modules():
        if not (isinstance(module, ParamWrapper) and module.parameter_name == "down_proj"):
            continue
        block = module.get_base_layer()
        width, sizes = block.down_proj.shape[-1], block.expert_sizes
        if min(sizes) == width:
            continue
        keep = torch.ones(len(sizes), 1, width)  # (E, 1, I)
        for e, n in enumerate(sizes):
            keep[e, :, n:] = 0
        for weight in (lora_a.weight for lora_a in module.lora_A.values()):  # (E * r, I)
            mask = keep.expand(-1, weight.shape[0] // len(sizes), -1).reshape(weight.shape).to(weight)
            with torch.no_grad():
                weight.mul_(mask)
            weight.register_hook(lambda grad, mask=mask: grad * mask)


def _zero_padding(blocks: dict[str, MoEMLP]) -> None:
    """After merging: padded gate/up rows got LoRA deltas but meet zero down columns; restore exact zeros."""
    with torch.no_grad():
        for block in blocks.values():
            width = block.down_proj.shape[-1]
            for e, n in enumerate(block.expert_sizes):
                block.gate_up_proj[e, n:width] = 0
                block.gate_up_proj[e, width + n :] = 0
                block.down_proj[e, :, n:] = 0


def _unload_nested(model, merge: bool) -> None:
    """Take out adapter layers that sit inside another one, innermost first, merging them if asked.

    peft's own unload skips them: the shared expert's LoRA Linears live inside the ParamWrapper that
    holds the MoEMLP's expert tensors, and would otherwise stay in the model unmerged.
    """
    from peft.tuners.lora.layer import ParamWrapper
    from peft.tuners.tuners_utils import BaseTunerLayer

    tuners = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    nested = [n for n in tuners if any(n.startswith(f"{outer}.") for outer in tuners)]
    for name in reversed(nested):
        module = model.get_submodule(name)
        if isinstance(module, ParamWrapper):
            continue  # the outermost ParamWrapper merges the ones it wraps
        if merge:
            module.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module.get_base_layer())


@contextlib.contextmanager
def merged_lora(model, blocks: dict[str, MoEMLP], config, seed: int):
    """``model`` wrapped by peft with the LoRA ``config`` while inside (factors initialised from ``seed``; the
    caller's RNG is left alone), padded expert columns masked. On a clean exit the factors are merged into the
    base weights and the padding is exact zeros again; on an exception they are dropped unmerged (the base
    weights were never touched). Yields the peft model to train."""
    from peft import get_peft_model

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    try:
        _mask_expert_padding(peft_model, blocks)
        yield peft_model
    except BaseException:
        _unload_nested(model, merge=False)
        peft_model.unload()
        raise
    _unload_nested(model, merge=True)
    peft_model.merge_and_unload()
    _zero_padding(blocks)


def _batches(input_ids: torch.Tensor, cfg: FinetuneConfig) -> list[torch.Tensor]:
    """Seeded shuffles of input_ids (N, T), one per epoch, cut into (B, T) batches."""
    g = torch.Generator().manual_seed(cfg.seed)
    out = []
    for _ in range(cfg.epochs):
        out += list(input_ids[torch.randperm(len(input_ids), generator=g)].split(cfg.batch_size))
    return out


def _optimizer(peft_model, blocks: dict[str, MoEMLP], cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """Adam with two groups: LoRA factors at cfg.lr, the CMoE gate scales u at cfg.scale_lr."""
    scales = [b.gate_scale for b in blocks.values() if b.gate_mode == "cmoe"]  # u only acts in cmoe gates
    for u in scales:
        u.requires_grad_(True)  # get_peft_model froze it: the released code's bug
    lora = [p for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" in n]
    groups = [{"params": lora, "lr": cfg.lr}]
    if scales:
        groups.append({"params": scales, "lr": cfg.scale_lr})
    return torch.optim.Adam(groups, betas=ADAM_BETAS, eps=1e-8)


def _snapshot(model, blocks: dict[str, MoEMLP]) -> dict:
    """What fine-tuning changes besides merged weights: grad flags, u, b, gamma, train mode."""
    return {
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "u": {n: b.gate_scale.detach().clone() for n, b in blocks.items()},
        "b": {n: b.selection_bias.clone() for n, b in blocks.items()},
        "gamma": {n: b.balance_gamma for n, b in blocks.items()},
        "training": model.training,
    }


def _restore(model, blocks: dict[str, MoEMLP], saved: dict, values: bool) -> None:
    """Put flags back; with ``values`` also u and b (a cancelled run leaves the model as it was)."""
    for name, p in model.named_parameters():
        p.requires_grad_(saved["requires_grad"].get(name, True))
    for name, block in blocks.items():
        block.balance_gamma = saved["gamma"][name]
        if values:
            with torch.no_grad():
                block.gate_scale.copy_(saved["u"][name])
                block.selection_bias.copy_(saved["b"][name])
    model.train(saved["training"])


@torch.enable_grad()  # it trains whatever the caller's grad mode
def _train(peft_model, blocks, batches, opt, cfg: FinetuneConfig, progress, cancel) -> dict:
    """The CMoE loop: MoEMLP moves b by the sign rule inside each forward."""
    for block in blocks.values():
        block.balance_gamma = cfg.balance_gamma
    return _run_steps(peft_model, batches, opt, progress, cancel)


def _run_steps(model, batches, opt, progress, cancel, label: str = "Fine-tuning") -> dict:
    """Causal-LM loss (labels = input_ids), one optimiser step per (B, T) batch; losses and seconds."""
    model.train()
    device, losses, start = next(model.parameters()).device, [], time.perf_counter()
    for step, ids in enumerate(batches):
        check_cancel(cancel)
        ids = ids.to(device)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        if not math.isfinite(loss.item()):
            raise ValueError(
                f"{label} loss became {float(loss)} at step {step + 1}: lower the learning rate."
            )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if progress:
            progress(
                (step + 1) / len(batches), f"{label} step {step + 1}/{len(batches)}: loss {losses[-1]:.3f}"
            )
    quarter = max(1, len(losses) // 4)  # single batches are noisy: compare the first and last quarters
    return {
        "steps": len(batches),
        "losses": losses,
        "loss_first": sum(losses[:quarter]) / quarter,
        "loss_last": sum(losses[-quarter:]) / quarter,
        "seconds": time.perf_counter() - start,
    }


def training_ids(dense, cfg: FinetuneConfig | None = None) -> torch.Tensor:
    """The fine-tuning sequences a config asks for: (n_sequences, seq_len) ids sampled from cfg.text."""
    from .data import load_documents, sample_sequences

    cfg = cfg or FinetuneConfig()
    text = training_text(cfg)
    docs = load_documents(text, model=dense, seed=cfg.seed)
    return sample_sequences(docs, dense.tokenizer, cfg.n_sequences, cfg.seq_len, cfg.seed, source=text)


def training_text(cfg: FinetuneConfig) -> str:
    """cfg.text, with ``auto`` resolved: Wikipedia prose from the shared data when present, else Python's docs."""
    from .data import default_text

    return default_text() if cfg.text == "auto" else cfg.text


def finetune(
    moe,
    input_ids: torch.Tensor,
    cfg: FinetuneConfig | None = None,
    progress: Callable[[float, str], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> dict:
    """Fine-tune a converted DenseModel in place on input_ids (N, T); returns stats (losses, seconds, ...).

    Afterwards the model holds the merged weights and trained u and b, in eval mode, with no peft module
    left. On cancel (raises moe_core.Cancelled) or an error, the model is restored exactly first.
    """
    cfg = cfg or FinetuneConfig()
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(
            f"Fine-tuning needs input_ids of shape (N, T) with T >= 2, got {tuple(input_ids.shape)}."
        )
    model, blocks = moe.model, _blocks(moe.model)
    _own_written(model, ATTENTION + DENSE_FFN)
    saved = _snapshot(model, blocks)
    try:
        with merged_lora(model, blocks, lora_config(model, cfg), cfg.seed) as peft_model:
            opt = _optimizer(peft_model, blocks, cfg)
            n_lora = sum(p.numel() for g in opt.param_groups[:1] for p in g["params"])
            stats = _train(peft_model, blocks, _batches(input_ids, cfg), opt, cfg, progress, cancel)
    except BaseException:  # cancelled, interrupted or failed: the adapters are dropped, the model restored
        _restore(model, blocks, saved, values=True)
        raise
    _restore(model, blocks, saved, values=False)
    model.eval()
    return stats | _summary(blocks, cfg, input_ids, n_lora)


def _summary(blocks: dict[str, MoEMLP], cfg: FinetuneConfig, input_ids, n_lora: int) -> dict:
    k = max(1, len(blocks))
    return {
        "tokens": cfg.epochs * input_ids.numel(),
        "lora_params": n_lora,
        "moe_layers": len(blocks),
        "u_abs_mean": sum(float(b.gate_scale.detach().abs().mean()) for b in blocks.values()) / k,
        "bias_abs_mean": sum(float(b.selection_bias.abs().mean()) for b in blocks.values()) / k,
    }


# ---------------------------------------------------------------------------------------------
# DIVE's two retraining stages (arXiv 2506.09351 §3.3; code: trainers/train_router.py, train_expert.py)


def _cycled_batches(input_ids: torch.Tensor, steps: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """``steps`` (B, T) batches from seeded shuffles of input_ids (N, T), as many passes as it takes."""
    g, rows = torch.Generator().manual_seed(seed), []
    while len(rows) < steps * batch_size:
        rows += torch.randperm(len(input_ids), generator=g).tolist()
    return list(input_ids[torch.tensor(rows[: steps * batch_size], dtype=torch.long)].split(batch_size))


def _router_params(blocks: dict[str, MoEMLP]) -> list[torch.nn.Parameter]:
    return [p for b in blocks.values() for p in b.router.parameters()]


def norm_params(model) -> list[torch.nn.Parameter]:
    """Every normalisation layer's weights outside attention: input, post-attention and final RMSNorms.

    Qwen3's q/k norms live in self_attn, which DIVE keeps frozen.
    """
    params = []
    for name, module in model.named_modules():
        if "norm" in type(module).__name__.lower() and ".self_attn." not in f".{name}.":
            params += list(module.parameters(recurse=False))
    return params


@contextlib.contextmanager
def _dive_stage(model, blocks: dict[str, MoEMLP], trained: list[torch.nn.Parameter]):
    """Grad flags, train mode and routing settings come back afterwards; on cancel or error the trained
    full parameters get their old values too (LoRA factors are dropped by the caller), so nothing changed."""
    saved = _snapshot(model, blocks)
    values = [p.detach().clone() for p in trained]
    routing = {n: (b.policy, b.gate_mode, b.temperature) for n, b in blocks.items()}
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for p, v in zip(trained, values, strict=True):
                p.copy_(v)
        raise
    finally:
        for name, block in blocks.items():
            block.policy, block.gate_mode, block.temperature = routing[name]
        _restore(model, blocks, saved, values=False)
        model.eval()


def train_router(moe, input_ids: torch.Tensor, cfg: DIVERetrainConfig, progress=None, cancel=None) -> dict:
    """DIVE stage 1 in place: only the routers (W_r, W_noise) train; every expert runs with softmax gates at
    temperature t (0.05 for top-1, 0.5 for top-2: a sharp softmax that approximates the sparse model, which a
    top-1 router could not learn from, its renormalised gate being the constant 1). Returns loop stats."""
    model, blocks = moe.model, _blocks(moe.model)
    _own_written(model)
    routers = _router_params(blocks)
    top_k = max(b.policy.k for b in blocks.values())
    with _dive_stage(model, blocks, routers):
        for p in model.parameters():
            p.requires_grad_(False)
        for p in routers:
            p.requires_grad_(True)
        for block in blocks.values():
            block.policy = RoutingPolicy("topk", k=block.n_experts)
            block.gate_mode, block.temperature = "prob", cfg.stage1_temperature(top_k)
        opt = torch.optim.Adam(routers, lr=cfg.router_lr)  # HF Trainer's AdamW defaults, no weight decay
        batches = _cycled_batches(input_ids, cfg.stage1_steps, cfg.batch_size, cfg.seed)
        return _run_steps(model, batches, opt, progress, cancel, "DIVE stage 1 (router)")


def _expert_lora(blocks: dict[str, MoEMLP], cfg: DIVERetrainConfig):
    """LoRA on every block's stacked experts (and shared expert, if any); never attention.

    target_modules must be a list: None makes peft fall back to its per-architecture default (q_proj, v_proj).
    """
    from peft import LoraConfig

    shared = [
        f"{n}.shared_expert.{p}"
        for n, b in blocks.items()
        if b.shared_expert is not None
        for p in DENSE_FFN[:3]
    ]
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=0.0,  # code 0.1; peft has no dropout for parameter-level LoRA (see FinetuneConfig)
        bias="none",
        target_modules=shared,
        target_parameters=[f"{n}.{p}" for n in blocks for p in ("gate_up_proj", "down_proj")],
    )


def train_experts(
    moe, input_ids: torch.Tensor, cfg: DIVERetrainConfig, steps: int | None = None, progress=None, cancel=None
) -> dict:
    """DIVE stage 2 in place: LoRA (r 8, alpha 16) on the experts, the routers (top-2 and up) and every RMSNorm
    trained fully, attention and embeddings frozen; top-k routing with training noise. LoRA is merged at the end.

    steps: defaults to cfg.stage2_steps (the FLAP baseline uses stage 1 + stage 2 steps here).
    """

    model, blocks = moe.model, _blocks(moe.model)
    _own_written(model, norms=True)
    # A top-1 router has no gradient here (its gate p / p is 1), only float rounding (~1e-7) that Adam's
    # normalisation would turn into full-size random steps: only routers choosing k >= 2 train in stage 2.
    routers = _router_params({n: b for n, b in blocks.items() if b.policy.k > 1})
    full = routers + norm_params(model)
    batches = _cycled_batches(
        input_ids, cfg.stage2_steps if steps is None else steps, cfg.batch_size, cfg.seed + 1
    )
    with (
        _dive_stage(model, blocks, full),
        merged_lora(model, blocks, _expert_lora(blocks, cfg), cfg.seed) as peft,
    ):
        for p in full:
            p.requires_grad_(True)  # get_peft_model froze them
        lora = [p for n, p in peft.named_parameters() if p.requires_grad and "lora_" in n]
        opt = torch.optim.Adam([{"params": lora}, {"params": full}], lr=cfg.lr)
        stats = _run_steps(peft, batches, opt, progress, cancel, "DIVE stage 2 (experts)")
    return stats | {"lora_params": sum(p.numel() for p in lora), "full_params": sum(p.numel() for p in full)}


def dive_retrain(
    moe, input_ids: torch.Tensor, cfg: DIVERetrainConfig | None = None, progress=None, cancel=None
) -> dict:
    """Both DIVE stages on input_ids (N, T), in place: {"stage1": stats, "stage2": stats} (a stage with 0 steps,
    and stage 1 of one-expert blocks, which have no routing to learn, are skipped). On cancel (Cancelled) or
    error the stage in progress is undone; a finished stage 1 stays."""
    cfg = cfg or DIVERetrainConfig()
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(
            f"Retraining needs input_ids of shape (N, T) with T >= 2, got {tuple(input_ids.shape)}."
        )
    blocks = _blocks(moe.model)
    if not blocks:
        raise ValueError("DIVE retraining needs a converted model (MoEMLP blocks); this one has none.")
    routed = any(b.n_experts > 1 for b in blocks.values())
    stage1 = cfg.stage1_steps if routed else 0
    out, split = {}, stage1 / max(1, stage1 + cfg.stage2_steps)
    if stage1:
        part = None if progress is None else (lambda f, m: progress(split * f, m))
        out["stage1"] = train_router(moe, input_ids, cfg, part, cancel)
    if cfg.stage2_steps:
        part = None if progress is None else (lambda f, m: progress(split + (1 - split) * f, m))
        out["stage2"] = train_experts(moe, input_ids, cfg, progress=part, cancel=cancel)
    return out
