"""DIVE: each expert is the dense FFN pruned (FLAP) on one cluster of calibration domains, then retrained.

Paper: Y. Feng, B. Shen, N. Gu, J. Zhao, P. Fu, Z. Lin, W. Wang, "DIVE into MoE: Diversity-Enhanced
Reconstruction of Large Language Models from Dense into Mixture-of-Experts", ACL 2025, arXiv 2506.09351;
code: github.com/yuchenblah/DIVE (pruning, assembly, training; the mining script was never released).

1. Domains: a named list of text sources. Each domain's text is split once: the head calibrates, the tail
   (``holdout``) is kept out for perplexity (mining here, per-domain scores in the benchmark).
2. FLAP statistics, per domain and layer, on the *dense* model's activations (the code propagates unpruned
   outputs): running sum and sum of squares of the down_proj inputs X (T, I). Fluctuation score
   S_j = var(X_j) * ||W_down[:, j]||^2 (the code's WIFV); a pruned FFN keeps the I - floor(p * I) best channels
   (uniform ratio p per layer) and folds the removed channels' mean contribution into a down_proj bias,
   b = W_down[:, removed] @ mean(X[:, removed]) (FLAP's bias compensation).
3. Domain affinity mining: prune once per domain; perplexity of every pruned model on every domain's held-out
   windows gives P (D, D), rows = calibration domain, columns = evaluation domain; normalised per evaluation
   set, A_ij = min_i' P_i'j / P_ij (1 = the best calibration source for j); Pearson r between rows of A;
   hierarchical clustering on 1 - r, cut into exactly N groups.
4. Expert reconstruction: expert g = the FFN pruned on group g's text, with its bias, stacked into one
   MoEMLP per layer; linear router with noise weights, both ~ N(0, 0.02) (NoisyTopkRouter); gates = softmax
   over the k selected logits (``renorm``).
5. Retraining (``moe_core.finetune.dive_retrain``): stage 1 the router only, every expert on, softmax at a
   temperature; stage 2 LoRA on the experts plus the router and RMSNorms, attention frozen.

Choices where the paper is silent, or where we differ on purpose:

- Fewer groups than experts is refused, with the reason (DIVEConfig validation): a group comes from at least
  one domain, and splitting one domain's text would give near-identical experts, the opposite of the method's
  point (diversity). With D >= N the tree is cut at exactly N groups (``cut_tree``), never fewer.
- Correlation orientation and linkage are unspecified: rows of A (two calibration domains are alike when
  pruning on either serves every evaluation set alike), distance 1 - r, average linkage by default.
- A group's statistics are the sums of its domains' statistics, each domain with ``n_sequences`` windows:
  the paper splits one calibration budget evenly over a cluster's datasets, which weighs them the same way;
  pooling sums means the per-domain pass of the mining step is the only calibration pass.
- Mining prunes at the experts' ratio p (the code mines per model and ratio).
- Optional shared expert (``shared_share``; the paper has none): the best channels on all domains pooled,
  always on, without bias; routed experts are then pruned from the remaining channels, so no channel counts
  twice, and each routed bias compensates every channel outside shared + kept. Gates sum to one, so the
  routed biases add up to exactly one compensation.
- ``flap_prune`` is the plain FLAP baseline (MLP only, uniform ratio, calibrated on all domains pooled);
  its FFNs are one-expert MoEMLP blocks so that it saves, reloads and retrains like the MoE models.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..config import DIVEConfig
from ..layerwise import convert_layers, run_layer, walk_layers
from ..moe import MoEMLP, Router, RoutingPolicy
from ..plumbing import Cancel, Progress, span
from ..profiling import check_cancel
from ..reconstruct import reconstruct_block
from . import Method, Option

ROUTER_INIT_STD = 0.02  # code: nn.init.normal_(std=0.02) for topkroute_linear and noise_linear


# ---------------------------------------------------------------------------------------------
# Domains


@dataclass(frozen=True)
class DomainData:
    """One domain's tokens: calibration windows (N, T) from the head of its text, held-out windows (W, T)."""

    calib: torch.Tensor
    heldout: torch.Tensor


