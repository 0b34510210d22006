"""Streaming conversion at scale: a checkpoint larger than the memory it may use, converted one layer at a time.

    python benchmarks/scale.py                       # 5.3 GB bf16 Llama, CMoE under --max-memory 2GB (~30 min)
    python benchmarks/scale.py --layers 4            # the same width, 4 layers: a quick run of every check

1. Writes once (cached under --cache) a random-weight Llama-architecture checkpoint (hidden 2560, FFN 6912, 36
   layers, 20 heads, 4 KV heads, SmolLM2's tokenizer and vocabulary): bf16 safetensors shards of 1 GB, tensor
   by tensor (N(0, 0.02) weights, unit norms), so writing it never needs the model in memory either.
2. Converts it with `python -m moe_core convert --method cmoe --max-memory 2GB` in a child process (CMoE
   S3A3E8 with the default routing step, --calib-sequences x --calib-len tokens of builtin:pydoc) and reports
   the child's peak resident memory as the operating system measured it (getrusage of the children: the whole
   process, Python, torch and the shards' pages included), the wall time and the seconds per layer.
3. Checks a sampled layer: the first --check-layers layers of the same checkpoint, as a model of their own,
   converted in memory (no --max-memory) with the same calibration, must give the streamed conversion's
   tensors of its last layer exactly (a layer's conversion depends only on the layers before it).
4. On the default model (its cached safetensors folder), the streamed and in-memory conversions must give
   identical logits (8 x 512 calibration tokens, the default recipe otherwise).

A table, then a JSON last line {"source_gb": ..., "peak_rss_gb": ..., "seconds": ..., "seconds_per_layer": ...,
"identical": true, ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a fresh clone without installing

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPE = {"hidden_size": 2560, "intermediate_size": 6912, "num_attention_heads": 20, "num_key_value_heads": 4}


def llama_config(layers: int):
    from transformers import LlamaConfig

    from moe_core.model_io import load_model

    tokenizer = load_model("builtin:smollm2-135m").tokenizer
    config = LlamaConfig(
        **SHAPE, num_hidden_layers=layers, vocab_size=len(tokenizer), max_position_embeddings=2048,
        tie_word_embeddings=False, rms_norm_eps=1e-5,
    )  # fmt: skip
    return config, tokenizer


@torch.no_grad()
def write_checkpoint(folder: Path, layers: int, shard_gb: float = 1.0) -> float:
    """The random bf16 checkpoint, tensor by tensor into 1 GB shards (cached: skipped when complete)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from moe_core.streaming import ShardWriter, folder_bytes

    if (folder / "model.safetensors.index.json").is_file():
        return folder_bytes(folder) / 1e9
    config, tokenizer = llama_config(layers)
    with init_empty_weights():
        shell = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(tmp, {"format": "pt"}, shard_bytes=int(shard_gb * 1e9))
    gen = torch.Generator().manual_seed(0)
    for name, p in shell.state_dict().items():
        if "norm" in name:
            value = torch.ones(p.shape, dtype=torch.bfloat16)
        else:
            value = (torch.randn(p.shape, generator=gen) * 0.02).to(torch.bfloat16)
        writer.add({name: value})
    writer.close()
    config.dtype = "bfloat16"
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    return folder_bytes(folder) / 1e9


def convert(folder: Path, out: Path, args, max_memory: str | None) -> dict:
    """`python -m moe_core convert` in a child process: (seconds, peak RSS of the child in GB, metrics)."""
    cmd = [sys.executable, "-m", "moe_core", "convert", "--model", str(folder), "--method", "cmoe"]
    cmd += ["--experts", args.experts, "--text", args.calib_text, "--n-sequences", str(args.calib_sequences)]
    cmd += ["--seq-len", str(args.calib_len), "--no-distill", "--out", str(out)]  # conversion only, as before
    cmd += ["--max-memory", max_memory] if max_memory else []
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KB; the largest child so far
    metrics = json.loads((out / "metrics.json").read_text())
    return {"seconds": seconds, "peak_gb": max(peak, before) * 1024 / 1e9, "metrics": metrics}


def truncated(folder: Path, n: int, dest: Path) -> Path:
    """The first n layers of a checkpoint as a model folder of their own (bf16 shards, same tensors)."""
    from transformers import AutoConfig

    from moe_core.streaming import ShardReader, ShardWriter

    reader = ShardReader(folder)
    config = AutoConfig.from_pretrained(folder)
    config.num_hidden_layers = n
    dest.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(dest, {"format": "pt"})
    for name in reader.files:
        parts = name.split(".")
        if parts[:2] == ["model", "layers"] and int(parts[2]) >= n:
            continue
        writer.add({name: reader.get(name)})
    writer.close()
    config.save_pretrained(dest)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(folder).save_pretrained(dest)
    return dest


