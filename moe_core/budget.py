"""Per-layer budgets: one global active-FFN budget, split across layers by how much each layer can lose.

After Alloc-MoE (arXiv 2604.08133) and cmoe-improve's per-layer allocation:

1. Sensitivity (:func:`measure_sensitivity`): for every layer l and candidate shape c (S shared and A active
   of E equal slices), KL(dense || model) per token on held-out calibration windows when layer l alone is
   converted at c, built exactly as the conversion will build it (carving, then the routing step), every
   other layer dense. Layers are measured on the dense model's inputs, one at a time. The tail (every later
   layer and the head on the held-out windows) is most of the cost, so the fast mode (the default) runs it once
   per layer, at the middle shape, and scales that KL to the other shapes by their squared output error on the
   same held-out FFN inputs (KL is quadratic in a small change of one layer's output): 7x fewer tails.
2. Allocation (:func:`allocate`): dynamic programming over layers (a multiple-choice knapsack): the shapes,
   one per layer, with the least summed KL whose mean active share is within the budget. A layer may stay
   dense (KL 0, share 1) when the budget allows it. A servable allocation uses one shape in every converted
   layer (the others dense), the form serving engines load: on SmolLM2 its summed KL is 5% above the free
   allocation's at 75% (0.633 vs 0.602, dense + S1A1E8) and 2% at 50% (2.031 vs 1.987).

Measured on SmolLM2-135M (30 layers): layer 0 loses 1.57 nats at one active slice of eight, the middle
layers 0.2-0.3, so a uniform shape spends the budget where it buys least.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .config import CMoEConfig, parse_experts
from .layerwise import apply_chunked, ffn_inputs, walk_layers, with_mlp
from .plumbing import Cancel, Progress, check_cancel, report

# Calibration tokens the sensitivity builds its blocks on: on SmolLM2, 8 x 512 allocated nearly as 32 x 512 did
# (75%: layers 0-9 and 23-29 dense against 0-9, 11 and 24-29) in 18 minutes against 36 (full mode, shared CPU).
SENSITIVITY_TOKENS = 4096

# Candidate (shared, active) slices per layer for E experts, one per active share (s + a) / E: the shapes
# with fewer routing decisions where the share is small. E = 8 gives 1/8 ... 7/8 (dense is always allowed).
CANDIDATES_E8 = ((0, 1), (1, 1), (2, 1), (2, 2), (3, 2), (4, 2), (6, 1))


def candidate_shapes(n_experts: int) -> list[str]:
    """SxAyEz shapes, one per active share t / E for t = 1 .. E - 1 (A = 1 up to t = 3 and at t = E - 1)."""
    if n_experts == 8:
        pairs = CANDIDATES_E8
    else:
        pairs = [(t - 1, 1) if t <= 3 or t == n_experts - 1 else (t - 2, 2) for t in range(1, n_experts)]
    return [f"S{s}A{a}E{n_experts}" for s, a in pairs]


def active_share(shape: str) -> float:
    """(S + A) / E of an SxAyEz shape; 1 for dense."""
    if shape.lower() == "dense":
        return 1.0
    s, a, e = parse_experts(shape)
    return (s + a) / e


@dataclass
class Sensitivity:
    """KL per token (L, C) of each layer converted alone at each candidate shape, on held-out windows."""

    shapes: list[str]
    kl: list[list[float]]
    tokens: int
    seconds: float = 0.0
    mode: str = (
        "full"  # full: every shape's KL measured; fast: one per layer, the others scaled by output error
    )

    @property
    def n_layers(self) -> int:
        return len(self.kl)

    def as_dict(self) -> dict:
        return asdict(self)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / "sensitivity.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_dict(), indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Sensitivity:
        path = Path(path)
        return cls(**json.loads((path / "sensitivity.json" if path.is_dir() else path).read_text()))


# ---------------------------------------------------------------------------------------------
# Measuring


def _kl(logp, ref_logp, chunk: int = 256) -> float:
    total = 0.0
    for a, b in zip(logp.split(chunk), ref_logp.split(chunk), strict=True):
        total += float((b.exp() * (b - a)).sum())
    return max(total / logp.shape[0], 0.0)


def _head_logp(dense, final) -> torch.Tensor:
    """Log-probs (P, V) of the model's own head on its last layer's outputs ``final`` (LayerInputs)."""
    from .sweep import _logits

    return torch.log_softmax(_logits(dense.model, dense.adapter, final), dim=-1)


@torch.no_grad()
def measure_sensitivity(
    dense,
    calib_ids: torch.Tensor,
    held_ids: torch.Tensor,
    cfg: CMoEConfig,
    routing=None,
    shapes: list[str] | None = None,
    progress: Progress = None,
    cancel: Cancel = None,
    mode: str = "full",
) -> Sensitivity:
    """KL(dense || one layer converted) for every layer and shape; blocks built on calib_ids (N, T) by CMoE's
    carving with ``cfg`` (and ``routing``, ReconstructSettings, when given), scored on held_ids (W, T').

    mode "fast": the KL is measured through the tail at the middle shape only; each other shape's KL is that
    one times the ratio of their summed squared FFN output errors on the held-out windows.

    One walk over the layers, each layer's weights used once (so it streams: inside
    :func:`moe_core.streaming.reading` a model larger than memory is read one decoder layer at a time): at layer
    i the held-out windows' hidden states with layer i converted alone (one set per measured shape) start, and
    every set started at an earlier layer goes on through layer i; after the last layer the head scores them all.
    The held-out hidden states in flight (one set per earlier layer and measured shape) go to disk when a
    streamed run's memory budget says so (:meth:`moe_core.streaming.LayerStream.spills`)."""
    from .layerwise import SpilledStates, capture_layer_inputs, run_layer
    from .methods.cmoe import carve_block
    from .reconstruct import reconstruct_block
    from .streaming import active

    if mode not in ("full", "fast"):
        raise ValueError(f"Sensitivity mode is fast or full, not '{mode}'.")
    start = time.perf_counter()
    shapes = shapes or candidate_shapes(cfg.shape[2])
    ref, n_layers, stream = len(shapes) // 2, dense.n_layers, active()
    measured = [c for c in range(len(shapes)) if mode == "full" or c == ref]
    in_flight = n_layers * len(measured) + 1
    spill = stream is not None and stream.spills(dense, held_ids, copies=in_flight)
    # captured before the calibration's walk starts: a streamed walk frees the embeddings once it has its inputs
    held = capture_layer_inputs(dense, held_ids, cfg.batch_size, SpilledStates() if spill else None)
    # (layer, shape column, the held-out states with that layer converted alone at that shape)
    started: list[tuple[int, int, object]] = []
    errors: list[list[float]] = []
    for step in walk_layers(dense, calib_ids, batch_size=cfg.batch_size, cancel=cancel):
        i, layer, mlp = step.index, step.layer, dense.mlp(step.index)
        x = ffn_inputs(layer, mlp, step.inputs)
        y = apply_chunked(mlp, x)
        held_x = ffn_inputs(layer, mlp, held) if mode == "fast" else None
        held_y = apply_chunked(mlp, held_x) if mode == "fast" else None
        started = [(j, c, run_layer(layer, h)) for j, c, h in started]  # the earlier layers' sets go on
        row = []
        for c, shape in enumerate(shapes):
            check_cancel(cancel)
            block, _ = carve_block(dense, i, x, cfg, parse_experts(shape))
            if routing is not None:
                reconstruct_block(block, x, y, routing, layer=i)
            if c in measured:
                started.append((i, c, run_layer(with_mlp(layer, mlp, block), held)))
            if mode == "fast":
                row.append(float((apply_chunked(block, held_x) - held_y).double().pow(2).sum()))
            report(progress, (i + (c + 1) / len(shapes)) / n_layers, f"Sensitivity: layer {i + 1}, {shape}")
        errors.append(row)
        held = run_layer(layer, held)
    if stream is not None:
        stream.head(dense)  # the embeddings and head the walk freed
    ref_logp = _head_logp(dense, held)
    kl = [[None] * len(shapes) for _ in range(n_layers)]
    for j, c, final in started:
        check_cancel(cancel)
        kl[j][c] = _kl(_head_logp(dense, final), ref_logp)
    if mode == "fast":
        for row, err in zip(kl, errors, strict=True):
            scale = row[ref] / max(err[ref], 1e-30)
            row[:] = [scale * e if v is None else v for v, e in zip(row, err, strict=True)]
    seconds = round(time.perf_counter() - start, 1)
    return Sensitivity(shapes, kl, int(held_ids[:, 1:].numel()), seconds, mode)


