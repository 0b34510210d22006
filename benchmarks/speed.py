"""Speed of the default model, dense against CMoE-converted: prefill and decode tokens/s, ideal and achieved.

    python benchmarks/speed.py                        # S1A1E8 and S3A3E8, 5 interleaved repeats
    python benchmarks/speed.py --configs S1A1E8 --repeats 3 --breakdown --threads 1
    python benchmarks/speed.py --configs --converted outputs/c50 --breakdown   # saved conversions

Models: the dense model, one CMoE conversion per --configs entry (calibrated on --calib-sequences x
--calib-len tokens of --calib-text: speed depends on sizes and k, not on which neurons) and each saved
conversion folder of --converted (any method, any per-layer allocation), all in this process.
Prefill: model(input_ids) on --prefill-batch x --prefill-len tokens of real text (full logits, as scoring
does), seconds per call. Decode: greedy batch-1 generation with a KV cache after a --prompt-len prompt;
each of the --decode-tokens steps (one forward of the new token + argmax) is timed and a repeat's tokens/s is
1 / its median step, which resists other processes' bursts on a shared CPU. Each repeat runs every model
once, in a rotated order; speed-ups are medians over repeats of the paired ratio MoE / dense.

Ideal speed-up = FLOPs per token of dense / MoE over the WHOLE model (moe_core.evaluate.param_report):
2 x (attention projections + FFN active weights incl. routers + LM head + norms) + 4 x L x heads x head_dim
x mean context (QK^T and AV). ``ideal_speedup`` leaves the context term out; the prefill and decode ideals
include it at the benchmark's mean context (prefill_len / 2; prompt_len + decode_tokens / 2). Achieved =
measured speed-up / the ideal of the same phase.

--breakdown adds a per-component table of one decode step (forward hooks and wrapped methods; medians over
steps): attention, the FFN and, for MoE layers, its three decode parts (``shared_in+router``: the one matmul of
the shared expert's gate/up rows and the router, with the activation; ``routing``: top-k on the host;
``experts``: the shared down projection and the chosen experts), ``ffn_other`` (the rest of the MoE block's
forward), the LM head and the rest of the step. From the dense model's breakdown it also gives each model's
measured ceiling, ``decode_ffn_bound``: dense step / (dense step - dense FFN x (1 - active FFN share)), the
decode speed-up if the FFN's time shrank exactly with its active share and nothing else changed (attention,
LM head and the step's fixed costs do not shrink; the FLOP ideal leaves those fixed costs out).
Prints the setup (versions, threads, attention, which MoE kernels ran), tables, then a JSON last line
{"S1A1E8": {"ideal_speedup": ..., "prefill_speedup": ...,
"decode_speedup": ..., ...}, ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a fresh clone without installing

import torch  # noqa: E402

from moe_core import moe_fast  # noqa: E402
from moe_core.checkpoint import load_converted  # noqa: E402
from moe_core.config import CMoEConfig  # noqa: E402
from moe_core.data import load_documents, sample_sequences  # noqa: E402
from moe_core.evaluate import decode_step_seconds as decode_steps  # noqa: E402
from moe_core.evaluate import param_report, prefill_seconds  # noqa: E402
from moe_core.methods import convert  # noqa: E402
from moe_core.model_io import DEFAULT_MODEL, load_model  # noqa: E402
from moe_core.moe import MoEMLP  # noqa: E402
from moe_core.moe_fast import grouped_mm_ok  # noqa: E402


def log(message: str) -> None:
    print(
        f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {message}", file=sys.stderr, flush=True
    )


# ---------------------------------------------------------------------------------------------
# Models and the FLOP ideal


def build_models(dense, configs: list[str], calib, converted: list[str] = ()) -> dict:
    """{"dense": DenseModel, config: converted DenseModel, ..., folder name: saved conversion, ...}; each config
    is CMoE on calib (N, T), each folder a checkpoint saved by a conversion (``load_converted``)."""
    models = {"dense": dense}
    for experts in configs:
        start = time.perf_counter()
        models[experts] = convert(dense, calib, CMoEConfig(experts=experts))
        log(f"{experts}: converted in {time.perf_counter() - start:.0f} s")
    for folder in converted:
        name = Path(folder).resolve().name
        if name in models:
            raise SystemExit(f"--converted {folder}: the name {name!r} is already taken; rename the folder")
        models[name] = load_converted(folder, device=str(dense.device))
        log(f"{name}: loaded from {folder}")
    return models


def ideal_speedups(models: dict, prefill_len: int, decode_context: float) -> dict:
    """Per config: dense FLOPs per token over MoE FLOPs per token, context-free and at each phase's context."""
    contexts = {"ideal_speedup": 0, "ideal_prefill": prefill_len, "ideal_decode": round(2 * decode_context)}
    flops = {
        name: {key: param_report(m, seq_len)["flops_per_token"] for key, seq_len in contexts.items()}
        for name, m in models.items()
    }
    return {
        name: {key: flops["dense"][key] / value for key, value in per_ctx.items()} | {"flops": per_ctx}
        for name, per_ctx in flops.items()
    }


