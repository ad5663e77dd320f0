"""The objects task of ``tiny-llava-objects``, ``tiny-llava-onevision-objects`` and
``tiny-clip-shapes``: one object, known class and place.

Images come from `vlminterp.data.synthetic_images.zoo_image`: 224x224, a textured grey background
(grey blobs and bars, never saturated) and one object of 8 classes (cat, dog, car, bus, bird, cup,
boat, clock; each its own colour, 4 shapes), area 1100-1900 px², at a random place. The models see
an 8x8 patch grid (LLaVA: 112 px, patch 14; CLIP: 64 px, patch 8; OneVision: 2x2 tiles of 4x4
cells, 64 px, patch 16, besides its 4x4 base view), so one cell covers 28x28 original pixels. The
class is visible only in the object's cells: everything else is texture.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from vlminterp.data.synthetic_images import ZOO_CATEGORIES, ZOO_SIZE, zoo_image

CLASSES = tuple(ZOO_CATEGORIES)
GRID = 8
CELL = ZOO_SIZE // GRID  # original pixels per patch-grid cell


@dataclass
class ImageItem:
    image: object  # PIL image
    category: str
    polygon: list[tuple[float, float]]

    @property
    def label(self) -> int:
        return CLASSES.index(self.category)

    def coverage(self, geometry=None) -> np.ndarray:
        """[rows, cols]: the fraction of each cell the object covers, of the zoo's 8x8 grid
        or of a view's cells (its `ImageGeometry`: each cell's footprint mapped back to
        original pixels, rounded to whole pixels; parts outside the image count as empty)."""
        m = self._mask
        if geometry is None:
            return m.reshape(GRID, CELL, GRID, CELL).mean(axis=(1, 3))
        (rows, cols), g = geometry.grid, geometry
        xs = (g.crop_box[0] + np.arange(cols + 1) * g.cell) * g.original[0] / g.resized[0]
        ys = (g.crop_box[1] + np.arange(rows + 1) * g.cell) * g.original[1] / g.resized[1]
        total = self._summed_area
        xi, yi = (np.clip(np.round(v), 0, n).astype(int) for v, n in ((xs, m.shape[1]), (ys, m.shape[0])))
        inside = total[np.ix_(yi[1:], xi[1:])] - total[np.ix_(yi[:-1], xi[1:])] \
            - total[np.ix_(yi[1:], xi[:-1])] + total[np.ix_(yi[:-1], xi[:-1])]
        return inside / np.outer(np.diff(ys), np.diff(xs))

    @cached_property
    def _mask(self) -> np.ndarray:
        from PIL import Image, ImageDraw

        mask = Image.new("L", (ZOO_SIZE, ZOO_SIZE), 0)
        ImageDraw.Draw(mask).polygon(self.polygon, fill=255)
        return np.asarray(mask, dtype=np.float32) / 255.0

    @cached_property
    def _summed_area(self) -> np.ndarray:
        return np.pad(self._mask.cumsum(0, dtype=np.float64).cumsum(1), ((1, 0), (1, 0)))


def sample_item(rng: np.random.Generator, category: str | None = None) -> ImageItem:
    category = category or str(rng.choice(CLASSES))
    image, polygon = zoo_image(np.random.RandomState(int(rng.integers(2**31))), category)
    return ImageItem(image, category, polygon)


def train_items(rng: np.random.Generator, n: int) -> list[ImageItem]:
    return [sample_item(rng) for _ in range(n)]


def heldout_items(seed: int, n_per_class: int) -> list[ImageItem]:
    """``n_per_class`` images of each class from ``seed``'s held-out stream (training draws
    from the stream ``[seed, 0]``)."""
    rng = np.random.default_rng([seed, 1])
    return [sample_item(rng, c) for c in CLASSES for _ in range(n_per_class)]
