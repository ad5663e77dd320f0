"""`ImageItem.coverage`: the object's share of each cell, of the zoo's 8x8 grid or of a view's
cells (the logit-lens targets of the objects models). References: the painted mask summed cell
by cell with plain slicing, and the object's painted area."""

import numpy as np
from hypothesis import given, settings, strategies as st

from vlminterp.tokens import ImageGeometry
from vlminterp.zoo import image_task

ITEMS = image_task.heldout_items(41, 1)  # one image per class


def test_the_zoo_grid_is_the_identity_geometry():
    for it in ITEMS:
        same = ImageGeometry((224, 224), (224, 224), (0, 0, 224, 224), 28, (8, 8))
        np.testing.assert_allclose(it.coverage(same), it.coverage(), atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(item=st.integers(0, len(ITEMS) - 1), left=st.integers(0, 60), top=st.integers(0, 60),
       cell=st.integers(8, 40), rows=st.integers(1, 8), cols=st.integers(1, 8))
def test_each_cell_is_the_mean_of_the_mask_over_its_pixels(item, left, top, cell, rows, cols):
    """Unscaled views (cells on whole pixels): a cell's coverage is the painted mask's mean
    over its footprint; parts outside the image count as empty."""
    it = ITEMS[item]
    geometry = ImageGeometry((224, 224), (224, 224),
                             (left, top, left + cols * cell, top + rows * cell), cell, (rows, cols))
    mask = it._mask
    want = np.array([[mask[top + r * cell: top + (r + 1) * cell,
                           left + c * cell: left + (c + 1) * cell].sum() / cell**2
                      for c in range(cols)] for r in range(rows)])
    np.testing.assert_allclose(it.coverage(geometry), want, atol=1e-6)


def test_a_scaled_view_covering_the_image_holds_the_whole_object():
    """OneVision's 64 px base view (4x4 cells of 16 px) and a 2x-upscaled 8x8 view: the
    area-weighted coverage adds up to the object's painted area."""
    for geometry in (ImageGeometry((224, 224), (64, 64), (0, 0, 64, 64), 16, (4, 4)),
                     ImageGeometry((224, 224), (448, 448), (0, 0, 448, 448), 56, (8, 8))):
        cell_area = (224 / geometry.grid[0]) ** 2
        for it in ITEMS:
            got = it.coverage(geometry)
            assert got.min() >= 0 and got.max() <= 1 + 1e-6
            assert abs(got.sum() * cell_area - it._mask.sum()) <= 1e-3 * it._mask.sum()
