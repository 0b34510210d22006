"""Plotly figure builders. They take numpy arrays (from the result objects) and return figures: no model
code and no tensor maths here, only the binning a chart needs.
"""

from __future__ import annotations

import numpy as np

TEMPLATE = "plotly_white"
ACCENT = "#4f46e5"  # indigo, the Soft theme's primary hue
MARKER = "#e11d48"  # reference lines (uniform rate)
HEIGHT = 340
COUNT_TICKS = np.array([0, 1, 10, 100, 1000])


def _layout(fig, title: str, x_title: str, y_title: str, height: int = HEIGHT):
    fig.update_layout(
        template=TEMPLATE,
        title={"text": title, "x": 0.01, "font": {"size": 15}},
        xaxis_title=x_title,
        yaxis_title=y_title,
        height=height,
        margin={"l": 60, "r": 20, "t": 50, "b": 50},
        bargap=0.05,
        showlegend=False,
    )
    return fig


def placeholder(message: str):
    """An empty figure that says what to do, so a plot area is never a blank box."""
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, font={"size": 14, "color": "#6b7280"})
    fig.update_layout(template=TEMPLATE, height=HEIGHT, xaxis_visible=False, yaxis_visible=False)
    return fig


SHARED = "#d97706"  # amber: the shared/routed cut-off


def rate_histogram(counts: np.ndarray, edges: np.ndarray, layer: int, uniform_rate: float, cutoff=None):
    """Bars of neuron counts over activation-rate bins: counts (B,), edges (B+1,); log y.

    cutoff: the current design's shared expert (design.shared_cutoff) with ``shared_counts`` (B,), its neurons
    per bin, or None.
    """
    import plotly.graph_objects as go

    centers, widths = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    fig = go.Figure(
        go.Bar(
            x=centers,
            y=counts,
            width=widths,
            marker_color=ACCENT,
            hovertemplate="rate %{x:.4f}<br>%{y} neurons<extra></extra>",
        )
    )
    fig.add_vline(x=uniform_rate, line_dash="dash", line_color=MARKER)
    fig.add_annotation(
        x=uniform_rate,
        y=0.85,
        yref="paper",
        text="uniform rate K_a/I",
        font={"color": MARKER},
        arrowcolor=MARKER,
        ax=60,
        ay=0,
        xanchor="left",
    )
    if cutoff is not None:  # the shared expert's neurons, stacked in amber on the same bins
        fig.data[0].y = counts - cutoff["shared_counts"]
        fig.data[0].name = "routed experts"
        fig.add_bar(
            x=centers,
            y=cutoff["shared_counts"],
            width=widths,
            marker_color=SHARED,
            name=f"shared expert (S={cutoff['n_shared']})",
            hovertemplate="rate %{x:.4f}<br>%{y} shared neurons<extra></extra>",
        )
        fig.update_layout(barmode="stack", showlegend=True)
        fig.add_annotation(
            x=1,
            y=0.65,
            xref="paper",
            yref="paper",
            text=f"shared | routed: {cutoff['shared_size']} neurons in amber are shared, the highest by {cutoff['by']}",
            font={"color": SHARED},
            showarrow=False,
            xanchor="right",
            bgcolor="rgba(255,255,255,0.8)",
        )
    fig.update_yaxes(type="log")
    title = f"Layer {layer}: activation rates of its {int(counts.sum())} FFN neurons"
    return _layout(
        fig, title, "activation rate (share of tokens where the neuron is in the top K_a)", "neurons"
    )


def log_rate_bins(rates_LI: np.ndarray, n_tokens: int, n_bins: int = 30):
    """Count neurons per layer in log-spaced rate bins, plus a first bin for rate 0.

    Rates are multiples of 1/n_tokens, so bin edges sit between whole token counts (no empty stripes).
    rates_LI (L, I) -> counts (L, 1 + n_bins'), x (1 + n_bins',): bin centres in log10(rate), the zero bin
    half a decade left of the first; n_bins' <= n_bins once duplicate edges are merged.
    """
    hits_LI = np.rint(rates_LI * n_tokens)  # tokens on which each neuron was active
    top = max(int(hits_LI.max()), 1)
    bounds = np.unique(np.rint(np.logspace(0, np.log10(top + 1), n_bins + 1)))  # first hit count of each bin
    counts = np.stack([np.histogram(row[row > 0], bins=bounds - 0.5)[0] for row in hits_LI])
    zeros = (hits_LI == 0).sum(axis=1, keepdims=True)
    centers = np.log10(np.sqrt(bounds[:-1] * (bounds[1:] - 1)) / n_tokens)
    return np.concatenate([zeros, counts], axis=1), np.concatenate([[centers[0] - 0.5], centers])


