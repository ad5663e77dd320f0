"""GLM-4.1V / 4.5V / 4.6V specifics: video frames carry the *image* token id (only
``mm_token_type_ids`` tells them apart) and a timestamp text follows each temporal group."""

import pytest
import torch
from support import media_pair, random_video, tiny

from vlminterp.interventions import site_tensor


def test_video_runs_use_the_image_token_and_are_told_apart_by_mm_token_type_ids():
    vlm = tiny("tiny-glm4.1v")
    cfg = vlm.torch_model.config
    for kind in ("image", "video"):
        inputs = media_pair(vlm, kind)
        row = vlm.layout(inputs)[0]
        ids = inputs["input_ids"][0]
        assert set(ids[row.visual].tolist()) == {cfg.image_token_id}
        assert cfg.video_token_id not in ids.tolist()
        types = inputs["mm_token_type_ids"][0, row.visual]
        assert set(types.tolist()) == {2 if kind == "video" else 1}
        assert (len(row.videos), len(row.images)) == ((1, 0) if kind == "video" else (0, 1))
    grid_t = int(inputs["video_grid_thw"][0, 0])
    assert len(row.videos[0].groups) == grid_t == 4


@pytest.mark.parametrize("model_id,fps,want", [
    ("tiny-glm4.1v", 2.0, ["0", "1", "2", "3"]),  # integer seconds of each group's first frame
    ("tiny-glm4.1v", 1.0, ["0", "2", "4", "6"]),
    ("tiny-glm4.6v", 2.0, ["0.0 seconds", "1.0 seconds", "2.0 seconds", "3.0 seconds"]),
])
def test_each_group_is_followed_by_its_timestamp_marker(model_id, fps, want):
    """The timestamps are the group's first input frame / fps, as the processor writes them;
    the layout keeps them as markers, apart from the patch tokens."""
    vlm = tiny(model_id)
    inputs = vlm.prepare(text="Which?", video=[random_video(0)], fps=fps)
    row = vlm.layout(inputs)[0]
    video = row.videos[0]
    ids = inputs["input_ids"][0]
    stamps = []
    for group in video.groups:
        after = [p for p in video.markers.tolist() if p > int(group.positions.max())]
        run = [after[0]]
        while run[-1] + 1 in after:
            run.append(run[-1] + 1)
        stamps.append(vlm.tokenizer.decode(ids[run]))
        assert run[0] == int(group.positions.max()) + 2  # after the group's <|end_of_image|>
    assert stamps == want
    assert set(video.markers.tolist()) <= set(row.markers.tolist())
    assert not set(video.markers.tolist()) & set(row.visual.tolist())


def test_odd_frame_count_pads_the_last_group_and_frame_spans_keep_their_meaning():
    """7 frames: the processor repeats the last frame to fill group 3, which holds input frame
    6 only; ``visual_frames:a:b`` selects the groups whose pixels really change."""
    vlm = tiny("tiny-glm4.1v")
    base = random_video(5, frames=7)
    inputs = vlm.prepare(text="Which?", video=[base])
    lay = vlm.layout(inputs)
    assert [g.frames for g in lay[0].videos[0].groups] == [(0, 2), (2, 4), (4, 6), (6, 7)]
    span = lay.frame_span(3, 5)
    assert span.groups == (1, 2) and span.frames == (2, 6) and not span.exact
    for frame in (3, 6):
        other = base.copy()
        other[frame] = 255 - other[frame]
        pair = vlm.prepare(text="Which?", video=[base, other])
        with torch.no_grad(), vlm.trace(pair):
            h = site_tensor(vlm.residual("embed")).save()
        changed = ((h[0] - h[1]).abs().amax(-1) > 1e-6).nonzero().flatten()
        assert changed.tolist() == vlm.layout(pair).positions(
            f"visual_frames:{frame}:{frame + 1}").tolist()


def test_a_box_painted_through_the_real_processor_lands_in_its_box_positions():
    """GLM resizes to multiples of 28 px under a pixel budget counted over 2 frames (168x112
    -> 84x56 here); a white box on black, aligned to cells after the resize, changes exactly
    the patches of the tokens `box_positions` names (token j owns patch rows 4j..4j+3)."""
    from PIL import Image

    vlm = tiny("tiny-glm4.1v")
    black = Image.new("RGB", (168, 112))
    boxed = black.copy()
    box = (56, 56, 168, 112)
    boxed.paste((255, 255, 255), box)
    inputs = vlm.prepare(text="What is this?", images=[black, boxed])
    view = vlm.layout(inputs)[1].images[0].views[0]
    assert view.geometry.resized == (84, 56) and view.grid == (2, 3)
    rows = inputs.row_sizes()["pixel_values"]
    a, b = inputs["pixel_values"].split(rows)
    change = (a - b).abs().mean(-1).view(-1, 4).mean(-1)  # per merged token
    painted = (change > 0.5 * change.max()).nonzero().flatten()
    want = view.box_positions(box) - int(view.positions.min())
    assert painted.tolist() == want.tolist() == [4, 5]
