"""InternVL specifics: tiles + thumbnail in one run, their geometry checked by painting through
the real processor; the crop count per row (the processor drops ``num_patches``)."""

import pytest
import torch
from support import random_image, random_video, tiny
from painted import check_views, painted

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


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
    bright_views = check_views(span, inputs["pixel_values"], box, MEAN, STD)
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


def test_frames_are_not_resampled_even_where_the_processor_would():
    """A checkpoint whose video processor samples frames (do_sample_frames, num_frames) would
    drop frames: the family's video_kwargs turn it off, so 8 frames given are 8 groups."""
    vlm = tiny("tiny-internvl")
    vp = vlm.processor.video_processor
    vp.do_sample_frames, vp.num_frames = True, 4
    try:
        resampled = vlm.processor(text=["<video>"], videos=[list(random_video(0))],
                                  return_tensors="pt")
        inputs = vlm.prepare(text="Which?", video=[random_video(0)])
    finally:
        vp.do_sample_frames, vp.num_frames = False, None
    assert len(resampled["pixel_values"]) == 4
    assert len(inputs["pixel_values"]) == 8
    assert [g.frames for g in vlm.layout(inputs)[0].videos[0].groups] == \
        [(k, k + 1) for k in range(8)]