def same_layer(a: Path, b: Path, layer: int) -> tuple[bool, int]:
    """Whether two converted folders hold identical tensors for decoder layer ``layer``; how many compared."""
    from moe_core.streaming import ShardReader

    ra, rb = ShardReader(a), ShardReader(b)
    prefix = f"model.layers.{layer}."
    names = sorted(n for n in ra.files if n.startswith(prefix))
    ok = bool(names) and all(n in rb and torch.equal(ra.get(n), rb.get(n)) for n in names)
    return ok, len(names)


@torch.no_grad()
def default_model_identical(work: Path, args) -> tuple[bool, float]:
    """Stream and in-memory conversions of the default model's cached folder: identical logits?"""
    from moe_core.checkpoint import load_converted
    from moe_core.data import eval_windows, load_documents
    from moe_core.model_io import cache_dir, load_model

    folder = cache_dir() / "smollm2-135m-instruct"
    load_model("builtin:smollm2-135m")  # writes the cache on a fresh machine
    runs = {}
    for name, limit in (("memory", None), ("stream", "100MB")):
        runs[name] = convert(folder, work / f"smollm2-{name}", args, limit)
    a, b = load_converted(work / "smollm2-memory"), load_converted(work / "smollm2-stream")
    windows = eval_windows(load_documents("builtin:pydoc"), a.tokenizer, 128, 2, source="builtin:pydoc")
    diff = float((a.model(windows).logits - b.model(windows).logits).abs().max())
    return diff == 0.0 and runs["stream"]["metrics"].get("streamed") is True, diff


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--layers", type=int, default=36, help="decoder layers of the random checkpoint (36: 5.3 GB)"
    )
    p.add_argument("--max-memory", default="2GB")
    p.add_argument("--experts", default="S3A3E8")
    p.add_argument("--calib-text", default="builtin:pydoc")
    p.add_argument("--calib-sequences", type=int, default=8)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--check-layers", type=int, default=2, help="layers of the truncated in-memory check")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "moe-studio" / "scale"))
    p.add_argument(
        "--work", default=None, help="output folder for the converted models (default: a temp dir)"
    )
    p.add_argument("--skip-default", action="store_true", help="skip the default-model check")
    args = p.parse_args()

    source = Path(args.cache) / f"llama-{args.layers}x{SHAPE['hidden_size']}-bf16"
    t = time.perf_counter()
    source_gb = write_checkpoint(source, args.layers)
    print(f"checkpoint {source} {source_gb:.2f} GB ({time.perf_counter() - t:.0f} s)", flush=True)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        run = convert(source, work / "streamed", args, args.max_memory)
        n = args.check_layers
        small = truncated(source, n, work / f"first-{n}")
        convert(small, work / "in-memory", args, None)
        identical_layer, n_tensors = same_layer(work / "streamed", work / "in-memory", n - 1)
        print(f"streamed: {run['seconds']:.0f} s, peak RSS {run['peak_gb']:.2f} GB; layer {n - 1} identical to "
              f"the in-memory conversion: {identical_layer} ({n_tensors} tensors)", flush=True)  # fmt: skip
        identical_default, diff = (None, None) if args.skip_default else default_model_identical(work, args)
    row = {
        "source_gb": round(source_gb, 3),
        "max_memory": args.max_memory,
        "streamed": run["metrics"].get("streamed", False),
        "peak_rss_gb": round(run["peak_gb"], 3),
        "peak_over_source": round(run["peak_gb"] / source_gb, 3),
        "seconds": round(run["seconds"], 1),
        "seconds_per_layer": round(run["seconds"] / args.layers, 2),
        "layers": args.layers,
        "calibration_tokens": args.calib_sequences * args.calib_len,
        "sampled_layer": n - 1,
        "sampled_layer_identical": identical_layer,
        "sampled_tensors": n_tensors,
        "default_model_identical": identical_default,
        "default_model_max_logit_diff": diff,
        "identical": identical_layer and identical_default is not False,
    }
    print("\n| source GB | max memory | peak RSS GB | peak / source | seconds | s / layer | identical |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {row['source_gb']} | {args.max_memory} | {row['peak_rss_gb']} | {row['peak_over_source']} | "
          f"{row['seconds']} | {row['seconds_per_layer']} | {row['identical']} |")  # fmt: skip
    print(json.dumps(row))
    return 0 if row["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
