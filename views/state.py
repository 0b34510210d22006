"""Per-browser-session state. It lives in one `gr.State` per session, never in a module global."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moe_core.model_io import DenseModel
    from moe_core.profiling import ActivationProfile


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


@dataclass(frozen=True)
class Session:
    """What one browser session has built so far; handlers return a new one (`dataclasses.replace`)."""

    dense: DenseModel | None = None
    profile: ActivationProfile | None = None
    # Shared by every replaced copy, so that a Cancel click reaches the job that is running now.
    cancel: CancelFlag = field(default_factory=CancelFlag, compare=False, repr=False)