# ---------------------------------------------------------------------------------------------
# Allocating


def allocate(sens: Sensitivity, budget: float, allow_dense: bool = True, servable: bool = False) -> list[str]:
    """One shape per layer ("dense" allowed) with the least summed KL and mean active share <= budget.

    Exact dynamic programming over layers; shares are counted in units of 1/E (E from the shapes).
    servable: every converted layer takes the same shape, the others stay dense (the best such shape), which is
    what Qwen2-MoE, and so vLLM and transformers without remote code, can express: one expert count, one top-k.
    """
    if servable:
        return _allocate_servable(sens, budget, allow_dense)
    n_experts = parse_experts(sens.shapes[0])[2]
    options = [(int(round(active_share(s) * n_experts)), kl_row, s) for s, kl_row in _columns(sens)]
    if allow_dense:
        options.append((n_experts, [0.0] * sens.n_layers, "dense"))
    capacity = int(budget * n_experts * sens.n_layers + 1e-9)
    lightest = min(units for units, _, _ in options)
    if lightest * sens.n_layers > capacity:
        raise ValueError(
            f"An active budget of {budget:.0%} is below the smallest shape ({lightest}/{n_experts} of the FFN "
            f"in every layer); raise the budget or allow smaller shapes."
        )
    best = {0: (0.0, [])}  # units used -> (summed KL, shapes so far)
    for layer in range(sens.n_layers):
        nxt: dict[int, tuple[float, list[str]]] = {}
        for used, (cost, chosen) in best.items():
            for units, kl_row, shape in options:
                total = used + units
                if total <= capacity and (total not in nxt or cost + kl_row[layer] < nxt[total][0]):
                    nxt[total] = (cost + kl_row[layer], chosen + [shape])
        best = nxt
    return min(best.values(), key=lambda v: v[0])[1]


