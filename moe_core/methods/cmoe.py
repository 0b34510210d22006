"""CMoE: carve each dense gated FFN into a shared expert and equal-size routed experts, training-free.

Paper: Z. Pei et al., "CMoE: Converting Mixture-of-Experts from Dense to Accelerate LLM Inference" /
"Analytical FFN-to-MoE Restructuring via Activation Pattern Analysis", arXiv 2502.04416 (v3, ACL 2026);
released code: github.com/JarvisPei/CMoE. Per layer, on the calibration tokens:

1. ATopK profiling (eqs. 13-15): h = act(W_gate x) * (W_up x) (T, I); each token marks its K_a largest |h_i|;
   rate mu_i = share of tokens marking neuron i.
2. Shared expert (eq. 16): the N_s*m highest-rate neurons, m = I // E.
3. Routed experts (eqs. 17-21): the other neurons are split into N_r = E - N_s clusters of exactly m by
   balanced assignment: centroids start at the N_r highest-rate remaining neurons, each centroid column of
   the (n, N_r) distance matrix is repeated m times and the square (n, n) linear-assignment problem is
   solved (scipy's linear_sum_assignment); centroids move to their members' mean; ``kmeans_iters`` rounds.
4. Router (eqs. 7-8): the member closest to each centroid is the expert's representative neuron;
   s = act(W_gate^R x) * (W_up^R x); p = softmax(s); top-N_k of p + b selects; g = 1 + p * u, u = 0 and b = 0.

Variants (``CMoEConfig.variant``): ``paper`` profiles raw h and uses L2 distances with a raw router;
``code`` (the released code) profiles h from L2-normalised x and unit-norm rows of W_gate / W_up (cosine),
uses L1 distances, unit-norm router rows and |s|. Layers are carved in order; with ``sequential`` (the
code's behaviour) each carved layer's output is the next layer's calibration input, else every layer is
profiled on dense inputs.

Remainder: when I is not divisible by E, no neuron is dropped (the released code drops them): the
r = I mod E leftover neurons join the shared expert when N_s > 0 (they are the next-highest rates), and
otherwise the first r routed experts (in order of their initial centroid's rate) take m + 1 neurons.

Measured on builtin:smollm2-135m (30 layers, I = 1536), 2-core CPU, calibration 8 x 512 tokens of
shared:calib-wikipedia, sequential carving; WikiText-2 test perplexity on 16 x 512 tokens (dense 36.63);
``python benchmarks/cmoe_variants.py``, 2026-11-24:

    config    paper ppl  code ppl  convert s (paper / code)
    S1A1E8      5688       3136      18 / 13
    S2A2E8       361        321      12 / 10
    S3A3E8      92.5       87.7      11 / 10
    S2A2E16     9455       3308      23 / 9

The code variant is lower in every configuration (-45%, -11%, -5%, -65%), hence the default. A 135M model's
FFN is far less sparse than Llama-2 7B's: keeping the 25% / 50% / 75% highest-rate neurons statically gives
4090 / 277 / 67 on 8 of those windows, against CMoE's 2430 / 235 / 69.3 (S1A1E8 / S2A2E8 / S3A3E8; dense 30.6
there): the router beats static pruning at 25% and 50% active, and is level with it at 75%.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..config import CMoEConfig
from ..layerwise import convert_layers, target_layers
from ..moe import MoEMLP, Router, RoutingPolicy
from ..reconstruct import ReconstructSettings, reconstruct_block
from . import Layout, Method, Option, choices


@dataclass(frozen=True)
class Carving:
    """One layer's neuron partition. shared (S,), experts: N_r index tensors, representatives (N_r,), rates (I,)."""

    shared: torch.Tensor
    experts: list[torch.Tensor]
    representatives: torch.Tensor
    rates: torch.Tensor


@dataclass
class ConversionReport:
    """What a conversion did, for the UI and metrics.json: one dict per carved layer."""

    method: str
    config: dict
    layers: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    routing: list[dict] = field(default_factory=list)  # per-layer reports of a separate routing pass

    def as_dict(self) -> dict:
        out = {"method": self.method, "config": self.config, "seconds": self.seconds, "layers": self.layers}
        return out | ({"routing": self.routing} if self.routing else {})


