"""Unit tests for vlminterp.plots: read the PNGs back and check what is drawn where."""

import matplotlib
import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from vlminterp import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _read(path) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = mpimg.imread(path)[..., :3]
    assert 150 <= img.shape[0] <= 2000 and 250 <= img.shape[1] <= 2000, img.shape
    return img


def _color_mask(img, rgb, tol=0.02) -> np.ndarray:
    return np.abs(img - np.asarray(rgb)[:3]).max(-1) < tol


def _box(mask):
    ys, xs = np.nonzero(mask)
    return ys.min(), ys.max(), xs.min(), xs.max(), ys.mean(), xs.mean()


def _runs(row: np.ndarray) -> int:
    """Number of maximal True runs in a 1-D boolean array."""
    return int(np.sum(row[1:] & ~row[:-1]) + row[0])


def test_heatmap_hot_cell_lands_in_the_right_place(tmp_path):
    a, b = np.zeros((6, 8)), np.zeros((6, 8))
    a[1, 6] = b[4, 2] = 1.0
    img_a = _read(plots.heatmap(a, tmp_path / "a.png", title="a", xlabel="layer", ylabel="pos"))
    img_b = _read(plots.heatmap(torch.tensor(b), tmp_path / "b.png", title="a", xlabel="layer", ylabel="pos"))
    assert img_a.shape == img_b.shape and img_a.std() > 0.1
    hot = matplotlib.colormaps[plots.SEQUENTIAL_CMAP](1.0)
    # the colorbar's hot end is in both images; what only one image has is its hot cell
    only_a = _color_mask(img_a, hot) & ~_color_mask(img_b, hot)
    only_b = _color_mask(img_b, hot) & ~_color_mask(img_a, hot)
    y0, y1, x0, x1, cy_a, cx_a = _box(only_a)
    cell_h, cell_w = y1 - y0 + 1, x1 - x0 + 1
    assert only_a.sum() >= 0.95 * cell_h * cell_w  # a filled rectangle, not scattered pixels
    *_, cy_b, cx_b = _box(only_b)
    assert only_b.sum() == pytest.approx(only_a.sum(), rel=0.1)
    assert cy_b - cy_a == pytest.approx(3 * cell_h, abs=2)  # row 1 → row 4
    assert cx_b - cx_a == pytest.approx(-4 * cell_w, abs=2)  # col 6 → col 2


def test_heatmap_nan_cell_is_blank(tmp_path):
    full = np.arange(20, dtype=float).reshape(4, 5)
    holed = full.copy()
    holed[2, 3] = np.nan
    img_full = _read(plots.heatmap(full, tmp_path / "full.png"))
    img_holed = _read(plots.heatmap(holed, tmp_path / "holed.png"))
    blank = _color_mask(img_holed, matplotlib.colors.to_rgb(plots.NAN_COLOR), tol=0.01)
    diff = np.abs(img_full - img_holed).max(-1) > 0.02
    y0, y1, x0, x1, *_ = _box(diff)  # only the NaN cell changed (same colour limits: 0..19)
    assert (blank & diff).sum() >= 0.95 * (y1 - y0 + 1) * (x1 - x0 + 1)  # ... and it is now blank
    assert diff.sum() > 2000
    h, w = img_holed.shape[:2]
    assert 0.4 < (y0 + y1) / 2 / h < 0.85 and 0.4 < (x0 + x1) / 2 / w < 0.85  # row 2/4, col 3/5
    all_nan = _read(plots.heatmap(np.full((3, 3), np.nan), tmp_path / "nan.png"))
    assert _color_mask(all_nan, matplotlib.colors.to_rgb(plots.NAN_COLOR), tol=0.01).sum() > 10_000


def test_heatmap_center_zero_is_diverging_and_symmetric(tmp_path):
    m = np.array([[-2.0, 0.0, 1.0]])
    img = _read(plots.heatmap(m, tmp_path / "c.png", center=0, row_labels=["r"], col_labels=["neg", "zero", "pos"],
                              cbar_label="Δ logit"))
    cmap = matplotlib.colormaps[plots.DIVERGING_CMAP]
    # limits are ±max|v| around 0: -2 → 0.0, 0 → 0.5 (neutral), +1 → 0.75 on the colormap
    cells = {v: _color_mask(img, cmap(x), tol=0.01) for v, x in [(-2, 0.0), (0, 0.5), (1, 0.75)]}
    for v, mask in cells.items():
        assert mask.sum() > 3000, v  # a whole cell, not just a colorbar sliver
    assert _box(cells[-2])[5] < _box(cells[0])[5] < _box(cells[1])[5]


