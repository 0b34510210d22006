"""Frozen, validated configuration for every stage, and a root RunConfig that a YAML/JSON file fills.

Every field has a default that runs on a 2-core CPU; invalid values raise ValueError saying how to fix them.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


MAX_CALIBRATION_TOKENS = 2**24  # 16.8 M tokens: far beyond any paper's recipe (CMoE: 8 x 2048)


@dataclass(frozen=True)
class ModelConfig:
    spec: str = "builtin:smollm2-135m"  # builtin:..., a local folder, a .gguf file or a hub id
    device: str = "cpu"
    dtype: str = "auto"  # float32 on CPU (bf16 matmuls are ~1000x slower there), bfloat16 on CUDA
    trust_remote_code: bool = False  # off: never run a repository's code unless the user says so
    # e.g. "2GB": a conversion of a model folder larger than this streams, one layer at a time (moe_core.streaming)
    max_memory: str | None = None

    def __post_init__(self):
        _check(
            bool(self.spec.strip()), "model.spec is empty: give builtin:smollm2-135m, a folder or a hub id."
        )
        if self.max_memory is not None:
            from .streaming import parse_bytes

            object.__setattr__(self, "max_memory", str(self.max_memory).strip())
            parse_bytes(self.max_memory)  # ValueError saying how to write it
        _check(
            self.dtype in ("auto", "float32", "bfloat16", "float16"),
            f"model.dtype '{self.dtype}' is not one of auto, float32, bfloat16, float16.",
        )


@dataclass(frozen=True)
class DataConfig:
    # calibration text (moe_core.data.parse_text_source); auto: Wikipedia prose from the shared data when
    # present, else Python's docs (moe_core.data.default_text); never the scored WikiText-2 test text
    text: str = "auto"
    n_sequences: int = 32  # CMoE carves on 8 x 2048; the routing step's least squares want >= 16k tokens
    seq_len: int = 512  # 2048 in the paper; 512 keeps a CPU run to minutes
    seed: int = 0

    def __post_init__(self):
        _check(
            1 <= self.n_sequences <= 100_000, f"data.n_sequences must be 1..100000, got {self.n_sequences}."
        )
        _check(2 <= self.seq_len <= 131_072, f"data.seq_len must be 2..131072, got {self.seq_len}.")
        tokens = self.n_sequences * self.seq_len
        _check(
            tokens <= MAX_CALIBRATION_TOKENS,
            f"data: {self.n_sequences} x {self.seq_len} = {tokens:,} calibration tokens is more than the "
            f"{MAX_CALIBRATION_TOKENS:,} a conversion can hold; lower n_sequences or seq_len.",
        )


@dataclass(frozen=True)
class ProfileConfig:
    k_act: int = 10  # CMoE's K_a: neurons marked active per token (paper and code default)
    batch_size: int = 1  # sequences per forward micro-batch

    def __post_init__(self):
        _check(self.k_act >= 1, f"profile.k_act must be >= 1, got {self.k_act}.")
        _check(self.batch_size >= 1, f"profile.batch_size must be >= 1, got {self.batch_size}.")


def parse_experts(text: str) -> tuple[int, int, int]:
    """'S2A2E8' -> (n_shared 2, n_active 2, n_experts 8): S shared + A active routed out of E experts (CMoE)."""
    match = re.fullmatch(r"\s*S(\d+)A(\d+)E(\d+)\s*", str(text), flags=re.IGNORECASE)
    _check(
        match is not None,
        f"Expert configuration '{text}' is not of the form SxAyEz (x shared, y active routed, z experts), "
        "e.g. S2A2E8 or S3A3E8.",
    )
    n_shared, n_active, n_experts = (int(g) for g in match.groups())
    _check(n_experts >= 2, f"{text}: need at least 2 experts (E >= 2), got E{n_experts}.")
    _check(
        n_shared < n_experts,
        f"{text}: with every expert shared nothing is routed (that is the dense model); use S <= E-1.",
    )
    _check(
        1 <= n_active <= n_experts - n_shared,
        f"{text}: active routed experts A must be 1..E-S = 1..{n_experts - n_shared}, got A{n_active}.",
    )
    return n_shared, n_active, n_experts


DEFAULT_EXPERTS = "S3A3E8"  # CMoE's E (8) and its one shape when a budget is turned off
DEFAULT_BUDGET = 0.75  # CMoE's default: 75% of the FFN active, allocated per layer


@dataclass(frozen=True)
class CMoEConfig:
    """CMoE carving (arXiv 2502.04416); defaults follow the released code except the neuron statistic
    (``shared_by``: magnitude, measured better; ``rate`` is the paper's), the experts of a layer that routes one
    per token (``cluster_on``: tokens, cut around groups of tokens and free to overlap; the paper partitions the
    neurons by their ``markers``) and the layout: by default a per-layer budget of 75% of the FFN over 8 experts
    (each layer's shape allocated by its measured sensitivity: on SmolLM2 1.55x the dense perplexity where one
    shape everywhere, S3A3E8, gives 1.85x, and 1.1x faster where S3A3E8 is not faster at all); the paper uses
    S2A2E8 everywhere.

    Giving ``experts`` alone means that one shape in every layer (no budget); giving ``budget`` (or
    ``layer_experts``) allocates per layer over ``experts``' E (8 when not given); giving neither is the default
    75% budget."""

    # SxAyEz: x shared + y active routed of z experts (S3A3E8 runs 75% of the FFN); None: see above
    experts: str | None = None
    k_act: int = 10  # K_a: ATopK neurons marked per token (paper and code)
    variant: Literal["paper", "code"] = "code"  # code: cosine profiling, L1, |s| router (lower perplexity)
    kmeans_iters: int = 1  # balanced-assignment + centroid-update rounds (the code does one)
    sequential: bool = True  # each carved layer's output feeds the next layer's calibration (the code)
    layers: tuple[int, ...] | None = None  # layers to carve; None = all
    batch_size: int = 4  # calibration sequences per forward micro-batch
    shared_by: Literal["rate", "magnitude"] = (
        "magnitude"  # shared neurons: mean |h_i| ||W_down,i|| or the ATopK rate (paper)
    )
    # neurons partitioned by clustering |h_i| ||W_down,i|| (cosine) or ATopK markers (paper); tokens: a layer
    # routing one expert per token re-cuts that partition around groups of tokens (experts may overlap;
    # moe_core.methods.cmoe.token_experts), the others keep it. At 75%, distilled: 38.45 against 39.69
    cluster_on: Literal["markers", "magnitude", "tokens"] = "tokens"
    # token-group rounds of cluster_on=tokens; measured on SmolLM2 at S1A1E8, 3 rounds give the routing step's
    # held-out error of 10 (0.3679 vs 0.3678, 0.2060 vs 0.2053) in a third of the time
    token_rounds: int = 3
    # one shape per layer, "SxAyEz" or "dense" (a per-layer budget's allocation); None: `experts` everywhere
    layer_experts: tuple[str, ...] | None = None
    budget: float | None = None  # active FFN share; layer_experts None: allocated per layer (moe_core.budget)
    # how the budget's sensitivity is measured: fast (one KL per layer, the other shapes scaled by their output
    # error; 3.1x faster on SmolLM2, its allocation's summed KL within 1.5% of full's) or full (every shape)
    sensitivity: Literal["fast", "full"] = "fast"
    # the budget's allocation uses one shape (the others dense): Qwen2-MoE's form, which vLLM and transformers
    # serve without remote code (a free allocation exports only as exact: its layers differ in expert count)
    servable: bool = False

    def __post_init__(self):
        if self.experts is None:  # no shape given: the budget (the default one when none is given either)
            if self.budget is None and self.layer_experts is None:
                object.__setattr__(self, "budget", DEFAULT_BUDGET)
            object.__setattr__(self, "experts", DEFAULT_EXPERTS)
        parse_experts(self.experts)
        _check(self.k_act >= 1, f"cmoe.k_act must be >= 1, got {self.k_act}.")
        _check(self.variant in ("paper", "code"), f"cmoe.variant is paper or code, not '{self.variant}'.")
        _check(
            self.shared_by in ("rate", "magnitude"),
            f"cmoe.shared_by is rate or magnitude, not '{self.shared_by}'.",
        )
        _check(
            self.cluster_on in ("markers", "magnitude", "tokens"),
            f"cmoe.cluster_on is markers, magnitude or tokens, not '{self.cluster_on}'.",
        )
        if self.layer_experts is not None:
            shapes = tuple(str(v).strip() for v in self.layer_experts)
            for shape in shapes:
                if shape.lower() != "dense":
                    parse_experts(shape)
            object.__setattr__(self, "layer_experts", shapes)
            converted = {shape for shape in shapes if shape.lower() != "dense"}
            _check(
                not self.servable or len(converted) <= 1,
                f"cmoe.servable means one shape in every converted layer; layer_experts has {sorted(converted)}.",
            )
        _check(
            self.budget is None or 0 < self.budget < 1,
            f"cmoe.budget is the active share of the FFN, in (0, 1) (e.g. 0.5), got {self.budget}.",
        )
        _check(
            self.sensitivity in ("fast", "full"),
            f"cmoe.sensitivity is fast or full, not '{self.sensitivity}'.",
        )
        _check(1 <= self.kmeans_iters <= 100, f"cmoe.kmeans_iters must be 1..100, got {self.kmeans_iters}.")
        _check(1 <= self.token_rounds <= 100, f"cmoe.token_rounds must be 1..100, got {self.token_rounds}.")
        _check(self.batch_size >= 1, f"cmoe.batch_size must be >= 1, got {self.batch_size}.")
        if self.layers is not None:
            layers = tuple(self.layers)
            _check(
                len(layers) > 0 and all(isinstance(i, int) and i >= 0 for i in layers),
                f"cmoe.layers must be null (all) or a non-empty list of layer indices >= 0, got {self.layers}.",
            )
            object.__setattr__(self, "layers", tuple(sorted(set(layers))))

    @property
    def shape(self) -> tuple[int, int, int]:
        """(n_shared, n_active, n_experts)."""
        return parse_experts(self.experts)

    def layer_shape(self, layer: int) -> tuple[int, int, int] | None:
        """(n_shared, n_active, n_experts) of one layer; None: the layer stays dense."""
        if self.layer_experts is None:
            return self.shape
        _check(
            layer < len(self.layer_experts),
            f"cmoe.layer_experts has {len(self.layer_experts)} entries; layer {layer} has none. Give one per layer.",
        )
        shape = self.layer_experts[layer]
        return None if shape.lower() == "dense" else parse_experts(shape)


@dataclass(frozen=True)
class LaDiMoConfig:
    """LaDiMo layer-wise distillation (arXiv 2408.04278); the paper gives none of these: see methods/ladimo.py."""

    n_experts: int = 8  # E slices of each FFN (192 neurons each on SmolLM2-135M)
    n_shared: int = 2  # slices kept always on as a shared expert (the paper names none; measured better)
    top_k: int | None = None  # uniform policy after conversion; None: 3/4 of the FFN active (S + A = 6 of 8)
    threshold: float | None = None  # set it for a dynamic policy: experts until their summed p reaches it
    # the paper splits the weights; contiguous: equal slices in order; cmoe: ATopK co-activation clusters;
    # magnitude: clusters of |h_i| ||W_down,i|| (moe_core.methods.cmoe.magnitude_features)
    partition: Literal["contiguous", "cmoe", "magnitude"] = "magnitude"
    # oracle: a linear router trained on each token's best experts, then a least-squares refit of the down
    # projections, in Qwen2-MoE's form (moe_core.reconstruct); random: near uniform, E-scaled experts (starts
    # at dense with every expert on); representative: from representative gate rows, E-scaled
    router_init: Literal["random", "representative", "oracle"] = "oracle"
    gate_mode: Literal["prob", "renorm"] = (
        "prob"  # random/representative inits; oracle is always prob (native)
    )
    # Adam steps per layer (~25 s per SmolLM2 layer on 2 CPU cores). 300, not 100: held-out relative MSE on the
    # calibration tokens (10% held out, mean over layers) 0.0717 against 0.0748 on SmolLM2-135M at S2A4E8
    steps: int = 300
    batch_tokens: int = 512  # calibration tokens per step
    lr: float = 1e-3  # experts (1e-4 barely moves them in 100 steps; 3e-3 hurts k = E)
    router_lr: float = 1e-2
    aux_weight: float = 0.01  # Switch Transformer's load-balancing weight
    # deployed: every token trains at the block's top-k (what it will run); range: a random k in
    # [train_k_min, E] per token, so that one block serves every policy the adaptive router may pick
    train_k: Literal["deployed", "range"] = "deployed"
    train_k_min: int = 1
    sequential: bool = True  # each layer trains on what the converted layers before it produce (else dense)
    holdout: float = 0.1  # share of calibration tokens kept to report the relative MSE
    k_act: int = 10  # CMoE ATopK neurons per token (cmoe partition, shared-neuron choice)
    layers: tuple[int, ...] | None = None  # layers to convert; None = all
    batch_size: int = 4  # calibration sequences per forward micro-batch
    seed: int = 0

    def __post_init__(self):
        _check(self.n_experts >= 2, f"ladimo.n_experts must be >= 2, got {self.n_experts}.")
        _check(
            0 <= self.n_shared < self.n_experts,
            f"ladimo.n_shared must be 0..n_experts-1 = 0..{self.n_experts - 1}, got {self.n_shared}.",
        )
        n_routed = self.n_experts - self.n_shared
        if self.top_k is None:
            object.__setattr__(self, "top_k", max(1, round(0.75 * self.n_experts) - self.n_shared))
        _check(
            1 <= self.top_k <= n_routed,
            f"ladimo.top_k must be 1..{n_routed} (routed experts), got {self.top_k}.",
        )
        _check(
            self.threshold is None or 0 < self.threshold <= 1,
            f"ladimo.threshold must be null (top-k) or in (0, 1], got {self.threshold}.",
        )
        _check(
            self.partition in ("contiguous", "cmoe", "magnitude"),
            f"ladimo.partition is contiguous, cmoe or magnitude, not '{self.partition}'.",
        )
        _check(
            self.router_init in ("random", "representative", "oracle"),
            f"ladimo.router_init is random, representative or oracle, not '{self.router_init}'.",
        )
        _check(
            self.train_k in ("deployed", "range"),
            f"ladimo.train_k is deployed or range, not '{self.train_k}'.",
        )
        _check(
            self.gate_mode in ("prob", "renorm"),
            f"ladimo.gate_mode is prob or renorm, not '{self.gate_mode}'.",
        )
        _check(
            self.steps >= 1 and self.batch_tokens >= 1, "ladimo.steps and ladimo.batch_tokens must be >= 1."
        )
        _check(self.lr > 0 and self.router_lr > 0, "ladimo.lr and ladimo.router_lr must be > 0.")
        _check(self.aux_weight >= 0, f"ladimo.aux_weight must be >= 0, got {self.aux_weight}.")
        _check(
            1 <= self.train_k_min <= n_routed,
            f"ladimo.train_k_min must be 1..{n_routed}, got {self.train_k_min}.",
        )
        _check(0 < self.holdout < 1, f"ladimo.holdout must be in (0, 1), got {self.holdout}.")
        _check(self.k_act >= 1 and self.batch_size >= 1, "ladimo.k_act and ladimo.batch_size must be >= 1.")
        if self.layers is not None:
            layers = tuple(self.layers)
            _check(
                len(layers) > 0 and all(isinstance(i, int) and i >= 0 for i in layers),
                f"ladimo.layers must be null (all) or a non-empty list of layer indices >= 0, got {self.layers}.",
            )
            object.__setattr__(self, "layers", tuple(sorted(set(layers))))


# DIVE domains: the six calibration corpora of the shared data folder (the paper mines 24 datasets).
DIVE_DOMAINS = tuple(
    (name, f"shared:calib-{name}") for name in ("arxiv", "books", "code", "math", "news", "wikipedia")
)
# Without the shared data folder: the fast builtins, prose and code (builtin:model is left out: its default
# 8 x 128 sampled tokens are too few for 16 x 256 calibration windows plus held-out ones, and it is slow).
DIVE_BUILTIN_DOMAINS = (("pydoc", "builtin:pydoc"), ("stdlib", "builtin:stdlib"))
DIVE_MAX_DEFAULT_EXPERTS = 4


def default_dive_domains() -> tuple[tuple[str, str], ...]:
    """DIVE_DOMAINS when the shared data folder holds all six calibration corpora, else DIVE_BUILTIN_DOMAINS."""
    from .data import SHARED_SOURCES, shared_data_dir

    root = shared_data_dir()
    files = [SHARED_SOURCES[spec.removeprefix("shared:")][0] for _, spec in DIVE_DOMAINS]
    present = root is not None and all((root / rel).is_file() for rel in files)
    return DIVE_DOMAINS if present else DIVE_BUILTIN_DOMAINS


def _domain_name(spec: str) -> str:
    """A short name for a text source: shared:calib-math -> math, file:/x/notes.txt -> notes."""
    tail = re.split(r"[:/\\]", spec.split("#")[0].rstrip("/"))[-1]
    return tail.removeprefix("calib-").split(".")[0] or spec


def parse_domains(items) -> tuple[tuple[str, str], ...]:
    """Domains as ((name, text source), ...) from a mapping, "name=spec" / "spec" strings or (name, spec) pairs."""
    items = list(items.items()) if isinstance(items, dict) else list(items or ())
    out = []
    for item in items:
        if isinstance(item, str):
            name, sep, spec = item.partition("=")
            if not sep or ":" in name or "/" in name:  # no name given: "shared:calib-math", "a=b/c.txt" ...
                name, spec = _domain_name(item), item
        else:
            _check(len(item) == 2, f"dive.domains entry {item!r} is not a (name, text source) pair.")
            name, spec = item
        name, spec = str(name).strip(), str(spec).strip()
        _check(bool(name) and bool(spec), f"dive.domains entry {item!r} needs a name and a text source.")
        out.append((name, spec))
    names = [n for n, _ in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    _check(
        not dupes, f"dive.domains names must be unique, repeated: {', '.join(dupes)}; name them name=spec."
    )
    return tuple(out)


@dataclass(frozen=True)
class DIVERetrainConfig:
    """DIVE's two retraining stages (methods/dive.py, finetune.dive_retrain), sized for minutes on a 2-core CPU.

    The paper trains stage 1 on 0.5B and stage 2 on 5B tokens at lr 1e-4; a few dozen CPU steps need more.
    """

    stage1_steps: int = (
        8  # router only, every expert on, temperature softmax (paper 1,905 steps x 262k tokens)
    )
    stage2_steps: int = 16  # LoRA on experts + router + RMSNorms, top-k (paper 9,535 steps x 524k tokens)
    batch_size: int = 2  # sequences per step
    router_lr: float = 1e-2  # stage 1: the router starts random and has only these steps (paper 1e-4)
    lr: float = 5e-4  # stage 2: LoRA, router and norms (paper 1e-4 over ~10k steps)
    temperature: float | None = (
        None  # stage 1 softmax temperature; None: 0.05 for top-1, 0.5 for top-2+ (code)
    )
    lora_r: int = 8  # paper code
    lora_alpha: int = 16  # paper code
    seed: int = 0

    @property
    def enabled(self) -> bool:
        """Whether either retraining stage runs (both at 0 steps: DIVE without retraining, which streams)."""
        return self.stage1_steps + self.stage2_steps > 0

    def __post_init__(self):
        _check(
            self.stage1_steps >= 0 and self.stage2_steps >= 0,
            "dive.retrain.stage1_steps and stage2_steps must be >= 0 (0 skips the stage).",
        )
        _check(self.batch_size >= 1, f"dive.retrain.batch_size must be >= 1, got {self.batch_size}.")
        _check(self.router_lr > 0 and self.lr > 0, "dive.retrain.router_lr and dive.retrain.lr must be > 0.")
        _check(
            self.temperature is None or self.temperature > 0,
            f"dive.retrain.temperature must be null (auto) or > 0, got {self.temperature}.",
        )
        _check(self.lora_r >= 1 and self.lora_alpha > 0, "dive.retrain.lora_r must be >= 1, lora_alpha > 0.")

    def stage1_temperature(self, top_k: int) -> float:
        return self.temperature if self.temperature is not None else (0.05 if top_k == 1 else 0.5)


@dataclass(frozen=True)
class DIVEConfig:
    """DIVE (arXiv 2506.09351): domain affinity mining, FLAP-pruned experts, two-stage retraining.

    Defaults resolve when the config is built (the resolved values are what ``to_dict`` and run configs hold):

    - ``domains=None``: the six ``shared:calib-*`` corpora (DIVE_DOMAINS) when the shared data folder
      (``moe_core.data.shared_data_dir``: ``$MOE_STUDIO_DATA``, else ``../shared/data``) holds all six, else
      the fast builtins ``pydoc=builtin:pydoc`` and ``stdlib=builtin:stdlib`` (DIVE_BUILTIN_DOMAINS), so that
      DIVE with defaults runs on any machine. ``builtin:model`` is not a default: it samples only 8 x 128
      tokens by default, too few for 16 x 256 calibration windows plus held-out ones, and is slow on CPU.
    - ``n_experts=None``: min(4, number of domains): 4 experts from the six corpora, 2 from the builtins.
    """

    domains: tuple[tuple[str, str], ...] | None = None  # (name, text source), "name=spec" strings work too
    n_experts: int | None = None  # N groups = N experts; None: min(4, domains) (paper: 8 from 24 datasets)
    top_k: int = 1  # experts per token (paper: DIVE 1/8 and 2/8)
    prune_ratio: float | None = (
        None  # channels each expert drops; None: 1 - 0.5 / top_k (half the FFN active)
    )
    shared_share: float = 0.0  # optional always-on shared expert: this share of channels (paper: none)
    n_sequences: int = 16  # calibration windows per domain (paper 1024 x 256 per expert)
    seq_len: int = 256  # paper (model.seqlen = 256)
    eval_windows: int = 2  # held-out windows per domain for the mining perplexities
    holdout: float = 0.2  # tail share of each domain's text kept out of calibration, for perplexity
    max_chars: int = 400_000  # characters read per domain (tokenizing stays under a second)
    linkage: Literal["average", "complete", "single"] = "average"  # on 1 - Pearson r (paper: unspecified)
    batch_size: int = 4  # sequences per forward micro-batch
    seed: int = 42  # paper code
    retrain: DIVERetrainConfig = field(default_factory=DIVERetrainConfig)

    def __post_init__(self):
        domains = parse_domains(default_dive_domains() if self.domains is None else self.domains)
        object.__setattr__(self, "domains", domains)
        if self.n_experts is None:  # at least 2, so that too few domains get the message below
            object.__setattr__(self, "n_experts", max(2, min(DIVE_MAX_DEFAULT_EXPERTS, len(domains))))
        _check(self.n_experts >= 2, f"dive.n_experts must be >= 2, got {self.n_experts}.")
        lower = f" or lower dive.n_experts to {len(domains)}" if len(domains) >= 2 else ""
        _check(
            len(domains) >= self.n_experts,
            f"DIVE builds one expert per group of domains: {len(domains)} domain(s) cannot make "
            f"{self.n_experts} groups. Add domains (dive.domains){lower}.",
        )
        _check(
            1 <= self.top_k <= self.n_experts,
            f"dive.top_k must be 1..n_experts={self.n_experts}, got {self.top_k}.",
        )
        if self.prune_ratio is None:
            object.__setattr__(self, "prune_ratio", 1 - 0.5 / self.top_k)
        _check(0 <= self.prune_ratio < 1, f"dive.prune_ratio must be in [0, 1), got {self.prune_ratio}.")
        _check(0 <= self.shared_share < 1, f"dive.shared_share must be in [0, 1), got {self.shared_share}.")
        _check(
            self.shared_share + (1 - self.prune_ratio) <= 1 + 1e-9,
            f"dive.shared_share ({self.shared_share}) plus each expert's kept share (1 - prune_ratio = "
            f"{1 - self.prune_ratio:g}) exceed the FFN: lower one of them.",
        )
        _check(self.n_sequences >= 1 and self.seq_len >= 2, "dive.n_sequences must be >= 1, seq_len >= 2.")
        _check(self.eval_windows >= 1, f"dive.eval_windows must be >= 1, got {self.eval_windows}.")
        _check(0 < self.holdout < 1, f"dive.holdout must be in (0, 1), got {self.holdout}.")
        _check(self.max_chars >= 1000, f"dive.max_chars must be >= 1000, got {self.max_chars}.")
        _check(
            self.linkage in ("average", "complete", "single"),
            f"dive.linkage is average, complete or single, not '{self.linkage}'.",
        )
        _check(self.batch_size >= 1, f"dive.batch_size must be >= 1, got {self.batch_size}.")


def from_dict(cls, data: dict | None):
    """Build a (possibly nested) frozen dataclass from a dict, refusing unknown keys by name; the keys a class
    names in RECORDS (results of later steps) are dropped with a warning."""
    data = dict(data or {})
    for key, why in getattr(cls, "RECORDS", {}).items():  # results of later steps, not inputs
        if data.pop(key, None) is not None:
            warnings.warn(f"The '{key}' section is ignored: {why}.", stacklevel=2)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    _check(not unknown, f"Unknown {cls.__name__} field(s): {', '.join(unknown)}. Known: {', '.join(known)}.")
    kwargs = {}
    for name, value in data.items():
        ftype = known[name].type
        sub = (
            ftype if dataclasses.is_dataclass(ftype) else _NESTED.get(ftype if isinstance(ftype, str) else "")
        )
        kwargs[name] = from_dict(sub, value) if sub and isinstance(value, dict) else value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"{cls.__name__}: {exc}") from exc


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def load_config_file(path: str | Path) -> dict:
    """Read a YAML or JSON run config into a dict (validation happens in from_dict)."""
    path = Path(path)
    _check(path.is_file(), f"Config file '{path}' does not exist.")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    _check(isinstance(data, dict), f"Config file '{path}' must hold a mapping at the top level.")
    return data


@dataclass(frozen=True)
class ProfileRun:
    """Root config of `python -m moe_core profile`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    out: str = "outputs/profile"


@dataclass(frozen=True)
class FinetuneConfig:
    """Light LoRA fine-tuning after conversion (CMoE §5.1), sized for minutes on a 2-core CPU.

    In a convert run config it runs after the conversion when ``enabled`` (``--finetune`` on the command line).
    """

    enabled: bool = False  # convert runs only: fine-tune the converted model before saving it
    # auto: shared:calib-wikipedia when the shared data folder is present (not WikiText-2: only its test split
    # is there, and perplexity is measured on it), else builtin:pydoc
    text: str = "auto"
    n_sequences: int = 32  # paper 2048 x 2048 tokens; 32 x 256 is ~3 min for SmolLM2-135M on 2 cores
    seq_len: int = 256
    batch_size: int = 2  # the code's --sft-bsz
    epochs: int = 1
    lr: float = 5e-4  # LoRA; paper 5.95e-5 over ~1000 steps, a few dozen CPU steps need more (measured)
    scale_lr: float = 1e-3  # CMoE's gate scales u (paper)
    lora_r: int = 8  # paper and code
    lora_alpha: int = 32  # paper and code
    lora_dropout: float = 0.0  # code 0.1, but peft has no dropout for LoRA on stacked expert tensors
    expert_lora: bool = True  # LoRA on the routed experts too (peft target_parameters)
    balance_gamma: float = 1e-3  # aux-loss-free bias step per forward (paper)
    seed: int = 0

    def __post_init__(self):
        _check(self.n_sequences >= 1, f"finetune.n_sequences must be >= 1, got {self.n_sequences}.")
        _check(self.seq_len >= 2, f"finetune.seq_len must be >= 2, got {self.seq_len}.")
        _check(self.batch_size >= 1, f"finetune.batch_size must be >= 1, got {self.batch_size}.")
        _check(self.epochs >= 1, f"finetune.epochs must be >= 1, got {self.epochs}.")
        _check(self.lr > 0 and self.scale_lr >= 0, "finetune.lr must be > 0 and finetune.scale_lr >= 0.")
        _check(self.lora_r >= 1 and self.lora_alpha > 0, "finetune.lora_r must be >= 1 and lora_alpha > 0.")
        _check(self.balance_gamma >= 0, f"finetune.balance_gamma must be >= 0, got {self.balance_gamma}.")
        _check(0 <= self.lora_dropout < 1, f"finetune.lora_dropout must be 0..1, got {self.lora_dropout}.")
        _check(
            not (self.expert_lora and self.lora_dropout > 0),
            "peft cannot apply LoRA dropout to the stacked expert tensors: set finetune.lora_dropout to 0, "
            "or finetune.expert_lora to false (routed experts then stay frozen).",
        )


@dataclass(frozen=True)
class RoutingConfig:
    """After any method, layer by layer (moe_core.reconstruct): routers trained on what the experts contribute,
    a least-squares refit of the down projections, and the routing form the model is saved in."""

    # trained: a linear router fitted to oracle expert labels; method: the method's own router
    router: Literal["method", "trained"] = "trained"
    # analytic: the method's own gates (CMoE's unit gates), the better model (SmolLM2-135M S3A3E8, WikiText-2:
    # 56.7 vs 66.1 native); native: Qwen2-MoE's routing (softmax weights on the top-k, gated shared expert),
    # which the portable export (vLLM, SGLang, llama.cpp) reproduces exactly. A native conversion whose layers
    # all route one expert per token is routed and distilled with unit gates and put in the native form after
    # (moe_core.pipeline.recovers_with_unit_gates)
    form: Literal["analytic", "native"] = "analytic"
    refit: bool = True  # least-squares refit of every down projection given the routing
    # analytic form with a refit: a bias per routed expert, refitted with the down projections, added when it
    # is chosen; it holds FLAP-style compensation (what the unchosen experts add on average). Measured 56.7 ->
    # 55.2 (S3A3E8 above); off by default: the portable export drops expert biases. Native cannot hold it
    compensate: bool = False
    rounds: int = 1  # label -> router -> refit rounds per layer
    router_steps: int = 200  # Adam steps of the router's cross-entropy (full batch up to 16k tokens)
    # calibration tokens used per layer (10% held out for the report), when the calibration has that many. The
    # refit overfits on too few: SmolLM2 layer 12 at S1A1E8, error on 4k held-out tokens 0.389 at 16k, 0.358 at
    # 32k, 0.335 at 65k, 0.330 at 131k (the routing step's share of a conversion's time grows with it)
    max_tokens: int = 65536

    def __post_init__(self):
        _check(
            self.router in ("method", "trained"), f"routing.router is method or trained, not '{self.router}'."
        )
        _check(self.form in ("analytic", "native"), f"routing.form is analytic or native, not '{self.form}'.")
        _check(
            self.rounds >= 1 and self.router_steps >= 1,
            "routing.rounds and routing.router_steps must be >= 1.",
        )
        _check(self.max_tokens >= 16, f"routing.max_tokens must be >= 16, got {self.max_tokens}.")
        _check(
            not self.compensate or (self.form == "analytic" and self.refit),
            "routing.compensate fits expert biases in the refit: it needs form analytic and refit true.",
        )

    @property
    def enabled(self) -> bool:
        """Whether any layer-wise routing step runs after the method."""
        return self.router == "trained" or self.form == "native" or self.refit

    def settings(self, seed: int = 0):
        from .reconstruct import ReconstructSettings

        return ReconstructSettings(
            router=self.router, form=self.form, refit=self.refit, rounds=self.rounds,
            router_steps=self.router_steps, max_tokens=self.max_tokens, seed=seed, compensate=self.compensate,
        )  # fmt: skip


DISTILL_PARTS = ("experts", "shared", "routers", "gate_scales", "biases", "norms", "attention")
TEACHER_DTYPES = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class DistillConfig:
    """Distillation recovery after any method (moe_core.distill): the dense model teaches the converted one.

    In a convert run config it runs after the conversion (and the routing step) when ``enabled``: by default, for
    16 steps of 4 x 256 tokens, the recovery that fits the default flow in 10 minutes on a 2-core CPU (on
    SmolLM2's default 75% budget: 47.4 -> 44.4 WikiText-2 perplexity, 1.55x -> 1.45x dense, in under 2 minutes).
    """

    enabled: bool = True  # convert runs only: distil before saving (--no-distill: not)
    # auto: shared:calib-wikipedia when the shared data folder is present, else builtin:pydoc (never the
    # scored WikiText-2 test text); training windows come from the head of the text, held-out ones from its tail
    text: str = "auto"
    tokens: int = 16_384  # token budget: tokens // seq_len training windows, one pass
    seq_len: int = 256
    batch_size: int = 4  # windows per step
    max_minutes: float | None = None  # time budget; the run stops at whichever budget ends first
    # measured on the default model's S3A3E8 (WikiText-2 test ppl 55.2 before): 3e-4 gave 45.5 after 80 steps,
    # 1e-4 47.1 after 128 (4 x 256 tokens a step, held out text: Wikipedia, never WikiText-2 test)
    lr: float = 3e-4
    train: tuple[str, ...] = ("experts", "shared", "routers", "norms")  # see moe_core.distill.PARTS
    lora_r: int = 0  # 0: the matrix parts train in full; r > 0: as LoRA factors of rank r, merged at the end
    hidden_weight: float = 0.0  # weight of the per-layer hidden-state MSE (the teacher then runs every step)
    teacher_topk: int = 0  # 0: the teacher runs every step; k: its top-k logits are cached on disk once
    # the teacher's matmuls while training: float32, bfloat16 (autocast), or auto (bfloat16 where this device runs
    # it faster: CUDA with bf16, CPUs with AMX; see moe_core.distill.teacher_dtype)
    teacher_dtype: str = "auto"
    eval_windows: int = 2  # held-out windows whose KL is reported
    eval_every: int = 25  # steps between held-out KL measurements
    checkpoint_every: int = 25  # steps between resumable checkpoints (0: none)
    # and at least this many minutes between them (a kill loses at most that): a checkpoint of SmolLM2's 50% recipe
    # (80M trained weights and their Adam moments) takes 3.4 s to write here, 2.7% of a 5 s-a-step CPU run at
    # every 25 steps, and would be most of a GPU run
    checkpoint_minutes: float = 5.0
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "train", tuple(self.train or ()))
        unknown = sorted(set(self.train) - set(DISTILL_PARTS))
        _check(not unknown, f"distill.train: unknown part(s) {unknown}; parts: {', '.join(DISTILL_PARTS)}.")
        _check(bool(self.train), f"distill.train is empty: name what trains ({', '.join(DISTILL_PARTS)}).")
        _check(self.tokens >= 2 and self.seq_len >= 2, "distill.tokens and distill.seq_len must be >= 2.")
        _check(
            self.tokens >= self.seq_len, f"distill.tokens ({self.tokens}) must cover one window of seq_len."
        )
        _check(self.batch_size >= 1, f"distill.batch_size must be >= 1, got {self.batch_size}.")
        _check(self.max_minutes is None or self.max_minutes > 0, "distill.max_minutes must be > 0 or null.")
        _check(self.lr > 0, f"distill.lr must be > 0, got {self.lr}.")
        _check(self.lora_r >= 0, f"distill.lora_r must be >= 0, got {self.lora_r}.")
        _check(self.hidden_weight >= 0, f"distill.hidden_weight must be >= 0, got {self.hidden_weight}.")
        _check(self.teacher_topk >= 0, f"distill.teacher_topk must be >= 0, got {self.teacher_topk}.")
        _check(
            self.teacher_dtype in TEACHER_DTYPES,
            f"distill.teacher_dtype must be one of {', '.join(TEACHER_DTYPES)}, got {self.teacher_dtype!r}.",
        )
        _check(
            self.eval_windows >= 1 and self.eval_every >= 1,
            "distill.eval_windows and eval_every must be >= 1.",
        )
        _check(
            self.checkpoint_every >= 0, f"distill.checkpoint_every must be >= 0, got {self.checkpoint_every}."
        )
        _check(
            self.checkpoint_minutes >= 0,
            f"distill.checkpoint_minutes must be >= 0, got {self.checkpoint_minutes}.",
        )


