"""Seeded images with objects at known places, plus a COCO-format annotations file.

Each category is drawn as its own shape and colour on a textured grey background (cat = orange
disc, dog = brown triangle, car = red wide rectangle, bus = yellow tall rectangle). Every image
holds one target object (first in the file) whose area is between 1100 and 1900 px², and up to
two distractors of other categories, so the set passes Neo et al.'s curation filter
(`coco.CocoObjects.samples`) by construction and the recipes run offline (``--synthetic N``).
Segmentation polygons are the drawn shapes' outlines; ``area`` is the polygon's area.

``style="zoo"`` writes the model zoo's images instead (`zoo_image`): 224x224, one object of 8
classes (`ZOO_CATEGORIES`: the 4 above plus bird, cup, boat, clock) and no other, on a grey
background with distractor texture (grey blobs and bars, never saturated).

    python -m vlminterp.data.synthetic_images --out /tmp/objects --n 24 [--style zoo]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

CATEGORIES: dict[str, tuple[str, tuple[int, int, int]]] = {
    "cat": ("disc", (235, 140, 30)),
    "dog": ("triangle", (120, 70, 30)),
    "car": ("wide", (215, 30, 30)),
    "bus": ("tall", (235, 215, 30)),
}
SIZES = ((192, 144), (160, 160), (224, 128), (144, 192))
ANNOTATIONS = "instances_synthetic.json"
# The model zoo's style (``style="zoo"``): one object of 8 classes (a colour each) on a textured
# background, no other object, square images so a square model view crops nothing.
ZOO_CATEGORIES: dict[str, tuple[str, tuple[int, int, int]]] = {
    **CATEGORIES,
    "bird": ("triangle", (40, 80, 230)),
    "cup": ("tall", (40, 180, 70)),
    "boat": ("wide", (150, 60, 200)),
    "clock": ("disc", (30, 200, 210)),
}
ZOO_SIZE = 224


def shape_polygon(shape: str, cx: float, cy: float, area: float) -> list[tuple[float, float]]:
    """Outline of ``shape`` centred at (cx, cy) with the given area (px²)."""
    if shape == "disc":
        r = math.sqrt(area / (24 * math.sin(2 * math.pi / 24) / 2))  # area of the 24-gon
        return [(cx + r * math.cos(2 * math.pi * k / 24), cy + r * math.sin(2 * math.pi * k / 24))
                for k in range(24)]
    if shape == "triangle":
        s = math.sqrt(2 * area)  # base = height = s
        return [(cx - s / 2, cy + s / 2), (cx + s / 2, cy + s / 2), (cx, cy - s / 2)]
    w = math.sqrt(area * 2) if shape == "wide" else math.sqrt(area / 2)
    h = area / w
    return [(cx - w / 2, cy - h / 2), (cx + w / 2, cy - h / 2), (cx + w / 2, cy + h / 2),
            (cx - w / 2, cy + h / 2)]


def _area(poly) -> float:
    return abs(sum(poly[k - 1][0] * p[1] - p[0] * poly[k - 1][1] for k, p in enumerate(poly))) / 2


def _bbox(poly) -> list[float]:
    xs, ys = [p[0] for p in poly], [p[1] for p in poly]
    return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]


def _overlaps(a: list[float], b: list[float], margin: float = 4.0) -> bool:
    return not (a[0] + a[2] + margin <= b[0] or b[0] + b[2] + margin <= a[0]
                or a[1] + a[3] + margin <= b[1] or b[1] + b[3] + margin <= a[1])


def make_image(rng: np.random.RandomState, size: tuple[int, int], objects: list[tuple[str, float]],
               categories: dict | None = None, texture: bool = False):
    """Draw ``objects`` = [(category, area), ...] at random non-overlapping places, with the
    shapes and colours of ``categories`` (default `CATEGORIES`); ``texture`` first paints
    grey blobs and bars over the noisy grey background (distractor texture, never saturated).
    Returns the PIL image and [(category, polygon), ...]."""
    from PIL import Image, ImageDraw

    categories = CATEGORIES if categories is None else categories
    w, h = size
    base = rng.randint(110, 150)
    pixels = np.clip(base + rng.randint(-12, 13, (h, w, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    if texture:
        _texture(rng, draw, w, h)
    placed = []
    for name, area in objects:
        shape, colour = categories[name]
        for _ in range(200):
            half = math.sqrt(area) * (1.0 if shape in ("disc", "triangle") else 0.75)
            cx = rng.uniform(half + 1, w - half - 1)
            cy = rng.uniform(half + 1, h - half - 1)
            poly = shape_polygon(shape, cx, cy, area)
            box = _bbox(poly)
            inside = box[0] >= 0 and box[1] >= 0 and box[0] + box[2] <= w and box[1] + box[3] <= h
            if inside and not any(_overlaps(box, _bbox(p)) for _, p in placed):
                break
        else:
            continue  # no room left: the image gets fewer distractors
        draw.polygon(poly, fill=colour)
        placed.append((name, poly))
    return image, placed


def _texture(rng: np.random.RandomState, draw, w: int, h: int) -> None:
    """3-8 grey ellipses and bars (grey 70-190, tint <= 8 per channel)."""
    for _ in range(rng.randint(3, 9)):
        grey = rng.randint(70, 191)
        fill = tuple(int(np.clip(grey + rng.randint(-8, 9), 0, 255)) for _ in range(3))
        x0, y0 = rng.randint(-w // 4, w), rng.randint(-h // 4, h)
        if rng.rand() < 0.5:
            draw.ellipse((x0, y0, x0 + rng.randint(w // 8, w // 2), y0 + rng.randint(h // 8, h // 2)),
                         fill=fill)
        else:
            draw.line((x0, y0, x0 + rng.randint(-w, w), y0 + rng.randint(-h, h)), fill=fill,
                      width=int(rng.randint(3, 12)))


def zoo_image(rng: np.random.RandomState, category: str, size: int = ZOO_SIZE,
              center: tuple[float, float] | None = None):
    """One zoo-style image: ``category`` (of `ZOO_CATEGORIES`) with area in [1100, 1900] px²
    at a random place (or centred at ``center``) on a textured background. Returns
    (PIL image, polygon)."""
    area = rng.uniform(1100, 1900)
    if center is None:
        image, placed = make_image(rng, (size, size), [(category, area)], ZOO_CATEGORIES,
                                   texture=True)
        return image, placed[0][1]
    from PIL import ImageDraw

    image, _ = make_image(rng, (size, size), [], ZOO_CATEGORIES, texture=True)
    shape, colour = ZOO_CATEGORIES[category]
    polygon = shape_polygon(shape, center[0], center[1], area)
    ImageDraw.Draw(image).polygon(polygon, fill=colour)
    return image, polygon


def write_dataset(out_dir: str | Path, n: int, seed: int = 0, style: str = "classic") -> Path:
    """Write ``n`` images and ``instances_synthetic.json`` under ``out_dir``; return the JSON
    path. The same (n, seed, style) gives the same files. ``style="zoo"``: the model zoo's
    images (`zoo_image`: one object of `ZOO_CATEGORIES`, textured background, 224x224)."""
    if n < 1:
        raise ValueError(f"n: expected at least 1 image, got {n}")
    if style not in ("classic", "zoo"):
        raise ValueError(f"style: expected 'classic' or 'zoo', got {style!r}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    names = list(CATEGORIES if style == "classic" else ZOO_CATEGORIES)
    categories = [{"id": i + 1, "name": c, "supercategory": "synthetic"} for i, c in enumerate(names)]
    images, annotations = [], []
    for i in range(n):
        target = names[i % len(names)]
        if style == "zoo":
            size = (ZOO_SIZE, ZOO_SIZE)
            image, polygon = zoo_image(rng, target)
            placed = [(target, polygon)]
        else:
            size = SIZES[rng.randint(len(SIZES))]
            others = [c for c in names if c != target]
            distractors = list(rng.choice(others, size=rng.randint(0, 3), replace=False))
            objects = [(target, rng.uniform(1100, 1900))]
            objects += [(d, rng.uniform(300, 2600)) for d in distractors]
            image, placed = make_image(rng, size, objects)
        file_name = f"images/{i:05d}.png"
        image.save(out / file_name)
        images.append({"id": i + 1, "file_name": file_name, "width": size[0], "height": size[1]})
        for name, poly in placed:
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1,
                "category_id": names.index(name) + 1, "bbox": [round(v, 2) for v in _bbox(poly)],
                "area": round(_area(poly), 2), "iscrowd": 0,
                "segmentation": [[round(v, 2) for p in poly for v in p]],
            })
    path = out / ANNOTATIONS
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": categories}, indent=1))
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory (images/ + instances_synthetic.json)")
    ap.add_argument("--n", type=int, default=24, help="number of images (default 24)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ap.add_argument("--style", choices=["classic", "zoo"], default="classic", help="classic: 4 "
                    "classes, up to 2 distractor objects, assorted sizes; zoo: the model zoo's "
                    "images (8 classes, one object, textured background, 224x224) (default classic)")
    args = ap.parse_args(argv)
    print(write_dataset(args.out, args.n, args.seed, args.style))


if __name__ == "__main__":
    main()
