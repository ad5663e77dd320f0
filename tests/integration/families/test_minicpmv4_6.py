"""MiniCPM-V 4.6 specifics: a source view plus row-major tiles per large image, every crop of
the batch packed along the last axis of ``pixel_values``, one token per 4x4 patches."""

import pytest
import torch
from support import random_image, tiny
from PIL import Image

from vlminterp.interventions import site_tensor
from vlminterp.models.minicpmv4_6 import view_pixels

# 336x112: a 168x56 source view (1x3 tokens) and three 112x112 tiles (2x2 tokens each)
WIDE = (336, 112)


def _image(seed, size=WIDE):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 255, (size[1], size[0], 3), generator=g,
                                         dtype=torch.uint8).numpy())


@pytest.fixture(scope="module")
def vlm():
    return tiny("tiny-minicpm-v4.6")


def test_a_wide_image_is_a_source_view_and_a_row_of_tiles(vlm):
    inputs = vlm.prepare(text="What is this?", images=[_image(0)])
    span = vlm.layout(inputs)[0].images[0]
    assert [(v.kind, v.grid, v.source) for v in span.views] == [
        ("base", (1, 3), 0), ("tile", (2, 2), 1), ("tile", (2, 2), 2), ("tile", (2, 2), 3)]
    assert inputs["target_sizes"].tolist() == [[4, 12], [8, 8], [8, 8], [8, 8]]
    ids = inputs["input_ids"][0]
    text = vlm.tokenizer.decode(ids[span.markers])
    assert text.count("<slice>") == 3 and text.startswith("<image_id>0</image_id><image>")
    square = vlm.prepare(text="What is this?", images=[_image(1, (224, 224))])
    span = vlm.layout(square)[0].images[0]
    assert [v.geometry.crop_box for v in span.views[1:]] == [  # row-major, a newline per row
        (0, 0, 112, 112), (112, 0, 224, 112), (0, 112, 112, 224), (112, 112, 224, 224)]
    text = vlm.tokenizer.decode(square["input_ids"][0][span.markers])
    assert text.endswith("<slice></slice><slice></slice>\n<slice></slice><slice></slice>")


def test_each_view_of_a_tiled_image_changes_exactly_its_positions(vlm):
    inputs = vlm.prepare(text="What is this?", images=[_image(0)]).select_rows([0, 0])
    span = vlm.layout(inputs)[0].images[0]
    for v, view in enumerate(span.views):
        perturbed = inputs.select_rows([0, 1])
        key, index = view_pixels(vlm, perturbed, 1, v)
        perturbed[key][index] = -perturbed[key][index]
        with torch.no_grad(), vlm.trace(perturbed):
            h = site_tensor(vlm.residual("embed")).save()
        changed = ((h[0] - h[1]).abs().amax(-1) > 1e-6).nonzero().flatten()
        assert changed.tolist() == sorted(view.positions.tolist()), view.kind


def _token_change(a, b, view, patch):
    """Mean |pixel change| per token of one view: the view's columns of the packed tensor are
    patch-major (each patch ``patch`` columns wide); a token owns 4x4 patches."""
    rows, cols = view.grid[0] * 4, view.grid[1] * 4
    diff = (a - b).abs().reshape(3, patch, rows * cols, patch).mean((0, 1, 3))
    return diff.view(view.grid[0], 4, view.grid[1], 4).mean((1, 3)).flatten()


def test_a_box_painted_through_the_real_processor_lands_in_box_positions_in_every_view(vlm):
    """The source view is a 0.5x resize, the tiles 1:1 crops: a white box over the middle
    third lands in the source view's middle token and fills the middle tile."""
    black = Image.new("RGB", WIDE)
    boxed = black.copy()
    box = (112, 0, 224, 112)
    boxed.paste((255, 255, 255), box)
    inputs = vlm.prepare(text="What is this?", images=[black, boxed])
    span = vlm.layout(inputs)[1].images[0]
    patch = inputs["pixel_values"].shape[2]
    painted = []
    for v, view in enumerate(span.views):
        _, index = view_pixels(vlm, inputs, 1, v)
        _, same = view_pixels(vlm, inputs, 0, v)
        change = _token_change(inputs["pixel_values"][index], inputs["pixel_values"][same],
                               view, patch)
        if change.max() > 0:
            painted += view.positions[change > 0.5 * change.max()].tolist()
    assert sorted(painted) == span.box_positions(box).tolist()
    assert len(painted) == 1 + 4


def test_select_rows_splits_the_packed_pixels_by_row(vlm):
    """Rows own different numbers of crops (4 and 1): picking rows from the batch equals
    running the processor on those rows."""
    images = [_image(0), random_image(1)]
    inputs = vlm.prepare(text="What is this?", images=images)
    picked = inputs.select_rows([1, 0, 1])
    again = vlm.prepare(text="What is this?", images=[images[1], images[0], images[1]])
    assert inputs.row_sizes()["target_sizes"] == [4, 1]
    for key in ("input_ids", "attention_mask", "pixel_values", "target_sizes"):
        assert torch.equal(picked[key], again[key]), key
