"""Per-browser-session state. It lives in one `gr.State` per session, never in a module global."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from moe_core.budget import Sensitivity
    from moe_core.export import ExportResult
    from moe_core.model_io import DenseModel
    from moe_core.profiling import ActivationProfile
    from moe_core.streaming import Source
    from moe_core.sweep import Plan, SweepResult

OUTPUT_ROOT = Path(
    os.environ.get("MOE_STUDIO_OUTPUTS", Path(__file__).resolve().parent.parent / "outputs" / "app")
)


CONVERTED = "converted"  # the session folder a conversion is saved in (and a streamed evaluation reads)
# what reads a streamed model one decoder layer at a time; everything else needs the whole model
STREAMED_STAGES = (
    "Profile, Design's sensitivity measurement, Convert (CMoE, LaDiMo, and DIVE without its retraining; no "
    "distillation), Evaluate (perplexity and agreement) and Export (exact, and the Qwen2-MoE formats where the "
    "routing is native)"
)


class CancelFlag:
    """A thread-safe cancel switch; calling it answers "cancelled?" (the library's `cancel()` contract)."""

    def __init__(self):
        self._event = threading.Event()

    def __call__(self) -> bool:
        return self._event.is_set()

    def set(self) -> None:
        self._event.set()

    def clear(self) -> None:
        self._event.clear()

    def __deepcopy__(self, memo) -> CancelFlag:
        # gr.State deep-copies its initial value for each new session: each gets its own, unset switch.
        return CancelFlag()


class Workspace:
    """This session's own folder under the app's output folder (created on first use, removed with the
    session): converted checkpoints, run configs and exports are written here and served from here only."""

    def __init__(self, root: Path = OUTPUT_ROOT):
        self._root, self._path, self._lock = Path(root), None, threading.Lock()

    def path(self, *parts: str) -> Path:
        with self._lock:
            if self._path is None:
                self._root.mkdir(parents=True, exist_ok=True)
                self._path = Path(tempfile.mkdtemp(prefix="session-", dir=self._root))
        return self._path.joinpath(*parts)

    def cleanup(self) -> None:
        if self._path is not None:
            shutil.rmtree(self._path, ignore_errors=True)

    def __deepcopy__(self, memo) -> Workspace:
        return Workspace(self._root)


@dataclass(frozen=True)
class Session:
    """What one browser session has built so far; handlers return a new one (`dataclasses.replace`)."""

    dense: DenseModel | None = None
    # a model folder larger than the Model tab's max memory, opened for streaming (moe_core.streaming): ``dense``
    # is then its shell (embeddings and final norm read, decoder layers on the meta device), and every stage
    # reads one decoder layer at a time or says that it cannot
    source: Source | None = None
    max_memory: str | None = None
    profile: ActivationProfile | None = None
    sensitivity: Sensitivity | None = None  # per-layer KL of the Design tab's budget mode (dense model's)
    moe: DenseModel | None = None  # the converted model (MoE layers), after Convert or a routing plan
    run_config: dict | None = None  # the ConvertRun (as a dict) that made `moe`, plus an applied plan
    calib_ids: torch.Tensor | None = None  # (N, T) calibration tokens of the conversion
    metrics: dict | None = None  # the conversion's metrics (params, seconds, per-layer report)
    sweep: SweepResult | None = None
    plan: Plan | None = None
    evals: tuple[dict, ...] = ()  # every evaluation of this session, oldest first
    export: ExportResult | None = None
    # Shared by every replaced copy, so that a Cancel click reaches the job that is running now.
    cancel: CancelFlag = field(default_factory=CancelFlag, compare=False, repr=False)
    workspace: Workspace = field(default_factory=Workspace, compare=False, repr=False)


def new_model(
    session: Session, dense, source: Source | None = None, max_memory: str | None = None
) -> Session:
    """A session with a freshly loaded model (or a streamed ``source``, whose shell ``dense`` is): everything
    derived from the previous one is dropped."""
    return Session(
        dense=dense, source=source, max_memory=max_memory, evals=session.evals, cancel=session.cancel,
        workspace=session.workspace,
    )  # fmt: skip


def needs_whole_model(session: Session, what: str) -> None:
    """ValueError when the session's model streams: ``what`` (e.g. "Generation") runs the whole model at once."""
    if session.source is not None:
        raise ValueError(
            f"{what} runs the whole model at once, and {session.dense.spec} is larger than the Model tab's max "
            f"memory ({session.max_memory}), so it streams one decoder layer at a time. {STREAMED_STAGES} "
            "stream; for the rest, raise or clear the max memory and load the model again, on a machine that holds "
            "it."
        )
