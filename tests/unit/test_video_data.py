"""Video reading and writing: index sampling, both decoder backends, time windows, error messages."""

import importlib.util

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlminterp.data.video import VideoReadError, read_frames, sample_indices, seconds_to_frame_range, write_video

BACKENDS = ["av", pytest.param("decord", marks=pytest.mark.skipif(
    importlib.util.find_spec("decord") is None, reason="decord is not installed on this platform"))]  # fmt: skip
FPS = 8
NUM_FRAMES = 16
# Measured with crf 18 on smooth content: mean |error| ~1.2, max 9 (chroma edges); both backends decode identically.
MEAN_TOLERANCE, MAX_TOLERANCE = 3.0, 24


def smooth_clip(num_frames=NUM_FRAMES, height=48, width=64):
    """Smooth gradients (which H.264 keeps well), 10 grey levels brighter per frame so frames are told apart."""
    t = np.arange(num_frames)[:, None, None, None]
    y = np.arange(height)[None, :, None, None]
    x = np.arange(width)[None, None, :, None]
    channel = np.arange(3)
    return (20 + 10 * t + 1.5 * x + 0.5 * (channel + 1) * y).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    frames = smooth_clip()
    path = write_video(tmp_path_factory.mktemp("video") / "clip.mp4", frames, fps=FPS)
    return path, frames


def source_indices(decoded, source):
    """For each decoded frame, the index of the closest source frame: tells which frames were read."""
    distances = np.abs(decoded[:, None].astype(np.int16) - source[None].astype(np.int16)).mean(axis=(2, 3, 4))
    return distances.argmin(axis=1).tolist()


@st.composite
def sampling_cases(draw):
    total = draw(st.integers(1, 500))
    first = draw(st.integers(0, total - 1))
    last = draw(st.integers(first, total - 1))
    return total, draw(st.integers(1, 64)), first, last


@settings(max_examples=50, deadline=None)
@given(sampling_cases())
def test_sample_indices_are_sorted_in_range_and_uniform(case):
    total, num_frames, first, last = case
    indices = sample_indices(total, num_frames, first, last)
    assert indices.dtype == np.int64 and indices.shape == (num_frames,)
    assert (np.diff(indices) >= 0).all()
    assert indices.min() >= first and indices.max() <= last
    assert indices[0] == first and (num_frames == 1 or indices[-1] == last)
    if num_frames > 1:  # each index is its evenly spaced ideal position truncated (the original's rule)
        ideal = first + np.arange(num_frames) * (last - first) / (num_frames - 1)
        assert ((indices <= ideal + 1e-9) & (indices > ideal - 1 - 1e-9)).all()
    if num_frames <= last - first + 1:
        assert len(set(indices.tolist())) == num_frames  # no repeats while there are enough frames


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 500), st.integers(1, 64))
def test_sample_indices_default_range_is_the_whole_video(total, num_frames):
    indices = sample_indices(total, num_frames)
    assert indices[0] == 0 and (num_frames == 1 or indices[-1] == total - 1)


@pytest.mark.parametrize(("args", "match"), [((0, 4), "0 frames"), ((10, 0), "at least 1"), ((10, 4, 5, 12), "5..12")])
def test_sample_indices_rejects_impossible_requests(args, match):
    with pytest.raises(ValueError, match=match):
        sample_indices(*args)


