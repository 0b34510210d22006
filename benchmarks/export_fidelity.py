"""Export fidelity: every method in both routing forms, every format, reloaded and compared with the model
MoE Studio evaluated; and what servability costs in perplexity.

    python benchmarks/export_fidelity.py                                  # about an hour on 2 CPU cores
    python benchmarks/export_fidelity.py --methods cmoe --formats portable exact --distill-minutes 0

Part 1, fidelity. For each method (CMoE S2A2E8, LaDiMo S2 top-2 of 8, DIVE 4 experts top-1 at half the FFN:
all at 50% of the FFN active) and routing form (``analytic``: the method's own routing; ``native``: the
routing step in Qwen2-MoE's form, moe_core.reconstruct), each export format is written with
moe_core.export.export_model, reloaded with AutoModelForCausalLM (exact needs trust_remote_code), and compared
with the internal model on the first --windows 512-token windows of WikiText-2 test: max |logit difference|,
KL(internal || export), top-1 agreement, perplexity. Calibration: --calib-sequences x 512 tokens of
--calib-text for conversion, routing and router fitting.

Part 2, the cost of servability. CMoE at 50% with the layer-wise routing step (magnitude carving, trained
routers, refit on --quality-sequences x 512 tokens) in the analytic form (unit gates, which only the exact
format serves) and in the native form (which the portable format serves exactly); WikiText-2 perplexity of
both, before and after --distill-minutes of distillation each (0 skips).

Prints two tables, then a JSON last line {"rows": [{"method", "routing", "format", "max_abs_logit_diff",
"kl", "agreement", "ppl"}, ...], "servability": {"analytic": {"ppl", "ppl_distilled"}, "native": {...}}}.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a fresh clone without installing

import torch  # noqa: E402

from moe_core.config import CMoEConfig, DistillConfig, DIVEConfig, LaDiMoConfig, RoutingConfig  # noqa: E402
from moe_core.data import eval_windows, load_documents, sample_sequences  # noqa: E402
from moe_core.evaluate import compare_logits, perplexity  # noqa: E402
from moe_core.export import ExportConfig, export_model  # noqa: E402
from moe_core.methods import convert  # noqa: E402
from moe_core.model_io import DenseModel, load_model  # noqa: E402

METHODS = {
    "cmoe": CMoEConfig(experts="S2A2E8"),
    "ladimo": LaDiMoConfig(n_experts=8, n_shared=2, top_k=2),
    "dive": DIVEConfig(top_k=1, prune_ratio=0.5),
}
FORMATS = ("exact", "portable", "llamacpp")
NATIVE = RoutingConfig(router="trained", form="native", refit=True)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def reload(folder: Path, like: DenseModel, remote: bool) -> DenseModel:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=remote, dtype=torch.float32)
    return DenseModel(model.eval(), like.tokenizer, like.adapter, str(folder))


def fidelity_rows(dense, method: str, form: str, calib, windows, formats, work: Path) -> list[dict]:
    routing = NATIVE if form == "native" else None
    moe = convert(dense, calib, METHODS[method], method=method, routing=routing)
    internal_ppl = perplexity(moe, windows)
    rows = []
    for fmt in formats:
        start = time.perf_counter()
        try:
            result = export_model(
                moe, work / f"{method}-{form}-{fmt}", ExportConfig(format=fmt), calib_ids=calib
            )
        except ValueError as exc:  # a format that cannot hold this model says why
            rows.append({"method": method, "routing": form, "format": fmt, "refused": str(exc)[:200]})
            continue
        loaded = reload(result.folder, moe, fmt == "exact")
        scores = compare_logits(moe, loaded, windows)
        diff = max_logit_diff(moe, loaded, windows[:1])
        rows.append(
            {"method": method, "routing": form, "format": fmt, "max_abs_logit_diff": diff, "kl": scores["kl"],
             "agreement": scores["agreement"], "ppl": scores["ppl"], "ppl_internal": internal_ppl,
             "exact_by_construction": result.exact_by_construction, "seconds": round(time.perf_counter() - start, 1)}
        )  # fmt: skip
        log(f"{method} {form} {fmt}: max |dlogit| {diff:.3g}, KL {scores['kl']:.2e}, ppl {scores['ppl']:.2f}")
        del loaded
        gc.collect()
    return rows


@torch.no_grad()
def max_logit_diff(a: DenseModel, b: DenseModel, ids) -> float:
    return float((a.model(input_ids=ids).logits.float() - b.model(input_ids=ids).logits.float()).abs().max())


def servability(dense, calib, windows, minutes: float, text: str) -> dict:
    """CMoE at 50% with the routing step, analytic vs native, before and after distillation."""
    from moe_core.distill import distill

    cfg = CMoEConfig(experts="S2A2E8", shared_by="magnitude", cluster_on="magnitude")
    out = {}
    for form in ("analytic", "native"):
        routing = RoutingConfig(router="trained", form=form, refit=True, max_tokens=calib.numel())
        moe = convert(dense, calib, cfg, routing=routing)
        out[form] = {"ppl": perplexity(moe, windows)}
        if minutes > 0:
            stats = distill(moe, dense, DistillConfig(text=text, tokens=10**7, max_minutes=minutes))
            out[form] |= {"ppl_distilled": perplexity(moe, windows), "distill_tokens": stats["tokens"]}
        log(f"servability {form}: {out[form]}")
    native, analytic = out["native"], out["analytic"]
    for key in ("ppl", "ppl_distilled"):
        if key in native:
            out[f"native_over_analytic_{key}"] = native[key] / analytic[key]
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:smollm2-135m")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--forms", nargs="+", default=["analytic", "native"], choices=["analytic", "native"])
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    p.add_argument("--calib-text", default="shared:calib-wikipedia")
    p.add_argument("--calib-sequences", type=int, default=8)
    p.add_argument("--quality-sequences", type=int, default=32, help="calibration windows for part 2")
    p.add_argument("--windows", type=int, default=8, help="WikiText-2 test windows of 512 tokens")
    p.add_argument(
        "--distill-minutes", type=float, default=10.0, help="part 2, per form; 0 skips distillation"
    )
    p.add_argument("--no-servability", action="store_true", help="skip part 2")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    dense = load_model(args.model)
    docs = load_documents(args.calib_text)
    calib = sample_sequences(docs, dense.tokenizer, args.calib_sequences, 512, seed=0)
    windows = eval_windows(load_documents("shared:wikitext2"), dense.tokenizer, 512, args.windows)
    rows = []
    with tempfile.TemporaryDirectory(prefix="export-fidelity-") as work:
        for method in args.methods:
            for form in args.forms:
                rows += fidelity_rows(dense, method, form, calib, windows, args.formats, Path(work))
    serv = {}
    if not args.no_servability:
        quality = sample_sequences(docs, dense.tokenizer, args.quality_sequences, 512, seed=0)
        serv = servability(dense, quality, windows, args.distill_minutes, args.calib_text)
    print_tables(rows, serv, windows.numel())
    print(json.dumps({"rows": rows, "servability": serv}, default=str))


def print_tables(rows: list[dict], serv: dict, n_tokens: int) -> None:
    print(f"\nWikiText-2 test, {n_tokens} tokens; KL, agreement and max |dlogit| against the internal model")
    print("| method | routing | format | max abs logit diff | KL | top-1 agreement | ppl (internal) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "refused" in r:
            print(f"| {r['method']} | {r['routing']} | {r['format']} | refused: {r['refused']} | | | |")
            continue
        print(
            f"| {r['method']} | {r['routing']} | {r['format']} | {r['max_abs_logit_diff']:.3g} | {r['kl']:.3g} | "
            f"{r['agreement']:.4f} | {r['ppl']:.2f} ({r['ppl_internal']:.2f}) |"
        )
    if serv:
        print("\nCMoE 50% with the routing step: the analytic form vs the native (servable) form")
        for form in ("analytic", "native"):
            print(f"{form}: {json.dumps(serv[form])}")


if __name__ == "__main__":
    main()
