"""DIVE against plain FLAP pruning at the same active FFN parameters, before and after retraining.

    python benchmarks/dive_quality.py                       # defaults below: about 20 min on 2 CPU cores
    python benchmarks/dive_quality.py --limit 5 --windows 1 --stage1-steps 1 --stage2-steps 1   # smoke run

Rows: dense; FLAP at p = 0.5; DIVE 1-of-N (each expert keeps 50%) and 2-of-N (each keeps 25%), so every
pruned row runs half the FFN per token; each before and after retraining (same text, same steps: DIVE's
stage 1 + stage 2, FLAP's one LoRA stage for as many steps, LoRA on the FFN + RMSNorms, attention frozen).

- Domains: the six calibration corpora of the shared data (DIVEConfig defaults); FLAP statistics are computed
  once per domain and shared by the mining at both ratios, the experts, and the FLAP baseline (all domains
  pooled, the same text DIVE saw in all).
- Each domain's text tail is held out (DIVEConfig.holdout): its first --mining-windows windows drive the
  mining, the next --domain-windows are the per-domain perplexity columns (ppl_<domain>), never mined on.
- WikiText-2: the first --windows non-overlapping --seq-len windows of shared:wikitext2 (test), no BOS.
- lm-eval: --tasks on the local task files, first --limit documents each, zero-shot, acc.
- Retraining text: --train-text (default shared:c4, web text like the paper's SlimPajama), seeded windows.
- active_ffn_share: active FFN parameters per token (routers included) over the dense model's FFN parameters.

Prints a table, then a JSON last line {"rows": [{"method": ..., "active_ffn_share": ..., "retrained": ...,
"wikitext_ppl": ..., "ppl_<domain>": ..., "<task>_acc": ..., ...}, ...], "groups": {...}, "setup": {...}}.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a fresh clone without installing

import torch  # noqa: E402

from moe_core.config import DIVEConfig, DIVERetrainConfig  # noqa: E402
from moe_core.data import eval_windows, load_documents, sample_sequences  # noqa: E402
from moe_core.evaluate import lm_eval_tasks, param_report, perplexity  # noqa: E402
from moe_core.finetune import dive_retrain, train_experts  # noqa: E402
from moe_core.methods.dive import (  # noqa: E402
    affinity_matrix,
    assemble,
    cluster_domains,
    domain_data,
    domain_stats,
    flap_prune,
    pooled,
)
from moe_core.model_io import load_model  # noqa: E402


def log(message: str) -> None:
    print(
        f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {message}", file=sys.stderr, flush=True
    )


def score(model, dense_ffn: int, wiki, heldout: dict, tasks: list[str], limit: int) -> dict:
    """One row's numbers: active FFN share, WikiText-2 ppl, ppl per domain, lm-eval accuracies."""
    start = time.perf_counter()
    row = {"active_ffn_share": param_report(model)["ffn_active_params"] / dense_ffn}
    row["wikitext_ppl"] = perplexity(model, wiki, batch_size=2)
    row |= {f"ppl_{name}": perplexity(model, windows, batch_size=2) for name, windows in heldout.items()}
    for task, metrics in (lm_eval_tasks(model, tasks, limit) if tasks else {}).items():
        row[f"{task.removesuffix('_local')}_acc"] = metrics.get("acc")
    row["eval_s"] = round(time.perf_counter() - start, 1)
    return row


def build(dense, stats, cfg: DIVEConfig, mining: dict) -> tuple:
    """Mine at cfg's ratio and assemble the DIVE model: (model, groups, mining seconds)."""
    start = time.perf_counter()
    ppl = affinity_matrix(dense, stats, mining, cfg.prune_ratio, batch_size=2)
    affinity = cluster_domains(list(stats), ppl, cfg.n_experts, cfg.linkage)
    moe, _ = assemble(dense, [pooled(stats, g) for g in affinity.groups], cfg)
    return moe, affinity.groups, round(time.perf_counter() - start, 1)


def retrain(model, train_ids, cfg: DIVERetrainConfig, routed: bool) -> dict:
    """DIVE's two stages; the one-expert FLAP model trains stage 2 for stage 1 + stage 2 steps (same budget)."""
    start = time.perf_counter()
    if not routed:  # FLAP baseline: no router to train
        stats = {"stage2": train_experts(model, train_ids, cfg, steps=cfg.stage1_steps + cfg.stage2_steps)}
    else:
        stats = dive_retrain(model, train_ids, cfg)
    losses = {
        f"{stage}_loss": [round(s["loss_first"], 3), round(s["loss_last"], 3)] for stage, s in stats.items()
    }
    return losses | {"retrain_s": round(time.perf_counter() - start, 1)}


def candidates(dense, stats, mining, args):
    """(name, model, extra) for FLAP and both DIVE settings, built lazily one at a time (memory)."""
    all_stats = pooled(stats, stats)
    flap = flap_prune(dense, all_stats, 0.5)
    yield "flap", flap, {}
    del flap
    for k in (1, 2):
        cfg = DIVEConfig(n_experts=args.n_experts, top_k=k, domains=args.domains or DIVEConfig().domains)
        moe, groups, seconds = build(dense, stats, cfg, mining)
        yield f"dive-{k}of{args.n_experts}", moe, {"groups": groups, "mining_s": seconds}
        del moe