# ---------------------------------------------------------------------------------------------
# Step 1-3: profiling and the partition


def expert_sizes(n_neurons: int, n_shared: int, n_experts: int) -> tuple[int, list[int]]:
    """(shared size, routed sizes): m = I // E each; the I mod E remainder goes to shared, else to the first experts."""
    m, rest = divmod(n_neurons, n_experts)
    if m < 1:
        raise ValueError(
            f"The FFN has {n_neurons} neurons, fewer than the {n_experts} experts asked for; use fewer experts."
        )
    n_routed = n_experts - n_shared
    if n_shared > 0:
        return n_shared * m + rest, [m] * n_routed
    return 0, [m + 1] * rest + [m] * (n_routed - rest)


TOKEN_CHUNK = 1024  # tokens whose (chunk, I) hidden activations are computed at once (bounds the temporaries)


def _hidden(x, w_gate, w_up, act, normalise: bool = False):
    """(start, h (t, I) float32) per chunk of TOKEN_CHUNK tokens of x (T, H): h = act(x W_gate^T) * (x W_up^T).
    normalise: from L2-normalised x and unit-norm weight rows (cosines)."""
    wg, wu = w_gate.float(), w_up.float()
    if normalise:
        wg, wu = F.normalize(wg, dim=-1), F.normalize(wu, dim=-1)
    for start in range(0, x.shape[0], TOKEN_CHUNK):
        xs = x[start : start + TOKEN_CHUNK].float()
        if normalise:
            xs = F.normalize(xs, dim=-1)
        yield start, act(xs @ wg.T) * (xs @ wu.T)


@torch.no_grad()
def atopk_markers(x, w_gate, w_up, act, k_act: int, normalise: bool) -> torch.Tensor:
    """CMoE ATopK markers: x (T, H), w_gate/w_up (I, H) -> (T, I) float32 in {0, 1}.

    normalise (the released code): h from L2-normalised x and unit-norm weight rows, i.e. cosines.
    """
    markers = torch.zeros(x.shape[0], w_gate.shape[0], device=x.device)
    for start, h in _hidden(x, w_gate, w_up, act, normalise):
        markers[start : start + len(h)].scatter_(1, h.abs().topk(k_act, dim=-1).indices, 1.0)
    return markers


@torch.no_grad()
def atopk_rates(x, w_gate, w_up, act, k_act: int, normalise: bool) -> torch.Tensor:
    """The ATopK markers' mean over tokens (I,), without the (T, I) markers."""
    counts = torch.zeros(w_gate.shape[0], device=x.device)
    for _, h in _hidden(x, w_gate, w_up, act, normalise):
        marked = h.abs().topk(k_act, dim=-1).indices.reshape(-1)
        counts.index_add_(0, marked, torch.ones(marked.numel(), device=counts.device))
    return counts / x.shape[0]


def distances(feats: torch.Tensor, centroids: torch.Tensor, metric: str) -> torch.Tensor:
    """feats (n, T), centroids (k, T) -> (n, k) distances, float64.

    ``l1`` / ``l2``: binary feats and centroids in [0, 1] (ATopK markers): for a in {0,1} and c in [0,1],
    |a - c| = a + c - 2ac, so both are one matmul away. ``cosine``: 1 - cos(f, c), for any real features.
    """
    f, c = feats.float(), centroids.float()
    if metric == "cosine":
        return (1 - F.normalize(f, dim=1) @ F.normalize(c, dim=1).T).double()
    cross = (f @ c.T).double()  # (n, k)
    ones = f.sum(1, keepdim=True).double()  # (n, 1) exact integer counts
    if metric == "l1":
        return ones + c.double().sum(1) - 2 * cross
    return (ones + (c.double() ** 2).sum(1) - 2 * cross).clamp(min=0).sqrt()


