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


def rate_histogram(counts: np.ndarray, edges: np.ndarray, layer: int, uniform_rate: float):
    """Bars of neuron counts over activation-rate bins: counts (B,), edges (B+1,); log y."""
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
