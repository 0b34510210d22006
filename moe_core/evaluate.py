"""Evaluate a converted model against its dense source: how much quality the experts cost, and what they save.

- perplexity on fixed token windows (W, T): exp of the mean next-token NLL over all W * (T - 1) predicted
  tokens, non-overlapping windows, no BOS: the GPTQ / CMoE WikiText-2 recipe (``moe_core.data.eval_windows``).
- KL(dense || MoE) and top-1 agreement on the very same predicted tokens, in float32, a chunk of positions
  at a time so that a 49k vocabulary never needs more than one window's logits per model. The dense side
  can run alongside or be cached once (:func:`reference_logits`) when many candidates share the windows.
- parameters and FLOPs per token (:func:`param_report` states the formula), expert load per layer.
- zero-shot tasks through lm-eval on the local task files (``shared/data/lm_eval_tasks``), fully offline.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .moe import MoEMLP
from .profiling import check_cancel

Progress = Callable[[float, str], None] | None
Cancel = Callable[[], bool] | None
CHUNK = 128  # positions per float32 log-softmax: 128 x 49152 x 4 B = 25 MB per model


# ---------------------------------------------------------------------------------------------
# Token-level scores


@dataclass
class _Sums:
    """Running sums over predicted tokens (Python floats are float64: 100k tokens add up without drift)."""

    nll: float = 0.0
    nll_ref: float = 0.0
    kl: float = 0.0
    agree: float = 0.0
    tokens: int = 0

    def add_chunk(self, logits, ref_logits, targets) -> None:  # logits (n, V), targets (n,)
        logp = F.log_softmax(logits.float(), dim=-1)
        self.nll -= float(logp.gather(1, targets[:, None]).sum())
        self.tokens += targets.numel()
        if ref_logits is None:
            return
        ref_logp = F.log_softmax(ref_logits.float(), dim=-1)
        self.nll_ref -= float(ref_logp.gather(1, targets[:, None]).sum())
        self.kl += float((ref_logp.exp() * (ref_logp - logp)).sum())  # KL(ref || model), nats
        self.agree += float((ref_logp.argmax(-1) == logp.argmax(-1)).sum())


def _batches(model, windows, batch_size, progress: Progress = None, cancel: Cancel = None):
    """(ids (B, T), logits (B, T - 1, V)) of ``model`` (a DenseModel) per micro-batch of windows (W, T): the
    positions that predict a token, on the layer-by-layer driver (a model streamed from its shards is read once)."""
    from .layerwise import window_logits

    return window_logits(model, windows, batch_size, progress, cancel)


@dataclass(frozen=True)
class ReferenceLogits:
    """A dense model's logits on fixed windows, kept so that many candidates compare against one dense pass.

    windows (W, T); logits (W, T - 1, V) float16 (half the memory; rounding the reference logits to float16
    moves KL by about 1e-4 nats per token, measured on SmolLM2-135M); ppl from the float32 pass.
    """

    spec: str
    windows: torch.Tensor
    logits: torch.Tensor
    ppl: float


@torch.no_grad()
def reference_logits(
    dense, windows, batch_size: int = 1, progress: Progress = None, cancel: Cancel = None
) -> ReferenceLogits:
    """Run ``dense`` once over windows (W, T) and keep its logits (W, T - 1, V) in float16."""
    _check_windows(windows)
    sums, kept = _Sums(), []
    for ids, logits in _batches(dense, windows, batch_size, progress, cancel):
        targets = ids[:, 1:].reshape(-1).to(logits.device)
        for s, chunk in enumerate(logits.reshape(-1, logits.shape[-1]).split(CHUNK)):
            sums.add_chunk(chunk, None, targets[s * CHUNK : s * CHUNK + len(chunk)])
        kept.append(logits.half().cpu())
    return ReferenceLogits(dense.spec, windows.clone(), torch.cat(kept), math.exp(sums.nll / sums.tokens))


@torch.no_grad()
def _score(dense, windows, ref=None, batch_size=1, progress: Progress = None, cancel: Cancel = None) -> _Sums:
    """One pass over windows (W, T): NLL of ``dense`` (and of ``ref``, with KL and agreement against it).

    ref: None, a DenseModel (run alongside), or ReferenceLogits of the same windows.
    """
    if isinstance(ref, ReferenceLogits) and not torch.equal(ref.windows, windows):
        raise ValueError("These ReferenceLogits were computed on other windows: pass the same windows.")
    if isinstance(ref, ReferenceLogits):
        refs = iter(ref.logits.split(batch_size))
    elif ref is not None:
        refs = (logits for _, logits in _batches(ref, windows, batch_size, cancel=cancel))
    sums = _Sums()
    for ids, logits in _batches(dense, windows, batch_size, progress, cancel):
        ref_logits = None if ref is None else next(refs).to(logits.device)
        targets = ids[:, 1:].reshape(-1).to(logits.device)  # (B*(T-1),)
        flat = logits.reshape(-1, logits.shape[-1])
        ref_flat = ref_logits.reshape(flat.shape) if ref_logits is not None else None
        for s in range(0, targets.numel(), CHUNK):
            chunk_ref = ref_flat[s : s + CHUNK] if ref_flat is not None else None
            sums.add_chunk(flat[s : s + CHUNK], chunk_ref, targets[s : s + CHUNK])
    return sums


def _check_windows(windows) -> None:
    if windows.dim() != 2 or windows.shape[1] < 2 or windows.shape[0] < 1:
        raise ValueError(
            f"Evaluation windows must be a (W, T) tensor with W >= 1 and T >= 2, got {tuple(windows.shape)}. "
            "Build them with moe_core.data.eval_windows."
        )


def perplexity(
    dense, windows, batch_size: int = 1, progress: Progress = None, cancel: Cancel = None
) -> float:
    """exp(mean NLL) over every predicted token of windows (W, T); ``dense`` is a DenseModel (MoE or not)."""
    _check_windows(windows)
    sums = _score(dense, windows, batch_size=batch_size, progress=progress, cancel=cancel)
    return math.exp(sums.nll / sums.tokens)


def compare_logits(
    dense_ref, moe, windows, batch_size: int = 1, progress: Progress = None, cancel: Cancel = None
) -> dict:
    """KL(dense_ref || moe) in nats per token and top-1 agreement on windows (W, T); also both perplexities.

    dense_ref: a DenseModel (run alongside, batch by batch) or its ReferenceLogits on these windows.
    """
    _check_windows(windows)
    sums = _score(moe, windows, dense_ref, batch_size, progress, cancel)
    return _scores(sums, dense_ref)


def _scores(sums: _Sums, ref) -> dict:
    out = {"ppl": math.exp(sums.nll / sums.tokens), "tokens": sums.tokens}
    if ref is None:
        return out
    exact = ref.ppl if isinstance(ref, ReferenceLogits) else math.exp(sums.nll_ref / sums.tokens)
    return out | {"ppl_ref": exact, "kl": sums.kl / sums.tokens, "agreement": sums.agree / sums.tokens}


# ---------------------------------------------------------------------------------------------
# Parameters, FLOPs, expert load


def moe_blocks(dense) -> dict[int, MoEMLP]:
    """{layer index: MoEMLP} for every converted layer of a DenseModel."""
    return {i: dense.mlp(i) for i in range(dense.n_layers) if isinstance(dense.mlp(i), MoEMLP)}


def param_report(dense, seq_len: int = 512) -> dict:
    """Total and per-token active parameters, FFN share and FLOPs per token of a (possibly converted) model.

    active = total - sum over MoE layers of (block total - block active); a block's active count uses its
    measured mean experts per token when load was tracked (:func:`expert_load`), else the policy's k.
    FLOPs per token = 2 * (active params - input embedding) + 4 * L * d_attn * seq_len / 2:
    one multiply-add per weight the token meets (the LM head counts even when tied to the embedding),
    plus QK^T and AV over the mean causal context of a seq_len window (d_attn = heads * head_dim).
    active_ffn_share = active FFN params (routers included) / the dense FFN's weights (3 H I per layer, I from
    the model config): the share of the dense FFN a token runs, slightly above (S + A) / E because of the
    routers. Against the dense FFN, not the experts' total: DIVE's experts overlap (their total exceeds the
    FFN) and FLAP's single pruned expert is all of its block but only part of the FFN.
    """
    model, cfg = dense.model, dense.text_config
    total = sum(p.numel() for p in model.parameters())
    ffn_total, ffn_active, ffn_weights = _ffn_counts(dense)
    active = total - (ffn_total - ffn_active)
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    heads = getattr(cfg, "num_attention_heads", None) or 0  # none: a recurrent model (xLSTM)
    head_dim = getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads if heads else 0)
    attn_flops = 4 * dense.n_layers * heads * head_dim * seq_len / 2
    matmul_params = active - embed.numel() + (head.numel() if head is embed else 0)
    return {
        "total_params": total,
        "active_params": round(active),
        "ffn_params": ffn_total,
        "ffn_active_params": round(ffn_active),
        "active_ffn_share": ffn_active / ffn_weights,
        "moe_layers": len(moe_blocks(dense)),
        "flops_per_token": round(2 * matmul_params + attn_flops),
        "flops_seq_len": seq_len,
    }


def _ffn_counts(dense) -> tuple[int, float, int]:
    """(total, active per token, dense FFN weights) summed over every layer's MLP; routers are in the first two."""
    blocks, total, active, weights = moe_blocks(dense), 0, 0.0, 0
    width = getattr(dense.text_config, "intermediate_size", None)
    for i in range(dense.n_layers):
        if i in blocks:
            counts = blocks[i].param_counts()
            total, active = total + counts["total"], active + counts["active"]
            layer_width = width[i] if isinstance(width, list | tuple) else width
            dense_ffn = 3 * blocks[i].hidden_size * layer_width if layer_width else 0
            weights += dense_ffn or counts["shared"] + counts["routed"]
        else:
            n = sum(p.numel() for p in dense.mlp(i).parameters())
            total, active, weights = total + n, active + n, weights + n
    return total, active, weights