def balanced_assign(dist: np.ndarray, sizes: list[int]) -> np.ndarray:
    """Minimum-cost assignment of n rows to k clusters holding exactly sizes[j] rows (sum = n).

    dist (n, k). Column j is repeated sizes[j] times, making the square problem of CMoE eq. 20.
    """
    from scipy.optimize import linear_sum_assignment

    owner = np.repeat(np.arange(len(sizes)), sizes)  # (n,) cluster of each repeated column
    rows, cols = linear_sum_assignment(dist[:, owner])
    assignment = np.empty(dist.shape[0], dtype=np.int64)
    assignment[rows] = owner[cols]
    return assignment


def balanced_clusters(feats, init, sizes, iters: int, metric: str):
    """Balanced k-means on feats (n, T) from centroids init (k, T) -> (assignment (n,) long, centroids (k, T))."""
    centroids, assignment = init.float().clone(), None
    counts = torch.tensor(sizes, dtype=torch.float32)[:, None]  # (k, 1); every cluster is non-empty
    for _ in range(iters):
        new = torch.from_numpy(balanced_assign(distances(feats, centroids, metric).numpy(), sizes))
        if assignment is not None and torch.equal(new, assignment):
            break
        assignment = new
        one_hot = F.one_hot(assignment, len(sizes)).T.float()  # (k, n)
        centroids = one_hot @ feats / counts  # eq. 21: members' mean
    return assignment, centroids


def carve(markers: torch.Tensor, n_shared: int, n_experts: int, iters: int, metric: str) -> Carving:
    """Partition the I neurons given ATopK markers (T, I): shared by rate, routed by balanced clustering."""
    return carve_features(markers.T.contiguous(), markers.mean(0), n_shared, n_experts, iters, metric)


def carve_features(feats, scores, n_shared: int, n_experts: int, iters: int, metric: str) -> Carving:
    """Partition the I neurons given one feature row per neuron, feats (I, T), and a score per neuron (I,):
    the shared expert takes the highest scores, the rest are clustered (balanced) from centroids at the
    highest-scoring remaining neurons; each cluster's member nearest its centroid represents it."""
    order = torch.sort(scores, descending=True, stable=True).indices  # ties -> lower index first
    shared_size, sizes = expert_sizes(len(scores), n_shared, n_experts)
    shared, rest = order[:shared_size], order[shared_size:]  # rest sorted by score, highest first
    feats = feats[rest]  # (n, T): one row per remaining neuron
    assignment, centroids = balanced_clusters(feats, feats[: len(sizes)], sizes, iters, metric)
    experts, reps = [], []
    for j in range(len(sizes)):
        members = (assignment == j).nonzero().squeeze(1)
        closest = distances(feats[members], centroids[j : j + 1], metric).squeeze(1).argmin()
        reps.append(rest[members[closest]])
        experts.append(rest[members].sort().values)
    return Carving(shared.sort().values, experts, torch.stack(reps), scores)


