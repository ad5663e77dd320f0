"""Qwen's reference frame sampling (qwen-vl-utils) through `reference_frames`, and the tiny
Qwen2-VL processor keeping the size it chose: token counts match what the real checkpoints'
users get with the reference pipeline."""

import numpy as np
import pytest
from support import tiny

from vlminterp.data.synthetic import make_video
from vlminterp.data.video import reference_frames, write_video


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    frames = np.concatenate([make_video("right", "red", num_frames=12, size=112)] * 2)[:, :, :96]
    return write_video(tmp_path_factory.mktemp("ref") / "clip.mp4", frames, fps=8)  # 24 frames, 3 s


def test_fps_sampling_and_resize_follow_the_reference(clip):
    frames, idx = reference_frames(clip, fps=2.0, min_pixels=56 * 56, max_pixels=112 * 112)
    # 3 s at 2 fps = 6 frames (>= 4, even), spread over frames 0..23 as linspace(...).round()
    assert idx == [int(i) for i in np.rint(np.linspace(0, 23, 6))]
    t, h, w, _ = frames.shape
    assert t == 6 and h % 28 == 0 and w % 28 == 0 and 56 * 56 <= h * w <= 112 * 112
    assert frames.dtype == np.uint8


def test_the_processor_keeps_the_reference_size(clip):
    vlm = tiny("tiny-qwen2-vl")
    frames, _ = reference_frames(clip, nframes=4, min_pixels=56 * 56, max_pixels=112 * 112)
    inputs = vlm.prepare(text="Which direction?", video=[frames])
    t, h, w = (int(x) for x in inputs["video_grid_thw"][0])
    assert (t * 2, h * 14, w * 14) == frames.shape[:3]


def test_bad_arguments(clip, tmp_path):
    with pytest.raises(ValueError, match="fps or nframes, not both"):
        reference_frames(clip, fps=2.0, nframes=4)
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        reference_frames(tmp_path / "missing.mp4")
