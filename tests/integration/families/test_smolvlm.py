"""SmolVLM2 / Idefics3 specifics: row/column tiles + a global view, their geometry checked by
painting through the real processor; per-frame ``Frame from mm:ss:`` markers after the intro
sentence, timestamps from the frames' rate; frames never resampled by the processor."""

import pytest
from support import random_video, tiny
from painted import check_views, painted

HALF = [0.5, 0.5, 0.5]

# The tiny processors resize the longest edge to 64 px and cut 32 px tiles of 4x4 cells. The
# boxes sit on cell borders of every view (tiles and the global view), so no cell is partial.
CASES = [((128, 96), (32, 24, 64, 48), (2, 2)), ((128, 96), (64, 48, 128, 72), (2, 2)),
         ((96, 128), (0, 64, 24, 96), (2, 2)), ((160, 40), (40, 10, 80, 30), (1, 2))]


@pytest.mark.parametrize("model_id", ["tiny-smolvlm2", "tiny-idefics3"])
@pytest.mark.parametrize("size,box,grid", CASES)
def test_a_painted_box_is_bright_exactly_in_the_cells_box_positions_names(model_id, size, box,
                                                                          grid):
    vlm = tiny(model_id)
    inputs = vlm.prepare(text="What is this?", images=[painted(size, box)])
    span = vlm.layout(inputs)[0].images[0]
    rows, cols = grid
    assert [v.kind for v in span.views] == ["tile"] * (rows * cols) + ["global"]
    assert [v.source for v in span.views] == list(range(rows * cols + 1))
    tags = [vlm.tokenizer.decode(inputs["input_ids"][0, v.separators[-1]]) for v in span.views]
    assert tags == [f"<row_{r + 1}_col_{c + 1}>" for r in range(rows) for c in range(cols)] + \
        ["<global-img>"]
    lit = check_views(span, inputs["pixel_values"][0], box, HALF, HALF)
    assert 2 <= lit < len(span.views)  # the global view and some, not all, tiles


def test_without_splitting_an_image_is_one_global_view():
    """The processor upsizes every image to its longest edge (then tiles it); with
    ``do_image_splitting=False`` the image is squared to one tile: a single global view."""
    vlm = tiny("tiny-smolvlm2")
    inputs = vlm.prepare(text="What is this?", images=[painted((32, 32), (8, 8, 16, 24))],
                         do_image_splitting=False)
    span = vlm.layout(inputs)[0].images[0]
    assert [(v.kind, v.source) for v in span.views] == [("global", None)]
    assert check_views(span, inputs["pixel_values"][0], (8, 8, 16, 24), HALF, HALF) == 1


@pytest.mark.parametrize("fps", [1.0, 2.0])
def test_frame_timestamps_are_markers_and_follow_the_frame_rate(fps):
    vlm = tiny("tiny-smolvlm2")
    inputs = vlm.prepare(text="Which?", video=[random_video(0)], fps=fps)
    row = vlm.layout(inputs)[0]
    video = row.videos[0]
    text = vlm.tokenizer.decode(inputs["input_ids"][0, video.markers])
    assert text.startswith("You are provided the following series of eight frames")
    stamps = [f"Frame from 00:{int(k / fps):02d}:" for k in range(8)]
    assert [part.split("<")[0] for part in text.split("\n")[2:10]] == stamps
    assert set(video.markers.tolist()) <= set(row.markers.tolist())
    for k, group in enumerate(video.groups):  # each frame its own run, after its label
        assert group.frames == (k, k + 1)
        label = vlm.tokenizer.decode(inputs["input_ids"][0, :int(group.positions[0])])
        assert label.endswith(stamps[k] + "<fake_token_around_image><global-img>")


def test_frames_are_not_resampled_even_where_the_processor_would():
    """SmolVLM2 checkpoints configure sampling (video_sampling: fps 1, max_frames 64): with
    sampling on, the processor would keep 4 of 8 frames; the family's video_kwargs turn it
    off, so 8 frames given are 8 groups."""
    vlm = tiny("tiny-smolvlm2")
    vp = vlm.processor.video_processor
    vp.do_sample_frames, vp.num_frames, vp.fps = True, 4, 1
    try:
        meta = [{"total_num_frames": 8, "fps": 1.0, "duration": 8.0}]
        resampled = vlm.processor(text=["<video>"], videos=[list(random_video(0))],
                                  video_metadata=meta, return_tensors="pt")
        inputs = vlm.prepare(text="Which?", video=[random_video(0)])
    finally:
        vp.do_sample_frames, vp.num_frames, vp.fps = False, None, None
    assert resampled["pixel_values"].shape[1] == 4
    assert inputs["pixel_values"].shape[1] == 8
    assert [g.frames for g in vlm.layout(inputs)[0].videos[0].groups] == \
        [(k, k + 1) for k in range(8)]