@torch.no_grad()
def token_experts(feats: torch.Tensor, cut: Carving, rounds: int = 3) -> Carving:
    """Re-cut the routed experts of a partition ``cut`` around groups of tokens: experts may overlap.

    feats (I, T): each neuron's contribution per token (:func:`magnitude_features`). Starting from the
    partition, alternate: each token joins the expert that holds the largest share of its contribution (summed
    over the expert's neurons, outside the shared expert), and each expert becomes the neurons with the largest
    mean share over its tokens, at its size. Both steps raise the captured share, so the rounds converge. A
    neuron two token groups both need sits in both experts; one no group needs is left out (pruned). Measured
    on SmolLM2 at S1A1E8 (32 x 512 calibration tokens, 3 rounds), the routing step's held-out error drops from
    0.417 to 0.368 (layer 12) and 0.247 to 0.206 (layer 20) at the same expert count and sizes.
    """
    shared = torch.zeros(feats.shape[0], dtype=torch.bool, device=feats.device)
    shared[cut.shared] = True
    # (T, I): each token's row normalised to a share; the shared expert's neurons count for nothing
    share = feats.T.float().clone(memory_format=torch.contiguous_format)  # row-major: 30x faster matmuls
    share[:, shared] = 0.0
    share /= share.sum(1, keepdim=True).clamp(min=1e-12)
    member = torch.zeros(len(cut.experts), feats.shape[0], device=feats.device)  # (E, I) in {0, 1}
    for j, e in enumerate(cut.experts):
        member[j, e] = 1.0
    sizes, assign, means = [int(e.numel()) for e in cut.experts], None, None
    for _ in range(rounds):
        new = (share @ member.T).argmax(1)  # (T,): the expert holding most of each token's contribution
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        picked = F.one_hot(assign, len(sizes)).T.float()  # (E, T)
        means = (picked @ share) / picked.sum(1, keepdim=True).clamp(min=1)  # (E, I): each group's mean share
        for j, size in enumerate(sizes):
            if picked[j].any():  # an expert no token picks keeps its neurons
                member[j] = 0.0
                member[j, means[j].masked_fill(shared, -1.0).topk(size).indices] = 1.0
    experts = [member[j].nonzero().squeeze(1) for j in range(len(sizes))]
    # representative (CMoE's analytic router): the neuron whose share its tokens raise most over the average
    lift = (means - share.mean(0)).masked_fill(member == 0, -float("inf"))
    return Carving(cut.shared, experts, lift.argmax(1), cut.rates)


@torch.no_grad()
def magnitude_features(x, w_gate, w_up, w_down, act) -> torch.Tensor:
    """What each neuron adds to the FFN output per token: |h_i| * ||W_down[:, i]||, (I, T) float32.

    (WINA's score; DOT-MoE's critique of activation-only proxies: they ignore W_down.)
    """
    norms, out = w_down.float().norm(dim=0), torch.empty(w_gate.shape[0], x.shape[0], device=x.device)
    for start, h in _hidden(x, w_gate, w_up, act):
        out[:, start : start + len(h)] = (h.abs() * norms).T
    return out


# ---------------------------------------------------------------------------------------------
# Step 4: the block


def cmoe_router(w_gate, w_up, representatives, act_name: str, variant: str) -> Router:
    """CMoE's analytical router from the representative neurons' gate/up rows (code: unit rows, |s|)."""
    from transformers.activations import ACT2FN

    wg, wu = w_gate[representatives].float(), w_up[representatives].float()  # (N_r, H)
    if variant == "code":
        wg, wu = F.normalize(wg, dim=-1), F.normalize(wu, dim=-1)
    router = Router(w_gate.shape[1], len(representatives), "cmoe", ACT2FN[act_name], variant == "code")
    with torch.no_grad():
        router.weight.copy_(wg)
        router.up_weight.copy_(wu)
    return router


def carve_block(
    dense, layer_idx: int, x: torch.Tensor, cfg: CMoEConfig, shape: tuple[int, int, int] | None = None
) -> tuple[MoEMLP, dict]:
    """Carve one dense MLP given its calibration inputs x (T, H): (MoEMLP, per-layer report).

    shape: (n_shared, n_active, n_experts) of this layer (default: the config's layer shape)."""
    n_shared, n_active, n_experts = shape or cfg.layer_shape(layer_idx)
    mlp = dense.mlp(layer_idx)
    w_gate, w_up, w_down = dense.adapter.weights(mlp)
    if cfg.k_act > w_gate.shape[0]:
        raise ValueError(f"cmoe.k_act={cfg.k_act} exceeds the FFN width {w_gate.shape[0]}; lower it.")
    act = dense.adapter.act_fn(mlp)
    normalise, markers = cfg.variant == "code", None  # markers (T, I) only when the neurons cluster on them
    if cfg.cluster_on == "markers":
        markers = atopk_markers(x, w_gate, w_up, act, cfg.k_act, normalise)
    rates = atopk_rates(x, w_gate, w_up, act, cfg.k_act, normalise) if markers is None else markers.mean(0)
    magnitude = None
    if cfg.shared_by == "magnitude" or cfg.cluster_on != "markers":
        magnitude = magnitude_features(x, w_gate, w_up, w_down, act)  # (I, T)
    scores = rates if cfg.shared_by == "rate" else magnitude.mean(1)
    if cfg.cluster_on == "markers":
        feats, metric = markers.T.contiguous(), "l1" if cfg.variant == "code" else "l2"
    else:
        feats, metric = magnitude, "cosine"
    cut = carve_features(feats, scores, n_shared, n_experts, cfg.kmeans_iters, metric)
    if cfg.cluster_on == "tokens" and n_active == 1:  # with more experts per token the partition does better
        cut = token_experts(magnitude, cut, cfg.token_rounds)
    act_name = dense.adapter.act_name(dense.model)
    router = cmoe_router(w_gate, w_up, cut.representatives, act_name, cfg.variant)
    policy = RoutingPolicy("topk", k=n_active)
    block = MoEMLP.from_dense(w_gate, w_up, w_down, act_name, cut.shared, cut.experts, router, policy, "cmoe")
    return block, _layer_report(layer_idx, cut, rates, cfg.k_act)