def test_seconds_to_frame_range_by_hand():
    assert seconds_to_frame_range(16, 8.0, None, None) == (0, 15)
    assert seconds_to_frame_range(16, 8.0, 0.5, 1.0) == (4, 8)  # frames at 0.5, 0.625, ..., 1.0 s
    assert seconds_to_frame_range(16, 8.0, 0.3, 0.6) == (2, 4)  # frame 2 (0.25-0.375 s) is on screen at 0.3 s
    assert seconds_to_frame_range(16, 8.0, 1.5, 99.0) == (12, 15)  # end clipped to the video
    assert seconds_to_frame_range(16, 8.0, 0.51, 0.55) == (4, 4)  # narrower than a frame: the frame on screen
    assert seconds_to_frame_range(300, 30.0, 4.1, 5.0) == (122, 150)  # 4.1 * 30 = 122.99999999999999: as the original
    assert seconds_to_frame_range(900, 30.0, 11.1, 19.6) == (333, 588)  # a real STAR window
    with pytest.raises(ValueError, match="clip.mp4: start 3.0 s is beyond the video's 2.000 s"):
        seconds_to_frame_range(16, 8.0, 3.0, 4.0, "clip.mp4")
    with pytest.raises(ValueError, match="reversed"):
        seconds_to_frame_range(16, 8.0, 1.0, 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_written_frames_read_back_within_tolerance(clip_file, backend):
    path, frames = clip_file
    decoded = read_frames(path, backend=backend)
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    error = np.abs(decoded.astype(np.int16) - frames)
    assert error.mean() < MEAN_TOLERANCE and error.max() <= MAX_TOLERANCE
    assert source_indices(decoded, frames) == list(range(NUM_FRAMES))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"num_frames": 4}, [0, 5, 10, 15]),
        ({"start": 0.5, "end": 1.0}, [4, 5, 6, 7, 8]),
        ({"num_frames": 3, "start": 0.5, "end": 1.0}, [4, 6, 8]),
        ({"num_frames": 3, "start": 1.5}, [12, 13, 15]),  # 13.5 truncates, as np.linspace(..., dtype=int)
        ({"num_frames": 4, "start": 0.3, "end": 1.4}, [2, 5, 8, 11]),  # from frame 2, on screen at 0.3 s
        ({"num_frames": 6, "start": 0.5, "end": 0.75}, [4, 4, 4, 5, 5, 6]),  # more than available: repeats
    ],
)
def test_sampling_reads_the_expected_frames(clip_file, backend, kwargs, expected):
    path, frames = clip_file
    decoded = read_frames(path, backend=backend, **kwargs)
    assert source_indices(decoded, frames) == expected
    np.testing.assert_allclose(decoded, frames[expected], atol=MAX_TOLERANCE)


def test_backends_agree(clip_file):
    pytest.importorskip("decord")
    path, _ = clip_file
    by_av = read_frames(path, num_frames=5, backend="av").astype(np.int16)
    by_decord = read_frames(path, num_frames=5, backend="decord").astype(np.int16)
    assert np.abs(by_av - by_decord).max() <= 2
    np.testing.assert_array_equal(read_frames(path, num_frames=5), read_frames(path, num_frames=5, backend="decord"))


def test_auto_backend_reads_widths_decord_cannot(tmp_path):
    # decord 0.6 raises "DECORDArrayCopyFromTo: The size must exactly match" for 16/24/48 px widths
    frames = smooth_clip(num_frames=4, height=24, width=24)
    decoded = read_frames(write_video(tmp_path / "narrow.mp4", frames), backend="auto")
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(np.int16) - frames).mean() < MEAN_TOLERANCE


def test_unknown_backend_is_rejected(clip_file):
    with pytest.raises(ValueError, match="'opencv' is not one of auto, decord, av"):
        read_frames(clip_file[0], backend="opencv")


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_file_names_the_path(tmp_path, backend):
    path = tmp_path / "nowhere" / "missing.mp4"
    with pytest.raises(FileNotFoundError) as info:
        read_frames(path, backend=backend)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("damage", ["random_bytes", "truncated"])
def test_corrupt_file_gives_one_line_error_naming_the_file(tmp_path, clip_file, backend, damage):
    path = tmp_path / f"{damage}.mp4"
    if damage == "random_bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    else:
        good = clip_file[0].read_bytes()
        path.write_bytes(good[: len(good) // 2])
    with pytest.raises(VideoReadError) as info:
        read_frames(path, backend=backend)
    message = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert message.startswith(f"cannot read video {path}: ") and "\n" not in message
    assert info.value.path == str(path)


def test_write_video_rejects_odd_sizes_and_leaves_no_temporary_files(tmp_path):
    with pytest.raises(ValueError, match="odd.mp4: yuv420p needs even frame sizes, got 47x64"):
        write_video(tmp_path / "odd.mp4", smooth_clip(height=47))
    write_video(tmp_path / "sub" / "ok.mp4", smooth_clip(num_frames=2))
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["ok.mp4"]


def test_write_video_sets_the_frame_rate(tmp_path):
    import av

    path = write_video(tmp_path / "fps.mp4", smooth_clip(num_frames=6), fps=12)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == 12 and stream.frames == 6 and stream.codec_context.name == "h264"


def test_pyav_reads_containers_without_a_frame_count(tmp_path):
    import av

    frames = smooth_clip(num_frames=6)
    path = tmp_path / "clip.mkv"  # Matroska stores no frame count: the reader must count by decoding
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0
    decoded = read_frames(path, num_frames=3, start=0.25, backend="av")
    assert source_indices(decoded, frames) == [2, 3, 5]  # frames 2..5, 3.5 truncates to 3
