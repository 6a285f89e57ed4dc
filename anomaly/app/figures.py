"""Plotly figures, labelled with units: every score is a squared Euclidean feature distance."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import plotly.graph_objects as go

from .render import OVERLAY_COLOURSCALE

SCORE_AXIS = "kNN score: mean squared feature distance to the K nearest normals"
PIXEL_UNIT = "squared feature distance"
_COLOURS = {"normal bank (leave-one-out)": "#8c8c8c", "test: good": "#2b8a3e", "test: defect": "#c92a2a",
            "test batch": "#1c7ed6"}


def wide_spread(groups: Mapping[str, np.ndarray]) -> bool:
    """Whether scores span more than a factor 20 (then a log axis shows both ends)."""
    values = np.concatenate([np.asarray(v, np.float64) for v in groups.values()] + [np.zeros(0)])
    positive = values[values > 0]
    return len(positive) > 1 and positive.max() > 20 * np.median(positive)


def score_histogram(groups: Mapping[str, np.ndarray], tau: float | None, title: str, log: bool = False) -> go.Figure:
    """Overlaid histograms on shared bins, as % of each group, with a vertical line at tau.

    With ``log``, bins are even in log10(score) and the axis is labelled in scores.
    """
    values = [np.asarray(v, np.float64) for v in groups.values() if len(v)]
    top = max([float(v.max()) for v in values] + [tau or 0.0, 1e-9])
    floor = top * 1e-6
    if log:
        positive = [float(v[v > 0].min()) for v in values if (v > 0).any()]
        floor = max(floor, 0.5 * min(positive, default=top))

    def axis(x):
        return np.log10(np.maximum(x, floor)) if log else np.asarray(x, np.float64)

    start, end = (float(axis(floor)), float(axis(top * 1.05))) if log else (0.0, top * 1.05)
    size = (end - start) / 80
    fig = go.Figure()
    for name, scores in groups.items():
        if len(scores):
            fig.add_trace(go.Histogram(
                x=axis(np.asarray(scores, np.float64)), name=f"{name} ({len(scores)})", histnorm="percent",
                opacity=0.6, xbins={"start": start, "end": end + size, "size": size}, marker_color=_COLOURS.get(name),
                hovertemplate="%{y:.1f}% of the group<extra></extra>" if log else
                "score %{x}<br>%{y:.1f}% of the group<extra></extra>",
            ))
    if tau is not None:
        fig.add_vline(x=float(axis(tau)), line_width=2, line_dash="dash", line_color="#e8590c",
                      annotation_text=f"τ = {tau:.4g}", annotation_position="top right")
    if log:
        ticks = [m * 10.0**e for e in range(int(np.floor(start)), int(np.ceil(end)) + 1) for m in (1, 2, 5)]
        ticks = [t for t in ticks if start <= np.log10(t) <= end]
        fig.update_xaxes(tickvals=np.log10(ticks), ticktext=[f"{t:g}" for t in ticks])
    fig.update_layout(barmode="overlay", title=title,
                      xaxis_title=f"{SCORE_AXIS}{' (log scale)' if log else ''}; drag to zoom",
                      yaxis_title="% of images in the group",
                      legend={"orientation": "h", "y": -0.25}, margin={"t": 50, "b": 10}, height=380)
    return fig


def roc_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], aucs: Mapping[str, float | None],
               title: str) -> go.Figure:
    fig = go.Figure()
    for name, (fpr, tpr) in curves.items():
        auc = aucs.get(name)
        label = f"{name} (AUC {auc:.3f})" if auc is not None else name
        fig.add_trace(go.Scatter(x=fpr, y=tpr, mode="lines", name=label))
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance",
                             line={"dash": "dot", "color": "#adb5bd"}))
    fig.update_layout(title=title, xaxis_title="false positive rate", yaxis_title="true positive rate",
                      xaxis_range=[0, 1], yaxis_range=[0, 1.02], height=420, legend={"y": 0.05, "x": 0.45})
    return fig


def heatmap_figure(picture: np.ndarray, anomaly_map: np.ndarray, high: float, title: str) -> go.Figure:
    """The image with the anomaly map over it; hovering shows each pixel's score.

    ``picture`` and ``anomaly_map`` must have the same height and width (shrink both first).
    """
    fig = go.Figure(go.Image(z=picture, hoverinfo="skip"))
    fig.add_trace(go.Heatmap(
        z=anomaly_map, zmin=0.0, zmax=high, colorscale=OVERLAY_COLOURSCALE,
        colorbar={"title": {"text": PIXEL_UNIT, "side": "top"}, "orientation": "h", "thickness": 10, "y": -0.02,
                  "yanchor": "top"},
        hovertemplate="x %{x}, y %{y}<br>score %{z:.4g}<extra></extra>",
    ))
    fig.update_layout(title=title, margin={"l": 0, "r": 0, "t": 36, "b": 0}, height=400,
                      plot_bgcolor="rgba(0,0,0,0)")
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, scaleanchor="x")
    return fig


def sizes_figure(sizes: np.ndarray) -> go.Figure:
    """Width against height of the normal images, one marker per distinct size."""
    pairs, counts = np.unique(np.asarray(sizes).reshape(-1, 2), axis=0, return_counts=True)
    fig = go.Figure(go.Scatter(
        x=pairs[:, 1], y=pairs[:, 0], mode="markers", marker={"size": 8 + 22 * np.sqrt(counts / counts.max())},
        text=[f"{c} image(s)" for c in counts], hovertemplate="%{x} × %{y} px<br>%{text}<extra></extra>",
    ))
    fig.update_layout(title="Image sizes of the normal bank", xaxis_title="width (pixels)",
                      yaxis_title="height (pixels)", height=340)
    return fig
