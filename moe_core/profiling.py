"""Activation profiling: which FFN neurons fire, per layer, on the user's calibration text.

Activation rate follows CMoE (arXiv 2502.04416, App. A.2, eqs. 13-15): for each token the K_a neurons
with the largest |h_i| are marked active, h = act(W_gate x) * (W_up x); the rate of neuron i is the
fraction of tokens that mark it. Also kept: mean |h_i| and a histogram of h per layer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .layerwise import walk_layers
from .plumbing import Cancelled, check_cancel

__all__ = ["ActivationProfile", "Cancelled", "check_cancel", "profile_model"]

HIST_BINS = 101


@torch.no_grad()
def ffn_hidden(adapter, mlp, x: torch.Tensor) -> torch.Tensor:
    """h = act(W_gate x) * (W_up x) in float32. x (T, H) -> (T, I)."""
    w_gate, w_up, _ = adapter.weights(mlp)
    xf = x.float()
    return adapter.act_fn(mlp)(xf @ w_gate.float().T) * (xf @ w_up.float().T)


def atopk_counts(h: torch.Tensor, k_act: int) -> torch.Tensor:
    """CMoE ATopK markers summed over tokens: h (T, I) -> counts (I,)."""
    idx = h.abs().topk(k_act, dim=-1).indices  # (T, K_a)
    return torch.bincount(idx.reshape(-1), minlength=h.shape[1]).float()


@dataclass
class ActivationProfile:
    """Per-layer neuron statistics, (L, I) each: ``rates`` (ATopK on the raw h), ``cosine_rates`` (ATopK on
    cosines, the released CMoE code's), ``mean_abs`` (mean |h_i|) and ``contribution`` (mean |h_i| times
    ||W_down[:, i]||, what magnitude carving ranks by); h_hist_counts (L, B); h_hist_edges (L, B+1).
    :func:`moe_core.design.shared_cutoff` reads the statistic a carving configuration ranks neurons by."""

    rates: torch.Tensor
    mean_abs: torch.Tensor
    h_hist_counts: torch.Tensor
    h_hist_edges: torch.Tensor
    k_act: int
    n_tokens: int
    model_spec: str = ""
    text_spec: str = ""
    cosine_rates: torch.Tensor | None = None  # None in profiles saved before they were measured
    contribution: torch.Tensor | None = None

    @property
    def n_layers(self) -> int:
        return self.rates.shape[0]

    def rate_histogram(self, layer: int, bins: int = 50) -> tuple[np.ndarray, np.ndarray]:
        """Histogram of activation rates of one layer's neurons over [0, max rate]."""
        rates = self.rates[layer].numpy()
        return np.histogram(rates, bins=bins, range=(0.0, max(float(rates.max()), 1e-6)))

    def h_histogram(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        return self.h_hist_counts[layer].numpy(), self.h_hist_edges[layer].numpy()

    def summary(self) -> dict:
        r = self.rates
        return {
            "model": self.model_spec,
            "text": self.text_spec,
            "layers": self.n_layers,
            "neurons_per_layer": r.shape[1],
            "tokens": self.n_tokens,
            "k_act": self.k_act,
            "uniform_rate": self.k_act / r.shape[1],
            "median_rate": float(r.median()),
            "max_rate": float(r.max()),
            "share_of_neurons_above_10x_uniform": float((r > 10 * self.k_act / r.shape[1]).float().mean()),
        }

    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            "rates": self.rates,
            "mean_abs": self.mean_abs,
            "h_hist_counts": self.h_hist_counts,
            "h_hist_edges": self.h_hist_edges,
        }
        tensors |= {
            k: getattr(self, k) for k in ("cosine_rates", "contribution") if getattr(self, k) is not None
        }
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "profile.safetensors"))
        meta = {
            "k_act": self.k_act,
            "n_tokens": self.n_tokens,
            "model_spec": self.model_spec,
            "text_spec": self.text_spec,
            "summary": self.summary(),
        }
        (folder / "profile.json").write_text(json.dumps(meta, indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> ActivationProfile:
        from safetensors.torch import load_file

        folder = Path(folder)
        meta = json.loads((folder / "profile.json").read_text())
        meta.pop("summary", None)
        return cls(**load_file(str(folder / "profile.safetensors")), **meta)


class _LayerStats:
    """Running accumulators for one layer (histogram range fixed from its first micro-batch)."""

    def __init__(self, n_neurons: int, k_act: int):
        self.k_act, self.counts, self.abs_sum = k_act, torch.zeros(n_neurons), torch.zeros(n_neurons)
        self.cosine_counts = torch.zeros(n_neurons)
        self.hist, self.edges, self.tokens = torch.zeros(HIST_BINS), None, 0

    def add_input(self, x: torch.Tensor) -> None:  # the MLP's input x (..., H); self.mlp: (W_gate, W_up, act)
        from .methods.cmoe import atopk_markers

        w_gate, w_up, act = self.mlp
        markers = atopk_markers(x.reshape(-1, x.shape[-1]), w_gate, w_up, act, self.k_act, normalise=True)
        self.cosine_counts += markers.sum(0).cpu()

    def add(self, h: torch.Tensor) -> None:  # h (T, I)
        h = h.reshape(-1, h.shape[-1]).float()
        a = h.abs()
        self.counts += torch.bincount(
            a.topk(self.k_act, dim=-1).indices.reshape(-1), minlength=h.shape[1]
        ).cpu()
        self.abs_sum += a.sum(0).cpu()
        self.tokens += h.shape[0]
        if self.edges is None:  # symmetric range from the first micro-batch's 99.9th |h| percentile
            sample = a.flatten()[:: max(1, a.numel() // 200_000)]
            bound = float(sample.kthvalue(max(1, int(0.999 * sample.numel()))).values) or 1e-6
            self.edges = torch.linspace(-bound, bound, HIST_BINS + 1)
        lo, hi = float(self.edges[0]), float(self.edges[-1])
        self.hist += torch.histc(h.clamp(lo, hi), bins=HIST_BINS, min=lo, max=hi).cpu()


@torch.no_grad()
def profile_model(
    dense,
    input_ids: torch.Tensor,
    *,
    k_act: int = 10,
    batch_size: int = 1,
    text_spec: str = "",
    progress: Callable[[float, str], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    cosine: bool = False,
) -> ActivationProfile:
    """Profile every FFN of a dense model on input_ids (N, T), one decoder layer at a time.

    cosine: also the cosine ATopK rates (what carving with shared_by="rate" ranks by); it recomputes every
    FFN's gate and up projections on normalised inputs, about 1.5x the profiling time, so it is opt-in."""
    n_neurons = dense.adapter.down(dense.mlp(0)).in_features
    if not 1 <= k_act <= n_neurons:
        raise ValueError(f"K_a must be between 1 and the intermediate size ({n_neurons}), got {k_act}.")
    stats = []
    steps = walk_layers(
        dense, input_ids, batch_size=batch_size, progress=progress, cancel=cancel, label="Profiled"
    )
    for step in steps:
        i, acc = step.index, _LayerStats(n_neurons, k_act)
        # The input of the down projection is exactly h = act(gate(x)) * up(x): read it, not recompute it.
        mlp = dense.mlp(i)
        w_gate, w_up, w_down = dense.adapter.weights(mlp)
        hooks = [(dense.adapter.down(mlp), lambda m, args, acc=acc: acc.add(args[0]))]
        if cosine:
            acc.mlp = (w_gate, w_up, dense.adapter.act_fn(mlp))
            hooks.append((mlp, lambda m, args, acc=acc: acc.add_input(args[0])))
        step.run(*hooks)
        acc.down_norms = w_down.float().norm(dim=0).cpu()  # ||W_down[:, i]|| (I,)
        stats.append(acc)
    return ActivationProfile(
        rates=torch.stack([s.counts / s.tokens for s in stats]),
        mean_abs=torch.stack([s.abs_sum / s.tokens for s in stats]),
        cosine_rates=torch.stack([s.cosine_counts / s.tokens for s in stats]) if cosine else None,
        contribution=torch.stack([s.abs_sum / s.tokens * s.down_norms for s in stats]),
        h_hist_counts=torch.stack([s.hist for s in stats]),
        h_hist_edges=torch.stack([s.edges for s in stats]),
        k_act=k_act,
        n_tokens=stats[0].tokens,
        model_spec=dense.spec,
        text_spec=text_spec,
    )