def split_text(docs: list[str], holdout: float) -> tuple[list[str], list[str]]:
    """(head, tail) of the joined documents by characters: calibration never sees the scored text."""
    text = "\n\n".join(d for d in docs if d)
    cut = int(len(text) * (1 - holdout))
    return [text[:cut]], [text[cut:]]


def domain_data(
    dense, cfg: DIVEConfig, progress: Progress = None, cancel: Cancel = None
) -> dict[str, DomainData]:
    """{domain name: DomainData} for every domain of cfg (seeded: same config, same tokens)."""
    from ..data import eval_windows, load_documents, sample_sequences

    out = {}
    for d, (name, spec) in enumerate(cfg.domains):
        check_cancel(cancel)
        docs = load_documents(spec, model=dense, seed=cfg.seed, max_chars=cfg.max_chars)
        head, tail = split_text(docs, cfg.holdout)
        calib = sample_sequences(head, dense.tokenizer, cfg.n_sequences, cfg.seq_len, cfg.seed, source=spec)
        heldout = eval_windows(
            tail, dense.tokenizer, cfg.seq_len, cfg.eval_windows, source=f"{spec} (held out)"
        )
        out[name] = DomainData(calib, heldout)
        if progress:
            progress((d + 1) / len(cfg.domains), f"DIVE: read domain {name}")
    return out


# ---------------------------------------------------------------------------------------------
# FLAP: statistics, scores, channel choice and bias compensation


@dataclass(frozen=True)
class FlapStats:
    """Running sums of every layer's down_proj inputs X (T, I): sum and sum of squares (L, I) float64."""

    sum: torch.Tensor
    sumsq: torch.Tensor
    tokens: int

    def __add__(self, other: FlapStats) -> FlapStats:
        return FlapStats(self.sum + other.sum, self.sumsq + other.sumsq, self.tokens + other.tokens)

    @property
    def mean(self) -> torch.Tensor:  # (L, I)
        return (self.sum / self.tokens).float()

    @property
    def var(self) -> torch.Tensor:  # (L, I), unbiased: the paper's 1 / (N - 1)
        n = self.tokens
        return ((self.sumsq - self.sum**2 / n) / max(n - 1, 1)).clamp(min=0).float()


def pooled(stats: dict[str, FlapStats], names) -> FlapStats:
    """The statistics of several domains' text together (sums add)."""
    names = list(names)
    total = stats[names[0]]
    for name in names[1:]:
        total = total + stats[name]
    return total


@torch.no_grad()
def flap_stats(
    dense, input_ids: torch.Tensor, batch_size: int = 4, cancel: Cancel = None, progress: Progress = None
) -> FlapStats:
    """FLAP statistics of input_ids (N, T) on the dense model, layer by layer.

    The hooks read each down projection's input, exactly X = act(W_gate x) * (W_up x), one decoder layer at a
    time (moe_core.layerwise.walk_layers: no final norm, no LM head; streamed when the model is).
    """
    n_layers, width = dense.n_layers, dense.adapter.down(dense.mlp(0)).in_features
    sums = torch.zeros(n_layers, width, dtype=torch.float64)
    sumsq = torch.zeros(n_layers, width, dtype=torch.float64)

    def hook(i):
        def accumulate(module, args):
            x = args[0].reshape(-1, width).double()  # float64: sums of squares over many tokens stay exact
            sums[i] += x.sum(0).cpu()
            sumsq[i] += (x * x).sum(0).cpu()

        return accumulate

    steps = walk_layers(
        dense, input_ids, batch_size=batch_size, progress=progress, cancel=cancel, label="FLAP statistics"
    )
    for step in steps:
        step.run((dense.adapter.down(dense.mlp(step.index)), hook(step.index)))
    return FlapStats(sums, sumsq, input_ids.numel())