def rate_heatmap(rates_LI: np.ndarray, n_tokens: int, uniform_rate: float):
    """Layers x activation-rate bins, colour = log10(1 + neurons); rates_LI (L, I)."""
    import plotly.graph_objects as go

    counts, x = log_rate_bins(rates_LI, n_tokens)
    ticks = np.arange(np.ceil(x[1]), np.floor(x[-1]) + 1)
    fig = go.Figure(
        go.Heatmap(
            z=np.log10(1 + counts),
            x=x,
            y=np.arange(rates_LI.shape[0]),
            customdata=counts,
            colorscale="Viridis",
            colorbar={
                "title": "neurons",
                "tickvals": np.log10(1 + COUNT_TICKS),
                "ticktext": [str(t) for t in COUNT_TICKS],
            },
            hovertemplate="layer %{y}<br>rate ~ 10^%{x:.2f}<br>%{customdata} neurons<extra></extra>",
        )
    )
    fig.add_vline(x=np.log10(uniform_rate), line_dash="dash", line_color=MARKER)
    fig.update_xaxes(
        tickvals=[x[0], *ticks], ticktext=["0", *[f"{10**t:.3g}" for t in ticks]], showgrid=False
    )
    fig.update_yaxes(autorange="reversed", showgrid=False)
    title = "All layers: how many neurons fire at each rate (dashed: uniform rate K_a/I)"
    return _layout(fig, title, "activation rate (log scale; first column: never active)", "layer", 420)


def h_histogram(counts: np.ndarray, edges: np.ndarray, layer: int):
    """Distribution of FFN hidden values h = act(gate x) * (up x): counts (B,), edges (B+1,); log y."""
    import plotly.graph_objects as go

    centers, widths = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    fig = go.Figure(
        go.Bar(
            x=centers,
            y=counts,
            width=widths,
            marker_color="#0d9488",
            hovertemplate="h %{x:.3f}<br>%{y:.0f} values<extra></extra>",
        )
    )
    fig.update_yaxes(type="log")
    title = f"Layer {layer}: FFN hidden values h = act(gate·x)·(up·x)"
    return _layout(fig, title, "h (clipped to the central 99.9 %)", "count")


DENSE_COLOR = "#9ca3af"  # grey: the dense reference
SERIES_COLORS = (ACCENT, SHARED)  # grouped bars: first and second series


def bars(
    title: str, labels: list[str], values: list[float], y_title: str, dense_first: bool = True, fmt=".3g"
):
    """One bar per run (the first one grey when it is the dense reference), values printed on the bars."""
    import plotly.graph_objects as go

    colors = [DENSE_COLOR if dense_first and i == 0 else ACCENT for i in range(len(labels))]
    fig = go.Figure(
        go.Bar(
            x=labels,
            y=values,
            marker_color=colors,
            text=[f"{v:{fmt}}" for v in values],
            textposition="outside",
            cliponaxis=False,
            hovertemplate="%{x}<br>%{y:.4g}<extra></extra>",
        )
    )
    return _layout(fig, title, "", y_title, 300)