@dataclass(frozen=True)
class ConvertRunBase:
    """Root config of `python -m moe_core convert` without its method sections: :data:`ConvertRun` adds one
    section per registered method (moe_core.methods.METHODS: ``cmoe``, ``ladimo``, ``dive``, ...), and the method
    named by ``method`` reads its own.

    A conversion writes this config, completed, as its run_config.json, and loading that file back runs the
    same conversion: the per-layer active experts (``active_per_layer``) and an applied routing plan (``plan``)
    are inputs like any other section. Sections that record what later steps did with the result (RECORDS:
    ``export``, which the export step adds to its copy) are accepted and ignored with a warning saying so,
    rather than stripped when written: the export's run config keeps them as provenance, and
    `python -m moe_core export --config` reads its own section from there.
    """

    RECORDS: ClassVar[dict[str, str]] = {
        "export": "it records how the model was exported afterwards (python -m moe_core export --config reads "
        "it), not an input of the conversion",
    }

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: str = "cmoe"
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    # routed experts per token, one per layer, set after the conversion (the Design tab's "per layer" A)
    active_per_layer: tuple[int, ...] | None = None
    # a routing plan applied last (moe_core.sweep.Plan.to_dict(): the Routing tab's Apply plan); its policies
    # give each listed layer a routing policy, or the dense FFN back (null)
    plan: dict | None = None
    out: str = "outputs/convert"

    def __post_init__(self):
        from .methods import METHODS

        _check(self.method in METHODS, f"Unknown method '{self.method}'. Methods: {', '.join(METHODS)}.")
        _check(bool(str(self.out).strip()), "out is empty: give the folder to write the converted model to.")
        if self.active_per_layer is not None:
            active = tuple(self.active_per_layer)
            _check(
                len(active) > 0 and all(isinstance(a, int) and a >= 1 for a in active),
                f"active_per_layer must be null or one top-k >= 1 per layer, got {self.active_per_layer}.",
            )
            object.__setattr__(self, "active_per_layer", active)
        _check(
            self.plan is None
            or (isinstance(self.plan, dict) and isinstance(self.plan.get("policies"), dict)),
            "plan must be null or a routing plan with a policies mapping (moe_core.sweep.Plan.to_dict()).",
        )

    def section(self):
        """The config section of the chosen method (e.g. self.cmoe)."""
        return getattr(self, self.method)