def fluctuation_scores(var: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """FLAP's WIFV score per channel: var (I,) of the down_proj input times ||W_down[:, j]||^2; w_down (H, I)."""
    return var.float() * w_down.float().pow(2).sum(0)


def n_kept(width: int, ratio: float) -> int:
    """Channels a pruned FFN keeps: I - floor(p * I) (the code's threshold at sort(S)[floor(p * I)])."""
    return width - math.floor(ratio * width + 1e-9)  # 1e-9: 0.29 * 100 must floor to 29, not 28


def keep_channels(scores: torch.Tensor, ratio: float, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted indices of the best I - floor(p * I) channels of scores (I,), never one of ``exclude``.

    Ties go to the lower index (stable sort), so the choice is deterministic.
    """
    scores = scores.clone()
    if exclude is not None and exclude.numel():
        scores[exclude] = -math.inf
    n = n_kept(scores.numel(), ratio)
    if n > scores.numel() - (0 if exclude is None else exclude.numel()):
        raise ValueError(
            f"Cannot keep {n} channels outside the {exclude.numel()} shared ones: lower the ratio."
        )
    return torch.sort(scores, descending=True, stable=True).indices[:n].sort().values


def compensation_bias(w_down: torch.Tensor, mean: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """FLAP bias (H,): the removed channels' mean contribution, W_down[:, removed] @ mean(X[:, removed]).

    w_down (H, I); mean (I,); kept: every channel that stays (routed expert and shared expert alike).
    """
    removed = torch.ones(w_down.shape[1], dtype=torch.bool, device=w_down.device)
    removed[kept] = False
    return (w_down[:, removed].float() @ mean.to(w_down.device)[removed].float()).to(w_down.dtype)


def prune_ffn(w_down, layer_stats: tuple[torch.Tensor, torch.Tensor], ratio: float, shared=None):
    """(kept indices, bias (H,)) of one FFN pruned at ratio p; layer_stats = (mean (I,), var (I,))."""
    mean, var = layer_stats
    kept = keep_channels(fluctuation_scores(var, w_down), ratio, shared)
    every = kept if shared is None else torch.cat([kept, shared])
    return kept, compensation_bias(w_down, mean, every)


# ---------------------------------------------------------------------------------------------
# Blocks and models


def noisy_router(hidden: int, n_experts: int, generator: torch.Generator) -> Router:
    """DIVE's NoisyTopkRouter: W_r and W_noise (E, H), both ~ N(0, 0.02) from a seeded generator."""
    router = Router(hidden, n_experts, "linear", noise=True)
    with torch.no_grad():
        router.weight.copy_(torch.randn(n_experts, hidden, generator=generator) * ROUTER_INIT_STD)
        router.noise_weight.copy_(torch.randn(n_experts, hidden, generator=generator) * ROUTER_INIT_STD)
    return router


def pruned_block(dense, i: int, kept: list, biases: list, router: Router, top_k: int, shared=None) -> MoEMLP:
    """Layer i's FFN as an MoEMLP whose experts are pruned copies (indices ``kept``) with their biases."""
    w_gate, w_up, w_down = dense.adapter.weights(dense.mlp(i))
    shared = torch.zeros(0, dtype=torch.long) if shared is None else shared
    act_name = dense.adapter.act_name(dense.model)
    policy = RoutingPolicy("topk", k=top_k)
    return MoEMLP.from_dense(
        w_gate, w_up, w_down, act_name, shared, kept, router, policy, "renorm", torch.stack(biases)
    )


def _copy(dense):
    from ..model_io import ConvertedModel

    return ConvertedModel.shell_of(dense)


def _flap_block(dense, i: int, stats: FlapStats, ratio: float) -> MoEMLP:
    """Layer i's FFN of ``dense`` pruned on ``stats``: a one-expert block (gate 1)."""
    w_down = dense.adapter.weights(dense.mlp(i))[2]
    kept, bias = prune_ffn(w_down, (stats.mean[i], stats.var[i]), ratio)
    router = Router(w_down.shape[0], 1, "linear")  # zero weights; renorm over one expert gives gate 1
    return pruned_block(dense, i, [kept], [bias], router, 1)


def _install_flap(target, dense, stats: FlapStats, ratio: float) -> None:
    """Replace every FFN of ``target`` by dense's FFN pruned on ``stats``."""
    for i in range(dense.n_layers):
        target.adapter.set_mlp(target.model, i, _flap_block(dense, i, stats, ratio))


def _run_pruned(model, stats: FlapStats, ratio: float, step) -> None:
    """A walk's visit: layer ``step.index`` runs with its FFN pruned on ``stats`` (the layer itself untouched)."""
    from ..layerwise import with_mlp

    block = _flap_block(model, step.index, stats, ratio)
    step.outputs = run_layer(with_mlp(step.layer, model.mlp(step.index), block), step.inputs)


@torch.no_grad()
def flap_prune(dense, stats: FlapStats, ratio: float):
    """Plain FLAP (MLP only, uniform ratio per layer, bias compensation): a pruned copy of ``dense``.

    stats: FlapStats of the calibration text (:func:`flap_stats`); ``dense`` is untouched.
    """
    if not 0 <= ratio < 1:
        raise ValueError(f"The pruning ratio must be in [0, 1), got {ratio}.")
    pruned = _copy(dense)
    _install_flap(pruned, dense, stats, ratio)
    return pruned


# ---------------------------------------------------------------------------------------------
# Domain affinity mining


@dataclass
class Affinity:
    """The mining result, plain data for a heatmap: D domains, N groups.

    ppl[i][j]: perplexity on domain j of the model pruned on domain i; normalised[i][j] = min_i' ppl[i'][j] /
    ppl[i][j]; correlation: Pearson r between rows of normalised; order: the dendrogram's leaf order (draw rows
    and columns in it); groups: domain names per expert, in that order.
    """

    names: list[str]
    ppl: list[list[float]]
    normalised: list[list[float]]
    correlation: list[list[float]]
    linkage: list[list[float]]
    order: list[int]
    groups: list[list[str]]
    method: str = "average"

    def as_dict(self) -> dict:
        return asdict(self)


def cluster_domains(names: list[str], ppl: np.ndarray, n_groups: int, method: str = "average") -> Affinity:
    """Normalise ppl (D, D) per evaluation set, correlate the rows, cluster on 1 - r into exactly n_groups."""
    from scipy.cluster.hierarchy import cut_tree, leaves_list, linkage
    from scipy.spatial.distance import squareform

    if not 1 <= n_groups <= len(names):
        raise ValueError(f"{len(names)} domains cannot form {n_groups} groups; use 1..{len(names)} groups.")
    normalised = ppl.min(axis=0, keepdims=True) / ppl  # (D, D), 1 = best calibration source per column
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.corrcoef(normalised) if len(names) > 1 else np.ones((1, 1))
    corr = np.nan_to_num(corr, nan=0.0)  # a constant row correlates with nothing
    np.fill_diagonal(corr, 1.0)
    dist = np.clip(1.0 - (corr + corr.T) / 2, 0.0, 2.0)
    np.fill_diagonal(dist, 0.0)
    if len(names) == 1:
        tree, order, labels = np.zeros((0, 4)), np.array([0]), np.array([0])
    else:
        tree = linkage(squareform(dist, checks=False), method=method)
        order, labels = leaves_list(tree), cut_tree(tree, n_clusters=n_groups).ravel()
    groups: dict[int, list[str]] = {}
    for leaf in order:  # groups and their members in dendrogram order: deterministic and plot-ready
        groups.setdefault(int(labels[leaf]), []).append(names[leaf])
    return Affinity(
        list(names),
        ppl.tolist(),
        normalised.tolist(),
        corr.tolist(),
        tree.tolist(),
        [int(i) for i in order],
        list(groups.values()),
        method,
    )


@torch.no_grad()
def affinity_matrix(
    dense,
    stats: dict[str, FlapStats],
    heldout: dict[str, torch.Tensor],
    ratio: float,
    batch_size: int = 4,
    progress: Progress = None,
    cancel: Cancel = None,
) -> np.ndarray:
    """P (D, D): perplexity on domain j's held-out windows of the FFNs pruned on domain i, in float64.

    One walk over the layers per calibration domain i: every domain's held-out windows go through layer l with
    its FFN pruned on domain i, then through layer l + 1 (so a model streamed from its shards is read once per
    domain, inside :func:`moe_core.streaming.reading`, never whole)."""
    from ..layerwise import window_logits
    from ..streaming import reread

    names = list(stats)
    windows = torch.cat([heldout[n] for n in names])
    owner = torch.repeat_interleave(torch.arange(len(names)), torch.tensor([len(heldout[n]) for n in names]))
    ppl = np.zeros((len(names), len(names)))
    for i, name in enumerate(names):
        nll, tokens = np.zeros(len(names)), np.zeros(len(names))
        with reread(dense) as model:
            visit = functools.partial(_run_pruned, model, stats[name], ratio)
            batches = window_logits(model, windows, batch_size, cancel=cancel, visit=visit)
            for (ids, logits), who in zip(batches, owner.split(batch_size), strict=True):
                logp = torch.log_softmax(logits.float(), dim=-1)
                picked = -logp.gather(-1, ids[:, 1:, None].to(logp.device))[..., 0]  # (B, T - 1)
                np.add.at(nll, who.numpy(), picked.double().sum(1).cpu().numpy())
                np.add.at(tokens, who.numpy(), picked.shape[1])
        ppl[i] = np.exp(nll / tokens)
        if progress:
            progress((i + 1) / len(names), f"DIVE mining: pruned on {name}, scored on every domain")
    return ppl


# ---------------------------------------------------------------------------------------------
# Expert reconstruction


@torch.no_grad()
def assemble(dense, group_stats: list[FlapStats], cfg: DIVEConfig, all_stats: FlapStats | None = None):
    """A copy of ``dense`` whose FFNs are MoEMLP blocks of one pruned expert per group (with its bias).

    all_stats: every domain pooled, only needed for the optional shared expert. Returns (model, per-layer info).
    """
    moe, generator = _copy(dense), torch.Generator().manual_seed(cfg.seed)
    layers = []
    for i in range(dense.n_layers):
        block, info = expert_block(dense, i, group_stats, cfg, generator, all_stats)
        moe.adapter.set_mlp(moe.model, i, block)
        layers.append(info)
    return moe, layers


def expert_block(dense, i: int, group_stats: list[FlapStats], cfg: DIVEConfig, generator, all_stats=None):
    """(layer i's MoEMLP of one pruned expert per group with its bias and a noisy router drawn from
    ``generator``, its info): one layer of :func:`assemble`."""
    w_down = dense.adapter.weights(dense.mlp(i))[2]
    shared = _shared_channels(w_down, all_stats, i, cfg.shared_share) if cfg.shared_share else None
    pruned = [prune_ffn(w_down, (g.mean[i], g.var[i]), cfg.prune_ratio, shared) for g in group_stats]
    kept, biases = [k for k, _ in pruned], [b for _, b in pruned]
    router = noisy_router(w_down.shape[0], len(kept), generator)
    block = pruned_block(dense, i, kept, biases, router, cfg.top_k, shared)
    return block, _layer_info(i, kept, biases, shared)


@torch.no_grad()
def assemble_routed(dense, input_ids, group_stats, cfg: DIVEConfig, all_stats=None, routing=None,
                    progress: Progress = None, cancel: Cancel = None):  # fmt: skip
    """:func:`assemble` on the layer-by-layer driver, each block routed and refitted (``routing``,
    ReconstructSettings, when given) on input_ids (N, T) as soon as it is built: the same model as assemble
    followed by the routing pass (moe_core.reconstruct.reconstruct_model), in one walk, so it streams.
    Returns (model, per-layer info, per-layer routing reports)."""
    moe, generator, routed = _copy(dense), torch.Generator().manual_seed(cfg.seed), []

    def build(i, x, y):
        block, info = expert_block(moe, i, group_stats, cfg, generator, all_stats)
        moe.adapter.set_mlp(moe.model, i, block)  # a streamed layer's dense MLP is freed before the refit
        if routing is not None:
            routed.append(reconstruct_block(block, x, y, routing, layer=i))
        return block, info

    layers = convert_layers(
        moe, input_ids, list(range(moe.n_layers)), build, batch_size=cfg.batch_size, progress=progress,
        cancel=cancel, label="DIVE experts",
    )  # fmt: skip
    return moe, layers, routed


def _shared_channels(w_down, all_stats: FlapStats, i: int, share: float) -> torch.Tensor:
    """The round(share * I) best channels of layer i on every domain pooled (the optional shared expert)."""
    if all_stats is None:
        raise ValueError("A shared expert needs the pooled statistics of every domain (all_stats).")
    scores = fluctuation_scores(all_stats.var[i], w_down)
    n = round(share * scores.numel())
    return torch.sort(scores, descending=True, stable=True).indices[:n].sort().values


def _layer_info(i: int, kept: list[torch.Tensor], biases: list[torch.Tensor], shared) -> dict:
    """Sizes, how much the experts overlap (mean pairwise share of common channels), bias norms."""
    sets = [set(k.tolist()) for k in kept]
    pairs = [(a, b) for a in range(len(sets)) for b in range(a + 1, len(sets))]
    overlap = [len(sets[a] & sets[b]) / len(sets[a]) for a, b in pairs]
    return {
        "layer": i,
        "expert_sizes": [len(s) for s in sets],
        "shared_size": 0 if shared is None else int(shared.numel()),
        "mean_overlap": float(np.mean(overlap)) if overlap else 1.0,
        "bias_norms": [round(float(b.float().norm()), 4) for b in biases],
    }


# ---------------------------------------------------------------------------------------------
# The pipeline


@dataclass
class DIVEReport:
    """What a DIVE conversion did: config, mining result (a heatmap's data), per-layer info, retraining."""

    config: dict
    affinity: dict
    layers: list[dict] = field(default_factory=list)
    retrain: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    method: str = "dive"
    routing: list[dict] = field(default_factory=list)  # per-layer reports of the routing pass, if any

    def as_dict(self) -> dict:
        return asdict(self)


def domain_stats(
    dense, data: dict[str, DomainData], batch_size: int = 4, progress: Progress = None, cancel: Cancel = None
) -> dict[str, FlapStats]:
    """{domain: FlapStats of its calibration windows} on the dense model."""
    from ..streaming import reread

    out = {}
    for d, (name, domain) in enumerate(data.items()):
        with reread(dense) as model:  # streamed: read once more
            out[name] = flap_stats(model, domain.calib, batch_size, cancel)
        if progress:
            progress((d + 1) / len(data), f"DIVE: FLAP statistics of {name}")
    return out


def convert(
    dense,
    input_ids: torch.Tensor,
    cfg: DIVEConfig | None = None,
    progress: Progress = None,
    cancel: Cancel = None,
    routing=None,
):
    """DIVE conversion of a copy of ``dense`` (untouched): mining, pruned experts, then retraining.

    input_ids (N, T): general text for the two retraining stages (the paper's SlimPajama) and the routing
    step; the domains' own text comes from cfg.domains. routing (ReconstructSettings): the layer-wise routing
    step, after the retraining (a second pass) or, with no retraining, as each layer is built (one walk: a
    model streamed from its shards converts without ever being whole; retraining needs the whole model).
    Returns a ConvertedModel of MoEMLP blocks; ``conversion`` is a DIVEReport (affinity matrix, cluster order
    and groups, per-layer overlap, retraining losses, routing reports, seconds).
    """
    from ..finetune import dive_retrain
    from ..reconstruct import reconstruct_model

    cfg, seconds, start = cfg or DIVEConfig(), {}, time.perf_counter()
    retraining = cfg.retrain.enabled
    mined = 0.7 if retraining else 0.9  # share of the progress bar at the end of the mining
    data = domain_data(dense, cfg, span(progress, 0.0, 0.05), cancel)
    stats = domain_stats(dense, data, cfg.batch_size, span(progress, 0.05, 0.3), cancel)
    seconds["statistics"] = time.perf_counter() - start
    heldout = {name: d.heldout for name, d in data.items()}
    ppl = affinity_matrix(
        dense, stats, heldout, cfg.prune_ratio, cfg.batch_size, span(progress, 0.3, mined), cancel
    )
    affinity = cluster_domains(list(stats), ppl, cfg.n_experts, cfg.linkage)
    seconds["mining"] = time.perf_counter() - start - seconds["statistics"]
    check_cancel(cancel)
    groups = [pooled(stats, g) for g in affinity.groups]
    all_stats = pooled(stats, stats) if cfg.shared_share else None
    if retraining:
        moe, layers = assemble(dense, groups, cfg, all_stats)
        report = DIVEReport(_config_dict(cfg), affinity.as_dict(), layers)
        after = 1.0 if routing is None else 0.9
        report.retrain = dive_retrain(moe, input_ids, cfg.retrain, span(progress, 0.75, after), cancel)
        if routing is not None:
            report.routing = reconstruct_model(
                moe, dense, input_ids, routing, progress=span(progress, 0.9, 1.0), cancel=cancel
            )
    else:
        moe, layers, routed = assemble_routed(
            dense, input_ids, groups, cfg, all_stats, routing, span(progress, mined, 1.0), cancel
        )
        report = DIVEReport(_config_dict(cfg), affinity.as_dict(), layers, routing=routed)
    seconds["total"] = time.perf_counter() - start
    report.seconds = {k: round(v, 2) for k, v in seconds.items()}
    moe.conversion = report
    if progress:
        progress(1.0, f"DIVE: {cfg.n_experts} experts, top-{cfg.top_k}, groups {affinity.groups}")
    return moe


def _config_dict(cfg: DIVEConfig) -> dict:
    out = asdict(cfg)
    out["domains"] = [list(d) for d in cfg.domains]
    return out


# ---------------------------------------------------------------------------------------------
# Registry entry


def _domains_text(domains) -> str:
    return ",".join(f"{name}={spec}" for name, spec in domains)


def _domains(text: str) -> list[str]:
    return [part.strip() for part in str(text or "").split(",") if part.strip()]


METHOD = Method(
    name="dive",
    title="DIVE",
    paper="Y. Feng et al., DIVE into MoE: Diversity-Enhanced Reconstruction of Large Language Models from "
    "Dense into Mixture-of-Experts, arXiv 2506.09351, ACL 2025",
    about="DIVE (arXiv 2506.09351): one FLAP-pruned expert per group of related domains, then two short "
    "retraining stages. E and A come from the Design tab; the shared ratio is a share of channels. After "
    "converting, a heatmap shows the mined domain affinity and which domains became which expert.",
    config=DIVEConfig,
    convert=convert,
    options=(
        Option(
            "domains",
            "--domains",
            "name=text source (or a source), comma-separated; one expert per group of domains",
            "Domains",
            "list",
            parse=_domains,
            show=_domains_text,
        ),  # fmt: skip
        Option("n_experts", "--n-experts", "experts (groups of domains)", kind=int, tab=False),
        Option("top_k", "--top-k", "experts per token", kind=int, tab=False),
        Option(
            "prune_ratio",
            "--prune-ratio",
            "channels each expert drops; empty: 1 - 0.5 / A",
            "Prune ratio",
            "optional",
        ),  # fmt: skip
        Option(
            "shared_share",
            "--shared-share",
            "share of channels in an always-on shared expert",
            kind=float,
            tab=False,
        ),
        Option("n_sequences", "", "calibration windows per domain", "Sequences per domain", int),
        Option(
            "retrain.stage1_steps",
            "--stage1-steps",
            "router only, every expert on (0 skips)",
            "Stage 1 steps",
            int,
        ),
        Option(
            "retrain.stage2_steps",
            "--stage2-steps",
            "LoRA on experts + router + norms (0 skips)",
            "Stage 2 steps",
            int,
        ),
    ),
    # DIVE's experts overlap (pruned copies): the shared ratio is a share of channels
    from_layout=lambda layout: {
        "n_experts": layout.n_experts,
        "top_k": layout.active,
        "shared_share": layout.shared_ratio,
    },
    to_layout=lambda cfg: (cfg.n_experts, cfg.top_k, cfg.shared_share),
    describe=lambda s: f"E{s.get('n_experts')} top-{s.get('top_k')}",
    order=20,
)
