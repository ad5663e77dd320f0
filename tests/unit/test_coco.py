"""COCO object annotations: validation errors, Neo et al.'s curation filter, object -> cells."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlminterp.data.coco import CocoError, CocoObjects, grow, object_cells, polygon_cells, read_coco
from vlminterp.data.synthetic_images import CATEGORIES, write_dataset
from vlminterp.models.clip import crop_geometry
from vlminterp.tokens import ImageGeometry


def _ann(i, image_id, cat, bbox=(10, 10, 40, 40), area=1500.0, **kw):
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": list(bbox), "area": area, **kw}


def _write(tmp_path, images, annotations, categories=None, name="instances.json"):
    categories = categories or [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"},
                                {"id": 3, "name": "car"}]
    path = tmp_path / name
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": categories}))
    return path


def _images(n):
    return [{"id": i, "file_name": f"{i}.png", "width": 100, "height": 80} for i in range(1, n + 1)]


def test_curation_filter_keeps_simple_scenes(tmp_path):
    anns = [
        _ann(1, 1, 1), _ann(2, 1, 2, area=5000), _ann(3, 1, 2, area=5000),  # kept: cat once
        *[_ann(10 + k, 2, 1 + k % 3) for k in range(4)],                    # 4 annotations
        _ann(20, 3, 1), _ann(21, 3, 1),                                     # cat twice
        _ann(30, 4, 1, area=999.0),                                         # too small
        _ann(40, 5, 3, area=1000.0),                                        # on a bound: out (strict)
        _ann(50, 6, 2, area=2000.5),                                        # too large
        _ann(60, 7, 3, area=1000.5),                                        # just inside
    ]
    path = _write(tmp_path, _images(7), anns)
    coco = CocoObjects(path, tmp_path)
    kept = coco.samples()
    assert [(s.image_id, s.annotation_id, s.category) for s in kept] == [(1, 1, "cat"), (7, 60, "car")]
    assert kept[0].box == (10.0, 10.0, 50.0, 50.0) and kept[0].key == "1:1"
    assert kept[0].image_size == (100, 80) and kept[0].path == tmp_path / "1.png"
    assert len(coco.samples(curate=False, one_per_image=False)) == len(anns)
    assert [s.image_id for s in coco.samples(max_annotations=4)] == [1, 2, 7]
    assert [s.image_id for s in coco.samples(inclusive_area=True)] == [1, 5, 7]  # [1000, 2000]
    assert [s.image_id for s in coco.samples(min_area=900, max_area=2100)] == [1, 4, 5, 6, 7]
    assert len(coco.samples(limit=1)) == 1


def test_curation_takes_the_first_qualifying_annotation_in_file_order(tmp_path):
    # image 1: the dog (id 9) comes before the cat (id 3) in the file; both qualify
    anns = [_ann(9, 1, 2, area=1500.0), _ann(3, 1, 1, area=1200.0), _ann(4, 2, 1, area=1999.9)]
    coco = CocoObjects(_write(tmp_path, _images(2), anns), tmp_path)
    assert [(s.image_id, s.annotation_id, s.category) for s in coco.samples()] == \
        [(1, 9, "dog"), (2, 4, "cat")]
    assert [s.annotation_id for s in coco.samples(curate=False, one_per_image=False)] == [9, 3, 4]


@pytest.mark.parametrize("mutate, where", [
    (lambda d: d["annotations"][1].update(bbox=[1, 2]), "annotations[1].bbox: expected 4 numbers"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, 0, 5]), "annotations[0].bbox: expected a positive"),
    (lambda d: d["annotations"][1].update(image_id=99), "annotations[1].image_id: no image with id 99"),
    (lambda d: d["annotations"][0].update(category_id=7), "annotations[0].category_id: no category"),
    (lambda d: d["annotations"][0].update(segmentation=[[1, 2, 3, 4, 5]]),
     "annotations[0].segmentation[0]: expected an even list"),
    (lambda d: d["annotations"][0].update(area="big"), "annotations[0].area: expected a non-negative"),
    (lambda d: d["images"][0].update(width=0), "images[0].width: expected a positive integer"),
    (lambda d: d["images"][1].pop("file_name"), "images[1].file_name: expected a non-empty string"),
    (lambda d: d["categories"][0].update(name=""), "categories[0].name: expected a non-empty string"),
    (lambda d: d.pop("annotations"), "annotations: expected a list"),
])
def test_bad_files_raise_one_line_naming_file_and_field(tmp_path, mutate, where):
    data = {"images": _images(2), "annotations": [_ann(1, 1, 1), _ann(2, 2, 2)],
            "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CocoError) as err:
        CocoObjects(path, tmp_path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: ") and where in message


def test_unreadable_inputs(tmp_path):
    with pytest.raises(CocoError, match="cannot read"):
        CocoObjects(tmp_path / "missing.json", tmp_path)
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(CocoError, match="not valid JSON"):
        CocoObjects(tmp_path / "x.json", tmp_path)
    path = _write(tmp_path, _images(1), [_ann(1, 1, 1)])
    with pytest.raises(CocoError, match="image_root is not a directory"):
        CocoObjects(path, tmp_path / "nowhere")
    coco = CocoObjects(path, tmp_path)
    with pytest.raises(CocoError, match="1.png: cannot read image"):
        coco.load_image(coco.samples()[0])
    from PIL import Image

    Image.new("RGB", (90, 80)).save(tmp_path / "1.png")
    with pytest.raises(CocoError, match="image is 90x80 but instances.json declares"):
        coco.load_image(coco.samples()[0])


def test_crowd_rle_falls_back_to_box(tmp_path):
    path = _write(tmp_path, _images(1), [_ann(1, 1, 1, segmentation={"counts": [1, 2], "size": [80, 100]})])
    sample = CocoObjects(path, tmp_path).samples()[0]
    assert sample.polygons is None


# -- polygon -> cells --------------------------------------------------------------------------

def _inside(px, py, poly) -> bool:
    """Even-odd point-in-polygon."""
    inside = False
    for k in range(len(poly)):
        (x0, y0), (x1, y1) = poly[k - 1], poly[k]
        if (y0 > py) != (y1 > py) and px < x0 + (py - y0) * (x1 - x0) / (y1 - y0):
            inside = not inside
    return inside


def _segment_enters(p, q, x0, y0, x1, y1) -> bool:
    """Does segment p-q meet the open rectangle (x0, x1) x (y0, y1)? (Liang-Barsky, strict.)"""
    lo, hi = 0.0, 1.0
    for a, d, lo_b, hi_b in ((p[0], q[0] - p[0], x0, x1), (p[1], q[1] - p[1], y0, y1)):
        if d == 0:
            if not lo_b < a < hi_b:
                return False
            continue
        t0, t1 = sorted(((lo_b - a) / d, (hi_b - a) / d))
        lo, hi = max(lo, t0), min(hi, t1)
    return lo < hi


def brute_cells(geometry, polygons, buffer=0):
    """Cells whose open square meets a polygon's boundary or lies inside it: for a simple
    polygon, exactly the cells it overlaps with positive area."""
    sx = geometry.resized[0] / geometry.original[0]
    sy = geometry.resized[1] / geometry.original[1]
    rows, cols = geometry.grid
    cell = geometry.cell
    found = []
    for flat in polygons:
        pts = [(flat[k] * sx - geometry.crop_box[0], flat[k + 1] * sy - geometry.crop_box[1])
               for k in range(0, len(flat), 2)]
        for r in range(rows):
            for c in range(cols):
                box = (c * cell, r * cell, (c + 1) * cell, (r + 1) * cell)
                hit = any(_segment_enters(pts[k - 1], pts[k], *box) for k in range(len(pts)))
                if hit or _inside(box[0] + cell / 2, box[1] + cell / 2, pts):
                    found.append((r, c))
    return grow(found, geometry.grid, buffer)


def _hull(points):
    pts = sorted(set(points))
    if len(pts) < 3:
        return pts

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return lower[:-1] + upper[:-1]


@st.composite
def geometries(draw):
    """Unscaled geometries (integer arithmetic is exact), non-square grids, offset crops."""
    cell = draw(st.sampled_from([4, 7, 14]))
    rows, cols = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    left, top = draw(st.integers(0, 12)), draw(st.integers(0, 12))
    w = left + cols * cell + draw(st.integers(0, 12))
    h = top + rows * cell + draw(st.integers(0, 12))
    return ImageGeometry((w, h), (w, h), (left, top, left + cols * cell, top + rows * cell), cell,
                         (rows, cols))


@settings(max_examples=150, deadline=None)
@given(geometries(), st.data(), st.integers(0, 2))
def test_box_polygons_give_box_cells(geometry, data, buffer):
    w, h = geometry.original
    x0, y0 = data.draw(st.integers(-5, w - 1)), data.draw(st.integers(-5, h - 1))
    x1, y1 = data.draw(st.integers(x0 + 1, w + 5)), data.draw(st.integers(y0 + 1, h + 5))
    square = [x0, y0, x1, y0, x1, y1, x0, y1]
    assert polygon_cells(geometry, [square], buffer) == sorted(geometry.box_cells((x0, y0, x1, y1), buffer))


@settings(max_examples=150, deadline=None)
@given(geometries(), st.data(), st.integers(0, 2))
def test_convex_polygons_match_brute_force(geometry, data, buffer):
    w, h = geometry.original
    points = data.draw(st.lists(st.tuples(st.integers(-4, w + 4), st.integers(-4, h + 4)),
                                min_size=3, max_size=8))
    hull = _hull(points)
    if len(hull) < 3:
        return
    flat = [v for p in hull for v in p]
    assert polygon_cells(geometry, [flat], buffer) == brute_cells(geometry, [flat], buffer)


def test_concave_and_multi_part_polygons_match_brute_force():
    geometry = ImageGeometry((60, 50), (60, 50), (2, 1, 58, 43), 14, (3, 4))
    l_shape = [3, 3, 40, 3, 40, 10, 10, 10, 10, 40, 3, 40]
    star = [30, 2, 34, 18, 50, 20, 36, 28, 42, 44, 30, 33, 18, 44, 24, 28, 10, 20, 26, 18]
    for polys in ([l_shape], [star], [l_shape, [45, 30, 57, 30, 57, 42]]):
        for buffer in (0, 1):
            assert polygon_cells(geometry, polys, buffer) == brute_cells(geometry, polys, buffer)
    assert (1, 2) not in polygon_cells(geometry, [l_shape])  # the L's empty corner


def test_scaled_crop_geometry_like_llava():
    # 640x480 -> shortest edge 336 -> 448x336, centre crop 336: cells of 14 px, 24x24 grid
    geometry = crop_geometry((640, 480), 336, (336, 336), 14)
    assert geometry.crop_box == (56, 0, 392, 336) and geometry.grid == (24, 24)
    box = (200.0, 100.0, 260.0, 150.0)
    square = [box[0], box[1], box[2], box[1], box[2], box[3], box[0], box[3]]
    assert polygon_cells(geometry, [square], 1) == sorted(geometry.box_cells(box, 1))
    triangle = [200, 100, 260, 100, 200, 150]
    assert polygon_cells(geometry, [triangle]) == brute_cells(geometry, [triangle])
    assert polygon_cells(geometry, [[0, 0, 50, 0, 50, 50]]) == []  # cropped away on the left


def test_grow_clips_to_grid():
    assert grow([(0, 0)], (3, 3), 1) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert len(grow([(1, 1)], (3, 3), 2)) == 9 and grow([], (3, 3), 2) == []


# -- synthetic images -------------------------------------------------------------------------

def test_synthetic_dataset_passes_curation_and_draws_objects(tmp_path):
    path = write_dataset(tmp_path / "a", 6, seed=3)
    coco, samples = read_coco(path, tmp_path / "a")
    assert len(samples) == 6 and {s.category for s in samples} == set(CATEGORIES)
    for s in samples:
        assert 1000 <= s.area <= 2000 and s.polygons
        image = np.asarray(coco.load_image(s))
        xs, ys = s.polygons[0][0::2], s.polygons[0][1::2]
        cx, cy = int(sum(xs) / len(xs)), int(sum(ys) / len(ys))  # inside: shapes are convex
        assert tuple(image[cy, cx]) == CATEGORIES[s.category][1]
        cells = object_cells(s, crop_geometry(s.image_size, 56, (56, 56), 14))
        assert cells and all(0 <= r < 4 and 0 <= c < 4 for r, c in cells)
    again = write_dataset(tmp_path / "b", 6, seed=3)
    assert again.read_text() == path.read_text()
    assert (tmp_path / "a/images/00002.png").read_bytes() == (tmp_path / "b/images/00002.png").read_bytes()
    with pytest.raises(ValueError, match="n: expected at least 1"):
        write_dataset(tmp_path / "c", 0)
