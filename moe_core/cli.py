"""Command line: `python -m moe_core <command>`; every command is one library call from a config.

Flags override the config file (YAML or JSON); the effective config is written next to the outputs,
so any run can be repeated exactly. Errors print one line and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .config import DataConfig, ModelConfig, ProfileRun, from_dict, load_config_file, to_dict


def _progress(fraction: float, message: str) -> None:
    print(f"[{fraction:6.1%}] {message}", file=sys.stderr, flush=True)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML or JSON run config; flags below override it")
    p.add_argument("--model", help="builtin:smollm2-135m, builtin:tiny-llama, a folder, a .gguf or a hub id")
    p.add_argument("--device", help="cpu or cuda")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        default=None,
        help="allow a model repository's own Python code to run (off by default)",
    )
    p.add_argument(
        "--text", help="calibration text: builtin:pydoc, builtin:stdlib, shared:wikitext2, a file ..."
    )
    p.add_argument("--n-sequences", type=int, help="number of calibration sequences")
    p.add_argument("--seq-len", type=int, help="tokens per calibration sequence")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="output folder")


def _overrides(args) -> dict:
    """Map flags onto the nested config dict (only flags the user gave)."""
    pairs = {
        ("model", "spec"): args.model,
        ("model", "device"): args.device,
        ("model", "trust_remote_code"): args.trust_remote_code,
        ("data", "text"): args.text,
        ("data", "n_sequences"): args.n_sequences,
        ("data", "seq_len"): args.seq_len,
        ("data", "seed"): args.seed,
        ("out",): args.out,
    }
    tree: dict = {}
    for path, value in pairs.items():
        if value is None:
            continue
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def _run_config(cls, args, extra: dict | None = None):
    base = load_config_file(args.config) if args.config else {}
    return from_dict(cls, _merge(_merge(base, _overrides(args)), extra or {}))


def load_calibration(model_cfg: ModelConfig, data_cfg: DataConfig, progress=_progress):
    """Load the model and sample calibration sequences: (DenseModel, input_ids (N, T))."""
    from .data import load_documents, parse_text_source, sample_sequences
    from .model_io import load_model

    dense = load_model(
        model_cfg.spec,
        device=model_cfg.device,
        dtype=model_cfg.dtype,
        trust_remote_code=model_cfg.trust_remote_code,
        progress=progress,
    )
    docs = load_documents(parse_text_source(data_cfg.text), model=dense, seed=data_cfg.seed)
    ids = sample_sequences(docs, dense.tokenizer, data_cfg.n_sequences, data_cfg.seq_len, data_cfg.seed)
    return dense, ids


def cmd_prepare(args) -> int:
    """Install-time step: de-quantise and cache the default model so the app starts fast."""
    from .model_io import load_model

    start = time.perf_counter()
    dense = load_model(args.model or "builtin:smollm2-135m", progress=_progress)
    print(
        json.dumps(
            {
                "model": dense.spec,
                "seconds": round(time.perf_counter() - start, 1),
                **dense.summary().as_dict(),
            }
        )
    )
    return 0


def cmd_profile(args) -> int:
    from .profiling import profile_model

    cfg = _run_config(ProfileRun, args, {"profile": {"k_act": args.k_act}} if args.k_act else None)
    dense, ids = load_calibration(cfg.model, cfg.data)
    start = time.perf_counter()
    profile = profile_model(
        dense,
        ids,
        k_act=cfg.profile.k_act,
        batch_size=cfg.profile.batch_size,
        text_spec=cfg.data.text,
        progress=_progress,
    )
    seconds = time.perf_counter() - start
    out = profile.save(cfg.out)
    (out / "run_config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    summary = {**profile.summary(), "seconds": round(seconds, 2), "out": str(out)}
    for i in range(profile.n_layers):
        rates = profile.rates[i]
        print(f"layer {i:3d}  max rate {float(rates.max()):.3f}  median {float(rates.median()):.4f}")
    print(json.dumps(summary))
    return 0


COMMANDS = {
    "prepare": (cmd_prepare, "cache the default model (de-quantise the GGUF once)", None),
    "profile": (
        cmd_profile,
        "per-layer neuron activation rates and hidden-state histograms",
        lambda p: p.add_argument("--k-act", type=int, help="CMoE K_a: neurons active per token"),
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m moe_core", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text, extra) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        _common(p)
        if extra:
            extra(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][0](args)
    except KeyboardInterrupt:
        print("\nInterrupted; nothing was written.", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:  # library errors carry the what and the how-to-fix
        print(f"error: {exc}", file=sys.stderr)
        return 2