def test_heatmap_label_count_is_checked(tmp_path):
    with pytest.raises(ValueError, match="row_labels: expected 2 labels, got 3"):
        plots.heatmap(np.zeros((2, 2)), tmp_path / "x.png", row_labels=["a", "b", "c"])
    assert not (tmp_path / "x.png").exists()


def test_large_heatmap_stays_a_readable_size(tmp_path):
    labels = [f"tok{i}" for i in range(200)]
    img = _read(plots.heatmap(np.random.default_rng(0).normal(size=(200, 200)), tmp_path / "big.png",
                              row_labels=labels, col_labels=labels))
    assert img.std() > 0.1


def test_grid_heatmap_layout_borders_and_overlay(tmp_path):
    rows, cols = 4, 4
    values = np.zeros(rows * cols)
    values[3 * cols + 3] = 1.0  # hot patch at (3, 3)
    plain = _read(plots.grid_heatmap(values, tmp_path / "g.png", grid=(rows, cols), title="attention"))
    low = _color_mask(plain, matplotlib.colormaps[plots.SEQUENTIAL_CMAP](0.0))
    hot = _color_mask(plain, matplotlib.colormaps[plots.SEQUENTIAL_CMAP](1.0))
    left = low[:, : low.shape[1] // 2]  # the colorbar is on the right; patch column 0 is all cold
    gy0, gy1 = np.nonzero(left.any(1))[0][[0, -1]]
    row1 = int(gy0 + 1.5 / rows * (gy1 - gy0))
    # with cell borders drawn, the four cold cells of patch row 1 are four separate runs
    assert _runs(low[row1]) == cols
    gx0, gx1 = np.nonzero(low[row1])[0][[0, -1]]
    hot_in_grid = hot[gy0:gy1 + 1, gx0:gx1 + 1]
    hy, hx = np.nonzero(hot_in_grid)
    assert hy.mean() / (gy1 - gy0) > 0.75 and hx.mean() / (gx1 - gx0) > 0.5  # bottom-right patch

    boxed = _read(plots.grid_heatmap(values, tmp_path / "gb.png", grid=(rows, cols),
                                     overlay_boxes=[(0.0, 0.0, 0.5, 0.5)]))
    red = (boxed[..., 0] > 0.8) & (boxed[..., 1] < 0.25) & (boxed[..., 2] < 0.25)
    plain_red = (plain[..., 0] > 0.8) & (plain[..., 1] < 0.25) & (plain[..., 2] < 0.25)
    assert plain_red.sum() == 0 and red.sum() > 200
    ry0, ry1, rx0, rx1, *_ = _box(red)
    mid_y, mid_x = (gy0 + gy1) / 2, (gx0 + gx1) / 2
    assert ry1 < mid_y + 5 and rx1 < mid_x + 5  # the box covers the top-left quadrant only
    assert ry1 - ry0 > 0.35 * (gy1 - gy0) and rx1 - rx0 > 0.2 * (gx1 - gx0)


def test_grid_heatmap_rejects_wrong_length(tmp_path):
    with pytest.raises(ValueError, match=r"expected 3\*4 = 12 values .* got 10"):
        plots.grid_heatmap(np.zeros(10), tmp_path / "g.png", grid=(3, 4))


def test_line_plot_series_direction_and_band(tmp_path):
    x = np.arange(20)
    series = {"rising": x * 1.0, "flat": np.full(20, 10.0)}
    plain = _read(plots.line_plot(x, series, tmp_path / "l.png", xlabel="layer", ylabel="acc"))
    banded = _read(plots.line_plot(list(x), series, tmp_path / "lb.png", xlabel="layer", ylabel="acc",
                                   bands={"rising": (x - 3.0, x + 3.0)}))
    c0 = _color_mask(plain, matplotlib.colors.to_rgb("C0"), tol=0.05)
    xs = np.flatnonzero(c0.any(0))
    lowest = np.array([np.nonzero(c0[:, x])[0].max() for x in xs])  # the legend sample sits above the line
    assert c0.sum() > 300 and np.mean(np.diff(lowest) <= 0) > 0.95  # rising to the right, ...
    assert lowest[len(lowest) // 4] - lowest[-1] > 150  # ... steeply
    c1 = _color_mask(plain, matplotlib.colors.to_rgb("C1"), tol=0.05)
    ys1, _ = np.nonzero(c1)
    assert c1.sum() > 300 and np.percentile(ys1, 90) - np.percentile(ys1, 10) < 8  # flat
    light_c0 = np.asarray(matplotlib.colors.to_rgb("C0")) * 0.2 + 0.8  # C0 at alpha 0.2 over white
    assert _color_mask(banded, light_c0, tol=0.03).sum() > 20 * _color_mask(plain, light_c0, tol=0.03).sum() + 1000


def test_line_plot_validates_lengths_and_band_names(tmp_path):
    with pytest.raises(ValueError, match=r"series\['b'\]: expected 3 values"):
        plots.line_plot([0, 1, 2], {"a": [1, 2, 3], "b": [1, 2]}, tmp_path / "l.png", xlabel="x", ylabel="y")
    with pytest.raises(ValueError, match=r"bands\['c'\]"):
        plots.line_plot([0, 1], {"a": [1, 2]}, tmp_path / "l.png", xlabel="x", ylabel="y",
                        bands={"c": ([0, 0], [1, 1])})


def _dark(img):
    """Near-black pixels, minus horizontal rules (the axes' top spine, the zero line)."""
    dark = img.max(-1) < 0.15
    dark[dark.mean(1) > 0.3] = False
    return dark


def _bars(img):
    """Pixel columns (start, end) and top y of each C0 bar, and the shared baseline y."""
    c0 = _color_mask(img, matplotlib.colors.to_rgb("C0"), tol=0.03)
    cols = np.concatenate([[False], c0.sum(0) > 5, [False]])
    starts = np.flatnonzero(cols[1:] & ~cols[:-1])
    ends = np.flatnonzero(cols[:-1] & ~cols[1:]) - 1
    tops = np.array([np.nonzero(c0[:, s:e + 1].any(1))[0].min() for s, e in zip(starts, ends)])
    return starts, ends, tops, np.nonzero(c0.any(1))[0].max()


def test_bar_plot_heights_proportional_and_ci_whiskers(tmp_path):
    img = _read(plots.bar_plot(["a", "b", "c"], [1.0, 3.0, 2.0], tmp_path / "b.png", ylabel="accuracy"))
    starts, _, tops, base = _bars(img)
    heights = base - tops
    assert len(starts) == 3
    assert heights[1] / heights[0] == pytest.approx(3.0, rel=0.05)
    assert heights[2] / heights[0] == pytest.approx(2.0, rel=0.05)

    with_ci = _read(plots.bar_plot(["a", "b", "c"], np.array([1.0, 3.0, 2.0]), tmp_path / "ci.png",
                                   errors=([0.5, 2.5, 1.0], [1.5, 3.2, 3.5]), ylabel="accuracy"))
    dark = _dark(with_ci)
    assert dark.sum() > _dark(img).sum() + 100  # whiskers and caps are drawn
    starts, ends, tops, base = _bars(with_ci)
    unit = base - tops[0]  # pixels per 1.0 (bar a has height 1)
    mid_c = (starts[2] + ends[2]) // 2
    top_c = np.nonzero(dark[:, mid_c - 2: mid_c + 3].any(1))[0].min()
    assert (base - top_c) / unit == pytest.approx(3.5, rel=0.05)  # bar c's upper CI bound


def test_bar_plot_nan_value_leaves_an_empty_slot(tmp_path):
    img = _read(plots.bar_plot(["a", "b", "c"], [1.0, float("nan"), 2.0], tmp_path / "n.png",
                               errors=([0.5, float("nan"), 1.5], [1.5, float("nan"), 2.5])))
    starts, ends, _, _ = _bars(img)
    assert len(starts) == 2
    slot = (ends[0] - starts[0] + 1) / 0.8  # bars are 0.8 of a slot wide
    assert starts[1] - starts[0] == pytest.approx(2 * slot, rel=0.05)  # b's slot is kept, empty

    first_nan = _read(plots.bar_plot(["a", "b", "c"], [float("nan"), 1.0, 2.0], tmp_path / "f.png"))
    starts, ends, _, _ = _bars(first_nan)
    black = (first_nan.max(-1) < 0.15).sum(0)
    left_spine = np.flatnonzero(black > 0.5 * black.max())[0]
    slot = (ends[0] - starts[0] + 1) / 0.8
    # xlim starts at -0.6 and bar b spans 0.6..1.4: 1.2 slots from the spine, so a's empty slot is kept
    assert (starts[0] - left_spine) / slot == pytest.approx(1.2, abs=0.1)
