"""Export fidelity: CMoE S2A2E8 on the default model, perplexity of the internal model and of its exports.

    python benchmarks/export_fidelity.py [--experts S2A2E8] [--windows 8] [--calib builtin:pydoc]

Converts the default model (calibration 8 x 512 tokens), writes three exports and reloads each folder with
AutoModelForCausalLM: exact (remote code), portable Qwen2-MoE with the naive router (no fitting), and
portable with the fitted router. Perplexity, KL(internal || export) and top-1 agreement are measured on
WikiText-2 windows (512 tokens, never seen in calibration). Prints a table, then a JSON last line
{"internal_ppl": ..., "exact_ppl": ..., "portable_ppl_unfitted": ..., "portable_ppl_fitted": ...}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from moe_core.config import CMoEConfig  # noqa: E402
from moe_core.data import eval_windows, load_documents, parse_text_source, sample_sequences  # noqa: E402
from moe_core.evaluate import compare_logits, perplexity  # noqa: E402
from moe_core.export import ExportConfig, export_model  # noqa: E402
from moe_core.methods import convert  # noqa: E402
from moe_core.model_io import DenseModel, load_model  # noqa: E402

VARIANTS = {  # name -> export config
    "exact": ExportConfig(format="exact"),
    "portable_unfitted": ExportConfig(format="portable", fit_router=False),
    "portable_fitted": ExportConfig(format="portable", fit_router=True),
}


def reload(folder: Path, moe: DenseModel, remote: bool) -> DenseModel:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=remote, dtype=torch.float32)
    return DenseModel(model.eval(), moe.tokenizer, moe.adapter, str(folder))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--experts", default="S2A2E8")
    parser.add_argument("--calib", default="builtin:pydoc", help="calibration text (conversion and fitting)")
    parser.add_argument("--n-sequences", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=8, help="WikiText-2 windows of 512 tokens")
    args = parser.parse_args()
    torch.manual_seed(0)

    t0 = time.perf_counter()
    dense = load_model(args.model)
    calib_docs = load_documents(parse_text_source(args.calib), seed=0)
    calib = sample_sequences(calib_docs, dense.tokenizer, args.n_sequences, args.seq_len, 0)
    moe = convert(dense, calib, CMoEConfig(experts=args.experts))
    print(f"converted {args.model} with CMoE {args.experts} in {time.perf_counter() - t0:.0f} s", flush=True)
    windows = eval_windows(load_documents("shared:wikitext2"), dense.tokenizer, 512, args.windows)
    rows = {"dense": {"ppl": perplexity(dense, windows)}, "internal": {"ppl": perplexity(moe, windows)}}
    run = {"model": {"spec": args.model}, "method": "cmoe", "cmoe": {"experts": args.experts}}
    run["data"] = {"text": args.calib, "n_sequences": args.n_sequences, "seq_len": args.seq_len}
    with tempfile.TemporaryDirectory(prefix="export-fidelity-") as work:
        for name, cfg in VARIANTS.items():
            start = time.perf_counter()
            result = export_model(
                moe, Path(work) / name, cfg, calib_ids=calib, calib_text=args.calib, run_config=run
            )
            seconds = time.perf_counter() - start
            loaded = reload(result.folder, moe, cfg.format == "exact")
            scores = compare_logits(moe, loaded, windows)
            rows[name] = {
                "ppl": scores["ppl"],
                "kl": scores["kl"],
                "agreement": scores["agreement"],
                "max_abs_logit_diff": result.fidelity["max_abs_logit_diff"],
                "export_s": seconds,
                "routing": result.routing.get("held_out_kl", {}),
            }
            print(f"{name}: {seconds:.0f} s, {json.dumps(rows[name])}", flush=True)
            del loaded
    print_table(rows, windows.numel())
    print(
        json.dumps(
            {
                "internal_ppl": round(rows["internal"]["ppl"], 3),
                "exact_ppl": round(rows["exact"]["ppl"], 3),
                "portable_ppl_unfitted": round(rows["portable_unfitted"]["ppl"], 3),
                "portable_ppl_fitted": round(rows["portable_fitted"]["ppl"], 3),
            }
        )
    )


def print_table(rows: dict, n_tokens: int) -> None:
    print(f"\nWikiText-2, {n_tokens} tokens; KL and agreement against the internal MoE model")
    print(f"{'model':20s} {'ppl':>9s} {'KL nats':>9s} {'top-1 agr':>9s} {'max|dlogit| (card)':>19s}")
    for name, r in rows.items():
        kl = f"{r['kl']:.4f}" if "kl" in r else "-"
        agr = f"{r['agreement']:.4f}" if "agreement" in r else "-"
        diff = f"{r['max_abs_logit_diff']:.3g}" if "max_abs_logit_diff" in r else "-"
        print(f"{name:20s} {r['ppl']:9.3f} {kl:>9s} {agr:>9s} {diff:>19s}")


if __name__ == "__main__":
    main()
