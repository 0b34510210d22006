"""llama.cpp on a llama.cpp-layout export: GGUF by llama.cpp's own converter, run by llama-cpp-python, logits
compared with transformers on the very same folder.

    python benchmarks/llamacpp_check.py --llama-cpp /path/to/llama.cpp                  # converts + exports first
    python benchmarks/llamacpp_check.py --llama-cpp /path/to/llama.cpp --export outputs/s2a2e8-llamacpp

Needs llama-cpp-python (``pip install llama-cpp-python``: it compiles llama.cpp, minutes; not in
requirements.txt) and a llama.cpp source tree for ``convert_hf_to_gguf.py`` and its ``gguf-py`` (the
llama-cpp-python sdist carries one under ``vendor/llama.cpp``). Without --export: CMoE --experts of the default
model (calibration 8 x 512 tokens of --calib), exported with ``--format llamacpp``.

Windows: --windows x --seq-len tokens of --text (never seen in calibration), each run from an empty cache by
both. Reports KL(transformers || llama.cpp) per predicted token, top-1 agreement, the largest logit gap and the
perplexity of each; prints a table, then a JSON last line {"kl": ..., "top1_agreement": ...,
"ppl_transformers": ..., "ppl_llamacpp": ..., ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
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


def make_export(args, folder: Path) -> Path:
    dense = load_model(DEFAULT_MODEL)
    calib = sample_sequences(load_documents(args.calib), dense.tokenizer, 8, 512, seed=0)
    moe = convert(dense, calib, CMoEConfig(experts=args.experts))
    export_model(moe, folder, ExportConfig(format="llamacpp"), calib_ids=calib)
    return folder


def to_gguf(folder: Path, llama_cpp: Path, out: Path) -> Path:
    """llama.cpp's convert_hf_to_gguf.py at f32 (f16 would underflow the export's 1e-20 shared gate)."""
    script = llama_cpp / "convert_hf_to_gguf.py"
    if not script.exists():
        raise SystemExit(f"No {script}: --llama-cpp must be a llama.cpp source tree.")
    env = os.environ | {"PYTHONPATH": str(llama_cpp / "gguf-py")}
    cmd = [sys.executable, str(script), str(folder), "--outtype", "f32", "--outfile", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"convert_hf_to_gguf.py failed:\n{done.stderr[-3000:]}")
    return out


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(folder: Path, gguf: Path, windows: torch.Tensor) -> dict:
    """Both runtimes on every window: KL, agreement, largest logit gap, perplexities."""
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    seq_len = windows.shape[1]
    llm = Llama(model_path=str(gguf), n_ctx=seq_len, n_batch=seq_len, logits_all=True, verbose=False)
    kl = agree = gap = nll_hf = nll_ll = 0.0
    count = 0
    for ids in windows.tolist():
        with torch.inference_mode():
            hf = (
                model(torch.tensor([ids])).logits[0].double().numpy()[:-1]
            )  # (T - 1, V): predict the next token
        llm.reset()
        llm.eval(ids)
        ll = np.asarray(llm.scores[: len(ids)], dtype=np.float64)[:-1]
        lp_hf, lp_ll = log_softmax(hf), log_softmax(ll)
        target = np.asarray(ids[1:])
        rows = np.arange(len(target))
        kl += float((np.exp(lp_hf) * (lp_hf - lp_ll)).sum())
        agree += float((hf.argmax(-1) == ll.argmax(-1)).sum())
        gap = max(gap, float(np.abs(hf - ll).max()))
        nll_hf -= float(lp_hf[rows, target].sum())
        nll_ll -= float(lp_ll[rows, target].sum())
        count += len(target)
    return {
        "tokens": count,
        "kl": kl / count,
        "top1_agreement": agree / count,
        "max_abs_logit_diff": gap,
        "ppl_transformers": float(np.exp(nll_hf / count)),
        "ppl_llamacpp": float(np.exp(nll_ll / count)),
    }


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--llama-cpp", type=Path, required=True, help="llama.cpp source tree (convert_hf_to_gguf.py)"
    )
    p.add_argument("--export", type=Path, help="a --format llamacpp export folder (default: make one)")
    p.add_argument("--experts", default="S2A2E8", help="CMoE layout when making the export")
    p.add_argument("--calib", default="builtin:pydoc", help="calibration text when making the export")
    p.add_argument(
        "--text", default="auto", help="evaluation text (auto: shared:wikitext2, else builtin:stdlib)"
    )
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="llamacpp-check-") as tmp:
        folder = args.export
        if folder is None:
            log(f"converting {DEFAULT_MODEL} (CMoE {args.experts}) and exporting it for llama.cpp")
            folder = make_export(args, Path(tmp) / "export")
        log("converting the export to GGUF with llama.cpp's convert_hf_to_gguf.py")
        gguf = to_gguf(folder, args.llama_cpp, Path(tmp) / "model-f32.gguf")
        text = args.text
        if text == "auto":
            try:
                docs, text = load_documents("shared:wikitext2"), "shared:wikitext2"
            except (ValueError, OSError):
                docs, text = load_documents("builtin:stdlib"), "builtin:stdlib"
        else:
            docs = load_documents(text)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        windows = eval_windows(docs, tokenizer, args.seq_len, args.windows, source=text)
        log(f"running both on {args.windows} x {args.seq_len} tokens of {text}")
        result = compare(folder, gguf, windows) | {"text": text, "export": str(args.export or "made here")}
    import llama_cpp
    import transformers

    result |= {"llama_cpp_python": llama_cpp.__version__, "transformers": transformers.__version__}
    print("| runtime | perplexity | KL vs transformers | top-1 agreement | max logit gap |")
    print("|---|---|---|---|---|")
    print(f"| transformers (Qwen2-MoE) | {result['ppl_transformers']:.3f} | 0 | 1 | 0 |")
    print(
        f"| llama.cpp {result['llama_cpp_python']} (f32 GGUF) | {result['ppl_llamacpp']:.3f} | {result['kl']:.2e} "
        f"| {result['top1_agreement']:.4f} | {result['max_abs_logit_diff']:.3f} |"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