@torch.no_grad()
def expert_load(
    dense, windows, batch_size: int = 1, progress: Progress = None, cancel: Cancel = None
) -> dict[int, list[int]]:
    """{layer: tokens routed to each expert} over windows (W, T); each layer sums to tokens * k for top-k.

    The counts stay on the blocks afterwards, so :func:`param_report` then uses the measured mean k.
    """
    blocks = moe_blocks(dense)
    with _tracking_load(blocks):
        for n, ids in enumerate(windows.split(batch_size)):
            check_cancel(cancel)
            dense.model(input_ids=ids.to(dense.device), use_cache=False)
            if progress:
                progress(min(1.0, (n + 1) * batch_size / len(windows)), "Counting expert load")
    return {i: [int(c) for c in b.load_counts.tolist()] for i, b in blocks.items()}


@contextlib.contextmanager
def _tracking_load(blocks: dict[int, MoEMLP]):
    """Count expert load from zero inside the block; tracking returns to its previous state after."""
    before = {i: b.track_load for i, b in blocks.items()}
    for b in blocks.values():
        b.reset_load()
        b.track_load = True
    try:
        yield
    finally:
        for i, b in blocks.items():
            b.track_load = before[i]


def load_summary(load: dict[int, list[int]]) -> dict:
    """Balance of an expert_load result: per layer max/mean load ratio (1.0 = perfectly balanced)."""
    ratios = {}
    for layer, counts in load.items():
        mean = sum(counts) / len(counts)
        ratios[layer] = max(counts) / mean if mean else 0.0
    return {"max_over_mean": ratios, "worst_layer": max(ratios, key=ratios.get) if ratios else None}