def _allocate_servable(sens: Sensitivity, budget: float, allow_dense: bool) -> list[str]:
    """The least-KL allocation among those that use one shape (plus dense layers)."""
    best, problem = None, None
    for c, shape in enumerate(sens.shapes):
        one = Sensitivity([shape], [[row[c]] for row in sens.kl], sens.tokens, sens.seconds, sens.mode)
        try:
            shapes = allocate(one, budget, allow_dense)
        except ValueError as exc:
            problem = problem or exc
            continue
        kl = allocation_summary(one, shapes)["predicted_kl_sum"]
        if best is None or kl < best[0]:
            best = (kl, shapes)
    if best is None:
        raise problem
    return best[1]


def _columns(sens: Sensitivity):
    for c, shape in enumerate(sens.shapes):
        yield shape, [row[c] for row in sens.kl]


def allocation_summary(sens: Sensitivity, shapes: list[str]) -> dict:
    """Mean active share, predicted summed KL and the shapes, for reports and the Design tab."""
    index = {s: c for c, s in enumerate(sens.shapes)}
    kl = sum(0.0 if s == "dense" else sens.kl[i][index[s]] for i, s in enumerate(shapes))
    return {
        "active_share": sum(active_share(s) for s in shapes) / len(shapes),
        "predicted_kl_sum": kl,
        "layer_experts": list(shapes),
    }


def plan_budget(
    dense, cfg, calib_ids: torch.Tensor, progress: Progress = None, cancel: Cancel = None
) -> dict:
    """Measure the sensitivity for a CMoE convert run (a ConvertRun with cmoe.budget set) and allocate its
    budget: {"budget", "active_share", "predicted_kl_sum", "layer_experts", "sensitivity"}. Blocks are built on
    the first SENSITIVITY_TOKENS of the calibration (the conversion then uses all of it); held-out windows:
    4 x 256 tokens of the calibration text at another seed."""
    from .data import load_documents, sample_sequences

    data = cfg.data
    docs = load_documents(data.text, model=dense, seed=data.seed)
    held = sample_sequences(docs, dense.tokenizer, 4, min(256, data.seq_len), data.seed + 1, source=data.text)
    routing = cfg.routing.settings(data.seed) if cfg.routing.enabled else None
    if routing is not None:  # ranking shapes needs no sharpened native routers: four refits fewer per block
        routing = replace(routing, sharpen=())
    calib_ids = calib_ids[: max(1, SENSITIVITY_TOKENS // calib_ids.shape[1])]
    sens = measure_sensitivity(
        dense, calib_ids, held, cfg.cmoe, routing, progress=progress, cancel=cancel, mode=cfg.cmoe.sensitivity
    )
    shapes = allocate(sens, cfg.cmoe.budget, servable=cfg.cmoe.servable)
    return {"budget": cfg.cmoe.budget, **allocation_summary(sens, shapes), "sensitivity": sens.as_dict()}
