"""Profile the default model on 8 x 2048 tokens of WikiText-2 and report the time.

    python benchmarks/profile_speed.py [--model builtin:smollm2-135m] [--text shared:wikitext2]

Prints per-stage seconds, then a JSON last line {"seconds": ..., "tokens_per_s": ...}
(seconds = profiling only: model loading and tokenisation are reported separately).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from moe_core.data import load_documents, parse_text_source, sample_sequences
from moe_core.model_io import load_model
from moe_core.profiling import profile_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--text", default="shared:wikitext2", help="falls back to builtin:pydoc if absent")
    parser.add_argument("--n-sequences", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--k-act", type=int, default=10)
    args = parser.parse_args()

    start = time.perf_counter()
    dense = load_model(args.model)
    load_s = time.perf_counter() - start
    try:
        source = parse_text_source(args.text)
        docs = load_documents(source)
    except ValueError as exc:
        print(f"{args.text} unavailable ({exc}); using builtin:pydoc")
        source = parse_text_source("builtin:pydoc")
        docs = load_documents(source)
    ids = sample_sequences(docs, dense.tokenizer, args.n_sequences, args.seq_len, seed=0)
    start = time.perf_counter()
    profile = profile_model(dense, ids, k_act=args.k_act, text_spec=source.spec)
    seconds = time.perf_counter() - start
    n_tokens = ids.numel()
    print(
        f"model load {load_s:.1f} s | text {source.spec} | {args.n_sequences} x {args.seq_len} tokens "
        f"| threads {torch.get_num_threads()}"
    )
    print(f"profiled {profile.n_layers} layers in {seconds:.1f} s ({n_tokens / seconds:.0f} tokens/s)")
    print(
        json.dumps(
            {
                "seconds": round(seconds, 2),
                "tokens_per_s": round(n_tokens / seconds, 1),
                "tokens": n_tokens,
                "layers": profile.n_layers,
                "text": source.spec,
            }
        )
    )


if __name__ == "__main__":
    main()
