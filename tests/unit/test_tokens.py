"""TokenSlice parsing and TokenLayout index arithmetic (pure functions, hypothesis)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy.ndimage import binary_dilation

from vlminterp.models.clip import crop_geometry
from vlminterp.tokens import ImageGeometry, TokenSlice, VideoSpan

specs = st.one_of(
    st.sampled_from(["all", "text", "visual", "last"]),
    st.tuples(st.integers(0, 50), st.integers(1, 50)).filter(lambda t: t[0] < t[1]).map(
        lambda t: f"visual_frames:{t[0]}:{t[1]}"),
    st.lists(st.integers(0, 999), min_size=1, max_size=6).map(
        lambda p: "positions:" + ",".join(map(str, p))),
)


@given(specs)
def test_slice_round_trips(spec):
    assert str(TokenSlice.parse(spec)) == spec


@pytest.mark.parametrize("bad", ["", "visual_frames:3:3", "visual_frames:4:2", "frames:0:2",
                                 "positions:", "positions:1,,2", "visual_frames:a:b", "VISUAL"])
def test_bad_slice_quotes_spec(bad):
    with pytest.raises(ValueError) as e:
        TokenSlice.parse(bad)
    assert repr(bad) in str(e.value) and "allowed" in str(e.value)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 33), st.sampled_from([1, 2, 4]), st.integers(1, 9), st.integers(0, 20),
       st.data())
def test_frame_spans_partition_visual_positions(num_frames, tpatch, per_group, offset, data):
    groups_n = -(-num_frames // tpatch)
    positions = torch.arange(offset, offset + groups_n * per_group)
    video = VideoSpan.uniform(list(positions.split(per_group)), num_frames, tpatch)
    # Spans cut at group boundaries partition the positions, in order, without overlap.
    cuts = sorted(set(data.draw(st.lists(st.integers(1, groups_n - 1), max_size=4))
                      if groups_n > 1 else []))
    bounds = [0] + [c * tpatch for c in cuts] + [num_frames]
    parts = [video.frame_span(a, b) for a, b in zip(bounds, bounds[1:])]
    assert torch.equal(torch.cat([p.positions for p in parts]), positions)
    assert all(p.exact for p in parts)
    # Any span selects exactly the groups holding its frames and says what it covers.
    a = data.draw(st.integers(0, num_frames - 1))
    b = data.draw(st.integers(a + 1, num_frames))
    span = video.frame_span(a, b)
    want = sorted({f // tpatch for f in range(a, b)})
    assert list(span.groups) == want
    assert span.frames[0] <= a and span.frames[1] >= b
    assert span.exact == (span.frames == (a, b))
    assert torch.equal(span.positions, torch.cat([video.groups[g].positions for g in want]))


def test_frame_span_beyond_video_names_value():
    video = VideoSpan.uniform([torch.arange(4), torch.arange(4, 8)], 4, 2)
    with pytest.raises(ValueError, match=r"visual_frames:2:9 is beyond the video's 4 frames"):
        video.frame_span(2, 9)


def _brute_cells(geo: ImageGeometry, box, buffer):
    """Rasterise the box onto resized-image pixels, crop, and list grid cells it touches."""
    rw, rh = geo.resized
    sx, sy = rw / geo.original[0], rh / geo.original[1]
    x0, y0, x1, y1 = box
    xs = np.arange(rw)
    ys = np.arange(rh)
    colmask = (xs < x1 * sx) & (xs + 1 > x0 * sx)
    rowmask = (ys < y1 * sy) & (ys + 1 > y0 * sy)
    pix = rowmask[:, None] & colmask[None, :]
    l, t, r, b = geo.crop_box
    pix = pix[t:b, l:r]
    rows, cols = geo.grid
    cells = pix[: rows * geo.cell, : cols * geo.cell].reshape(rows, geo.cell, cols, geo.cell)
    hit = cells.any(axis=(1, 3))
    if buffer and hit.any():
        hit = binary_dilation(hit, structure=np.ones((3, 3)), iterations=buffer)
    return {(int(r), int(c)) for r, c in zip(*np.nonzero(hit))}


@settings(max_examples=150, deadline=None)
@given(st.integers(20, 400), st.integers(20, 400), st.sampled_from([(56, 14), (336, 14), (32, 8)]),
       st.integers(0, 2), st.data())
def test_box_cells_match_pixel_overlap(w, h, size_patch, buffer, data):
    size, patch = size_patch
    geo = crop_geometry((w, h), size, (size, size), patch)
    x0 = data.draw(st.integers(0, w - 1))
    y0 = data.draw(st.integers(0, h - 1))
    x1 = data.draw(st.integers(x0 + 1, w))  # boxes may touch the image borders
    y1 = data.draw(st.integers(y0 + 1, h))
    got = set(geo.box_cells((x0, y0, x1, y1), buffer))
    assert got == _brute_cells(geo, (x0, y0, x1, y1), buffer)


def test_box_cells_rejects_empty_box():
    geo = crop_geometry((100, 80), 56, (56, 56), 14)
    with pytest.raises(ValueError, match=r"box \(10, 10, 5, 20\)"):
        geo.box_cells((10, 10, 5, 20))