# ---------------------------------------------------------------------------------------------
# Timers


def measure(models: dict, prefill_ids, prompt, n_new: int, repeats: int) -> dict:
    """{name: {"prefill": [tokens/s per repeat], "decode": [...]}}, every repeat running every model once."""
    names = list(models)
    for m in models.values():  # warm-up: first-call allocations and kernel selection
        prefill_seconds(m.model, prefill_ids[:1, :64])
        decode_steps(m.model, prompt, 4)
    result = {name: {"prefill": [], "decode": []} for name in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate: no model always runs first
        for name in order:
            result[name]["prefill"].append(
                prefill_ids.numel() / prefill_seconds(models[name].model, prefill_ids)
            )
        for name in order:
            steps = decode_steps(models[name].model, prompt, n_new)
            result[name]["decode"].append(1.0 / statistics.median(steps))
        log(
            f"repeat {r + 1}/{repeats}: "
            + ", ".join(f"{n} {result[n]['decode'][-1]:.1f} tok/s" for n in names)
        )
    return result


def paired_speedup(moe: list[float], dense: list[float]) -> float:
    """Median over repeats of MoE / dense measured in the same repeat (shared drifts in load cancel)."""
    return statistics.median(m / d for m, d in zip(moe, dense, strict=True))


# ---------------------------------------------------------------------------------------------
# Decode-step breakdown


class StepClock:
    """Seconds per component within the current decode step, from forward hooks and wrapped route()."""

    def __init__(self):
        self.step: dict[str, float] = {}
        self.steps: list[dict[str, float]] = []
        self._starts: dict[int, float] = {}
        self._undo: list = []

    def watch(self, module, key: str) -> None:
        def pre(mod, _args):
            self._starts[id(mod)] = time.perf_counter()

        def post(mod, _args, _out):
            self.step[key] = self.step.get(key, 0.0) + time.perf_counter() - self._starts[id(mod)]

        self._undo += [
            module.register_forward_pre_hook(pre).remove,
            module.register_forward_hook(post).remove,
        ]

    def watch_function(self, module, name: str, key: str) -> None:
        """Time module.name(...) calls (the module attribute is replaced until close())."""
        function = getattr(module, name)

        def timed(*args):
            start = time.perf_counter()
            out = function(*args)
            self.step[key] = self.step.get(key, 0.0) + time.perf_counter() - start
            return out

        setattr(module, name, timed)
        self._undo.append(lambda: setattr(module, name, function))

    def end_step(self, seconds: float) -> None:
        self.steps.append(self.step | {"step": seconds})
        self.step = {}

    def close(self) -> None:
        for undo in self._undo:
            undo()


# The parts of MoEMLP's CPU decode step (moe_fast.decode): one matmul for the shared expert's gate/up rows and
# the router, routing on the host, then the shared down projection and the chosen experts.
DECODE_PARTS = {"decode_front": "shared_in+router", "route_host": "routing", "decode_experts": "experts"}


def breakdown(dense_model, prompt, n_new: int) -> dict[str, float]:
    """Median ms per decode step of attention, the FFN (for MoE split into its decode parts), LM head, other."""
    model, clock = dense_model.model, StepClock()
    for layer in dense_model.adapter.layers(model):
        clock.watch(layer.self_attn, "attention")
        clock.watch(layer.mlp, "ffn")
    if any(isinstance(layer.mlp, MoEMLP) for layer in dense_model.adapter.layers(model)):
        for function, key in DECODE_PARTS.items():
            clock.watch_function(moe_fast, function, key)
    clock.watch(model.get_output_embeddings(), "lm_head")
    try:
        decode_steps(model, prompt, n_new, on_step=clock.end_step)
    finally:
        clock.close()
    rows = []
    for s in clock.steps:
        parts = {key: s.get(key, 0.0) for key in DECODE_PARTS.values()}
        rows.append(
            {"attention": s["attention"], "ffn": s["ffn"]}
            | parts
            | {
                "ffn_other": s["ffn"] - sum(parts.values()) if any(parts.values()) else 0.0,
                "lm_head": s["lm_head"],
                "other": s["step"] - s["attention"] - s["ffn"] - s["lm_head"],
                "step": s["step"],
            }
        )
    return {key: 1e3 * statistics.median(r[key] for r in rows) for key in rows[0]}


# ---------------------------------------------------------------------------------------------
# Report


def setup_line(models: dict) -> str:
    """What the numbers depend on: versions, device, dtype, threads, attention and the MoE kernels that ran."""
    import transformers

    dense = models["dense"]
    line = (
        f"torch {torch.__version__}, transformers {transformers.__version__}, {dense.device.type}, "
        f"{dense.summary().dtype}, {torch.get_num_threads()} threads, "
        f"attention {dense.model.config._attn_implementation}"
    )
    blocks = [b for m in models.values() for b in m.adapter.layers(m.model) if isinstance(b.mlp, MoEMLP)]
    if blocks:
        block = blocks[0].mlp
        x = torch.zeros(1, block.hidden_size, device=dense.device, dtype=block.gate_up_proj.dtype)
        decode = (
            "fused (moe_fast.decode)"
            if moe_fast.decode_plan(block, x) is not None
            else "grouped_mm or host loop"
        )
        prefill = "grouped_mm" if grouped_mm_ok(block, x) else "per-expert loop"
        line += f"; MoE decode {decode}, prefill {prefill}"
    return line


def speed_table(speeds: dict, ideals: dict, summary: dict) -> str:
    lines = [
        "| model | prefill tok/s | decode tok/s | ideal (no ctx / prefill / decode) | prefill speed-up | "
        "decode speed-up | achieved prefill | achieved decode |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in speeds.items():
        pre, dec = statistics.median(s["prefill"]), statistics.median(s["decode"])
        i = ideals[name]
        ideal = f"{i['ideal_speedup']:.2f} / {i['ideal_prefill']:.2f} / {i['ideal_decode']:.2f}"
        if name == "dense":
            lines.append(f"| dense | {pre:.0f} | {dec:.1f} | 1.00 | 1.00 | 1.00 | - | - |")
            continue
        r = summary[name]
        lines.append(
            f"| {name} | {pre:.0f} | {dec:.1f} | {ideal} | {r['prefill_speedup']:.2f} | {r['decode_speedup']:.2f} "
            f"| {r['prefill_achieved']:.0%} | {r['decode_achieved']:.0%} |"
        )
    return "\n".join(lines)


def ffn_bounds(models: dict, dense_parts: dict[str, float]) -> dict[str, float]:
    """Per MoE model: the decode speed-up if only the dense FFN's measured time shrank, to the active FFN share."""
    step, ffn = dense_parts["step"], dense_parts["ffn"]
    return {
        name: step / (step - ffn * (1 - param_report(m)["active_ffn_share"]))
        for name, m in models.items()
        if name != "dense"
    }


def breakdown_table(parts: dict[str, dict[str, float]]) -> str:
    keys = ["attention", "ffn", *DECODE_PARTS.values(), "ffn_other", "lm_head", "other", "step"]
    lines = ["| model (ms / decode step) | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, p in parts.items():
        lines.append(f"| {name} | " + " | ".join(f"{p[k]:.2f}" for k in keys) + " |")
    return "\n".join(lines)


def summarise(speeds: dict, ideals: dict) -> dict:
    out = {}
    for name in speeds:
        if name == "dense":
            continue
        pre = paired_speedup(speeds[name]["prefill"], speeds["dense"]["prefill"])
        dec = paired_speedup(speeds[name]["decode"], speeds["dense"]["decode"])
        i = ideals[name]
        out[name] = {
            "ideal_speedup": round(i["ideal_speedup"], 3),
            "prefill_speedup": round(pre, 3),
            "decode_speedup": round(dec, 3),
            "ideal_prefill_speedup": round(i["ideal_prefill"], 3),
            "ideal_decode_speedup": round(i["ideal_decode"], 3),
            "prefill_achieved": round(pre / i["ideal_prefill"], 3),
            "decode_achieved": round(dec / i["ideal_decode"], 3),
        }
    return out


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument(
        "--configs", nargs="*", default=["S1A1E8", "S3A3E8"], help="CMoE SxAyEz shapes (none: --configs)"
    )
    p.add_argument("--converted", nargs="*", default=[], help="folders of saved conversions to time as well")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prefill-batch", type=int, default=4)
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--calib-text", default="builtin:pydoc")
    p.add_argument("--calib-sequences", type=int, default=4)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", help="float32 on CPU, bfloat16 on CUDA unless told")
    p.add_argument("--breakdown", action="store_true", help="also time the parts of a decode step")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dense = load_model(args.model, device=args.device, dtype=args.dtype)
    docs = load_documents(args.calib_text)
    calib = sample_sequences(docs, dense.tokenizer, args.calib_sequences, args.calib_len, seed=0)
    text = sample_sequences(docs, dense.tokenizer, args.prefill_batch + 1, args.prefill_len, seed=1)
    prefill_ids = text[1:].to(dense.device)  # (B, T)
    prompt = text[:1, : args.prompt_len].to(dense.device)  # (1, P)
    models = build_models(dense, args.configs, calib.to(dense.device), args.converted)
    if len(models) == 1:
        raise SystemExit("nothing to compare: give --configs or --converted")
    ideals = ideal_speedups(models, args.prefill_len, args.prompt_len + args.decode_tokens / 2)
    log(f"measuring: {torch.get_num_threads()} threads, {dense.summary().dtype}, device {args.device}")
    speeds = measure(models, prefill_ids, prompt, args.decode_tokens, args.repeats)
    summary = summarise(speeds, ideals)
    print(setup_line(models))
    print()
    print(speed_table(speeds, ideals, summary))
    if args.breakdown:
        print()
        parts = {n: breakdown(m, prompt, args.decode_tokens) for n, m in models.items()}
        print(breakdown_table(parts))
        for name, bound in ffn_bounds(models, parts["dense"]).items():
            summary[name]["decode_ffn_bound"] = round(bound, 3)
            print(
                f"{name}: decode {summary[name]['decode_speedup']:.2f}x; if only the FFN's time shrank to its "
                f"active share: {bound:.2f}x ({summary[name]['decode_speedup'] / bound:.0%} of that reached)"
            )
    log("done")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
