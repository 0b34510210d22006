"""Distillation settings compared from one start: which learning rate, loss or trained parts recover most.

    python -m moe_core convert --budget 0.5 --no-distill --out outputs/c50        # the start, saved once
    python benchmarks/distill_settings.py --model outputs/c50 --steps 64 \
        --settings '{}' '{"lr": 2e-4}' '{"lr": 6e-4}' '{"hidden_weight": 1.0}'

Each setting (a JSON object of moe_core.config.DistillConfig fields over --base) distils a fresh copy of the
saved conversion from its dense source (the run config's model) for --steps steps of the setting's batch, from
the same seed and the same training windows, and is scored by KL(dense || model) on --eval-windows held-out
windows from the tail of the distillation text (moe_core.distill.distill_data: never its training windows, and
never WikiText-2 test unless named), before and after. Settings are ranked by that held-out KL, so the scored
WikiText-2 windows play no part in choosing a recipe.

Each finished row is appended to --jsonl as it comes; the table, then a JSON last line
{"model": ..., "steps": ..., "rows": [{"settings": {...}, "held_out_kl_start": ..., "held_out_kl": ...,
"minutes": ...}, ...]} end the run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a fresh clone without installing

from moe_core.checkpoint import load_converted, read_json  # noqa: E402
from moe_core.config import DistillConfig, from_dict  # noqa: E402
from moe_core.distill import distill, distill_data  # noqa: E402
from moe_core.model_io import load_model  # noqa: E402

# the recipe of the README's 50% and 25% rows: every part in full, the attention layers included
BASE = {"train": ["experts", "shared", "routers", "norms", "attention"]}


def setting_config(base: dict, setting: dict, steps: int, eval_windows: int) -> DistillConfig:
    """The DistillConfig of one setting: --base, then the setting, sized to ``steps`` steps, held-out KL at the
    end only, no checkpoints."""
    cfg = from_dict(DistillConfig, base | setting)
    return replace(
        cfg,
        tokens=steps * cfg.batch_size * cfg.seq_len,
        max_minutes=None,
        eval_windows=eval_windows,
        eval_every=steps,
        checkpoint_every=0,
    )


def run_setting(folder: str, dense, cfg: DistillConfig) -> dict:
    """Distil a fresh load of the conversion in ``folder`` with ``cfg``: its held-out KL before and after."""
    moe = load_converted(folder)
    ids, held = distill_data(dense, cfg)
    start = time.perf_counter()
    stats = distill(moe, dense, cfg, ids, held)
    return {
        "held_out_kl_start": stats["held_out"][0][1],
        "held_out_kl": stats["held_out_kl"],
        "steps": stats["steps"],
        "tokens": stats["tokens"],
        "minutes": round((time.perf_counter() - start) / 60, 2),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| settings | held-out KL before | after | steps | tokens | minutes |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["held_out_kl"]):
        lines.append(
            f"| {json.dumps(r['settings'])} | {r['held_out_kl_start']:.4g} | {r['held_out_kl']:.4g} | "
            f"{r['steps']} | {r['tokens']} | {r['minutes']} |"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a converted folder saved without distillation")
    p.add_argument(
        "--settings", nargs="+", default=["{}"], help="JSON objects of distill fields, one per row"
    )
    p.add_argument("--base", default=json.dumps(BASE), help="JSON distill fields every setting starts from")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--reference", default=None, help="the dense teacher (default: the run config's model)")
    p.add_argument("--jsonl", default=None)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    reference = args.reference or read_json(args.model, "run_config.json")["model"]["spec"]
    dense = load_model(reference)
    base, rows = json.loads(args.base), []
    for text in args.settings:
        setting = json.loads(text)
        cfg = setting_config(base, setting, args.steps, args.eval_windows)
        row = {"settings": setting} | run_setting(args.model, dense, cfg)
        rows.append(row)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
        print(
            f"{json.dumps(setting)}: held-out KL {row['held_out_kl_start']:.4g} -> {row['held_out_kl']:.4g}"
        )
    summary = {"model": args.model, "reference": reference, "steps": args.steps, "rows": rows}
    print(table(rows))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
