"""Headless figures for recipes: each function writes one PNG atomically and returns its Path.

Figures are built as ``matplotlib.figure.Figure`` on an Agg canvas, never through pyplot, so
nothing depends on (or changes) the global backend and no figure outlives its call.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import SupportsFloat

import matplotlib
import numpy as np
from jaxtyping import Real
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from vlminterp.store import atomic_write

SEQUENTIAL_CMAP = "viridis"
DIVERGING_CMAP = "RdBu_r"
NAN_COLOR = "#d9d9d9"  # NaN cells are left empty: the axes background shows through
DPI = 100

Vector = Real[np.ndarray, "_n"] | Real[Tensor, "_n"] | Sequence[SupportsFloat]
Matrix = Real[np.ndarray, "_rows _cols"] | Real[Tensor, "_rows _cols"] | Sequence[Sequence[SupportsFloat]]


def _array(values: Vector | Matrix, ndim: int, what: str) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().to("cpu").double().numpy()
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != ndim:
        raise ValueError(f"{what}: expected {ndim}-D values, got shape {arr.shape}")
    return arr


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    FigureCanvasAgg(fig)
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight"))
    finally:
        fig.clear()


def _norm(arr: np.ndarray, center: float | int | None) -> tuple[matplotlib.colors.Colormap, Normalize]:
    finite = arr[np.isfinite(arr)]
    if center is not None:
        half = float(np.max(np.abs(finite - center))) if finite.size else 1.0
        half = half or 1.0
        cmap, norm = DIVERGING_CMAP, Normalize(center - half, center + half)
    else:
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        cmap, norm = SEQUENTIAL_CMAP, Normalize(lo, hi if hi > lo else lo + 1.0)
    return matplotlib.colormaps[cmap].with_extremes(bad=(0, 0, 0, 0)), norm


def _label_cells(ax: Axes, axis: str, n: int, labels: Sequence[str] | None, what: str) -> None:
    """Label every cell along ``axis``, or every k-th one when there are too many to read."""
    if labels is None:
        return
    if len(labels) != n:
        raise ValueError(f"{what}: expected {n} labels, got {len(labels)}")
    idx = list(range(0, n, max(1, int(np.ceil(n / 40)))))
    text = [str(labels[i]) for i in idx]
    if axis == "y":
        ax.set_yticks(idx, text)
    else:
        slanted = max(map(len, text), default=0) > 3
        ax.set_xticks(idx, text, rotation=45 if slanted else 0, ha="right" if slanted else "center")


def _size(rows: int, cols: int) -> tuple[float, float]:
    return float(np.clip(2.5 + 0.4 * cols, 4, 16)), float(np.clip(1.5 + 0.4 * rows, 3, 14))


def heatmap(
    matrix: Matrix,
    path: str | os.PathLike,
    *,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    cbar_label: str = "",
    center: float | int | None = None,
    annotate: bool = False,
    counts: Matrix | None = None,
    empty_note: str = "no data",
) -> Path:
    """A 2-D heatmap; NaN cells are blank. ``center=c`` uses a diverging colormap symmetric about c.
    ``counts`` (same shape) writes ``n=K`` in every cell (the values each mean averages);
    when no cell has a value, ``empty_note`` says why across the plot."""
    arr = _array(matrix, 2, "heatmap matrix")
    rows, cols = arr.shape
    ns = None if counts is None else _array(counts, 2, "heatmap counts")
    if ns is not None and ns.shape != arr.shape:
        raise ValueError(f"heatmap counts: expected shape {arr.shape}, got {ns.shape}")
    fig = Figure(figsize=_size(rows, cols))
    ax = fig.add_subplot()
    ax.set_facecolor(NAN_COLOR)
    cmap, norm = _norm(arr, center)
    im = ax.imshow(np.ma.masked_invalid(arr), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax, label=cbar_label)
    _label_cells(ax, "y", rows, row_labels, "row_labels")
    _label_cells(ax, "x", cols, col_labels, "col_labels")
    for (r, c), v in np.ndenumerate(arr):
        parts = [f"{v:.2g}"] if annotate and np.isfinite(v) else []
        if ns is not None:
            parts.append(f"n={0 if not np.isfinite(ns[r, c]) else int(ns[r, c])}")
        if parts:
            light = np.isfinite(v) and (norm(v) < 0.5 if center is None else abs(norm(v) - 0.5) > 0.3)
            ax.text(c, r, "\n".join(parts), ha="center", va="center", fontsize=7,
                    color="white" if light else "black")
    if not np.isfinite(arr).any():
        _note(ax, empty_note)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    return _save(fig, path)


def _note(ax: Axes, text: str) -> None:
    """A boxed message across the middle of the axes (why the plot is empty)."""
    import textwrap

    width = max(20, int(ax.get_position().width * ax.figure.get_figwidth() * 9))
    ax.text(0.5, 0.5, textwrap.fill(text, width), transform=ax.transAxes, ha="center",
            va="center", fontsize=8, bbox={"facecolor": "white", "edgecolor": "0.5", "alpha": 0.9})


def grid_heatmap(
    values: Vector,
    path: str | os.PathLike,
    *,
    grid: tuple[int, int],
    title: str = "",
    overlay_boxes: Sequence[Sequence[SupportsFloat]] | None = None,
    center: float | int | None = None,
    cbar_label: str = "",
) -> Path:
    """Per-patch values (row-major, ``rows*cols`` long) drawn on the patch grid with cell borders.

    ``overlay_boxes`` are ``(x0, y0, x1, y1)`` in fractions of the image width/height, drawn
    as red outlines (e.g. an object's bounding box).
    """
    rows, cols = grid
    arr = _array(values, 1, "grid_heatmap values")
    if arr.size != rows * cols:
        raise ValueError(f"grid_heatmap values: expected {rows}*{cols} = {rows * cols} values for "
                         f"grid {grid}, got {arr.size}")
    arr = arr.reshape(rows, cols)
    side = float(np.clip(0.35 * max(rows, cols), 4, 12))
    fig = Figure(figsize=(side * min(1.0, cols / rows) + 1.2, side * min(1.0, rows / cols)))
    ax = fig.add_subplot()
    ax.set_facecolor(NAN_COLOR)
    cmap, norm = _norm(arr, center)
    im = ax.imshow(np.ma.masked_invalid(arr), cmap=cmap, norm=norm, interpolation="nearest",
                   extent=(0, cols, rows, 0))
    fig.colorbar(im, ax=ax, label=cbar_label)
    ax.set_xticks(np.arange(cols + 1), minor=True)
    ax.set_yticks(np.arange(rows + 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.0 if max(rows, cols) <= 32 else 0.4)
    ax.tick_params(which="minor", length=0)
    ax.set_xticks([c + 0.5 for c in range(0, cols, max(1, cols // 8))], minor=False)
    ax.set_xticklabels([str(c) for c in range(0, cols, max(1, cols // 8))])
    ax.set_yticks([r + 0.5 for r in range(0, rows, max(1, rows // 8))], minor=False)
    ax.set_yticklabels([str(r) for r in range(0, rows, max(1, rows // 8))])
    for i, box in enumerate(overlay_boxes or []):
        if len(box) != 4:
            raise ValueError(f"overlay_boxes[{i}]: expected (x0, y0, x1, y1), got {tuple(box)}")
        x0, y0, x1, y1 = (float(b) for b in box)
        ax.add_patch(Rectangle((x0 * cols, y0 * rows), (x1 - x0) * cols, (y1 - y0) * rows,
                               fill=False, edgecolor="red", linewidth=2.5))
    ax.set(title=title, xlabel="patch column", ylabel="patch row")
    return _save(fig, path)


def line_plot(
    x: Vector,
    series: Mapping[str, Vector],
    path: str | os.PathLike,
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    bands: Mapping[str, tuple[Vector, Vector]] | None = None,
    notes: Mapping[str, str] | None = None,
    empty_note: str = "no data",
) -> Path:
    """One line per series over ``x``; ``bands[name] = (lo, hi)`` shades a CI around that series.
    ``notes[name]`` is added to that series' legend entry (e.g. ``n=12``); a series with no
    finite value is listed as ``name: no data`` (or its note), and an empty plot shows
    ``empty_note``."""
    xs = _array(x, 1, "line_plot x")
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for name in bands or {}:
        if name not in series:
            raise ValueError(f"bands[{name!r}]: no series of that name (series: {list(series)})")
    for name, ys in series.items():
        y = _array(ys, 1, f"series[{name!r}]")
        if y.size != xs.size:
            raise ValueError(f"series[{name!r}]: expected {xs.size} values (len(x)), got {y.size}")
        note = (notes or {}).get(name)
        label = f"{name} ({note})" if note else name
        if not np.isfinite(y).any():
            label = f"{name}: no data" + (f" ({note})" if note else "")
        (line,) = ax.plot(xs, y, marker="o" if xs.size <= 30 else None, markersize=3, label=label)
        if bands and name in bands:
            lo, hi = (_array(b, 1, f"bands[{name!r}]") for b in bands[name])
            if lo.size != xs.size or hi.size != xs.size:
                raise ValueError(f"bands[{name!r}]: expected lo and hi of length {xs.size}, "
                                 f"got {lo.size} and {hi.size}")
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    if not any(np.isfinite(_array(ys, 1, "series")).any() for ys in series.values()):
        _note(ax, empty_note)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(frameon=False)
    return _save(fig, path)


def bar_plot(
    labels: Sequence[str],
    values: Vector,
    path: str | os.PathLike,
    *,
    errors: tuple[Vector, Vector] | None = None,
    ylabel: str = "",
    title: str = "",
    counts: Sequence[int] | None = None,
    notes: Mapping[str, str] | None = None,
    empty_note: str = "no data",
) -> Path:
    """Bars with optional CI whiskers; ``errors = (lo, hi)`` are the interval bounds, not deltas.

    A bound on the wrong side of its value (possible with percentile bootstraps) is drawn as 0.
    ``counts`` adds ``(n=K)`` to each bar's label; a bar without a value reads ``n/a`` or
    ``notes[label]`` (why it is missing); an all-empty plot shows ``empty_note``.
    """
    vals = _array(values, 1, "bar_plot values")
    if len(labels) != vals.size:
        raise ValueError(f"bar_plot labels: expected {vals.size} labels (one per value), got {len(labels)}")
    yerr = None
    if errors is not None:
        lo, hi = (_array(e, 1, "bar_plot errors") for e in errors)
        if lo.size != vals.size or hi.size != vals.size:
            raise ValueError(f"bar_plot errors: expected lo and hi of length {vals.size}, got {lo.size} and {hi.size}")
        yerr = np.clip(np.stack([vals - lo, hi - vals]), 0, None)
    fig = Figure(figsize=(float(np.clip(1.5 + 0.6 * vals.size, 4, 16)), 4.5))
    ax = fig.add_subplot()
    pos = np.arange(vals.size)
    ax.bar(pos, vals, yerr=yerr, capsize=4, color="C0", error_kw={"ecolor": "black", "elinewidth": 1.2})
    ax.set_xlim(-0.6, vals.size - 0.4)  # keep NaN bars' slots (autoscale would drop them)
    if counts is not None and len(counts) != vals.size:
        raise ValueError(f"bar_plot counts: expected {vals.size} counts, got {len(counts)}")
    for i in np.flatnonzero(~np.isfinite(vals)):
        ax.text(i, 0, (notes or {}).get(labels[i], "n/a"), ha="center", va="bottom", color="0.4",
                rotation=90 if (notes or {}).get(labels[i]) else 0, fontsize=8)
    if not np.isfinite(vals).any():
        _note(ax, empty_note)
    long = max(map(len, labels), default=0) > 6 or vals.size > 8
    ticks = [str(s) if counts is None else f"{s} (n={counts[i]})" for i, s in enumerate(labels)]
    ax.set_xticks(pos, ticks, rotation=30 if long else 0, ha="right" if long else "center")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set(title=title, ylabel=ylabel)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def sweep_heatmap(result, path: str | os.PathLike, *, normalised: bool = False,
                  title: str | None = None) -> Path:
    """A `vlminterp.sweep.SweepResult` as a heatmap: one row per site (per site and head with a
    head axis), one column per position group (labelled with its position count). The title
    says what the cells hold, the method, the direction and n (the clean/corrupt pairs per
    cell); blank cells do not exist (k/v heads beyond the kv head count)."""
    values = result.normalised() if normalised else result.values
    rows = list(result.coords["site"])
    if "head" in result.dims:
        heads = result.coords["head"]
        rows = [f"{s} h{h}" for s in rows for h in heads]
        values = np.moveaxis(values, result.dims.index("head"), 1).reshape(len(rows), -1)
    cols = [f"{g} ({result.n_positions.get(g, '?')} pos)" for g in result.coords["positions"]]
    what = ("normalised effect (1 = the source run's metric)" if normalised
            else "effect on the metric (patched - destination)")
    direction = result.meta.get("direction", "")
    n = result.meta.get("pairs", 1)
    empty = "" if np.isfinite(values).any() and np.nanmax(np.abs(values)) > 0 else \
        " — every cell is 0 or missing"
    heading = title or f"{result.method} patching ({direction}): {what}, n = {n} pair per cell{empty}"
    return heatmap(values, path, row_labels=rows, col_labels=cols, title=heading,
                   xlabel="position group", ylabel="site",
                   cbar_label="normalised effect" if normalised else "effect", center=0,
                   annotate=values.size <= 64)