def _convert_run_class() -> type:
    """ConvertRunBase plus one field per registered method, named after it and holding its config section
    (built once, on first use: the registry imports the method modules, which import this one)."""
    from .methods import METHODS

    sections = [(name, m.config, field(default_factory=m.config)) for name, m in METHODS.items()]
    cls = dataclasses.make_dataclass("ConvertRun", sections, bases=(ConvertRunBase,), frozen=True)
    cls.__module__, cls.__doc__ = __name__, ConvertRunBase.__doc__
    return cls


def __getattr__(name: str):
    if name == "ConvertRun":
        globals()["ConvertRun"] = cls = _convert_run_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_NESTED = {
    "ModelConfig": ModelConfig,
    "DataConfig": DataConfig,
    "ProfileConfig": ProfileConfig,
    "CMoEConfig": CMoEConfig,
    "LaDiMoConfig": LaDiMoConfig,
    "DIVEConfig": DIVEConfig,
    "DIVERetrainConfig": DIVERetrainConfig,
    "FinetuneConfig": FinetuneConfig,
    "RoutingConfig": RoutingConfig,
    "DistillConfig": DistillConfig,
}


EVAL_TEXT = "shared:wikitext2"  # the perplexity text of evaluation and the benchmarks (WikiText-2 test)
# The head of EVAL_TEXT that perplexity is scored on: evaluation's default 16 x 512 windows and the benchmarks'
# (at most 16 x 512), twice over. Nothing is tuned on it (SweepConfig refuses to be).
SCORED_TOKENS = 16_384