# ---------------------------------------------------------------------------------------------
# lm-eval on the local task files (offline)


def default_task_dir() -> Path:
    """``shared/data/lm_eval_tasks`` (moved with ``MOE_STUDIO_DATA``); ValueError when absent."""
    from .data import shared_data_dir

    root = shared_data_dir()
    if root is None or not (root / "lm_eval_tasks").is_dir():
        raise ValueError(
            "No local lm-eval task folder found: set MOE_STUDIO_DATA to the shared data folder "
            "(the one holding lm_eval_tasks/), or pass task_dir."
        )
    return root / "lm_eval_tasks"


def available_tasks(task_dir: str | Path | None = None) -> list[str]:
    """Task names declared by the YAML files of a local task folder."""
    folder = Path(task_dir) if task_dir else default_task_dir()
    names = []
    for path in sorted(folder.glob("*.yaml")):
        found = re.search(r"^task:\s*(\S+)", path.read_text(), re.MULTILINE)
        if found:
            names.append(found.group(1))
    return names


def check_tasks(tasks: list[str], task_dir: str | Path | None = None) -> Path:
    """The task folder, after checking every task is in it (ValueError naming the available ones)."""
    folder = Path(task_dir) if task_dir else default_task_dir()
    known = available_tasks(folder)
    unknown = [t for t in tasks if t not in known]
    if not tasks or unknown:
        raise ValueError(f"Unknown lm-eval task(s) {unknown or tasks}. Available here: {', '.join(known)}.")
    return folder


