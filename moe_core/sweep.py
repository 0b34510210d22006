"""Per-layer accuracy-vs-throughput curves of a converted model, and a picker that turns them into a plan.

LaDiMo's adaptive router (arXiv 2408.04278, Figs. 4-5) chooses a routing policy per layer from how much each
layer's conversion costs in accuracy and gains in speed. Here, for every layer l and candidate policy P
(top-k for k = 1..E, dynamic thresholds, or the dense FFN), only layer l is converted and:

- quality: KL(dense || candidate) in nats per token, the change in NLL, and top-1 agreement on held-out
  windows (default 2 x 256 tokens of WikiText-2 after skipping the first 64 windows, which evaluation and the
  benchmarks score). A dense pass caches the hidden states entering every layer and the dense log-probs, so a
  candidate recomputes only layers l..L-1 (half the model on average) and no dense pass is repeated.
- active parameters: the layer's FFN parameters not run per token, with the mean experts per token measured
  on the same windows (dynamic policies vary per token).
- throughput (measured): the block's and the dense MLP's times on the layer's own held-out FFN inputs,
  interleaved, median of ``repeats``: prefill (``timing_tokens`` rows in one call) and decode (one row per
  call). The whole model's change is t_model / (t_model + t_block - t_mlp), t_model the dense model's
  measured time on the same shape (one sequence of ``timing_tokens``; one token after a ``timing_tokens``
  KV cache).
- cumulative curve (Fig. 4): layers sorted by KL at the reference policy (the converted model's own), the k
  least sensitive converted for k = 0..L: KL and perplexity measured; throughput from the summed measured
  block deltas, and measured on the whole model at ``throughput_points`` evenly spaced k.

:func:`pick_plan` turns the curves into a per-layer plan for a target, :func:`apply_plan` applies it.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import SweepConfig
from .evaluate import moe_blocks
from .layerwise import LayerInputs, head_logits, run_rest, walk_layers
from .model_io import DenseModel
from .moe import MoEMLP, RoutingPolicy
from .plumbing import shell_copy
from .profiling import check_cancel

Progress = Callable[[float, str], None] | None
Cancel = Callable[[], bool] | None
CHUNK = 128  # positions per float32 log-softmax over the vocabulary
DENSE = "dense"
MIN_FIT_KL = 0.01  # nats: below this summed KL the cumulative curve cannot calibrate KL -> perplexity


# ---------------------------------------------------------------------------------------------
# Result objects (plain data for the app's plots)


@dataclass(frozen=True)
class PolicyPoint:
    """One (layer, policy) measurement. policy: a label (dense, top-3, dyn-0.9); spec: RoutingPolicy dict."""

    layer: int
    policy: str
    spec: dict | None
    kl: float  # KL(dense || candidate), nats per token
    dnll: float  # NLL change, nats per token (exp(dnll) - 1 = relative perplexity change)
    agreement: float  # top-1 agreement with the dense model
    mean_k: float  # routed experts per token, measured (dense: all)
    active_saving: float  # share of this layer's dense FFN params not run per token (router counted)
    block_ms: float  # prefill: timing_tokens rows in one call
    mlp_ms: float
    block_decode_ms: float  # decode: one row per call
    mlp_decode_ms: float
    throughput_ratio: float  # whole-model prefill tokens/s, candidate / dense
    decode_throughput_ratio: float


@dataclass
class SweepResult:
    """Every PolicyPoint, the cumulative curve and what the picker needs. save/load: sweep.json + CSVs."""

    model: str
    source: str
    n_layers: int
    n_experts: int
    layer_ffn_params: int  # dense FFN parameters of one layer (every layer of the model)
    reference_policy: str
    dense_ppl: float
    model_ms: float
    model_decode_ms: float
    points: list[PolicyPoint] = field(default_factory=list)
    cumulative: list[dict] = field(default_factory=list)
    sensitivity_order: list[int] = field(default_factory=list)  # layers, least sensitive first
    kl_to_logppl: float = 1.0  # fitted c in log(ppl / dense ppl) ~ c * summed per-layer KL
    config: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    def point(self, layer: int, policy: str) -> PolicyPoint:
        for p in self.points:
            if p.layer == layer and p.policy == policy:
                return p
        raise KeyError(f"No sweep point for layer {layer}, policy '{policy}'.")

    def layer_points(self, layer: int) -> list[PolicyPoint]:
        return [p for p in self.points if p.layer == layer]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SweepResult:
        data = dict(data)
        data["points"] = [PolicyPoint(**p) for p in data.get("points", [])]
        return cls(**data)

    def save(self, folder: str | Path) -> Path:
        """Write sweep.json, points.csv (a row per layer and policy) and cumulative.csv; returns the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "sweep.json").write_text(json.dumps(self.to_dict(), indent=2))
        _write_csv(folder / "points.csv", [asdict(p) | {"spec": json.dumps(p.spec)} for p in self.points])
        _write_csv(
            folder / "cumulative.csv",
            [c | {"layers": " ".join(map(str, c["layers"]))} for c in self.cumulative],
        )
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> SweepResult:
        return cls.from_dict(json.loads((Path(folder) / "sweep.json").read_text()))