def default_eval_text() -> str:
    """EVAL_TEXT when the shared data folder holds it, else builtin:pydoc (present on every machine)."""
    from .data import SHARED_SOURCES, shared_data_dir

    root = shared_data_dir()
    present = root is not None and (root / SHARED_SOURCES[EVAL_TEXT.removeprefix("shared:")][0]).is_file()
    return EVAL_TEXT if present else "builtin:pydoc"


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation of a (converted) model; perplexity windows follow the WikiText-2 recipe.

    The one set of defaults of `python -m moe_core eval` and the app's Evaluate tab: both run
    :func:`moe_core.pipeline.evaluate_pair` on this config. ``text="auto"`` resolves when the config is built
    (:func:`default_eval_text`), so run configs hold the text that was scored.
    """

    text: str = "auto"  # perplexity text (non-overlapping windows of the joined documents); auto: see above
    n_windows: int = 16  # a CPU-sized prefix; all of WikiText-2 test is 148 x 2048 tokens
    seq_len: int = 512  # 2048 in the papers; 512 keeps a CPU run to about a minute
    batch_size: int = 1
    reference: str = "auto"  # dense model for KL and agreement: auto = the source model, none = skip
    tasks: tuple[str, ...] = ()  # lm-eval tasks from the local task files, e.g. arc_easy_local
    limit: int = 100  # lm-eval: first `limit` documents per task
    speed: bool = True  # also time prefill and batch-1 decode of the model and the reference, in turn

    def __post_init__(self):
        _check(1 <= self.n_windows <= 100_000, f"eval.n_windows must be 1..100000, got {self.n_windows}.")
        _check(2 <= self.seq_len <= 131_072, f"eval.seq_len must be 2..131072, got {self.seq_len}.")
        _check(self.batch_size >= 1, f"eval.batch_size must be >= 1, got {self.batch_size}.")
        _check(self.limit >= 1, f"eval.limit must be >= 1, got {self.limit}.")
        _check(bool(str(self.reference).strip()), "eval.reference is empty: give a model spec, auto or none.")
        _check(bool(str(self.text).strip()), "eval.text is empty: give a text source, or auto.")
        object.__setattr__(self, "tasks", tuple(self.tasks or ()))
        if self.text == "auto":
            object.__setattr__(self, "text", default_eval_text())


@dataclass(frozen=True)
class EvalRun:
    """Root config of `python -m moe_core eval`: model.spec may be a converted folder."""

    model: ModelConfig = field(default_factory=ModelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    out: str = "outputs/eval"


_NESTED.update({"EvalConfig": EvalConfig})


@dataclass(frozen=True)
class SweepConfig:
    """Per-layer accuracy-vs-throughput sweep and plan picker (moe_core/sweep.py, LaDiMo's adaptive router).

    The held-out windows start after ``skip_windows``; on the evaluation text (EVAL_TEXT) they must start past
    its first SCORED_TOKENS tokens, which perplexity is scored on, else the config is refused (ValueError).
    """

    text: str = "shared:wikitext2"  # held-out text for KL and perplexity
    # windows skipped first; None: as many as cover SCORED_TOKENS (64 of 256 tokens), the head of the text that
    # evaluation and the benchmarks score. On EVAL_TEXT fewer are refused: the plan would be tuned on them.
    skip_windows: int | None = None
    n_windows: int = 2  # 2 x 256 held-out tokens: 30 layers x 12 policies stay within minutes on 2 cores
    seq_len: int = 256
    batch_size: int = 2  # windows per forward
    topk: tuple[int, ...] | None = None  # top-k candidates; None = 1..E
    thresholds: tuple[float, ...] = (0.5, 0.8, 0.9)  # dynamic-policy candidates (cumulative routing weight)
    timing_tokens: int = 256  # prefill rows timed per block (and the model's prefill length)
    repeats: int = 5  # interleaved timing repeats; medians are reported
    cumulative_step: int = 1  # cumulative curve at k = 0, step, 2*step, ..., L converted layers
    throughput_points: int = 3  # cumulative points whose whole-model throughput is measured
    max_ppl_increase: float | None = None  # picker target, e.g. 0.05 = +5% perplexity ...
    min_active_reduction: float | None = None  # ... or e.g. 0.25 = 25% fewer active FFN parameters

    def __post_init__(self):
        _check(
            bool(str(self.text).strip()), "sweep.text is empty: give a text source, e.g. shared:wikitext2."
        )
        _check(
            self.n_windows >= 1 and self.seq_len >= 2, "sweep.n_windows must be >= 1 and sweep.seq_len >= 2."
        )
        self._check_skip()
        _check(self.batch_size >= 1 and self.repeats >= 1, "sweep.batch_size and sweep.repeats must be >= 1.")
        _check(self.timing_tokens >= 1, f"sweep.timing_tokens must be >= 1, got {self.timing_tokens}.")
        _check(self.cumulative_step >= 1, f"sweep.cumulative_step must be >= 1, got {self.cumulative_step}.")
        _check(
            self.throughput_points >= 0,
            f"sweep.throughput_points must be >= 0, got {self.throughput_points}.",
        )
        thresholds = tuple(float(t) for t in self.thresholds or ())
        _check(
            all(0 < t <= 1 for t in thresholds),
            f"sweep.thresholds must lie in (0, 1], got {self.thresholds}.",
        )
        object.__setattr__(self, "thresholds", thresholds)
        if self.topk is not None:
            topk = tuple(sorted(set(self.topk)))
            _check(
                len(topk) > 0 and topk[0] >= 1,
                f"sweep.topk must be null (1..E) or k values >= 1, got {self.topk}.",
            )
            object.__setattr__(self, "topk", topk)
        _check(
            self.max_ppl_increase is None or self.min_active_reduction is None,
            "Give at most one sweep target: max_ppl_increase or min_active_reduction.",
        )

    def _check_skip(self) -> None:
        """Resolve skip_windows None, and refuse held-out windows inside EVAL_TEXT's scored head."""
        needed = -(-SCORED_TOKENS // self.seq_len)  # windows that cover the scored tokens
        if self.skip_windows is None:
            object.__setattr__(self, "skip_windows", needed)
        _check(self.skip_windows >= 0, f"sweep.skip_windows must be >= 0, got {self.skip_windows}.")
        _check(
            self.text != EVAL_TEXT or self.skip_windows >= needed,
            f"sweep: skipping {self.skip_windows} windows of {self.seq_len} tokens leaves the sweep on the first "
            f"{SCORED_TOKENS:,} tokens of {EVAL_TEXT}, which evaluation and the benchmarks score perplexity on: "
            f"the plan would be tuned on its own test. Set sweep.skip_windows to at least {needed} (or leave it "
            "null), or sweep another text.",
        )


@dataclass(frozen=True)
class SweepRun:
    """Root config of `python -m moe_core sweep`: model.spec is a converted folder, or a dense model that is
    first converted with the ladimo section on the data section's calibration text."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ladimo: LaDiMoConfig = field(default_factory=LaDiMoConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    out: str = "outputs/sweep"


_NESTED.update({"SweepConfig": SweepConfig})