def _expanded_tasks(task_dir: Path, out: Path) -> None:
    """Copy the YAMLs with ${LMEVAL_DATA_DIR} filled in: lm-eval does not expand variables itself."""
    data_dir = str(task_dir.resolve().parent)
    for path in task_dir.glob("*.yaml"):
        (out / path.name).write_text(path.read_text().replace("${LMEVAL_DATA_DIR}", data_dir))


def lm_eval_tasks(
    dense,
    tasks: list[str],
    limit: int | None = 100,
    task_dir: str | Path | None = None,
    batch_size: int = 8,
    max_length: int = 2048,
) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-eval's HFLM wrapping the in-memory model; first ``limit`` docs.

    Only local task files are used (no hub): an unknown task raises ValueError naming the available ones.
    ``max_length`` bounds rolling-loglikelihood windows (HFLM would otherwise take the model's 8k context).
    """
    folder = check_tasks(tasks, task_dir)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # a stray hub access fails fast instead of hanging
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(
        pretrained=dense.model,
        tokenizer=dense.tokenizer,
        batch_size=batch_size,
        backend="causal",
        max_length=max_length,
    )
    with tempfile.TemporaryDirectory() as tmp:
        _expanded_tasks(folder, Path(tmp))
        res = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            task_manager=TaskManager(include_path=tmp),
            limit=limit,
            log_samples=False,
            bootstrap_iters=0,
        )
    return {task: _numeric(res["results"].get(task, {})) for task in tasks}


def _numeric(metrics: dict) -> dict[str, float]:
    """lm-eval keys look like 'acc,none'; keep the metric name and numeric values only."""
    out = {}
    for key, value in metrics.items():
        name = key.split(",")[0]
        if isinstance(value, int | float) and not name.endswith("_stderr"):
            out[name] = float(value)
    return out


# ---------------------------------------------------------------------------------------------
# Speed (quick numbers for the app and CLI; benchmarks/speed.py does the careful timing and the FLOP ideal)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _random_ids(dense, batch_size: int, seq_len: int, seed: int = 0):
    vocab = dense.text_config.vocab_size
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed))
    return ids.to(dense.device)


@torch.inference_mode()
def prefill_seconds(model, ids) -> float:
    """Seconds of one full forward over ids (B, T), without a KV cache."""
    _sync(ids.device)
    start = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    _sync(ids.device)
    return time.perf_counter() - start


@torch.inference_mode()
def decode_step_seconds(
    model, prompt, n_new: int, on_step: Callable[[float], None] | None = None
) -> list[float]:
    """Greedy decode with a KV cache after prompt (1, P): seconds of each new token's step (forward + argmax)."""
    out = model(prompt, use_cache=True, logits_to_keep=1)
    token, cache, times = out.logits[:, -1:].argmax(-1), out.cache, []  # (1, 1)
    for _ in range(n_new):
        _sync(prompt.device)
        start = time.perf_counter()
        out = model(token, cache=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        _sync(prompt.device)
        times.append(time.perf_counter() - start)
        if on_step is not None:
            on_step(times[-1])
    return times


def measure_speed(
    dense,
    moe,
    seq_len: int = 256,
    decode_tokens: int = 32,
    prompt_len: int = 16,
    repeats: int = 3,
    cancel: Cancel = None,
) -> dict:
    """Prefill (1 x seq_len) and batch-1 decode tokens/s of ``moe`` and ``dense``, timed in turn in every repeat.

    A repeat's decode speed is 1 / its median step (robust to another process's burst); each number is the
    median over repeats. Keys: tokens_per_s, ref_tokens_per_s (prefill), decode_tokens_per_s,
    ref_decode_tokens_per_s.
    """
    ids, prompt = _random_ids(dense, 1, seq_len), _random_ids(dense, 1, prompt_len, seed=1)
    models = {"": moe, "ref_": dense}
    for m in models.values():  # warm-up
        prefill_seconds(m.model, ids[:, : min(seq_len, 32)])
        decode_step_seconds(m.model, prompt, 2)
    prefill = {key: [] for key in models}
    decode = {key: [] for key in models}
    for r in range(repeats):
        order = list(models) if r % 2 == 0 else list(models)[::-1]  # neither model always goes first
        for key in order:
            check_cancel(cancel)
            prefill[key].append(seq_len / prefill_seconds(models[key].model, ids))
            decode[key].append(
                1.0 / statistics.median(decode_step_seconds(models[key].model, prompt, decode_tokens))
            )
    out = {}
    for key in models:
        out[f"{key}tokens_per_s"] = statistics.median(prefill[key])
        out[f"{key}decode_tokens_per_s"] = statistics.median(decode[key])
    return out


# ---------------------------------------------------------------------------------------------
# The whole evaluation


@dataclass(frozen=True)
class EvalReport:
    """What `python -m moe_core eval` measures; saved as metrics.json."""

    model: str
    reference: str | None
    text: str
    n_windows: int
    seq_len: int
    ppl: float
    ppl_ref: float | None = None
    kl: float | None = None  # KL(reference || model), nats per token
    agreement: float | None = None  # top-1 agreement with the reference
    params: dict = field(default_factory=dict)
    ref_params: dict = field(default_factory=dict)
    expert_load: dict = field(default_factory=dict)  # {layer: tokens routed to each expert}
    lm_eval: dict = field(default_factory=dict)
    seconds: float = 0.0
    speed: dict = field(default_factory=dict)  # measure_speed() against the reference, when asked for
    ref_lm_eval: dict = field(default_factory=dict)  # the reference's scores on the same lm-eval tasks
    streamed: bool = False  # read one decoder layer at a time from its shards (no speed, no lm-eval)

    def summary(self) -> dict:
        """The headline numbers (no per-layer load), for printing."""
        out = {k: v for k, v in asdict(self).items() if k not in ("expert_load", "params", "ref_params")}
        out |= {k: self.params.get(k) for k in ("active_params", "total_params", "active_ffn_share")}
        if self.ref_params.get("flops_per_token"):
            out["flops_ratio"] = self.params["flops_per_token"] / self.ref_params["flops_per_token"]
        return out

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "metrics.json"
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, folder: str | Path) -> EvalReport:
        data = json.loads((Path(folder) / "metrics.json").read_text())
        data["expert_load"] = {int(k): v for k, v in data.get("expert_load", {}).items()}
        return cls(**data)


def evaluate(
    dense_ref,
    moe,
    windows,
    *,
    text: str = "",
    batch_size: int = 1,
    tasks: list[str] | None = None,
    limit: int | None = 100,
    progress: Progress = None,
    cancel: Cancel = None,
) -> EvalReport:
    """Perplexity, KL / agreement vs ``dense_ref`` (None: skipped), expert load, params, optional lm-eval tasks.

    windows (W, T) are scored once by both models; expert load is counted during the same pass.
    """
    _check_windows(windows)
    if tasks:
        check_tasks(tasks)  # fail before the long scoring pass
    start, blocks = time.perf_counter(), moe_blocks(moe)
    with _tracking_load(blocks):
        sums = _score(moe, windows, dense_ref, batch_size, progress, cancel)
    scores = _scores(sums, dense_ref)
    scores.pop("tokens")
    ref_model = dense_ref if hasattr(dense_ref, "model") else None
    return EvalReport(
        model=moe.spec,
        reference=dense_ref.spec if dense_ref is not None else None,
        text=text,
        n_windows=windows.shape[0],
        seq_len=windows.shape[1],
        params=param_report(moe, windows.shape[1]),
        ref_params=param_report(ref_model, windows.shape[1]) if ref_model is not None else {},
        expert_load={i: [int(c) for c in b.load_counts.tolist()] for i, b in blocks.items()},
        lm_eval=lm_eval_tasks(moe, tasks, limit) if tasks else {},
        seconds=time.perf_counter() - start,
        **scores,
    )
