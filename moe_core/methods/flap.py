"""FLAP: static structured pruning of every FFN, the baseline each MoE conversion has to beat.

Paper: Y. An, X. Zhao, T. Yu, M. Tang, J. Wang, "Fluctuation-based Adaptive Structured Pruning for Large
Language Models", AAAI 2024, arXiv 2312.11983 (code: github.com/CASIA-IVA-Lab/FLAP). Here MLP only, with a
uniform ratio per layer, as every quality benchmark of this project compares against it:

1. On the calibration tokens, each layer's down projection input X (T, I) is summed and squared on the dense
   model (:func:`moe_core.methods.dive.flap_stats`).
2. Each channel j scores var(X_j) * ||W_down[:, j]||^2 (the code's WIFV); the best I - floor(p * I) stay.
3. The removed channels' mean contribution, W_down[:, removed] @ mean(X[:, removed]), becomes a bias of the
   down projection (bias compensation), so the pruned FFN is right on average.

Every token runs the same kept channels: no router, no speed-up beyond the smaller FFN. Each FFN is saved as a
one-expert MoEMLP block (gate 1) so the result saves, reloads, routes, distils and exports like the MoE models;
the routing step then refits the kept down projection by least squares when ``routing.refit`` is on. The
Design tab's layout sets the ratio: FLAP keeps the share of each FFN that the layout runs per token, (S + A) / E.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from ..plumbing import Cancel, Progress, span
from . import Method, Option
from .cmoe import ConversionReport
from .dive import _flap_block, flap_stats


@dataclass(frozen=True)
class FLAPConfig:
    """FLAP static pruning (arXiv 2312.11983): one uniform ratio of FFN channels dropped in every layer."""

    prune_ratio: float = 0.25  # channels each FFN drops (0.25: 75% of the FFN runs, like S3A3E8)
    batch_size: int = 4  # calibration sequences per forward

    def __post_init__(self):
        if not 0 <= self.prune_ratio < 1:
            raise ValueError(
                f"flap.prune_ratio is the share of FFN channels dropped, in [0, 1), got {self.prune_ratio}."
            )
        if self.batch_size < 1:
            raise ValueError(f"flap.batch_size must be >= 1, got {self.batch_size}.")


def convert(
    dense,
    input_ids: torch.Tensor,
    cfg: FLAPConfig | None = None,
    progress: Progress = None,
    cancel: Cancel = None,
    routing=None,
):
    """FLAP-prune a copy of ``dense`` (untouched) on calibration input_ids (N, T); every FFN becomes a
    one-expert MoEMLP of the kept channels with the compensation bias. routing (ReconstructSettings): the
    routing step, run on each block as soon as it is pruned (the refit of its kept down projection), in the
    same walk over the layers, so a model streamed from its shards converts without ever being whole. The
    ``conversion`` report lists the channels kept per layer."""
    from ..layerwise import convert_layers
    from ..model_io import ConvertedModel
    from ..reconstruct import reconstruct_block
    from ..streaming import reread

    cfg, start = cfg or FLAPConfig(), time.perf_counter()
    with reread(dense) as model:  # streamed: read once more
        stats = flap_stats(model, input_ids, cfg.batch_size, cancel, span(progress, 0.0, 0.5))
    moe, routed = ConvertedModel.shell_of(dense), []

    def build(i, x, y):
        block = _flap_block(moe, i, stats, cfg.prune_ratio)
        moe.adapter.set_mlp(moe.model, i, block)  # a streamed layer's dense MLP is freed before the refit
        if routing is not None:
            routed.append(reconstruct_block(block, x, y, routing, layer=i))
        return block, {"layer": i, "kept": block.expert_sizes[0], "width": stats.sum.shape[1]}

    report = ConversionReport("flap", asdict(cfg))
    report.layers = convert_layers(
        moe, input_ids, list(range(moe.n_layers)), build, batch_size=cfg.batch_size,
        progress=span(progress, 0.5, 1.0), cancel=cancel, label="FLAP",
    )  # fmt: skip
    report.routing = routed
    report.seconds = round(time.perf_counter() - start, 2)
    moe.conversion = report
    if progress:
        progress(1.0, f"FLAP: {dense.n_layers} FFNs pruned by {cfg.prune_ratio:.0%}")
    return moe


METHOD = Method(
    name="flap",
    title="FLAP",
    paper="Y. An et al., Fluctuation-based Adaptive Structured Pruning for Large Language Models, "
    "arXiv 2312.11983, AAAI 2024",
    about="FLAP static pruning (arXiv 2312.11983), the baseline the MoE methods have to beat: every token runs "
    "the same channels of each FFN, those whose output varies most, and the dropped channels' mean output is "
    "added back as a bias. No router. It keeps the share of each FFN the Design tab's layout runs per token.",
    config=FLAPConfig,
    convert=convert,
    options=(
        Option("prune_ratio", "--prune-ratio", "channels each FFN drops, in [0, 1)", kind=float, tab=False),
    ),
    from_layout=lambda layout: {"prune_ratio": round(1 - layout.active_share, 6)},
    describe=lambda s: f"{1 - float(s.get('prune_ratio') or 0):.0%} of each FFN kept",
    order=30,
)