def grouped_bars(title: str, labels: list[str], series: dict[str, list[float]], y_title: str, fmt=".3g"):
    """One group per run, one bar per series (e.g. prefill and decode), values printed on the bars."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for i, (name, values) in enumerate(series.items()):
        fig.add_trace(
            go.Bar(
                name=name,
                x=labels,
                y=values,
                marker_color=SERIES_COLORS[i % len(SERIES_COLORS)],
                text=["n/a" if v is None else f"{v:{fmt}}" for v in values],  # None: not measured
                textposition="outside",
                cliponaxis=False,
                hovertemplate=f"%{{x}}<br>{name} %{{y:.4g}}<extra></extra>",
            )
        )
    _layout(fig, title, "", y_title, 300)
    legend = {"orientation": "h", "y": -0.12, "x": 0.5, "xanchor": "center", "yanchor": "top"}
    fig.update_layout(barmode="group", showlegend=True, legend=legend, margin={"b": 70})
    return fig


def policy_curves(points: list[dict], layer: int, reference: str):
    """One layer's candidates: KL (x, log) vs whole-model prefill throughput ratio (y), labelled by policy."""
    import plotly.graph_objects as go

    fig = go.Figure(
        go.Scatter(
            x=[max(p["kl"], 1e-6) for p in points],
            y=[p["throughput_ratio"] for p in points],
            mode="markers+text+lines",
            text=[p["policy"] for p in points],
            textposition="top center",
            marker={"size": 9, "color": [MARKER if p["policy"] == reference else ACCENT for p in points]},
            line={"color": "#c7d2fe"},
            customdata=[[p["active_saving"], p["agreement"]] for p in points],
            hovertemplate="%{text}<br>KL %{x:.2e} nats/token<br>throughput x%{y:.3f}"
            "<br>active FFN saved %{customdata[0]:.1%}<br>top-1 agreement %{customdata[1]:.3f}<extra></extra>",
        )
    )
    fig.update_xaxes(type="log")
    title = f"Layer {layer}: quality vs speed per routing policy (red: the converted model's own)"
    return _layout(
        fig, title, "KL(dense || candidate), nats per token (log)", "whole-model throughput / dense"
    )


def pareto(cumulative: list[dict], dense_ppl: float, plan_point: dict | None = None):
    """The cumulative curve (k least sensitive layers converted): active FFN saving vs perplexity increase."""
    import plotly.graph_objects as go

    x = [c.get("active_ffn_reduction", 0.0) for c in cumulative]
    y = [c["ppl"] / dense_ppl - 1 for c in cumulative]  # measured perplexity, relative to dense
    fig = go.Figure(
        go.Scatter(
            x=x,
            y=y,
            mode="lines+markers",
            marker={"color": ACCENT},
            text=[f"{len(c.get('layers', []))} layers" for c in cumulative],
            hovertemplate="%{text}<br>active FFN saved %{x:.1%}<br>perplexity %{y:+.2%}<extra></extra>",
            name="layers converted, least sensitive first",
        )
    )
    if plan_point is not None:
        fig.add_trace(
            go.Scatter(
                x=[plan_point["active_ffn_reduction"]],
                y=[plan_point["ppl_increase"]],
                mode="markers",
                marker={"size": 14, "color": MARKER, "symbol": "star"},
                name="picked plan (predicted)",
                hovertemplate="plan<br>active FFN saved %{x:.1%}<br>perplexity %{y:+.2%}<extra></extra>",
            )
        )
    fig.update_xaxes(tickformat=".0%")
    fig.update_yaxes(tickformat="+.1%")
    fig = _layout(
        fig, "Pareto front: saving vs quality", "active FFN parameters saved", "perplexity increase"
    )
    fig.update_layout(showlegend=True, legend={"orientation": "h", "y": -0.25})
    return fig


GROUP = ("#111827", SHARED)  # DIVE's domain groups (one expert each): outlines on Viridis, on RdBu


