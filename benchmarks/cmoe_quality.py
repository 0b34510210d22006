"""CMoE quality on the default model: perplexity training-free and after light fine-tuning, KL and agreement.

    python benchmarks/cmoe_quality.py                     # S1A1E8 S2A2E8 S3A3E8 S2A2E16, defaults below
    python benchmarks/cmoe_quality.py --configs S2A2E8 --windows 4 --ft-sequences 8

Perplexity windows: the first --windows non-overlapping --seq-len token windows of WikiText-2 raw test
(shared:wikitext2, "\\n\\n"-joined, no BOS; a CPU-sized prefix of the 148 x 2048 standard set), the same
windows for the dense model and every configuration. KL(dense || MoE) in nats per token and top-1 agreement
are on the same predicted tokens. Calibration (carving) and fine-tuning text: shared:calib-wikipedia, not
WikiText-2: only its test split is in the shared data, and tuning on the scored text would leak.
Fine-tuning: moe_core.finetune with FinetuneConfig defaults (LoRA r 8 / alpha 32 on attention, shared and
routed experts; u trained at 1e-3; aux-free bias gamma 1e-3). active_ffn_share: active FFN parameters per
token (routers included) over the FFN weights. Seconds are wall clock on a shared machine; CPU seconds and
the load average are printed beside them.

Prints a table, then a JSON last line
{"dense_ppl": ..., "windows": ..., "configs": {"S1A1E8": {"ppl_free": ..., "ppl_ft": ..., "kl": ...,
"agreement": ..., "active_ffn_share": ..., "convert_s": ..., ...}, ...}} (kl / agreement: training-free;
kl_ft / agreement_ft: after fine-tuning).
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

from moe_core.config import CMoEConfig, FinetuneConfig  # noqa: E402
from moe_core.data import eval_windows, load_documents, sample_sequences  # noqa: E402
from moe_core.evaluate import compare_logits, param_report, reference_logits  # noqa: E402
from moe_core.finetune import finetune, training_ids  # noqa: E402
from moe_core.methods import convert  # noqa: E402
from moe_core.model_io import load_model  # noqa: E402

DEFAULT_CONFIGS = ["S1A1E8", "S2A2E8", "S3A3E8", "S2A2E16"]


def log(message: str) -> None:
    print(
        f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {message}", file=sys.stderr, flush=True
    )


def timed(fn, *args, **kwargs):
    """(result, wall seconds, CPU seconds of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def run_config(dense, ref, windows, calib, ft_ids, experts: str, ft_cfg: FinetuneConfig | None) -> dict:
    """Convert, score training-free, fine-tune, score again; one row of the table."""
    moe, convert_s, convert_cpu = timed(convert, dense, calib, CMoEConfig(experts=experts))
    log(f"{experts}: converted in {convert_s:.0f} s")
    free = compare_logits(ref, moe, windows)
    row = {
        "ppl_free": free["ppl"],
        "kl": free["kl"],
        "agreement": free["agreement"],
        "active_ffn_share": param_report(moe, windows.shape[1])["active_ffn_share"],
        "convert_s": round(convert_s, 1),
        "convert_cpu_s": round(convert_cpu, 1),
    }
    log(f"{experts}: training-free ppl {free['ppl']:.2f}, KL {free['kl']:.3f}")
    if ft_cfg is not None:
        stats, ft_s, _ = timed(finetune, moe, ft_ids, ft_cfg)
        tuned = compare_logits(ref, moe, windows)
        row |= {"ppl_ft": tuned["ppl"], "kl_ft": tuned["kl"], "agreement_ft": tuned["agreement"]}
        row |= {
            "finetune_s": round(ft_s, 1),
            "loss_first": stats["loss_first"],
            "loss_last": stats["loss_last"],
        }
        log(f"{experts}: fine-tuned in {ft_s:.0f} s, ppl {tuned['ppl']:.2f}")
    return row


def table(dense_ppl: float, rows: dict[str, dict]) -> str:
    cols = [
        ("config", "{}"),
        ("ppl_free", "{:.2f}"),
        ("ppl_ft", "{:.2f}"),
        ("kl", "{:.3f}"),
        ("kl_ft", "{:.3f}"),
        ("agreement", "{:.3f}"),
        ("agreement_ft", "{:.3f}"),
        ("active_ffn_share", "{:.3f}"),
        ("convert_s", "{:.0f}"),
        ("finetune_s", "{:.0f}"),
    ]
    lines = [
        "| " + " | ".join(name for name, _ in cols) + " |",
        "|" + "---|" * len(cols),
        f"| dense | {dense_ppl:.2f} | - | 0 | - | 1 | - | 1.000 | - | - |",
    ]
    for name, row in rows.items():
        cells = [fmt.format(row[key]) if key in row else "-" for key, fmt in cols[1:]]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    ft = FinetuneConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:smollm2-135m")
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    p.add_argument("--windows", type=int, default=8, help="WikiText-2 test windows scored")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    p.add_argument("--calib-text", default="shared:calib-wikipedia")
    p.add_argument("--calib-sequences", type=int, default=8)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--ft-sequences", type=int, default=ft.n_sequences)
    p.add_argument("--ft-len", type=int, default=ft.seq_len)
    p.add_argument("--lr", type=float, default=ft.lr, help="LoRA learning rate")
    p.add_argument("--no-finetune", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    dense = load_model(args.model)
    windows = eval_windows(load_documents("shared:wikitext2"), dense.tokenizer, args.seq_len, args.windows)
    ref = reference_logits(dense, windows)
    log(f"dense ppl {ref.ppl:.2f} on {len(windows)} x {args.seq_len} WikiText-2 test tokens")
    calib = sample_sequences(
        load_documents(args.calib_text), dense.tokenizer, args.calib_sequences, args.calib_len, seed=0
    )
    ft_cfg = FinetuneConfig(
        text=args.calib_text, n_sequences=args.ft_sequences, seq_len=args.ft_len, lr=args.lr
    )
    ft_ids = training_ids(dense, ft_cfg)  # seed 0: starts with the calibration offsets, as in the CMoE code
    ft_cfg = None if args.no_finetune else ft_cfg
    rows = {}
    for experts in args.configs:
        rows[experts] = run_config(dense, ref, windows, calib, ft_ids, experts, ft_cfg)
        gc.collect()
    print(
        f"WikiText-2 test: first {len(windows)} non-overlapping windows x {args.seq_len} tokens "
        f"({len(windows) * (args.seq_len - 1)} predicted tokens); calibration {args.calib_sequences} x "
        f"{args.calib_len} and fine-tuning {args.ft_sequences} x {args.ft_len} tokens of {args.calib_text}"
    )
    print(table(ref.ppl, rows))
    setup = {"windows": len(windows), "seq_len": args.seq_len, "calib_text": args.calib_text}
    setup |= {"ft_sequences": args.ft_sequences, "ft_len": args.ft_len, "lr": args.lr}
    print(json.dumps({"dense_ppl": ref.ppl, **setup, "configs": rows}))


if __name__ == "__main__":
    main()