def _layer_report(layer_idx: int, cut: Carving, rates: torch.Tensor, k_act: int) -> dict:
    marks = rates * k_act  # expected marks per token are k_act in all
    return {
        "layer": layer_idx,
        "shared_size": int(cut.shared.numel()),
        "expert_sizes": [int(e.numel()) for e in cut.experts],
        "representatives": cut.representatives.tolist(),
        "shared_mark_share": float(marks[cut.shared].sum() / k_act) if cut.shared.numel() else 0.0,
        "max_rate": float(rates.max()),
    }


# ---------------------------------------------------------------------------------------------
# The pipeline


@torch.no_grad()
def convert(
    dense,
    input_ids: torch.Tensor,
    cfg: CMoEConfig | None = None,
    progress: Callable[[float, str], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    routing: ReconstructSettings | None = None,
):
    """Carve a copy of ``dense`` into CMoE layers on calibration input_ids (N, T); ``dense`` is untouched.

    routing: when given, each carved block is routed and refitted right away (moe_core.reconstruct), so the
    next layer carves on what the finished layer produces. Returns a ConvertedModel whose listed layers hold
    MoEMLP blocks; its ``conversion`` is a ConversionReport (per-layer sizes, representatives,
    routing errors, seconds). Layers whose shape is "dense" (cmoe.layer_experts) stay dense.
    """
    from ..model_io import ConvertedModel

    cfg, start = cfg or CMoEConfig(), time.perf_counter()
    moe = ConvertedModel.shell_of(dense)
    targets = [i for i in target_layers(cfg.layers, moe.n_layers, "cmoe") if cfg.layer_shape(i) is not None]
    report = ConversionReport("cmoe", _config_dict(cfg))
    if not targets:
        raise ValueError("cmoe.layer_experts keeps every layer dense: there is nothing to convert.")

    def build(i, x, y):
        begin = time.perf_counter()
        block, info = carve_block(moe, i, x, cfg)
        # in place now rather than after the routing step: a streamed layer's dense MLP (a quarter of a GB in
        # float32 at 2560 x 6912) is freed before the refit's normal equations, the peak of a layer's work
        moe.adapter.set_mlp(moe.model, i, block)
        if routing is not None:
            info["routing"] = reconstruct_block(block, x, y, routing, layer=i)
        info["seconds"] = round(time.perf_counter() - begin, 3)
        return block, info

    report.layers = convert_layers(
        moe, input_ids, targets, build, batch_size=cfg.batch_size, sequential=cfg.sequential,
        progress=progress, cancel=cancel, label=f"CMoE {_shapes_label(cfg)}",
    )  # fmt: skip
    report.seconds = round(time.perf_counter() - start, 2)
    moe.conversion = report
    return moe


def _shapes_label(cfg: CMoEConfig) -> str:
    """What the progress line calls the layout: the one shape, or the per-layer shapes' range (a budget's)."""
    if cfg.layer_experts is None:
        return cfg.experts
    shapes = sorted({s for s in cfg.layer_experts if s.lower() != "dense"})
    return shapes[0] if len(shapes) == 1 else f"per-layer ({', '.join(shapes)})"


def _config_dict(cfg: CMoEConfig) -> dict:
    from dataclasses import asdict

    out = asdict(cfg)
    out["layers"] = None if cfg.layers is None else list(cfg.layers)
    return out


# ---------------------------------------------------------------------------------------------
# Registry entry


def _from_layout(layout: Layout) -> dict:
    out: dict = {"experts": layout.experts}
    if layout.budget is not None:
        out |= {"budget": layout.budget, "layer_experts": layout.layer_experts, "servable": layout.servable}
    return out


def _to_layout(cfg: CMoEConfig) -> tuple[int, int, float]:
    n_shared, active, n_experts = cfg.shape
    return n_experts, active, n_shared / n_experts


def _describe(section: dict) -> str:
    shapes = section.get("layer_experts")
    if shapes:
        from collections import Counter

        counts = ", ".join(f"{shape} x{n}" for shape, n in Counter(shapes).most_common())
        return (
            f"one shape per layer for a {section.get('budget') or 0:.0%} budget, layers per shape: {counts}"
        )
    return str(section.get("experts"))


METHOD = Method(
    name="cmoe",
    title="CMoE",
    paper="Z. Pei et al., CMoE: Converting Mixture-of-Experts from Dense to Accelerate LLM Inference "
    "(Analytical FFN-to-MoE Restructuring via Activation Pattern Analysis), arXiv 2502.04416, ACL 2026",
    about="CMoE (arXiv 2502.04416): carve neurons into experts by co-activation; no training, seconds per layer.",
    config=CMoEConfig,
    convert=convert,
    options=(
        Option(
            "experts", "--experts", "SxAyEz: x shared + y active routed of z experts, e.g. S2A2E8", tab=False
        ),
        Option(
            "variant",
            "--variant",
            "code: cosine profiling, L1 clusters, |s| router (lower ppl)",
            "Variant",
            choices(CMoEConfig, "variant"),
        ),  # fmt: skip
        Option("k_act", "--k-act", "neurons per token marked active when grouping neurons", "K_a", int),
        Option(
            "kmeans_iters",
            "",
            "balanced-assignment + centroid rounds (the code does 1)",
            "Clustering rounds",
            int,
        ),
        Option(
            "token_rounds",
            "--token-rounds",
            "cluster_on=tokens: token-group rounds (3 give the error of 10 on SmolLM2)",
            kind=int,
            tab=False,
        ),  # fmt: skip
        Option(
            "shared_by",
            "--shared-by",
            "shared neurons by ATopK rate or |h| ||W_down||",
            kind=choices(CMoEConfig, "shared_by"),
            tab=False,
        ),  # fmt: skip
        Option(
            "cluster_on",
            "--cluster-on",
            "cluster neurons on ATopK markers or |h| ||W_down||, or cut experts around token groups (tokens)",
            kind=choices(CMoEConfig, "cluster_on"),
            tab=False,
        ),  # fmt: skip
        Option(
            "budget",
            "--budget",
            "active FFN share (e.g. 0.5), allocated per layer by measured sensitivity",
            kind=float,
            tab=False,
        ),  # fmt: skip
        Option(
            "servable",
            "--servable",
            "the budget gives every converted layer one shape (the rest dense): what vLLM and transformers load",
            kind=bool,
            tab=False,
        ),  # fmt: skip
        Option(
            "sensitivity",
            "--sensitivity",
            "the budget's sensitivity: fast (one KL per layer, scaled by output error) or full (every shape)",
            kind=choices(CMoEConfig, "sensitivity"),
            tab=False,
        ),  # fmt: skip
    ),
    from_layout=_from_layout,
    to_layout=_to_layout,
    describe=_describe,
    budget=True,
    top_ks=lambda cfg, n_layers: [s[1] for s in map(cfg.layer_shape, range(n_layers)) if s is not None],
    order=0,
)
