"""Export settings and results, and the constants every export module shares."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

FORMATS = ("portable", "exact", "llamacpp", "gguf")
GGUF_TYPES = ("f16", "q8_0", "f32")  # gguf.QTYPES, named here so that importing export stays light
MODELING_FILE = "modeling_moe_studio.py"
TEMPLATE = Path(__file__).parent.parent / "templates" / MODELING_FILE
# max |logit difference| that counts as identical. Float32 summation order alone moves a 30-layer model's logits
# by about 1e-4: the dense SmolLM2-135M by 5.5e-5 (logits up to |33|) between 1 and 2 threads, and an exact export
# reloaded at another thread count than its internal model by 6.2e-5 to 1.03e-4 (6 conversions). A routing
# decision that differs moves them by far more.
EXACT_TOL = 1e-3
EVAL_TEXT = (
    "The history of the city begins with a small settlement on the river, where traders met to exchange "
    "grain, salt and cloth. Over the centuries the market grew into a town, and the town into a city with "
    "bridges, schools and a library. Today its museums describe how ordinary people lived, worked and "
    "argued about the future of their streets."
)


@dataclass(frozen=True)
class ExportConfig:
    format: Literal["portable", "exact", "llamacpp", "gguf"] = "portable"
    fit_router: bool = True  # approximated layers: fit a linear router on calibration tokens (else naive)
    fit_steps: int = 0  # extra Adam steps on the selection cross-entropy (measured no better: off)
    verify: bool = True  # reload in a clean process and measure; the model card reports it
    zip: bool = False  # also write <out>.zip
    gguf_type: Literal["f16", "q8_0", "f32"] = "f16"  # gguf: matrix type (f16: what llama.cpp users expect)
    # portable / llamacpp: expert and shared widths zero-padded to a multiple of this (exact); 128 suits vLLM's
    # fused MoE kernels (FlashInfer TRTLLM wants per-GPU expert widths in multiples of 128)
    width_align: int = 8

    def __post_init__(self):
        if self.width_align < 8 or self.width_align % 8:
            raise ValueError(f"width_align must be a multiple of 8 (e.g. 128), got {self.width_align}.")
        if self.format not in FORMATS:
            raise ValueError(f"export format must be one of {', '.join(FORMATS)}, got '{self.format}'.")
        if self.gguf_type not in GGUF_TYPES:
            raise ValueError(f"gguf_type must be one of {', '.join(GGUF_TYPES)}, got '{self.gguf_type}'.")
        if not 0 <= self.fit_steps <= 100_000:
            raise ValueError(f"fit_steps must be 0..100000, got {self.fit_steps}.")


@dataclass
class ExportResult:
    """Where the export went, what it is, and how close it is to the internal model."""

    folder: Path
    format: str
    architecture: str
    exact_by_construction: bool
    notes: list[str] = field(default_factory=list)
    fidelity: dict = field(default_factory=dict)
    routing: dict = field(default_factory=dict)
    zip_path: Path | None = None
    gguf: dict = field(default_factory=dict)  # gguf: the file read back (gguf.check_gguf)

    def summary(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("folder", "zip_path")}
        return {**out, "folder": str(self.folder), "zip": str(self.zip_path) if self.zip_path else None}
