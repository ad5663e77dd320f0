"""InternVL specifics: tiles + thumbnail in one run, their geometry checked by painting through
the real processor; the crop count per row (the processor drops ``num_patches``)."""

import numpy as np
import pytest
import torch
from conftest import random_image, tiny
from PIL import Image

MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])


def painted(size, box) -> Image.Image:
    w, h = size
    pixels = np.zeros((h, w, 3), dtype=np.uint8)
    x0, y0, x1, y1 = box
    pixels[y0:y1, x0:x1] = 255
    return Image.fromarray(pixels)


def cell_brightness(crop: torch.Tensor, side: int) -> torch.Tensor:
    """Mean brightness in [0, 1] of each cell of a normalised [3, H, W] crop: [side, side]."""
    pixels = (crop * STD[:, None, None] + MEAN[:, None, None]).mean(0)
    cell = pixels.shape[-1] // side
    return pixels.view(side, cell, side, cell).mean((1, 3))


# Boxes on cell borders of every view (tile cells are 16 px of these originals, thumbnail
# cells 48 x 32 or 32 x 48), so each cell is either covered or not: no partial cells.
CASES = [((192, 128), (48, 32, 96, 64), (3, 2)), ((192, 128), (96, 64, 192, 96), (3, 2)),
         ((128, 192), (32, 96, 64, 144), (2, 3)), ((128, 192), (0, 0, 32, 48), (2, 3))]


@pytest.mark.parametrize("size,box,tiles", CASES)
def test_a_painted_box_is_bright_exactly_in_the_cells_box_positions_names(size, box, tiles):
    vlm = tiny("tiny-internvl")
    inputs = vlm.prepare(text="What is this?", images=[painted(size, box)])
    span = vlm.layout(inputs)[0].images[0]
    cols, rows = tiles
    assert [v.kind for v in span.views] == ["tile"] * (cols * rows) + ["thumbnail"]
    assert [v.source for v in span.views] == list(range(cols * rows + 1))
    assert len(inputs["pixel_values"]) == cols * rows + 1
    named = set(span.box_positions(box).tolist())
    bright_views = 0
    for view in span.views:
        side = view.grid[0]
        light = cell_brightness(inputs["pixel_values"][view.source].cpu(), side)
        cells = set(view.geometry.box_cells(box))
        for r in range(side):
            for c in range(side):
                if (r, c) in cells:
                    assert light[r, c] > 0.6, (view.kind, view.source, r, c)
                    assert int(view.cell_positions([(r, c)])) in named
                else:
                    assert light[r, c] < 0.2, (view.kind, view.source, r, c)
        bright_views += bool(cells)
    assert 2 <= bright_views < len(span.views)  # the thumbnail and some, not all, tiles


def test_crops_per_row_match_the_image_processor_and_select_rows_splits_them():
    vlm = tiny("tiny-internvl")
    images = [random_image(0, 80, 60), random_image(1, 30, 90), random_image(2, 32, 32)]
    inputs = vlm.prepare(text="What is this?", images=images)
    alone = [vlm.prepare(text="What is this?", images=[im]) for im in images]
    reference = vlm.processor.image_processor(images, crop_to_patches=True, return_tensors="pt")
    assert inputs.row_sizes()["pixel_values"] == reference["num_patches"].tolist() == [7, 4, 1]
    picked = inputs.select_rows([2, 0, 0])
    torch.testing.assert_close(picked["pixel_values"], torch.cat(
        [alone[2]["pixel_values"], alone[0]["pixel_values"], alone[0]["pixel_values"]]))
    assert picked.row_sizes()["pixel_values"] == [1, 7, 7]
    views = [len(vlm.layout(a)[0].images[0].views) for a in alone]
    assert views == [7, 4, 1]
