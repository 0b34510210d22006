"""Dense -> MoE conversion methods: a registry that every other part reads, one module per method.

A method module defines ``METHOD``, a :class:`Method` that says everything about it: its name, title and paper,
its config section (a frozen dataclass), its ``convert`` function, the settings the command line and the
Convert tab expose (:class:`Option`), and how the Design tab's layout maps onto its section. The registry finds
the modules of this package by themselves, so adding a method is adding its module (and its tests): the run
config (``ConvertRun`` gets a section per method), ``python -m moe_core convert``, the Convert tab and the model
card all read :data:`METHODS`.

Every ``convert`` has the signature ``convert(dense, input_ids (N, T), cfg, progress=None, cancel=None,
routing=None)``, runs the routing step (``routing``) inside its own layer loop, each layer routed as soon as it
is built, so that every method converts in one walk over the layers and streams, and returns a new ConvertedModel
(moe_core.model_io; the caller's model is never modified) whose converted layers are MoEMLP blocks and whose
``conversion`` field is the method's report (per-layer sizes, seconds). :func:`convert` seeds the global RNG
from the config's ``seed`` first, so the same config gives the same model in any process or session.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Layout:
    """The Design tab's expert layout, in the terms every method maps from: E experts, S of them shared (a
    share ``shared_ratio`` of E), A routed ones active per token; budget mode adds the active FFN share and,
    once measured, one SxAyEz shape per layer."""

    n_experts: int
    n_shared: int
    active: int
    shared_ratio: float
    budget: float | None = None
    layer_experts: tuple[str, ...] | None = None
    servable: bool = False  # budget mode: one shape in every converted layer (Qwen2-MoE engines serve it)

    @property
    def experts(self) -> str:
        return f"S{self.n_shared}A{self.active}E{self.n_experts}"

    @property
    def active_share(self) -> float:
        """Share of each FFN that runs per token with equal expert widths: (S + A) / E."""
        return (self.n_shared + self.active) / self.n_experts


@dataclass(frozen=True)
class Option:
    """One setting of a method that the command line (a flag) and the Convert tab (an input) expose.

    path: the field in the method's section, dotted when nested ("retrain.stage1_steps"). kind: int, float,
    str, bool, a tuple of choices, "optional" (a number or empty) or "list" (comma-separated text, with
    ``parse`` and ``show`` converting between the text and the config value). tab: False keeps it off the
    Convert tab (the layout fields, which come from the Design tab).
    """

    path: str
    flag: str
    help: str
    label: str = ""
    kind: object = str
    tab: bool = True
    parse: Callable[[str], object] | None = None
    show: Callable[[object], str] | None = None

    def get(self, section):
        """The option's value in a config section (a dataclass, or its dict)."""
        for part in self.path.split("."):
            section = section[part] if isinstance(section, dict) else getattr(section, part)
        return section

    def put(self, tree: dict, value) -> None:
        """Set the option's value in a nested dict of a section."""
        *parents, leaf = self.path.split(".")
        for parent in parents:
            tree = tree.setdefault(parent, {})
        tree[leaf] = value

    def to_text(self, value) -> str:
        """The flag's text for a config value."""
        return self.show(value) if self.show is not None else str(value)

    def from_text(self, text: str):
        """The config value of the flag's text (its type already applied by argparse)."""
        return self.parse(text) if self.parse is not None else text


def _no_layout(layout: Layout) -> dict:
    return {}


@dataclass(frozen=True)
class Method:
    """Everything about one conversion method (see the module docstring)."""

    name: str  # the run config's method value and section name
    title: str
    paper: str  # the full citation (model cards)
    about: str  # one paragraph for the Convert tab
    config: type  # the section's frozen dataclass
    convert: Callable
    options: tuple[Option, ...] = ()
    # the Design tab's Layout -> values of the section (the fields the layout decides)
    from_layout: Callable[[Layout], dict] = _no_layout
    # the section's layout as (E, A, shared ratio), for a loaded run config; None: the Design tab keeps its own
    to_layout: Callable[[object], tuple[int, int, float]] | None = None
    describe: Callable[[dict], str] | None = None  # a saved section (dict) -> the layout in a phrase
    budget: bool = False  # whether the Design tab's budget mode (one shape per layer) applies
    # (section, number of layers) -> the routed experts per token of each layer the section converts, when the
    # method's gates are unit gates (CMoE's); None: not known before converting
    top_ks: Callable[[object, int], list[int]] | None = None
    order: int = 100  # position in menus and lists

    def layout_text(self, section: dict) -> str:
        if self.describe is not None:
            return self.describe(section)
        return section.get("experts") or self.title


def choices(cls, name: str) -> tuple[str, ...]:
    """The values a config field's Literal allows (menus and flags follow the config)."""
    import typing

    return tuple(typing.get_args(typing.get_type_hints(cls)[name]))


def _discover() -> dict[str, Method]:
    found = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        method = getattr(module, "METHOD", None)
        if isinstance(method, Method):
            found.append(method)
    found.sort(key=lambda m: (m.order, m.name))
    return {m.name: m for m in found}


METHODS: dict[str, Method] = _discover()


def lookup(name: str) -> Method:
    """The registered method called ``name`` (ValueError naming the known ones)."""
    if name not in METHODS:
        raise ValueError(f"Unknown conversion method '{name}'. Methods: {', '.join(METHODS)}.")
    return METHODS[name]


def convert(
    dense,
    input_ids: torch.Tensor,
    cfg=None,
    *,
    method: str = "cmoe",
    routing=None,
    progress: Callable[[float, str], None] | None = None,
    cancel: Callable[[], bool] | None = None,
):
    """Run one registered method. cfg: its config section (e.g. CMoEConfig), a ConvertRun (its routing
    section then applies too), or None (defaults). routing: the layer-wise routing step (moe_core.reconstruct),
    which every method runs inside its layer loop."""
    from ..config import ConvertRun

    if isinstance(cfg, ConvertRun):
        method, routing, cfg = cfg.method, routing or cfg.routing, cfg.section()
    entry = lookup(method)
    if cfg is None:
        cfg = entry.config()
    elif not isinstance(cfg, entry.config):
        raise ValueError(f"Method '{method}' needs a {entry.config.__name__}, got {type(cfg).__name__}.")
    # Same config and seed, same model: whatever a method draws from the global RNG (router init, LoRA, noise)
    # comes from the config's seed, and the caller's RNG streams are left where they were.
    settings = routing.settings(getattr(cfg, "seed", 0)) if routing is not None and routing.enabled else None
    with torch.random.fork_rng(devices=[dense.device] if dense.device.type == "cuda" else []):
        torch.manual_seed(getattr(cfg, "seed", 0))
        return entry.convert(dense, input_ids, cfg, progress=progress, cancel=cancel, routing=settings)


def report_from_dict(data: dict | None):
    """The method report a checkpoint's metrics.json holds ("conversion"), rebuilt: DIVE's DIVEReport, the
    other methods' ConversionReport; None when there is none."""
    if not data:
        return None
    from .cmoe import ConversionReport
    from .dive import DIVEReport

    cls = DIVEReport if data.get("method") == "dive" else ConversionReport
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in known})


__all__ = ["METHODS", "Layout", "Method", "Option", "choices", "convert", "lookup", "report_from_dict"]