COLUMNS = ("method", "retrained", "active_ffn_share", "wikitext_ppl")


def table(rows: list[dict]) -> str:
    keys = list(COLUMNS) + [k for k in rows[0] if k.startswith("ppl_") or k.endswith("_acc")]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = []
        for key in keys:
            value = row.get(key)
            cells.append(f"{value:.3f}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    rt = DIVERetrainConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:smollm2-135m")
    p.add_argument("--domains", nargs="+", help="text sources (default: the six shared calibration domains)")
    p.add_argument("--n-experts", type=int, default=4, help="N: DIVE 1-of-N and 2-of-N")
    p.add_argument("--calib-sequences", type=int, default=8, help="FLAP calibration windows per domain")
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--mining-windows", type=int, default=2, help="held-out windows per domain for mining")
    p.add_argument(
        "--domain-windows", type=int, default=2, help="further held-out windows per domain, scored"
    )
    p.add_argument("--windows", type=int, default=4, help="WikiText-2 test windows")
    p.add_argument("--seq-len", type=int, default=512, help="WikiText-2 window length")
    p.add_argument(
        "--tasks", default="arc_easy_local,piqa_local", help="comma-separated; empty skips lm-eval"
    )
    p.add_argument("--limit", type=int, default=25, help="lm-eval: first N documents per task")
    p.add_argument("--train-text", default="shared:c4")
    p.add_argument("--train-sequences", type=int, default=32)
    p.add_argument("--train-len", type=int, default=256)
    p.add_argument("--stage1-steps", type=int, default=rt.stage1_steps)
    p.add_argument("--stage2-steps", type=int, default=rt.stage2_steps)
    p.add_argument("--no-retrain", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    start = time.perf_counter()
    dense = load_model(args.model)
    windows = args.mining_windows + args.domain_windows
    cfg = DIVEConfig(
        domains=args.domains or DIVEConfig().domains,
        n_experts=args.n_experts,
        n_sequences=args.calib_sequences,
        seq_len=args.calib_len,
        eval_windows=windows,
    )
    data = domain_data(dense, cfg)
    short = [n for n, d in data.items() if len(d.heldout) < windows]
    if short:
        raise SystemExit(f"Domains {short} hold out fewer than {windows} windows: lower the window counts.")
    mining = {n: d.heldout[: args.mining_windows] for n, d in data.items()}
    heldout = {n: d.heldout[args.mining_windows :] for n, d in data.items()}
    wiki = eval_windows(load_documents("shared:wikitext2"), dense.tokenizer, args.seq_len, args.windows)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    train_ids = sample_sequences(
        load_documents(args.train_text, max_chars=2_000_000),
        dense.tokenizer,
        args.train_sequences,
        args.train_len,
        seed=0,
    )
    rt = DIVERetrainConfig(stage1_steps=args.stage1_steps, stage2_steps=args.stage2_steps)
    stats = domain_stats(dense, data, cfg.batch_size)
    log(f"FLAP statistics of {len(stats)} domains in {time.perf_counter() - start:.0f} s")
    dense_ffn = param_report(dense)["ffn_params"]
    rows = [
        {"method": "dense", "retrained": False, **score(dense, dense_ffn, wiki, heldout, tasks, args.limit)}
    ]
    log(f"dense: wikitext ppl {rows[0]['wikitext_ppl']:.2f}")
    groups = {}
    for name, model, extra in candidates(dense, stats, mining, args):
        groups |= {name: extra["groups"]} if "groups" in extra else {}
        row = {
            "method": name,
            "retrained": False,
            **score(model, dense_ffn, wiki, heldout, tasks, args.limit),
        }
        rows.append(row | {k: v for k, v in extra.items() if k != "groups"})
        log(f"{name}: wikitext ppl {row['wikitext_ppl']:.2f} {extra}")
        if not args.no_retrain:
            fit = retrain(model, train_ids, rt, routed=name != "flap")
            tuned = score(model, dense_ffn, wiki, heldout, tasks, args.limit)
            rows.append({"method": name, "retrained": True, **tuned, **fit})
            log(f"{name} retrained: wikitext ppl {tuned['wikitext_ppl']:.2f} {fit}")
        del model
        gc.collect()
    setup = vars(args) | {"seconds": round(time.perf_counter() - start)}
    print(
        f"{args.model}; WikiText-2 {len(wiki)} x {args.seq_len} tokens; per-domain ppl on {args.domain_windows} "
        f"held-out x {args.calib_len} tokens; lm-eval {', '.join(tasks) or '-'} limit {args.limit}; "
        f"retraining {args.stage1_steps} + {args.stage2_steps} steps x {rt.batch_size} x {args.train_len} "
        f"tokens of {args.train_text}; DIVE groups {groups}"
    )
    print(table(rows))
    print(json.dumps({"rows": rows, "groups": groups, "setup": setup}))


if __name__ == "__main__":
    main()
