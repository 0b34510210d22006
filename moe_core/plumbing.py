"""The plumbing every long step shares: progress and cancel callbacks, the Cancelled error, and model copies
that cost no weight memory.

Long loops take ``progress(fraction, message)`` and ``cancel() -> bool`` and never know who listens (the
command line prints, the app moves a progress bar); :func:`check_cancel` raises :class:`Cancelled`.

A conversion starts from :func:`shell_copy` of the dense model: its own module tree over the dense model's
weight storage, so only the MLPs a method replaces take new memory (a whole-model deepcopy doubled the peak).
The rule that keeps the dense model bit-for-bit unchanged: whatever writes into a converted model's parameters
in place (an optimiser step, a LoRA merge, a refit, a ``copy_``) first calls :func:`unshare` on exactly those
parameters. Replacing a parameter or a module (``set_mlp``, ``.to(dtype)``, ``p.data = ...``) needs nothing:
the copy's Parameter objects are its own, only their storage is shared.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

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


def shell_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters share their storage with the original's: no weight memory.

    Every module object is new (replacing a submodule of the copy leaves the original alone) and every
    Parameter is a new object over the same storage, with its own ``requires_grad`` and ``.grad``; tied
    parameters stay tied. Buffers are copied: they are small, and some are running state written in place by
    forward passes (MoEMLP's load counts and balancing bias), which two models must not share. In-place writes
    into a shared parameter reach the original: call :func:`unshare` on it first.
    """
    import torch

    memo: dict[int, object] = {}
    for p in module.parameters():  # duplicates (tied weights) come once: one new Parameter per storage owner
        with torch.no_grad():
            memo[id(p)] = type(p)(p.detach(), p.requires_grad)
    return copy.deepcopy(module, memo)


def unshare(module: nn.Module, select: Callable[[str, nn.Parameter], bool] | None = None) -> int:
    """Give ``module`` its own copy of each selected parameter (all without ``select``), in place.

    select(name, parameter) sees every name a parameter has (a tied LM head under both of its names); a
    parameter chosen under any name is cloned once and replaced everywhere in ``module``, so ties hold.
    Call it before an in-place write into a model made by :func:`shell_copy` (training, a LoRA merge, a
    refit). A parameter that was not shared is cloned too (its old storage is freed): harmless, and needs no
    bookkeeping of what is shared. Parameter objects change, so build optimisers afterwards. Returns how many
    parameters were cloned.
    """
    import torch

    chosen = {
        id(p): p
        for name, p in module.named_parameters(remove_duplicate=False)
        if select is None or select(name, p)
    }
    fresh: dict[int, nn.Parameter] = {}
    with torch.no_grad():
        for key, p in chosen.items():
            fresh[key] = type(p)(p.detach().clone(), p.requires_grad)
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None and id(p) in fresh:
                    sub._parameters[name] = fresh[id(p)]
    return len(fresh)


def unshare_params(module: nn.Module, params) -> int:
    """:func:`unshare` of the given parameter objects (a list or a dict's values) wherever they sit in ``module``."""
    ids = {id(p) for p in params}
    return unshare(module, lambda _name, p: id(p) in ids)
