"""CMoE on the default model: conversion seconds per configuration and WikiText-2 perplexity, paper vs code variant.

    python benchmarks/cmoe_variants.py                       # S1A1E8 S2A2E8 S3A3E8 S2A2E16 x paper, code
    python benchmarks/cmoe_variants.py --configs S2A2E8 --variants code --text shared:wikitext2

Calibration: --n-sequences x --seq-len tokens of --text (default shared:calib-wikipedia: Wikipedia prose,
disjoint from the WikiText-2 test windows that are scored). Perplexity: the first --windows non-overlapping
--eval-len windows of shared:wikitext2 (moe_core.evaluate.perplexity). Prints one JSON line per run and a table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from moe_core.config import CMoEConfig  # noqa: E402
from moe_core.data import eval_windows, load_documents, sample_sequences  # noqa: E402
from moe_core.evaluate import perplexity  # noqa: E402
from moe_core.methods import convert  # noqa: E402
from moe_core.model_io import load_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:smollm2-135m")
    p.add_argument("--configs", nargs="+", default=["S1A1E8", "S2A2E8", "S3A3E8", "S2A2E16"])
    p.add_argument("--variants", nargs="+", default=["paper", "code"])
    p.add_argument("--text", default="shared:calib-wikipedia")
    p.add_argument("--n-sequences", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--eval-len", type=int, default=512)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="calibration sampling seeds")
    p.add_argument("--no-sequential", action="store_true", help="profile every layer on dense inputs")
    args = p.parse_args()

    torch.manual_seed(0)
    dense = load_model(args.model)
    docs = load_documents(args.text)
    calib = {
        seed: sample_sequences(docs, dense.tokenizer, args.n_sequences, args.seq_len, seed)
        for seed in args.seeds
    }
    windows = eval_windows(load_documents("shared:wikitext2"), dense.tokenizer, args.eval_len, args.windows)
    rows = [{"config": "dense", "variant": "-", "ppl": perplexity(dense, windows, batch_size=4)}]
    print(json.dumps(rows[0]), flush=True)
    for seed, experts, variant in itertools.product(args.seeds, args.configs, args.variants):
        cfg = CMoEConfig(experts=experts, variant=variant, sequential=not args.no_sequential)
        wall, cpu = time.perf_counter(), time.process_time()
        moe = convert(dense, calib[seed], cfg)
        row = {
            "config": experts,
            "variant": variant,
            "seed": seed,
            "convert_s": round(time.perf_counter() - wall, 1),
            "convert_cpu_s": round(time.process_time() - cpu, 1),
            "load_avg_1m": round(os.getloadavg()[0], 1),
            "ppl": perplexity(moe, windows, batch_size=4),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        del moe
    print(f"\n{'config':10s} {'variant':8s} {'seed':>4s} {'ppl':>9s} {'convert s':>10s}")
    for r in rows:
        print(
            f"{r['config']:10s} {r['variant']:8s} {r.get('seed', '-'):>4} {r['ppl']:9.2f} {r.get('convert_s', 0):10.1f}"
        )


if __name__ == "__main__":
    main()
