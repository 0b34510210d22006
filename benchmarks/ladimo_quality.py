"""LaDiMo on the default model: the picked per-layer plan against a uniform top-k at equal active FFN parameters.

    python benchmarks/ladimo_quality.py                      # E = 8, uniform top-6, plan at the same saving
    python benchmarks/ladimo_quality.py --steps 50 --calib-sequences 8 --windows 4

Steps, all in this process: LaDiMo conversion (moe_core.methods.ladimo, LaDiMoConfig defaults but --steps,
--n-experts, --top-k) on --calib-sequences x --calib-len tokens of --calib-text; the per-layer sweep
(moe_core.sweep, SweepConfig defaults: held-out WikiText-2 windows after the first 64 x 256 tokens); plans
picked by moe_core.sweep.pick_plan for (a) the uniform model's own active-FFN saving, so plan and uniform are
compared at equal active parameters, and (b) --max-ppl-increase. Scored on the first --windows
non-overlapping --seq-len windows of WikiText-2 test (disjoint from the sweep's windows): perplexity, KL(dense
|| model) per token, top-1 agreement; active_ffn_reduction = 1 - active FFN share (routers counted, mean
experts per token measured on the scored windows for dynamic policies). throughput_ratio: prefill tokens/s
(--prefill-batch x --prefill-len) of the model over dense, and decode (batch 1, KV cache), medians of
paired ratios over --repeats interleaved repeats (benchmarks/speed.py's timers).

Prints a table, then a JSON last line {"dense_ppl": ..., "plan": {"active_ffn_reduction": ..., "ppl": ...,
"kl": ..., "throughput_ratio": ...}, "uniform": {...}, "plan_ppl_target": {...}, "seconds": {...}}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a fresh clone without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/speed.py's timers

import torch  # noqa: E402
from speed import measure, paired_speedup  # noqa: E402

from moe_core.config import LaDiMoConfig, SweepConfig  # noqa: E402
from moe_core.data import eval_windows, load_documents, sample_sequences  # noqa: E402
from moe_core.evaluate import compare_logits, expert_load, param_report, reference_logits  # noqa: E402
from moe_core.methods import convert  # noqa: E402
from moe_core.model_io import load_model  # noqa: E402
from moe_core.sweep import apply_plan, held_out_windows, pick_plan, sweep  # noqa: E402


def log(message: str) -> None:
    load = os.getloadavg()[0]
    print(f"[{time.strftime('%H:%M:%S')} load {load:.1f}] {message}", file=sys.stderr, flush=True)


def progress_logger(every: float = 0.1):
    """A progress callback that logs at most every ``every`` of the way."""
    last = [-1.0]

    def report(fraction: float, message: str) -> None:
        if fraction - last[0] >= every or fraction >= 1.0:
            last[0] = fraction
            log(message)

    return report


def score(ref, model, windows) -> dict:
    """Perplexity, KL and agreement against the dense reference; active FFN reduction with measured k."""
    expert_load(model, windows, batch_size=4)  # dynamic policies: param_report uses the measured mean k
    scores = compare_logits(ref, model, windows, batch_size=4)
    share = param_report(model, windows.shape[1])["active_ffn_share"]
    return {
        "active_ffn_reduction": round(1.0 - share, 4),
        "ppl": round(scores["ppl"], 3),
        "kl": round(scores["kl"], 4),
        "agreement": round(scores["agreement"], 4),
    }


def table(dense_ppl: float, rows: dict[str, dict]) -> str:
    head = (
        "| model | active FFN reduction | ppl | KL | agreement | prefill x dense | decode x dense | layers |"
    )
    lines = [
        head,
        "|---|---|---|---|---|---|---|---|",
        f"| dense | 0 | {dense_ppl:.2f} | 0 | 1 | 1 | 1 | - |",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['active_ffn_reduction']:.3f} | {r['ppl']:.2f} | {r['kl']:.4f} | {r['agreement']:.3f}"
            f" | {r['throughput_ratio']:.3f} | {r['decode_throughput_ratio']:.3f} | {r['policies']} |"
        )
    return "\n".join(lines)


def policy_summary(model) -> str:
    """'top-6 x20, dense x4, dyn-0.9 x6': how many layers run each policy."""
    from moe_core.evaluate import moe_blocks

    blocks = moe_blocks(model)
    counts: dict[str, int] = {}
    for i in range(model.n_layers):
        label = blocks[i].policy.label() if i in blocks else "dense"
        counts[label] = counts.get(label, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def parse_args(argv=None) -> argparse.Namespace:
    lad = LaDiMoConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:smollm2-135m")
    p.add_argument("--calib-text", default="shared:calib-wikipedia")
    p.add_argument("--calib-sequences", type=int, default=16)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--n-experts", type=int, default=lad.n_experts)
    p.add_argument("--top-k", type=int, default=None, help="uniform policy (default: 3/4 of the experts)")
    p.add_argument("--steps", type=int, default=lad.steps, help="Adam steps per layer")
    p.add_argument("--sweep-windows", type=int, default=SweepConfig().n_windows)
    p.add_argument("--max-ppl-increase", type=float, default=0.10, help="second plan's target")
    p.add_argument("--windows", type=int, default=8, help="WikiText-2 test windows scored")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prefill-batch", type=int, default=1)
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--out", default=None, help="also save the sweep (sweep.json, CSVs) here")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    seconds = {}
    dense = load_model(args.model)
    windows = eval_windows(load_documents("shared:wikitext2"), dense.tokenizer, args.seq_len, args.windows)
    ref = reference_logits(dense, windows, batch_size=4)
    log(f"dense ppl {ref.ppl:.2f} on {len(windows)} x {args.seq_len} WikiText-2 test tokens")
    calib = sample_sequences(
        load_documents(args.calib_text), dense.tokenizer, args.calib_sequences, args.calib_len, seed=0
    )
    cfg = LaDiMoConfig(n_experts=args.n_experts, top_k=args.top_k, steps=args.steps)
    start = time.perf_counter()
    uniform = convert(dense, calib, cfg, method="ladimo", progress=progress_logger())
    seconds["convert"] = round(time.perf_counter() - start, 1)
    layers = uniform.conversion.layers
    seconds["val_mse_init"] = round(sum(r["val_mse_init"] for r in layers) / len(layers), 4)
    seconds["val_mse"] = round(sum(r["val_mse"] for r in layers) / len(layers), 4)
    log(
        f"held-out relative MSE at the uniform k, mean over layers: {seconds['val_mse_init']:.4f} at init, "
        f"{seconds['val_mse']:.4f} trained"
    )

    sweep_cfg = SweepConfig(n_windows=args.sweep_windows)
    start = time.perf_counter()
    result = sweep(dense, uniform, held_out_windows(dense.tokenizer, sweep_cfg), sweep_cfg, progress_logger())
    seconds["sweep"] = round(time.perf_counter() - start, 1)
    seconds["sweep_parts"] = result.seconds
    if args.out:
        result.save(args.out)
    log(f"sweep of {len(result.points)} (layer, policy) points in {seconds['sweep']:.0f} s")

    rows = {f"uniform {uniform_label(uniform)}": score(ref, uniform, windows)}
    saving = rows[next(iter(rows))]["active_ffn_reduction"]
    plans = {
        "plan (same saving)": pick_plan(result, min_active_reduction=saving),
        f"plan (ppl +{args.max_ppl_increase:.0%})": pick_plan(result, max_ppl_increase=args.max_ppl_increase),
    }
    models = {"dense": dense, next(iter(rows)): uniform}
    for name, plan in plans.items():
        models[name] = apply_plan(uniform, plan, dense)
        rows[name] = score(ref, models[name], windows) | {"predicted": plan.predicted}
    for name, model in models.items():
        if name != "dense":
            rows[name]["policies"] = policy_summary(model)

    log("timing: interleaved repeats of every model")
    prefill_ids = windows[: args.prefill_batch, : args.prefill_len]
    speeds = measure(models, prefill_ids, windows[:1, :32], args.decode_tokens, args.repeats)
    for name in rows:
        rows[name]["throughput_ratio"] = round(
            paired_speedup(speeds[name]["prefill"], speeds["dense"]["prefill"]), 3
        )
        rows[name]["decode_throughput_ratio"] = round(
            paired_speedup(speeds[name]["decode"], speeds["dense"]["decode"]), 3
        )

    print(
        f"LaDiMo E={args.n_experts}, {args.steps} steps/layer on {args.calib_sequences} x {args.calib_len} tokens "
        f"of {args.calib_text}; convert {seconds['convert']:.0f} s, sweep {seconds['sweep']:.0f} s "
        f"({len(result.points)} points, {result.n_layers} layers). Scored on {len(windows)} x {args.seq_len} "
        "WikiText-2 test tokens."
    )
    print(table(ref.ppl, rows))
    names = list(rows)
    print(
        json.dumps(
            {
                "dense_ppl": round(ref.ppl, 3),
                "plan": rows[names[1]],
                "uniform": rows[names[0]],
                "plan_ppl_target": rows[names[2]],
                "seconds": seconds,  # and the mean held-out relative MSE of the blocks
            }
        )
    )


def uniform_label(model) -> str:
    from moe_core.evaluate import moe_blocks

    return next(iter(moe_blocks(model).values())).policy.label()


if __name__ == "__main__":
    main()
