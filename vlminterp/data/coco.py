"""COCO object annotations (``instances_*.json`` + an image folder) as object samples.

One `ObjectSample` per kept annotation: the image file, the category name, the box as
``(x0, y0, x1, y1)`` original pixels (COCO stores ``[x, y, w, h]``), the segmentation polygons
when present, and the image size. `curate` is Neo et al. 2024's filter for simple scenes, as the
original's code has it: images with at most 3 annotations in which some category occurs exactly
once with 1000 < area < 2000 px² (strict; ``inclusive_area`` also keeps the bounds), the first
such annotation in the file's order being the sample. Problems in the file raise `CocoError`
with one line naming the file and field::

    instances_val2017.json: annotations[12].bbox: expected 4 numbers, got [1, 2]

`object_cells` maps an object to patch-grid cells: a cell counts when the object's polygon (or
box) overlaps it with positive area after the processor's resize and crop, grown by ``buffer``
rings of 8-neighbours — for a box this is exactly `ImageGeometry.box_cells`.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlminterp.tokens import ImageGeometry


class CocoError(ValueError):
    """An annotation file (or image) that cannot be used; the message names file and field."""


@dataclass(frozen=True)
class ObjectSample:
    key: str  # "<image_id>:<annotation_id>", unique per sample; resumable logs use it
    image_id: int
    annotation_id: int
    file_name: str
    path: Path
    category: str
    category_id: int
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in original pixels
    area: float
    image_size: tuple[int, int]  # (width, height) as the file declares it
    polygons: tuple[tuple[float, ...], ...] | None = None  # flat [x0, y0, x1, y1, ...] each


def _shown(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict, str)) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class CocoObjects:
    """A validated COCO instances file. ``samples(...)`` lists the objects a recipe uses."""

    def __init__(self, annotations: str | os.PathLike, image_root: str | os.PathLike):
        self.path = Path(annotations)
        self.image_root = Path(image_root)
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except OSError as e:
            raise CocoError(f"{self.path}: cannot read the annotations file ({e.strerror})") from None
        except ValueError as e:
            raise CocoError(f"{self.path}: not valid JSON ({e})") from None
        if not self.image_root.is_dir():
            raise CocoError(f"{self.image_root}: image_root is not a directory")
        if not isinstance(data, dict):
            self._fail("", f"expected an object with 'images', 'annotations', 'categories', "
                           f"got {type(data).__name__}")
        for name in ("images", "annotations", "categories"):
            if not isinstance(data.get(name), list):
                self._fail(name, f"expected a list, got {_shown(data.get(name))}")
        self.categories = self._categories(data["categories"])
        self.images = self._images(data["images"])
        self.annotations = [self._annotation(i, a) for i, a in enumerate(data["annotations"])]
        self.by_image: dict[int, list[dict]] = defaultdict(list)
        for a in self.annotations:
            self.by_image[a["image_id"]].append(a)

    def _fail(self, where: str, message: str):
        raise CocoError(f"{self.path}: {where + ': ' if where else ''}{message}")

    def _categories(self, entries: list) -> dict[int, str]:
        out = {}
        for i, c in enumerate(entries):
            if not isinstance(c, dict):
                self._fail(f"categories[{i}]", f"expected an object, got {_shown(c)}")
            if not _int(c.get("id")):
                self._fail(f"categories[{i}].id", f"expected an integer, got {_shown(c.get('id'))}")
            if not isinstance(c.get("name"), str) or not c["name"].strip():
                self._fail(f"categories[{i}].name",
                           f"expected a non-empty string, got {_shown(c.get('name'))}")
            out[c["id"]] = c["name"].strip()
        return out

    def _images(self, entries: list) -> dict[int, dict]:
        out = {}
        for i, im in enumerate(entries):
            where = f"images[{i}]"
            if not isinstance(im, dict):
                self._fail(where, f"expected an object, got {_shown(im)}")
            if not _int(im.get("id")):
                self._fail(f"{where}.id", f"expected an integer, got {_shown(im.get('id'))}")
            if im["id"] in out:
                self._fail(f"{where}.id", f"duplicate image id {im['id']}")
            if not isinstance(im.get("file_name"), str) or not im["file_name"]:
                self._fail(f"{where}.file_name",
                           f"expected a non-empty string, got {_shown(im.get('file_name'))}")
            for k in ("width", "height"):
                if not _int(im.get(k)) or im[k] <= 0:
                    self._fail(f"{where}.{k}", f"expected a positive integer, got {_shown(im.get(k))}")
            out[im["id"]] = im
        return out

    def _annotation(self, i: int, a: Any) -> dict:
        where = f"annotations[{i}]"
        if not isinstance(a, dict):
            self._fail(where, f"expected an object, got {_shown(a)}")
        for k in ("id", "image_id", "category_id"):
            if not _int(a.get(k)):
                self._fail(f"{where}.{k}", f"expected an integer, got {_shown(a.get(k))}")
        if a["image_id"] not in self.images:
            self._fail(f"{where}.image_id", f"no image with id {a['image_id']} in 'images'")
        if a["category_id"] not in self.categories:
            self._fail(f"{where}.category_id",
                       f"no category with id {a['category_id']} in 'categories'")
        bbox = a.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(map(_number, bbox)):
            self._fail(f"{where}.bbox", f"expected 4 numbers [x, y, w, h], got {_shown(bbox)}")
        if bbox[2] <= 0 or bbox[3] <= 0:
            self._fail(f"{where}.bbox", f"expected a positive width and height, got {_shown(bbox)}")
        area = a.get("area", bbox[2] * bbox[3])
        if not _number(area) or area < 0:
            self._fail(f"{where}.area", f"expected a non-negative number, got {_shown(area)}")
        return {"id": a["id"], "image_id": a["image_id"], "category_id": a["category_id"],
                "bbox": bbox, "area": float(area),
                "polygons": self._polygons(f"{where}.segmentation", a.get("segmentation"))}

    def _polygons(self, where: str, seg: Any) -> tuple[tuple[float, ...], ...] | None:
        if seg is None or isinstance(seg, dict) or seg == []:
            return None  # absent, or run-length encoded (crowd regions): the box is used
        if not isinstance(seg, list):
            self._fail(where, f"expected a list of polygons or an RLE object, got {_shown(seg)}")
        polys = []
        for j, p in enumerate(seg):
            if (not isinstance(p, list) or len(p) < 6 or len(p) % 2
                    or not all(map(_number, p))):
                self._fail(f"{where}[{j}]", f"expected an even list of >= 6 numbers "
                                            f"[x0, y0, x1, y1, ...], got {_shown(p)}")
            polys.append(tuple(float(v) for v in p))
        return tuple(polys)

    def sample(self, a: dict) -> ObjectSample:
        im = self.images[a["image_id"]]
        x, y, w, h = (float(v) for v in a["bbox"])
        return ObjectSample(
            key=f"{a['image_id']}:{a['id']}", image_id=a["image_id"], annotation_id=a["id"],
            file_name=im["file_name"], path=self.image_root / im["file_name"],
            category=self.categories[a["category_id"]], category_id=a["category_id"],
            box=(x, y, x + w, y + h), area=a["area"], image_size=(im["width"], im["height"]),
            polygons=a["polygons"])

    def samples(self, curate: bool = True, *, max_annotations: int = 3,
                min_area: float | int = 1000.0, max_area: float | int = 2000.0,
                inclusive_area: bool = False, one_per_image: bool = True,
                limit: int | None = None) -> list[ObjectSample]:
        """Object samples in the file's image order. With ``curate`` (Neo et al.'s filter) an
        image is kept when it has at most ``max_annotations`` annotations and a category that
        occurs exactly once in it with min_area < area < max_area (<= both ways with
        ``inclusive_area``); that annotation is the sample (the first such in the file's order
        when ``one_per_image``, as the original's). Without ``curate`` every annotation is a
        sample."""
        def in_bounds(area: float) -> bool:
            return min_area <= area <= max_area if inclusive_area else min_area < area < max_area

        out = []
        for image_id in self.images:
            anns = self.by_image.get(image_id, [])  # in the file's order
            if curate:
                if not anns or len(anns) > max_annotations:
                    continue
                counts = Counter(a["category_id"] for a in anns)
                anns = [a for a in anns if counts[a["category_id"]] == 1 and in_bounds(a["area"])]
            if one_per_image:
                anns = anns[:1]
            out.extend(self.sample(a) for a in anns)
            if limit is not None and len(out) >= limit:
                return out[:limit]
        return out

    def load_image(self, sample: ObjectSample):
        """The image as RGB PIL; its size must match the annotation file's width/height, since
        boxes are in that pixel frame."""
        from PIL import Image

        try:
            with Image.open(sample.path) as im:
                image = im.convert("RGB")
        except OSError as e:
            raise CocoError(f"{sample.path}: cannot read image of images[id={sample.image_id}] "
                            f"({e})") from None
        if image.size != sample.image_size:
            raise CocoError(f"{sample.path}: image is {image.size[0]}x{image.size[1]} but "
                            f"{self.path.name} declares width x height = "
                            f"{sample.image_size[0]}x{sample.image_size[1]}")
        return image


def read_coco(annotations: str | os.PathLike, image_root: str | os.PathLike,
              curate: bool = True, **filters) -> tuple[CocoObjects, list[ObjectSample]]:
    """Read and validate a COCO file; return it with its (curated) samples."""
    coco = CocoObjects(annotations, image_root)
    return coco, coco.samples(curate, **filters)


# -- object -> patch-grid cells ------------------------------------------------------------

def _clip(poly, x0, y0, x1, y1):
    """Sutherland–Hodgman clip of a polygon to the rectangle [x0, x1] x [y0, y1]."""
    edges = ((0, x0, True), (0, x1, False), (1, y0, True), (1, y1, False))
    for axis, bound, keep_above in edges:
        if not poly:
            break
        inside = (lambda p: p[axis] >= bound) if keep_above else (lambda p: p[axis] <= bound)
        out = []
        for k, cur in enumerate(poly):
            prev = poly[k - 1]
            if inside(cur) != inside(prev):
                t = (bound - prev[axis]) / (cur[axis] - prev[axis])
                out.append((prev[0] + t * (cur[0] - prev[0]), prev[1] + t * (cur[1] - prev[1])))
            if inside(cur):
                out.append(cur)
        poly = out
    return poly


def _area(poly):
    return abs(sum(poly[k - 1][0] * p[1] - p[0] * poly[k - 1][1]
                   for k, p in enumerate(poly))) / 2.0


def grow(cells, grid: tuple[int, int], buffer: int) -> list[tuple[int, int]]:
    """``cells`` plus ``buffer`` rings of 8-neighbours, clipped to the grid, row-major."""
    rows, cols = grid
    out = set(cells)
    for r, c in cells:
        for dr in range(-buffer, buffer + 1):
            for dc in range(-buffer, buffer + 1):
                if 0 <= r + dr < rows and 0 <= c + dc < cols:
                    out.add((r + dr, c + dc))
    return sorted(out)


def polygon_cells(geometry: ImageGeometry, polygons, buffer: int = 0,
                  min_area: float | int = 1e-9) -> list[tuple[int, int]]:
    """Grid cells (row, col) that the union of ``polygons`` (flat ``[x0, y0, x1, y1, ...]`` in
    original pixels) overlaps with positive area after resize and crop, grown by ``buffer``.

    Exact geometry (each polygon is clipped to each candidate cell) rather than a raster: a
    rasterised polygon also fills its right/bottom boundary pixels, so an object ending exactly
    on a cell border would leak into the next cell, and a box as a polygon gives the same cells
    as `ImageGeometry.box_cells`."""
    sx = geometry.resized[0] / geometry.original[0]
    sy = geometry.resized[1] / geometry.original[1]
    left, top = geometry.crop_box[0], geometry.crop_box[1]
    rows, cols = geometry.grid
    cell = geometry.cell
    found = set()
    for flat in polygons:
        pts = [(flat[k] * sx - left, flat[k + 1] * sy - top) for k in range(0, len(flat), 2)]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        c0, c1 = max(int(min(xs) // cell), 0), min(int(max(xs) // cell) + 1, cols)
        r0, r1 = max(int(min(ys) // cell), 0), min(int(max(ys) // cell) + 1, rows)
        for r in range(r0, r1):
            for c in range(c0, c1):
                if (r, c) not in found:
                    piece = _clip(pts, c * cell, r * cell, (c + 1) * cell, (r + 1) * cell)
                    if len(piece) >= 3 and _area(piece) > min_area:
                        found.add((r, c))
    return grow(found, geometry.grid, buffer)


def object_cells(sample: ObjectSample, geometry: ImageGeometry, buffer: int = 0,
                 use_polygons: bool = True) -> list[tuple[int, int]]:
    """The object's cells: its segmentation polygons when present (and ``use_polygons``),
    else its box."""
    if use_polygons and sample.polygons:
        return polygon_cells(geometry, sample.polygons, buffer)
    return geometry.box_cells(sample.box, buffer)
