"""The plumbing every long step shares: progress and cancel callbacks, and the Cancelled error.

Long loops take ``progress(fraction, message)`` and ``cancel() -> bool`` and never know who listens (the
command line prints, the app moves a progress bar); :func:`check_cancel` raises :class:`Cancelled`.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[float, str], None] | None
Cancel = Callable[[], bool] | None


class Cancelled(Exception):
    """Raised when the caller's cancel() returns True; nothing is written."""


def check_cancel(cancel: Cancel) -> None:
    if cancel is not None and cancel():
        raise Cancelled("Cancelled by the user.")


def report(progress: Progress, fraction: float, message: str) -> None:
    """Call ``progress`` if there is one."""
    if progress is not None:
        progress(fraction, message)


def span(progress: Progress, lo: float, hi: float) -> Progress:
    """A progress callback for one stage, mapped onto [lo, hi] of the whole job."""
    if progress is None:
        return None
    return lambda fraction, message: progress(lo + (hi - lo) * fraction, message)