def _write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        path.write_text("")
        return
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@dataclass(frozen=True)
class Plan:
    """A routing policy per layer: RoutingPolicy fields, or None to keep the dense FFN."""

    policies: dict[int, dict | None]
    labels: dict[int, str]
    predicted: dict  # active_ffn_reduction, kl_sum, ppl_increase, throughput_ratio (from the sweep)
    target: dict

    def to_dict(self) -> dict:
        return {
            "policies": {str(k): v for k, v in self.policies.items()},
            "labels": {str(k): v for k, v in self.labels.items()},
            "predicted": self.predicted,
            "target": self.target,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        policies = {int(k): v for k, v in data["policies"].items()}
        labels = {int(k): v for k, v in data["labels"].items()}
        return cls(policies, labels, data.get("predicted", {}), data.get("target", {}))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        return cls.from_dict(json.loads(Path(path).read_text()))


# ---------------------------------------------------------------------------------------------
# Held-out windows, the dense cache and scoring


def held_out_windows(tokenizer, cfg: SweepConfig) -> torch.Tensor:
    """(n_windows, seq_len) consecutive windows of cfg.text after the first ``skip_windows`` windows."""
    from .data import eval_windows, load_documents

    docs = load_documents(cfg.text)
    windows = eval_windows(docs, tokenizer, cfg.seq_len, cfg.skip_windows + cfg.n_windows, source=cfg.text)
    if len(windows) < cfg.skip_windows + cfg.n_windows:
        raise ValueError(
            f"sweep.text '{cfg.text}' has {len(windows)} windows of {cfg.seq_len} tokens; skipping "
            f"{cfg.skip_windows} leaves fewer than {cfg.n_windows}. Lower sweep.skip_windows, or use more text."
        )
    return windows[cfg.skip_windows :]


@dataclass
class _Cache:
    """The dense pass: inputs of every layer, each layer's FFN inputs (N*T, H), dense log-probs (P, V)."""

    inputs: list[LayerInputs]
    ffn_x: list[torch.Tensor]
    logp: torch.Tensor
    targets: torch.Tensor
    nll: float


def _logits(model, adapter, inputs: LayerInputs) -> torch.Tensor:
    """The model's own final norm and head on its last layer's outputs: (P, V) at the predicting positions."""
    logits = head_logits(model, adapter, inputs, keep=slice(None, -1))  # each (B, T-1, V)
    return torch.cat([x.reshape(-1, x.shape[-1]).float() for x in logits])


@torch.no_grad()
def dense_cache(dense, windows, batch_size: int) -> _Cache:
    """One dense pass, one layer at a time, keeping what the candidates restart from."""
    kept, ffn_x = [], []
    for step in walk_layers(dense, windows, batch_size=batch_size):
        kept.append(step.inputs)
        ffn_x.append(step.run_seeing(dense.mlp(step.index)))
    outputs = step.outputs
    logp = F.log_softmax(_logits(dense.model, dense.adapter, outputs), dim=-1)  # (P, V)
    targets = windows[:, 1:].reshape(-1).to(logp.device)
    nll = -float(logp.gather(1, targets[:, None]).mean())
    return _Cache(kept, ffn_x, logp, targets, nll)


@torch.no_grad()
def run_from(model, layer: int, cache: _Cache) -> torch.Tensor:
    """Logits (P, V) of ``model`` (a DenseModel) restarted at ``layer`` from the dense cache (layers before it
    are dense), on the layer-by-layer driver."""
    final = run_rest(model, cache.inputs[layer])
    return _logits(model.model, model.adapter, final)


def score(logits, cache: _Cache) -> dict:
    """KL(dense || logits), NLL change and top-1 agreement, nats per predicted token. logits (P, V)."""
    kl = nll = agree = 0.0
    for s in range(0, logits.shape[0], CHUNK):
        logp = F.log_softmax(logits[s : s + CHUNK], dim=-1)
        ref = cache.logp[s : s + CHUNK]
        kl += float((ref.exp() * (ref - logp)).sum().detach())
        nll -= float(logp.gather(1, cache.targets[s : s + CHUNK, None]).sum())
        agree += float((ref.argmax(-1) == logp.argmax(-1)).sum())
    n = logits.shape[0]
    return {"kl": max(kl / n, 0.0), "dnll": nll / n - cache.nll, "agreement": agree / n}


# ---------------------------------------------------------------------------------------------
# Timing (measured, interleaved, medians)


@torch.no_grad()
def time_pair(fn_a, fn_b, repeats: int) -> tuple[float, float]:
    """Median milliseconds of two callables, run alternately (a, b, a, b, ...) after one warm-up each."""
    fn_a(), fn_b()
    times_a, times_b = [], []
    for _ in range(repeats):
        for fn, out in ((fn_a, times_a), (fn_b, times_b)):
            _sync_cuda()
            start = time.perf_counter()
            fn()
            _sync_cuda()  # CUDA kernels run asynchronously: the clock must wait for them
            out.append(1000 * (time.perf_counter() - start))
    return statistics.median(times_a), statistics.median(times_b)


def _sync_cuda() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _decode_rows(fn, x, n_rows: int = 8) -> Callable[[], None]:
    """One call per row for the first n_rows rows of x (N, H): decode-shaped work; time is divided later."""
    rows = [x[i : i + 1] for i in range(min(n_rows, x.shape[0]))]
    return lambda: [fn(r) for r in rows]


def block_times(block, mlp, x, cfg: SweepConfig) -> dict:
    """Prefill and decode times (ms) of block vs the dense MLP on the layer's FFN inputs x (N, H)."""
    prefill = x[: cfg.timing_tokens]
    block_ms, mlp_ms = time_pair(lambda: block(prefill), lambda: mlp(prefill), cfg.repeats)
    n_rows = min(8, x.shape[0])
    bd, md = time_pair(_decode_rows(block, x, n_rows), _decode_rows(mlp, x, n_rows), cfg.repeats)
    return {
        "block_ms": block_ms,
        "mlp_ms": mlp_ms,
        "block_decode_ms": bd / n_rows,
        "mlp_decode_ms": md / n_rows,
    }


@torch.no_grad()
def model_times(dense, windows, cfg: SweepConfig) -> tuple[float, float]:
    """Dense model: (prefill ms of one sequence of timing_tokens, decode ms of one token after that cache)."""
    ids = windows.reshape(-1)[: cfg.timing_tokens + 1][None].to(dense.device)  # (1, T+1)
    prefill, _ = time_pair(
        lambda: dense.model(input_ids=ids[:, :-1], use_cache=False), lambda: None, cfg.repeats
    )
    cache = dense.model(input_ids=ids[:, :-1], use_cache=True, logits_to_keep=1).cache

    def step():
        dense.model(input_ids=ids[:, -1:], cache=cache, use_cache=True)
        cache.crop(-1)  # keep the cache length fixed across repeats

    decode, _ = time_pair(step, lambda: None, cfg.repeats)
    return prefill, decode


def _ratio(model_ms: float, delta_ms: float) -> float:
    return model_ms / max(model_ms + delta_ms, 1e-9)


# ---------------------------------------------------------------------------------------------
# The sweep


def candidate_policies(block: MoEMLP, cfg: SweepConfig) -> list[RoutingPolicy]:
    """top-k for each k in cfg.topk (None: 1..E), then a dynamic policy per threshold."""
    ks = list(cfg.topk) if cfg.topk else list(range(1, block.n_experts + 1))
    if max(ks) > block.n_experts:
        raise ValueError(f"sweep.topk {ks} asks for more than the {block.n_experts} experts of a layer.")
    return [RoutingPolicy("topk", k=k) for k in ks] + [
        RoutingPolicy("dynamic", threshold=t) for t in cfg.thresholds
    ]


@torch.no_grad()
def layer_points(work, dense, moe, layer: int, cache: _Cache, cfg: SweepConfig, model_times_ms, cancel=None):
    """PolicyPoints of one layer: ``work`` (a copy of the dense model) gets a copy of the layer's block,
    set to each candidate policy in turn; the dense MLP is put back afterwards."""
    block, mlp, adapter = copy.deepcopy(moe.mlp(layer)), dense.mlp(layer), dense.adapter
    n_params = sum(p.numel() for p in mlp.parameters())
    points, model_ms, decode_ms = [], *model_times_ms
    adapter.set_mlp(work.model, layer, block)
    try:
        for policy in candidate_policies(block, cfg):
            check_cancel(cancel)
            block.set_policy(policy)
            block.reset_load()
            block.track_load = True
            scores = score(run_from(work, layer, cache), cache)
            block.track_load = False
            mean_k = block.mean_active_experts()
            t = block_times(block, mlp, cache.ffn_x[layer], cfg)
            ratios = {
                "throughput_ratio": _ratio(model_ms, t["block_ms"] - t["mlp_ms"]),
                "decode_throughput_ratio": _ratio(decode_ms, t["block_decode_ms"] - t["mlp_decode_ms"]),
            }
            saving = 1 - block.param_counts(mean_k)["active"] / n_params
            points.append(
                PolicyPoint(
                    layer,
                    policy.label(),
                    asdict(policy),
                    **scores,
                    mean_k=mean_k,
                    active_saving=saving,
                    **t,
                    **ratios,
                )
            )
    finally:
        adapter.set_mlp(work.model, layer, mlp)
    return [_dense_point(layer, block.n_experts, points[0])] + points


def _dense_point(layer: int, n_experts: int, ref: PolicyPoint) -> PolicyPoint:
    """The dense FFN: no change by definition (the sweep checks once that its restart path reproduces it)."""
    return PolicyPoint(
        layer,
        DENSE,
        None,
        0.0,
        0.0,
        1.0,
        float(n_experts),
        0.0,
        ref.mlp_ms,
        ref.mlp_ms,
        ref.mlp_decode_ms,
        ref.mlp_decode_ms,
        1.0,
        1.0,
    )


def sweep(
    dense, moe, windows, cfg: SweepConfig | None = None, progress: Progress = None, cancel: Cancel = None
) -> SweepResult:
    """Per-layer curves of ``moe`` (converted from ``dense``) on held-out windows (N, T); neither is modified.

    Returns a SweepResult: a PolicyPoint for every (converted layer, candidate policy) plus the dense one,
    and the cumulative curve (see the module docstring for what is measured and how).
    """
    cfg, clock = cfg or SweepConfig(), time.perf_counter()
    blocks = moe_blocks(moe)
    if not blocks:
        raise ValueError("The model has no MoE layers: convert it first (python -m moe_core convert).")
    # candidates are swapped into a copy one layer at a time; weights are shared
    work = DenseModel(shell_copy(dense.model), dense.tokenizer, dense.adapter, dense.spec)
    cache = dense_cache(dense, windows, cfg.batch_size)
    if score(run_from(work, 0, cache), cache)["kl"] > 1e-4:  # the restart path must be exact
        raise ValueError(
            f"Restarting {dense.spec} from cached layer inputs does not reproduce its logits: "
            "this architecture is not supported by the sweep."
        )
    result = _empty_result(dense, moe, blocks, cache, model_times(dense, windows, cfg), cfg)
    result.seconds["dense_pass"] = round(time.perf_counter() - clock, 1)
    for n, layer in enumerate(sorted(blocks)):
        result.points += layer_points(
            work, dense, moe, layer, cache, cfg, (result.model_ms, result.model_decode_ms), cancel
        )
        if progress:
            progress(0.85 * (n + 1) / len(blocks), f"Sweep: layer {layer + 1}/{dense.n_layers}")
    result.seconds["layers"] = round(time.perf_counter() - clock - result.seconds["dense_pass"], 1)
    cumulative_curve(result, work, dense, blocks, cache, windows, cfg, cancel)
    result.seconds["cumulative"] = round(time.perf_counter() - clock - sum(result.seconds.values()), 1)
    result.seconds["total"] = round(time.perf_counter() - clock, 1)
    if progress:
        progress(1.0, "Sweep done")
    return result


def _empty_result(dense, moe, blocks, cache: _Cache, times, cfg: SweepConfig) -> SweepResult:
    return SweepResult(
        model=moe.spec,
        source=dense.spec,
        n_layers=dense.n_layers,
        n_experts=max(b.n_experts for b in blocks.values()),
        layer_ffn_params=sum(p.numel() for p in dense.mlp(0).parameters()),
        reference_policy=_reference_label(blocks),
        dense_ppl=math.exp(cache.nll),
        model_ms=times[0],
        model_decode_ms=times[1],
        config=asdict(cfg),
    )


def _reference_label(blocks: dict[int, MoEMLP]) -> str:
    labels = {b.policy.label() for b in blocks.values()}
    return labels.pop() if len(labels) == 1 else "converted"


@torch.no_grad()
def cumulative_curve(
    result: SweepResult, work, dense, blocks, cache: _Cache, windows, cfg: SweepConfig, cancel=None
):
    """Fill result.cumulative / sensitivity_order / kl_to_logppl: convert the k least sensitive layers."""
    ref = {i: b.policy.label() for i, b in blocks.items()}
    order = sorted(blocks, key=lambda i: (result.point(i, ref[i]).kl, i))
    ks = sorted(set(range(0, len(order) + 1, cfg.cumulative_step)) | {len(order)})
    timed = {
        ks[round(j * (len(ks) - 1) / cfg.throughput_points)] for j in range(1, cfg.throughput_points + 1)
    }
    ids = windows.reshape(-1)[: cfg.timing_tokens][None].to(dense.device)
    try:
        for k in ks:
            check_cancel(cancel)
            for i in order[:k]:
                dense.adapter.set_mlp(work.model, i, blocks[i])
            result.cumulative.append(
                _cumulative_point(result, work, dense, order[:k], ref, cache, ids, cfg, k in timed)
            )
    finally:
        for i in order:
            dense.adapter.set_mlp(work.model, i, dense.mlp(i))
    result.sensitivity_order = order
    result.kl_to_logppl = _fit_kl_to_logppl(result.cumulative)


def _cumulative_point(result, work, dense, chosen, ref, cache, ids, cfg, measure: bool) -> dict:
    picked = [result.point(i, ref[i]) for i in chosen]
    scores = (
        score(run_from(work, min(chosen), cache), cache)
        if chosen
        else {"kl": 0.0, "dnll": 0.0, "agreement": 1.0}
    )
    delta = sum(p.block_ms - p.mlp_ms for p in picked)
    row = {
        "k": len(chosen),
        "layers": list(chosen),
        **scores,
        "ppl": result.dense_ppl * math.exp(scores["dnll"]),
    }
    row |= {
        "kl_sum": sum(p.kl for p in picked),
        "active_ffn_reduction": sum(p.active_saving for p in picked) / result.n_layers,
    }
    row |= {"throughput_ratio": _ratio(result.model_ms, delta), "throughput_ratio_measured": None}
    if measure:
        moe_ms, dense_ms = time_pair(
            lambda: work.model(input_ids=ids, use_cache=False),
            lambda: dense.model(input_ids=ids, use_cache=False),
            cfg.repeats,
        )
        row["throughput_ratio_measured"] = dense_ms / moe_ms
    return row


def _fit_kl_to_logppl(cumulative: list[dict]) -> float:
    """c of log(ppl / dense ppl) ~ c * summed per-layer KL: least squares through the origin (1.0 if undefined)."""
    if max((c["kl_sum"] for c in cumulative), default=0.0) < MIN_FIT_KL:
        return (
            1.0  # NLL changes this small are sampling noise: assume E[dNLL] = KL (text drawn from the model)
        )
    xy = sum(c["kl_sum"] * c["dnll"] for c in cumulative)
    return max(xy / sum(c["kl_sum"] ** 2 for c in cumulative), 0.0)


# ---------------------------------------------------------------------------------------------
# The picker


@dataclass(frozen=True)
class _Segment:
    layer: int
    start: PolicyPoint
    end: PolicyPoint

    @property
    def ratio(self) -> float:  # active-parameter saving per nat of KL; dominated moves (no extra KL) first
        return (self.end.active_saving - self.start.active_saving) / max(self.end.kl - self.start.kl, 1e-12)


def hull_segments(points: list[PolicyPoint]) -> list[_Segment]:
    """One layer's efficient moves from the dense FFN: the upper convex hull of (KL, saving), left to right.

    Each move goes to the point with the best extra saving per extra KL; their ratios never increase, so a
    greedy over all layers' moves sorted by ratio takes each layer's moves in order (the LP-optimal rule).
    """
    current = next((p for p in points if p.policy == DENSE), None)
    if current is None:
        raise ValueError("Each layer's sweep points need a dense point to start from.")
    segments = []
    while True:
        better = [p for p in points if p.active_saving > current.active_saving + 1e-12]
        if not better:
            return segments
        nxt = max(better, key=lambda p: (_Segment(current.layer, current, p).ratio, p.active_saving))
        segments.append(_Segment(current.layer, current, nxt))
        current = nxt


def pick_plan(
    result: SweepResult, max_ppl_increase: float | None = None, min_active_reduction: float | None = None
) -> Plan:
    """A policy per layer for one target: the most active-FFN saving within ``max_ppl_increase`` (0.05 = +5%
    perplexity, predicted as exp(c * summed KL) - 1 with c fitted on the cumulative curve), or the least
    predicted KL reaching ``min_active_reduction`` (0.25 = 25% fewer active FFN parameters than dense).

    Rule: every layer's moves along its (KL, saving) hull, all layers merged and taken in order of saving per
    KL (Pareto-greedy); the final step, which may overshoot the target, is the cheapest single-layer change of
    any policy (hull or not) that meets it, and a remaining perplexity budget is filled the same way.
    """
    _check_target(max_ppl_increase, min_active_reduction)
    chosen = {i: _dense_of(result, i) for i in range(result.n_layers) if result.layer_points(i)}
    moves = [s for i in chosen for s in hull_segments(result.layer_points(i))]
    closed: set[int] = set()
    for seg in sorted(moves, key=lambda s: -s.ratio):  # stable: a layer's equal-ratio moves stay in order
        if seg.layer in closed or chosen[seg.layer] is not seg.start:
            continue
        if min_active_reduction is not None:
            if _saving(result, chosen | {seg.layer: seg.end}) >= min_active_reduction:
                chosen = _cheapest_finish(result, chosen, min_active_reduction)
                break
            chosen[seg.layer] = seg.end
        elif _ppl_increase(result, chosen, seg) <= max_ppl_increase:
            chosen[seg.layer] = seg.end
        else:
            closed.add(seg.layer)  # this layer's later moves cost even more per unit saved
    if min_active_reduction is not None and _saving(result, chosen) < min_active_reduction:
        best = sum(max(p.active_saving for p in result.layer_points(i)) for i in chosen) / result.n_layers
        raise ValueError(
            f"No plan reaches {min_active_reduction:.0%} fewer active FFN parameters: the swept policies "
            f"reach at most {best:.1%}. Lower the target, or convert and sweep with fewer active experts."
        )
    if max_ppl_increase is not None:
        chosen = _fill_budget(result, chosen, max_ppl_increase)
    target = {"max_ppl_increase": max_ppl_increase, "min_active_reduction": min_active_reduction}
    return _plan(result, chosen, target)


def _changes(result: SweepResult, chosen: dict[int, PolicyPoint]):
    """Every single-layer change to a policy that saves more than the layer's current one."""
    for i, now in chosen.items():
        for p in result.layer_points(i):
            if p.active_saving > now.active_saving + 1e-12:
                yield chosen | {i: p}


def _cheapest_finish(result, chosen, min_active_reduction: float) -> dict[int, PolicyPoint]:
    """The single-layer change reaching the saving target with the least summed KL."""
    reaching = [c for c in _changes(result, chosen) if _saving(result, c) >= min_active_reduction]
    return min(reaching, key=lambda c: (sum(p.kl for p in c.values()), -_saving(result, c)))


def _fill_budget(result, chosen, max_ppl_increase: float) -> dict[int, PolicyPoint]:
    """Spend what is left of the perplexity budget: the largest single-layer saving that fits, repeatedly."""
    while True:
        fitting = [c for c in _changes(result, chosen) if _ppl_increase(result, c) <= max_ppl_increase]
        if not fitting:
            return chosen
        chosen = max(fitting, key=lambda c: (_saving(result, c), -sum(p.kl for p in c.values())))


def _dense_of(result: SweepResult, layer: int) -> PolicyPoint:
    return next(p for p in result.layer_points(layer) if p.policy == DENSE)


def _check_target(max_ppl_increase, min_active_reduction) -> None:
    if (max_ppl_increase is None) == (min_active_reduction is None):
        raise ValueError(
            "Give exactly one target: max_ppl_increase (e.g. 0.05 for +5% perplexity) "
            "or min_active_reduction (e.g. 0.2 for 20% fewer active FFN parameters)."
        )
    if max_ppl_increase is not None and max_ppl_increase < 0:
        raise ValueError(f"max_ppl_increase must be >= 0 (0.05 = +5% perplexity), got {max_ppl_increase}.")
    if min_active_reduction is not None and not 0 < min_active_reduction < 1:
        raise ValueError(
            "min_active_reduction must be in (0, 1) (0.2 = 20% fewer active FFN parameters), "
            f"got {min_active_reduction}."
        )


def _saving(result: SweepResult, chosen: dict[int, PolicyPoint]) -> float:
    return sum(p.active_saving for p in chosen.values()) / result.n_layers


def _ppl_increase(result: SweepResult, chosen: dict[int, PolicyPoint], seg: _Segment | None = None) -> float:
    kl = sum(p.kl for p in chosen.values()) + (seg.end.kl - seg.start.kl if seg else 0.0)
    return math.exp(result.kl_to_logppl * kl) - 1


def _plan(result: SweepResult, chosen: dict[int, PolicyPoint], target: dict) -> Plan:
    delta = sum(p.block_ms - p.mlp_ms for p in chosen.values())
    delta_decode = sum(p.block_decode_ms - p.mlp_decode_ms for p in chosen.values())
    predicted = {
        "active_ffn_reduction": _saving(result, chosen),
        "kl_sum": sum(p.kl for p in chosen.values()),
        "ppl_increase": _ppl_increase(result, chosen),
        "throughput_ratio": _ratio(result.model_ms, delta),
        "decode_throughput_ratio": _ratio(result.model_decode_ms, delta_decode),
    }
    policies = {i: p.spec for i, p in sorted(chosen.items())}
    return Plan(policies, {i: p.policy for i, p in sorted(chosen.items())}, predicted, target)


def apply_plan(moe, plan: Plan, dense=None):
    """A copy of ``moe`` with each layer's policy set from ``plan``; layers the plan keeps dense get ``dense``'s
    FFN back (pass the source model then). ``moe`` itself is not modified: the copy shares its weights
    (moe_core.plumbing.shell_copy), and stages that later write into them in place unshare them first."""
    from .model_io import ConvertedModel

    out = ConvertedModel.shell_of(moe, plan=plan)  # weights shared with moe
    for layer, spec in plan.policies.items():
        mlp = out.mlp(layer)
        if spec is None and isinstance(mlp, MoEMLP):
            if dense is None:
                raise ValueError(
                    f"The plan keeps layer {layer} dense: pass the source dense model to apply_plan."
                )
            out.adapter.set_mlp(out.model, layer, copy.deepcopy(dense.mlp(layer)))
        elif spec is not None:
            if not isinstance(mlp, MoEMLP):
                raise ValueError(f"The plan routes layer {layer}, but it is not an MoE layer in this model.")
            mlp.set_policy(RoutingPolicy(**spec))
    if isinstance(moe, ConvertedModel):
        out.conversion, out.metrics = moe.conversion, moe.metrics
        out.run_config = {**moe.run_config, "plan": plan.to_dict()} if moe.run_config else {}
    return out
