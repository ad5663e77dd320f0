"""A bright box painted into a black image, and how bright each token cell of a processor's
pixel crop is: the reference for anyres/tiling geometry (a box must light exactly the cells
`View.geometry.box_cells` names, in every view)."""

import numpy as np
import torch
from PIL import Image


def painted(size, box) -> Image.Image:
    w, h = size
    pixels = np.zeros((h, w, 3), dtype=np.uint8)
    x0, y0, x1, y1 = box
    pixels[y0:y1, x0:x1] = 255
    return Image.fromarray(pixels)


def cell_brightness(crop: torch.Tensor, side: int, mean, std) -> torch.Tensor:
    """Mean brightness in [0, 1] of each cell of a normalised [3, H, W] crop: [side, side]."""
    mean, std = torch.as_tensor(mean)[:, None, None], torch.as_tensor(std)[:, None, None]
    pixels = (crop.float().cpu() * std + mean).mean(0)
    cell = pixels.shape[-1] // side
    return pixels.view(side, cell, side, cell).mean((1, 3))


def check_views(span, pixel_crops, box, mean, std) -> int:
    """Assert every view's crop is bright in exactly the cells its geometry names for ``box``
    (and that those cells' positions are in ``span.box_positions``); return how many views
    the box lights."""
    named = set(span.box_positions(box).tolist())
    lit = 0
    for view in span.views:
        side = view.grid[0]
        light = cell_brightness(pixel_crops[view.source or 0], side, mean, std)
        cells = set(view.geometry.box_cells(box))
        for r in range(side):
            for c in range(side):
                where = (view.kind, view.source, r, c)
                if (r, c) in cells:
                    assert light[r, c] > 0.6, where
                    assert int(view.cell_positions([(r, c)])) in named, where
                else:
                    assert light[r, c] < 0.2, where
        lit += bool(cells)
    return lit
