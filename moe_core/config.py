"""Frozen, validated configuration for every stage, and a root RunConfig that a YAML/JSON file fills.

Every field has a default that runs on a 2-core CPU; invalid values raise ValueError saying how to fix them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class ModelConfig:
    spec: str = "builtin:smollm2-135m"  # builtin:..., a local folder, a .gguf file or a hub id
    device: str = "cpu"
    dtype: str = "auto"  # float32 on CPU (bf16 matmuls are ~1000x slower there), bfloat16 on CUDA
    trust_remote_code: bool = False  # off: never run a repository's code unless the user says so

    def __post_init__(self):
        _check(
            bool(self.spec.strip()), "model.spec is empty: give builtin:smollm2-135m, a folder or a hub id."
        )
        _check(
            self.dtype in ("auto", "float32", "bfloat16", "float16"),
            f"model.dtype '{self.dtype}' is not one of auto, float32, bfloat16, float16.",
        )


@dataclass(frozen=True)
class DataConfig:
    text: str = "builtin:pydoc"  # calibration text source (see moe_core.data.parse_text_source)
    n_sequences: int = 8  # CMoE carves on 8 x 2048 tokens
    seq_len: int = 512  # 2048 in the paper; 512 keeps a CPU run to seconds
    seed: int = 0

    def __post_init__(self):
        _check(
            1 <= self.n_sequences <= 100_000, f"data.n_sequences must be 1..100000, got {self.n_sequences}."
        )
        _check(2 <= self.seq_len <= 131_072, f"data.seq_len must be 2..131072, got {self.seq_len}.")


@dataclass(frozen=True)
class ProfileConfig:
    k_act: int = 10  # CMoE's K_a: neurons marked active per token (paper and code default)
    batch_size: int = 1  # sequences per forward micro-batch

    def __post_init__(self):
        _check(self.k_act >= 1, f"profile.k_act must be >= 1, got {self.k_act}.")
        _check(self.batch_size >= 1, f"profile.batch_size must be >= 1, got {self.batch_size}.")


def from_dict(cls, data: dict | None):
    """Build a (possibly nested) frozen dataclass from a dict, refusing unknown keys by name."""
    data = dict(data or {})
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    _check(not unknown, f"Unknown {cls.__name__} field(s): {', '.join(unknown)}. Known: {', '.join(known)}.")
    kwargs = {}
    for name, value in data.items():
        ftype = known[name].type
        sub = _NESTED.get(ftype if isinstance(ftype, str) else getattr(ftype, "__name__", ""))
        kwargs[name] = from_dict(sub, value) if sub and isinstance(value, dict) else value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"{cls.__name__}: {exc}") from exc


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def load_config_file(path: str | Path) -> dict:
    """Read a YAML or JSON run config into a dict (validation happens in from_dict)."""
    path = Path(path)
    _check(path.is_file(), f"Config file '{path}' does not exist.")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    _check(isinstance(data, dict), f"Config file '{path}' must hold a mapping at the top level.")
    return data


@dataclass(frozen=True)
class ProfileRun:
    """Root config of `python -m moe_core profile`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    out: str = "outputs/profile"


_NESTED = {"ModelConfig": ModelConfig, "DataConfig": DataConfig, "ProfileConfig": ProfileConfig}
