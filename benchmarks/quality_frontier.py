"""Quality at equal compute: every recipe at 75%, 50% and 25% of the FFN active, on the default model.

    python benchmarks/quality_frontier.py                              # all budgets, all recipes (hours)
    python benchmarks/quality_frontier.py --budgets 0.5 --recipes cmoe cmoe+router flap oracle
    python benchmarks/quality_frontier.py --budgets 0.5 --distill-minutes 5 --jsonl outputs/frontier.jsonl

Rows per budget (``recipe``):
- ``cmoe``: CMoE as published, training-free, one shape for every layer (S3A3E8 / S2A2E8 / S1A1E8 for 75% /
  50% / 25%; the paper's code variant, K_a = 10), carved on --calib-sequences x --calib-len tokens.
- ``cmoe+router``: the same shape, carved by magnitude (shared neurons and clusters by |h_i| ||W_down,i||),
  each layer's router trained on its oracle expert labels and its down projections refitted by least
  squares (moe_core.reconstruct), layer by layer on what the converted layers before it produce; in the
  analytic form (unit gates; --form native: Qwen2-MoE's, which engines serve), as are the rows built on it.
- ``cmoe+router+native``: the same in the native form whatever --form says: the price of servability.
- ``cmoe+router+budget``: as above with one shape per layer, allocated from measured per-layer sensitivity
  by dynamic programming within the budget (moe_core.budget).
- ``cmoe+router+budget+distill``: then distilled from the dense model for at most --distill-minutes
  (moe_core.distill; the tokens it used are in the row).
- ``ladimo``: LaDiMo with its defaults at the budget's shape; ``dive``: DIVE (six calibration domains,
  4 experts, top-1, each expert keeping the budget's share, default retraining); ``flap``: FLAP static
  pruning of every FFN to the budget (bias compensation, no training).
- ``oracle``: the cmoe+router+budget model routed by its oracle labels (the best k experts per token for
  the dense FFN's output): the bound of any router for those experts.

Scores: perplexity on the first --windows non-overlapping 512-token windows of WikiText-2 test (scoring only,
never calibration or tuning), KL(dense || model) and top-1 agreement on the same tokens, the active FFN share
(routers included), prefill (1 x 256) and batch-1 decode speed vs dense measured in turn
(moe_core.evaluate.measure_speed), minutes to build. Calibration, budget and distillation text:
--calib-text (shared:calib-wikipedia, not WikiText-2), distillation from the head of that text.

Each finished row is appended to --jsonl as it comes; the table, then a JSON last line
{"dense_ppl": ..., "rows": [{"budget": 0.5, "recipe": "...", "ppl": ..., "kl": ..., "prefill_x": ...,
"decode_x": ..., "minutes": ...}, ...]} end the run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a fresh clone without installing

import torch  # noqa: E402

from moe_core.config import CMoEConfig, DistillConfig, DIVEConfig, LaDiMoConfig, RoutingConfig  # noqa: E402
from moe_core.data import eval_windows, load_documents, sample_sequences  # noqa: E402
from moe_core.evaluate import compare_logits, measure_speed, param_report, reference_logits  # noqa: E402
from moe_core.methods import convert  # noqa: E402
from moe_core.model_io import load_model  # noqa: E402

RECIPES = (
    "cmoe",
    "cmoe+router",
    "cmoe+router+native",
    "cmoe+router+budget",
    "cmoe+router+budget+distill",
    "ladimo",
    "dive",
    "flap",
    "oracle",
)
UNIFORM = {0.75: "S3A3E8", 0.5: "S2A2E8", 0.25: "S1A1E8"}  # one shape per budget: (S + A) / E = budget
LADIMO = {0.75: (2, 4), 0.5: (2, 2), 0.25: (1, 1)}  # (n_shared, top_k) of 8 experts


def log(message: str) -> None:
    print(
        f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {message}", file=sys.stderr, flush=True
    )


class Bench:
    """What every row shares: the dense model, its reference logits, calibration tokens, settings."""

    def __init__(self, args):
        self.args = args
        self.dense = load_model(args.model)
        wiki = load_documents("shared:wikitext2")
        self.windows = eval_windows(
            wiki, self.dense.tokenizer, args.seq_len, args.windows, source="shared:wikitext2"
        )
        self.ref = reference_logits(self.dense, self.windows)
        self.dense_ffn = param_report(self.dense, args.seq_len)["ffn_params"]
        docs = load_documents(args.calib_text)
        self.calib = sample_sequences(
            docs, self.dense.tokenizer, args.calib_sequences, args.calib_len, seed=0
        )
        self.held = sample_sequences(docs, self.dense.tokenizer, 4, 256, seed=1)  # budget sensitivity
        self.routing = RoutingConfig(
            router="trained",
            form=args.form,
            refit=True,
            max_tokens=min(self.calib.numel(), args.routing_tokens),
        )
        self.models: dict = {}  # (budget, recipe) -> model, for the recipes that build on another
        self.sensitivity = None  # measured once: it serves every budget (the shapes do not depend on it)
        log(f"dense ppl {self.ref.ppl:.2f} on {len(self.windows)} x {args.seq_len} WikiText-2 test tokens")

    def carve(self, budget: float, **kw) -> CMoEConfig:
        return CMoEConfig(
            experts=UNIFORM[budget], shared_by="magnitude", cluster_on=self.args.cluster_on, **kw
        )


def build_cmoe(b: Bench, budget: float):
    paper = CMoEConfig(experts=UNIFORM[budget], shared_by="rate", cluster_on="markers")  # as published
    return convert(b.dense, b.calib, paper), {}


def build_router(b: Bench, budget: float):
    return convert(b.dense, b.calib, b.carve(budget), routing=b.routing), {}


def build_native(b: Bench, budget: float):
    return convert(b.dense, b.calib, b.carve(budget), routing=replace(b.routing, form="native")), {}


def build_budget(b: Bench, budget: float):
    from moe_core.budget import SENSITIVITY_TOKENS, allocate, allocation_summary, measure_sensitivity

    cfg = b.carve(budget)
    if b.sensitivity is None:
        calib = b.calib[: max(1, SENSITIVITY_TOKENS // b.calib.shape[1])]  # as plan_budget measures it
        b.sensitivity = measure_sensitivity(
            b.dense, calib, b.held, cfg, b.routing.settings(), progress=_every(0.1, "sensitivity"),
            mode=cfg.sensitivity,
        )  # fmt: skip
    sens = b.sensitivity
    shapes = allocate(sens, budget)
    notes = allocation_summary(sens, shapes) | {"sensitivity_minutes": round(sens.seconds / 60, 1)}
    moe = convert(b.dense, b.calib, replace(cfg, layer_experts=tuple(shapes)), routing=b.routing)
    return moe, notes


def build_distill(b: Bench, budget: float):
    import copy

    from moe_core.distill import distill

    base = b.models.get((budget, "cmoe+router+budget"))
    moe = copy.deepcopy(base) if base is not None else build_budget(b, budget)[0]
    cfg = DistillConfig(
        text=b.args.calib_text,
        tokens=b.args.distill_tokens,
        max_minutes=b.args.distill_minutes,
        lr=b.args.distill_lr,
        train=tuple(part.strip() for part in b.args.distill_train.split(",") if part.strip()),
    )
    stats = distill(moe, b.dense, cfg, progress=_every(0.05, "distill"))
    notes = {k: stats[k] for k in ("steps", "tokens", "stopped", "held_out_kl")}
    return moe, notes | {"distill_minutes": round(stats["seconds"] / 60, 1), "train": ",".join(cfg.train)}


def build_ladimo(b: Bench, budget: float):
    n_shared, top_k = LADIMO[budget]
    return convert(b.dense, b.calib, LaDiMoConfig(n_shared=n_shared, top_k=top_k), method="ladimo"), {}


def build_dive(b: Bench, budget: float):
    cfg = DIVEConfig(top_k=1, prune_ratio=1 - budget)
    return convert(b.dense, b.calib, cfg, method="dive"), {"groups": cfg.n_experts}


def build_flap(b: Bench, budget: float):
    from moe_core.methods.flap import FLAPConfig

    # the registered method without its routing step: FLAP as published (no refit)
    return convert(b.dense, b.calib, FLAPConfig(prune_ratio=1 - budget), method="flap"), {}


BUILDERS = {
    "cmoe": build_cmoe,
    "cmoe+router": build_router,
    "cmoe+router+native": build_native,
    "cmoe+router+budget": build_budget,
    "cmoe+router+budget+distill": build_distill,
    "ladimo": build_ladimo,
    "dive": build_dive,
    "flap": build_flap,
}


def _every(step: float, label: str):
    last = [-1.0]

    def progress(fraction: float, message: str) -> None:
        if fraction - last[0] >= step:
            last[0] = fraction
            log(f"{label} {fraction:.0%}: {message}")

    return progress


def score(b: Bench, model, speed: bool) -> dict:
    quality = compare_logits(b.ref, model, b.windows)
    row = {"ppl": quality["ppl"], "kl": quality["kl"], "agreement": quality["agreement"]}
    # against the dense FFN (a pruned model's own share would read 1.0); routers and FLAP's biases included
    row["active_ffn_share"] = param_report(model, b.args.seq_len)["ffn_active_params"] / b.dense_ffn
    if speed:
        s = measure_speed(b.dense, model, seq_len=256, decode_tokens=32, repeats=b.args.speed_repeats)
        row["prefill_x"] = s["tokens_per_s"] / s["ref_tokens_per_s"]
        row["decode_x"] = s["decode_tokens_per_s"] / s["ref_decode_tokens_per_s"]
    return row


def oracle_row(b: Bench, budget: float) -> dict:
    from moe_core.reconstruct import oracle_routing

    of = next((r for r in ("cmoe+router+budget", "cmoe+router") if (budget, r) in b.models), None)
    base = b.models[(budget, of)] if of else build_budget(b, budget)[0]
    of = of or "cmoe+router+budget"
    with oracle_routing(base, b.dense):
        quality = compare_logits(b.ref, base, b.windows)
    return {
        "ppl": quality["ppl"],
        "kl": quality["kl"],
        "agreement": quality["agreement"],
        "of": of,
    }


def run_row(b: Bench, budget: float, recipe: str) -> dict:
    start = time.perf_counter()
    if recipe == "oracle":
        row = oracle_row(b, budget)
    else:
        model, notes = BUILDERS[recipe](b, budget)
        minutes = (time.perf_counter() - start) / 60
        if recipe in ("cmoe+router", "cmoe+router+budget"):
            b.models[(budget, recipe)] = model
        row = score(b, model, speed=not b.args.no_speed) | notes | {"minutes": round(minutes, 1)}
    return {"budget": budget, "recipe": recipe, **row}


def table(dense_ppl: float, rows: list[dict]) -> str:
    cols = [("budget", "{:.2f}"), ("recipe", "{}"), ("ppl", "{:.2f}"), ("kl", "{:.3f}"), ("agreement", "{:.3f}"),
            ("active_ffn_share", "{:.3f}"), ("prefill_x", "{:.2f}"), ("decode_x", "{:.2f}"), ("minutes", "{:.1f}")]  # fmt: skip
    lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines.append(f"| 1.00 | dense | {dense_ppl:.2f} | 0 | 1 | 1.000 | 1.00 | 1.00 | - |")
    for row in rows:
        lines.append("| " + " | ".join(f.format(row[c]) if c in row else "-" for c, f in cols) + " |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:smollm2-135m")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.75, 0.5, 0.25], choices=list(UNIFORM))
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    p.add_argument("--windows", type=int, default=8, help="WikiText-2 test windows scored")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--calib-text", default="shared:calib-wikipedia")
    p.add_argument("--calib-sequences", type=int, default=32)
    p.add_argument(
        "--routing-tokens", type=int, default=RoutingConfig().max_tokens, help="routing step, per layer"
    )
    p.add_argument(
        "--form", choices=["analytic", "native"], default="analytic", help="routing form of the rows"
    )
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument(
        "--cluster-on",
        choices=["magnitude", "tokens"],
        default=CMoEConfig().cluster_on,
        help="the carving of every row but the published CMoE's: tokens (the default) re-cuts top-1 layers' "
        "experts around token groups; magnitude is the partition the README's frontier table was measured with",
    )
    p.add_argument("--distill-minutes", type=float, default=30.0)
    p.add_argument(
        "--distill-tokens",
        type=int,
        default=163_840,
        help="token budget: 160 steps of 4 x 256, about what --distill-minutes 25-30 covers on a 2-core CPU, "
        "so the learning rate's cosine decay runs to its end",
    )
    p.add_argument("--distill-lr", type=float, default=DistillConfig().lr)
    p.add_argument(
        "--distill-train",
        default=",".join(DistillConfig().train),
        help="what distillation trains (moe_core.distill.PARTS, comma-separated); add attention for the "
        "attention layers too",
    )
    p.add_argument("--speed-repeats", type=int, default=3)
    p.add_argument("--no-speed", action="store_true")
    p.add_argument(
        "--jsonl", default="outputs/quality_frontier.jsonl", help="each finished row is appended here"
    )
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    b = Bench(args)
    rows, jsonl = [], Path(args.jsonl)
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    order = [r for r in RECIPES if r in args.recipes]  # oracle after the models it bounds
    for budget in args.budgets:
        for recipe in order:
            log(f"budget {budget:.2f}: {recipe}")
            row = run_row(b, budget, recipe)
            rows.append(row)
            with jsonl.open("a") as f:
                f.write(json.dumps(row, default=str) + "\n")
            log(f"budget {budget:.2f} {recipe}: ppl {row['ppl']:.2f} kl {row['kl']:.3f}")
            gc.collect()
        b.models.clear()
    print(
        f"WikiText-2 test: first {len(b.windows)} non-overlapping windows x {args.seq_len} tokens; calibration "
        f"{args.calib_sequences} x {args.calib_len} tokens of {args.calib_text}"
    )
    print(table(b.ref.ppl, rows))
    print(json.dumps({"dense_ppl": b.ref.ppl, "rows": rows}, default=str))


if __name__ == "__main__":
    main()
