"""llama.cpp on MoE Studio's own GGUF: llama-cpp-python runs a ``--format gguf`` export's file, transformers runs
the same file (its GGUF reader, de-quantised, with the export's config.json), logits compared on held-out text.

    python benchmarks/gguf_check.py                                  # converts + exports f32, f16, q8_0 first
    python benchmarks/gguf_check.py --export out/gguf-f16 out/gguf-q8_0 --reference out/gguf-f32

Needs llama-cpp-python (``pip install llama-cpp-python``: it compiles llama.cpp, 5-10 minutes; not in
requirements.txt). Without --export: CMoE --experts of the default model (calibration 8 x 512 tokens of
--calib), exported with ``--format gguf`` as f32 (the reference), f16 and q8_0.

Windows: --windows x --seq-len tokens of --text (never seen in calibration), each run from an empty cache. Per
export: KL(transformers || llama.cpp) per predicted token, top-1 agreement, the largest logit gap and both
perplexities, on the same file; with a reference (an f32 GGUF export, or any export folder transformers loads):
KL and top-1 agreement of llama.cpp against it (quantisation and runtime together) and of transformers on the
file against it (the weights' rounding alone). Also whether llama.cpp's
tokenizer, read from the GGUF, splits --text's first documents into the same ids as transformers'. Prints a
table, then a JSON last line {"exports": {folder: {...}}, ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a fresh clone without installing

from moe_core.config import CMoEConfig  # noqa: E402
from moe_core.data import eval_windows, load_documents, sample_sequences  # noqa: E402
from moe_core.export import ExportConfig, export_model  # noqa: E402
from moe_core.methods import convert  # noqa: E402
from moe_core.model_io import DEFAULT_MODEL, load_model  # noqa: E402


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def make_exports(args, root: Path) -> tuple[list[Path], Path]:
    """(f16 and q8_0 exports, the f32 one) of the default model converted with CMoE ``args.experts``."""
    dense = load_model(DEFAULT_MODEL)
    calib = sample_sequences(load_documents(args.calib), dense.tokenizer, 8, 512, seed=0)
    moe = convert(dense, calib, CMoEConfig(experts=args.experts))
    folders = {}
    for qtype in ("f32", "f16", "q8_0"):
        log(f"exporting --format gguf --gguf-type {qtype}")
        cfg = ExportConfig(format="gguf", gguf_type=qtype, verify=False)
        folders[qtype] = export_model(moe, root / f"gguf-{qtype}", cfg, calib_ids=calib).folder
    return [folders["f16"], folders["q8_0"]], folders["f32"]


def gguf_file(folder: Path) -> Path:
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise SystemExit(
            f"{folder} holds no .gguf file: export it with `python -m moe_core export --format gguf`."
        )
    return files[0]


def load_transformers(folder: Path):
    """The export in float32: from its GGUF (with its config.json) when it has one, else its safetensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {}
    if not list(folder.glob("*.safetensors")):
        extra = {"gguf_file": gguf_file(folder).name, "config": AutoConfig.from_pretrained(folder)}
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra).eval()


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@torch.inference_mode()
def hf_logits(model, ids: list[int]) -> np.ndarray:
    """(T - 1, V) float64 logits predicting each next token."""
    return model(torch.tensor([ids])).logits[0].double().numpy()[:-1]


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()  # an empty KV cache: every window from scratch
    llm.eval(ids)
    return np.asarray(llm.scores[: len(ids)], dtype=np.float64)[:-1]


class Pair:
    """Running KL(ref || other), top-1 agreement, largest logit gap and both negative log-likelihoods."""

    def __init__(self):
        self.kl = self.agree = self.gap = self.nll_ref = self.nll_other = 0.0
        self.count = 0

    def add(self, ref: np.ndarray, other: np.ndarray, ids: list[int]) -> None:
        lp_ref, lp_other = log_softmax(ref), log_softmax(other)
        target, rows = np.asarray(ids[1:]), np.arange(len(ids) - 1)
        self.kl += float((np.exp(lp_ref) * (lp_ref - lp_other)).sum())
        self.agree += float((ref.argmax(-1) == other.argmax(-1)).sum())
        self.gap = max(self.gap, float(np.abs(ref - other).max()))
        self.nll_ref -= float(lp_ref[rows, target].sum())
        self.nll_other -= float(lp_other[rows, target].sum())
        self.count += len(target)

    def result(self, ref: str, other: str) -> dict:
        n = max(self.count, 1)
        return {
            "tokens": self.count,
            "kl": self.kl / n,
            "top1_agreement": self.agree / n,
            "max_abs_logit_diff": self.gap,
            f"ppl_{ref}": float(np.exp(self.nll_ref / n)),
            f"ppl_{other}": float(np.exp(self.nll_other / n)),
        }


