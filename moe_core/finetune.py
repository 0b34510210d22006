"""Light fine-tuning of a converted model: LoRA + CMoE's trainable gate scales + aux-loss-free balancing.

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

import math
import time
from collections.abc import Callable

import torch

from .config import FinetuneConfig
from .moe import MoEMLP
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


def _train(peft_model, blocks, batches, opt, cfg: FinetuneConfig, progress, cancel) -> dict:
    """The loop: causal-LM loss, Adam step; MoEMLP moves b by the sign rule inside each forward."""
    for block in blocks.values():
        block.balance_gamma = cfg.balance_gamma
    peft_model.train()
    device, losses, start = next(peft_model.parameters()).device, [], time.perf_counter()
    for step, ids in enumerate(batches):
        check_cancel(cancel)
        ids = ids.to(device)
        loss = peft_model(input_ids=ids, labels=ids, use_cache=False).loss
        if not math.isfinite(loss.item()):
            raise ValueError(f"Fine-tuning loss became {float(loss)} at step {step + 1}: lower finetune.lr.")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if progress:
            progress(
                (step + 1) / len(batches),
                f"Fine-tuning step {step + 1}/{len(batches)}: loss {losses[-1]:.3f}",
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
    docs = load_documents(cfg.text, model=dense, seed=cfg.seed)
    return sample_sequences(docs, dense.tokenizer, cfg.n_sequences, cfg.seq_len, cfg.seed, source=cfg.text)


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
    from peft import get_peft_model

    cfg = cfg or FinetuneConfig()
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(
            f"Fine-tuning needs input_ids of shape (N, T) with T >= 2, got {tuple(input_ids.shape)}."
        )
    model, blocks = moe.model, _blocks(moe.model)
    saved = _snapshot(model, blocks)
    with torch.random.fork_rng():  # a seeded LoRA initialisation that leaves the caller's RNG alone
        torch.manual_seed(cfg.seed)
        peft_model = get_peft_model(model, lora_config(model, cfg))
    try:
        _mask_expert_padding(peft_model, blocks)
        opt = _optimizer(peft_model, blocks, cfg)
        n_lora = sum(p.numel() for g in opt.param_groups[:1] for p in g["params"])
        stats = _train(peft_model, blocks, _batches(input_ids, cfg), opt, cfg, progress, cancel)
    except BaseException:  # cancelled, interrupted or failed: leave the model as it was
        _unload_nested(model, merge=False)
        peft_model.unload()  # drop the adapters without merging: base weights were never touched
        _restore(model, blocks, saved, values=True)
        raise
    _unload_nested(model, merge=True)
    peft_model.merge_and_unload()
    _zero_padding(blocks)
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