def affinity_heatmap(affinity: dict):
    """DIVE's domain affinity mining (methods/dive.Affinity.as_dict()): two heatmaps, domains in the
    dendrogram's leaf order, each group of domains (one expert) outlined on the diagonal.

    Left: normalised affinity A (D, D), rows = domain the FFNs were pruned on, columns = domain scored,
    A_ij = min_i' ppl_i'j / ppl_ij (1: the best pruning source for j), raw perplexity on hover.
    Right: Pearson r between rows of A, what the clustering reads (distance 1 - r).
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    order = list(affinity["order"])
    names = [affinity["names"][i] for i in order]
    expert = {name: g for g, members in enumerate(affinity["groups"]) for name in members}
    normalised = np.asarray(affinity["normalised"])[np.ix_(order, order)]
    corr = np.asarray(affinity["correlation"])[np.ix_(order, order)]
    ppl = np.asarray(affinity["ppl"])[np.ix_(order, order)]
    fig = make_subplots(
        1,
        2,
        subplot_titles=("Affinity min ppl / ppl (rows: pruned on, columns: scored on)", "Pearson r of rows"),
        horizontal_spacing=0.16,
    )
    fig.add_trace(
        go.Heatmap(
            z=normalised.tolist(),  # small: plain lists keep the JSON readable
            x=names,
            y=names,
            customdata=[
                [[float(v), f"expert {expert[n]}"] for v in row] for n, row in zip(names, ppl, strict=True)
            ],
            zmin=0,
            zmax=1,
            colorscale="Viridis",
            texttemplate="%{z:.2f}",
            colorbar={"title": "A", "x": 0.42, "len": 0.9},
            hovertemplate="pruned on %{y} (%{customdata[1]})<br>scored on %{x}<br>ppl %{customdata[0]:.2f}"
            "<br>A %{z:.3f}<extra></extra>",
        ),
        1,
        1,
    )
    fig.add_trace(
        go.Heatmap(
            z=corr.tolist(),
            x=names,
            y=names,
            zmin=-1,
            zmax=1,
            colorscale="RdBu",
            texttemplate="%{z:.2f}",
            colorbar={"title": "r", "x": 1.0, "len": 0.9},
            hovertemplate="%{y} vs %{x}<br>r %{z:.3f}<extra></extra>",
        ),
        1,
        2,
    )
    for g, members in enumerate(affinity["groups"]):  # a cut of the tree: contiguous in leaf order
        at = [names.index(m) for m in members]
        lo, hi = min(at) - 0.5, max(at) + 0.5
        for col in (1, 2):
            fig.add_shape(
                type="rect",
                x0=lo,
                x1=hi,
                y0=lo,
                y1=hi,
                line={"color": GROUP[col - 1], "width": 3},
                name=f"expert {g}",
                row=1,
                col=col,
            )
    fig.update_yaxes(autorange="reversed", showgrid=False)
    fig.update_xaxes(showgrid=False, tickangle=-30)
    experts = "; ".join(f"expert {g}: {', '.join(m)}" for g, m in enumerate(affinity["groups"]))
    title = (
        f"DIVE domain affinity, domains in cluster order ({affinity.get('method', 'average')} linkage)"
        f"<br><span style='font-size:12px'>outlined groups, one expert each: {experts}</span>"
    )
    fig = _layout(fig, title, "", "", 400 + 12 * len(names))
    fig.update_layout(margin={"l": 90, "r": 20, "t": 100, "b": 80})
    return fig


def _legend_below(fig, bottom: int = 90):
    legend = {"orientation": "h", "y": -0.3, "x": 0.5, "xanchor": "center", "yanchor": "top"}
    fig.update_layout(showlegend=True, legend=legend, margin={"b": bottom})
    return fig


def sensitivity_heatmap(kl_LC, shapes: list[str], chosen: list[str] | None = None):
    """KL(dense || one layer converted) per token, layers (rows) x candidate shapes (columns, by active share),
    log colour; ``chosen``: the allocation's shape per layer ("dense" allowed), marked with a ring."""
    import plotly.graph_objects as go

    kl = np.asarray(kl_LC, dtype=float)  # (L, C)
    n_layers = kl.shape[0]
    log_kl = np.log10(np.clip(kl, 1e-4, None))
    ticks = np.arange(np.floor(log_kl.min()), np.ceil(log_kl.max()) + 1)
    if len(ticks) == 1:
        ticks = np.append(ticks, ticks[0] + 1)
    fig = go.Figure(
        go.Heatmap(
            z=log_kl.tolist(),
            x=shapes,
            y=list(range(n_layers)),
            customdata=kl.tolist(),
            text=[[f"{v:.2g}" for v in row] for row in kl] if kl.size <= 120 else None,
            texttemplate="%{text}" if kl.size <= 120 else None,
            zmin=float(ticks[0]),
            zmax=float(ticks[-1]),
            colorscale="Viridis",
            colorbar={"title": "KL", "tickvals": ticks, "ticktext": [f"{10**t:g}" for t in ticks]},
            hovertemplate="layer %{y}, %{x}<br>KL %{customdata:.3g} nats/token<extra></extra>",
        )
    )
    for i, shape in enumerate(chosen or []):  # the allocation: each layer's cell outlined ("dense": none)
        if shape in shapes:
            c = shapes.index(shape)
            fig.add_shape(
                type="rect", x0=c - 0.5, x1=c + 0.5, y0=i - 0.5, y1=i + 0.5, line={"color": "white", "width": 3},
                name=f"layer {i}: {shape}",
            )  # fmt: skip
    fig.update_yaxes(autorange="reversed", showgrid=False, dtick=1 if n_layers <= 16 else 5)
    fig.update_xaxes(showgrid=False)
    title = "Sensitivity: KL when one layer alone is converted (outlined: the allocation)"
    return _layout(fig, title, "candidate shape (S shared + A active of E slices)", "layer",
                   max(300, 140 + 16 * n_layers))  # fmt: skip