def tokenizer_match(llm, tokenizer, docs: list[str], n_docs: int = 50) -> float:
    """Share of the first documents that llama.cpp's tokenizer (from the GGUF) splits as transformers' does."""
    docs = [d for d in docs if d.strip()][:n_docs]
    same = sum(
        llm.tokenize(d.encode(), add_bos=False, special=False)
        == tokenizer(d, add_special_tokens=False)["input_ids"]
        for d in docs
    )
    return same / max(len(docs), 1)


def check(folder: Path, windows: torch.Tensor, reference, docs: list[str]) -> dict:
    """llama.cpp vs transformers on the export's GGUF (and vs the reference model, if any), window by window."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    seq_len = windows.shape[1]
    model = load_transformers(folder)
    llm = Llama(
        model_path=str(gguf_file(folder)), n_ctx=seq_len, n_batch=seq_len, logits_all=True,
        n_threads=os.cpu_count(), verbose=False,
    )  # fmt: skip
    same, vs_ref, weights_only = Pair(), Pair(), Pair()
    for ids in windows.tolist():
        ll, hf = llama_logits(llm, ids), hf_logits(model, ids)
        same.add(hf, ll, ids)
        if reference is not None:
            ref = hf_logits(reference, ids)
            vs_ref.add(ref, ll, ids)
            weights_only.add(ref, hf, ids)
    out = same.result("transformers", "llamacpp")
    if reference is not None:
        out["vs_reference"] = vs_ref.result("reference", "llamacpp")
        out["transformers_vs_reference"] = weights_only.result("reference", "transformers")
    out["tokenizer_match"] = tokenizer_match(llm, AutoTokenizer.from_pretrained(folder), docs)
    out["gguf"] = gguf_file(folder).name
    out["gguf_mib"] = round(gguf_file(folder).stat().st_size / 2**20, 1)
    return out


def eval_text(args) -> tuple[list[str], str]:
    if args.text != "auto":
        return load_documents(args.text), args.text
    try:
        return load_documents("shared:wikitext2"), "shared:wikitext2"
    except (ValueError, OSError):
        return load_documents("builtin:stdlib"), "builtin:stdlib"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--export", type=Path, nargs="*", help="--format gguf export folders (default: make them)")
    p.add_argument(
        "--reference", type=Path, help="an export to compare llama.cpp against (e.g. the f32 GGUF)"
    )
    p.add_argument("--experts", default="S2A2E8", help="CMoE layout when making the exports")
    p.add_argument("--calib", default="builtin:pydoc", help="calibration text when making the exports")
    p.add_argument(
        "--text", default="auto", help="evaluation text (auto: shared:wikitext2, else builtin:stdlib)"
    )
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    return p.parse_args()


def print_table(results: dict) -> None:
    print("| export | GGUF | MiB | ppl transformers | ppl llama.cpp | KL | top-1 agreement | max logit gap "
          "| llama.cpp vs reference: KL, top-1 | transformers vs reference: KL, top-1 | tokenizer match |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    nan = float("nan")
    for folder, r in results.items():
        ref, tf = r.get("vs_reference", {}), r.get("transformers_vs_reference", {})
        print(
            f"| {Path(folder).name} | {r['gguf']} | {r['gguf_mib']} | {r['ppl_transformers']:.3f} "
            f"| {r['ppl_llamacpp']:.3f} | {r['kl']:.2e} | {r['top1_agreement']:.4f} | {r['max_abs_logit_diff']:.3f} "
            f"| {ref.get('kl', nan):.2e}, {ref.get('top1_agreement', nan):.4f} "
            f"| {tf.get('kl', nan):.2e}, {tf.get('top1_agreement', nan):.4f} "
            f"| {r['tokenizer_match']:.2f} |"
        )


def main() -> None:
    args = parse_args()
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="gguf-check-") as tmp:
        exports, reference = args.export, args.reference
        if not exports:
            log(f"converting {DEFAULT_MODEL} (CMoE {args.experts}) and exporting it as GGUF")
            exports, reference = make_exports(args, Path(tmp))
        docs, text = eval_text(args)
        tokenizer = AutoTokenizer.from_pretrained(exports[0])
        windows = eval_windows(docs, tokenizer, args.seq_len, args.windows, source=text)
        ref_model = load_transformers(reference) if reference else None
        results = {}
        for folder in exports:
            log(
                f"{folder.name}: llama.cpp and transformers on {args.windows} x {args.seq_len} tokens of {text}"
            )
            results[str(folder)] = check(folder, windows, ref_model, docs)
    import llama_cpp
    import transformers

    print_table(results)
    versions = {"llama_cpp_python": llama_cpp.__version__, "transformers": transformers.__version__}
    print(json.dumps({"exports": results, "reference": str(reference), "text": text, **versions}))


if __name__ == "__main__":
    main()