def allocation_bars(shapes: list[str], shares: list[float], budget: float):
    """The active FFN share of each layer's allocated shape (grey: kept dense), the budget as a dashed line."""
    import plotly.graph_objects as go

    mean = float(np.mean(shares))
    fig = go.Figure(
        go.Bar(
            x=list(range(len(shapes))),
            y=shares,
            marker_color=[DENSE_COLOR if s == "dense" else ACCENT for s in shapes],
            text=shapes if len(shapes) <= 16 else None,
            textposition="outside",
            cliponaxis=False,
            customdata=shapes,
            hovertemplate="layer %{x}: %{customdata}<br>active share %{y:.1%}<extra></extra>",
        )
    )
    fig.add_hline(y=budget, line_dash="dash", line_color=MARKER)
    fig.add_annotation(
        x=1, xref="paper", y=budget, text=f"budget {budget:.0%}", showarrow=False, xanchor="right",
        yanchor="bottom", font={"color": MARKER}, bgcolor="rgba(255,255,255,0.8)",
    )  # fmt: skip
    fig.update_yaxes(tickformat=".0%", range=[0, 1.08])
    fig.update_xaxes(dtick=1 if len(shapes) <= 16 else 5)
    title = f"Allocation: active share per layer, mean {mean:.1%} (grey: kept dense)"
    return _layout(fig, title, "layer", "active FFN share", 300)


def loss_curve(steps: list[int], losses: list[float], held_steps: list[int], held_kl: list[float]):
    """Distillation: training KL per step (line) and held-out KL (points), both nats per token."""
    import plotly.graph_objects as go

    fig = go.Figure(
        go.Scatter(
            x=steps, y=losses, mode="lines", line={"color": ACCENT}, name="training KL (per step)",
            hovertemplate="step %{x}<br>KL %{y:.4f}<extra></extra>",
        )
    )  # fmt: skip
    fig.add_trace(
        go.Scatter(
            x=held_steps, y=held_kl, mode="lines+markers", line={"color": MARKER, "dash": "dot"},
            marker={"size": 8}, name="held-out KL", hovertemplate="step %{x}<br>held-out KL %{y:.4f}<extra></extra>",
        )
    )  # fmt: skip
    fig.update_yaxes(rangemode="tozero")
    fig.update_xaxes(dtick=1 if max(steps or [0]) <= 16 else None, rangemode="tozero")
    fig = _layout(fig, "Distillation: KL(dense || MoE), nats per token", "step", "KL", 320)
    return _legend_below(fig)


def routing_errors(layers: list[int], before: list[float], after: list[float], oracle: list[float]):
    """The routing step per layer: held-out relative error ||out - y||² / ||y||² before and after it, and
    the oracle bound (each token sent to its best experts)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    series = (("before", before, DENSE_COLOR, "solid"), ("after", after, ACCENT, "solid"),
              ("oracle bound", oracle, SHARED, "dash"))  # fmt: skip
    for name, values, color, dash in series:
        fig.add_trace(
            go.Scatter(
                x=layers, y=values, mode="lines+markers", name=name, line={"color": color, "dash": dash},
                hovertemplate=f"layer %{{x}}<br>{name} %{{y:.4f}}<extra></extra>",
            )
        )  # fmt: skip
    fig.update_yaxes(rangemode="tozero")
    fig.update_xaxes(dtick=1 if len(layers) <= 16 else 5)
    fig = _layout(fig, "Routing step: held-out relative error per layer", "layer", "relative error", 300)
    return _legend_below(fig)
