"""Read video files into ``[T, H, W, C]`` uint8 RGB arrays, and write small mp4s.

Reading uses decord when it is importable (faster) and PyAV otherwise; both return the same frames
for the same indices. ``start``/``end`` are seconds, as in video QA annotations, converted to frame
indices with the stream's average frame rate exactly as the video study's original does, so the
same frames are read: frame ``int(t * fps)`` is the one on screen at time t (frame i is shown
during [i / fps, (i + 1) / fps)), and ``num_frames`` indices are
``np.linspace(first, last, num_frames, dtype=int)`` (truncated, not rounded).
"""

import os
from pathlib import Path
import numpy as np
from jaxtyping import Int64, UInt8

BACKENDS = ("auto", "decord", "av")


class VideoReadError(RuntimeError):
    """A video file exists but cannot be decoded (corrupt, truncated, no video stream, ...)."""

    def __init__(self, path: str | os.PathLike, reason: str | BaseException):
        self.path = str(path)
        self.reason = " ".join(str(reason).split())[:300]  # library errors can span several lines
        super().__init__(f"cannot read video {self.path}: {self.reason}")


def sample_indices(total: int, num_frames: int, first: int = 0, last: int | None = None) -> Int64[np.ndarray, " n"]:
    """``num_frames`` frame indices spread evenly over ``first..last`` (both inclusive), truncated
    to integers as the original's ``np.linspace(first, last, num_frames, dtype=int)``.

    ``last`` defaults to ``total - 1``. When more frames are asked for than the range holds,
    indices repeat (still sorted), so a model always gets the frame count it expects.
    """
    last = total - 1 if last is None else last
    if total < 1:
        raise ValueError(f"cannot sample frames from a video with {total} frames")
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    if not 0 <= first <= last < total:
        raise ValueError(f"frame range {first}..{last} is not inside 0..{total - 1}")
    return np.linspace(first, last, num_frames, dtype=int).astype(np.int64)


def seconds_to_frame_range(
    total: int, fps: float, start: float | int | None, end: float | int | None, path: str | os.PathLike = "video"
) -> tuple[int, int]:
    """Inclusive frame range of the window [start, end] seconds: ``int(start * fps)`` (the frame on
    screen at ``start``) to ``int(end * fps)`` clipped to the last frame, as the original computes
    it (float products truncated as they are: the same frames as the original, float error
    included). A window inside one frame interval gives that single frame.
    """
    if not fps > 0:
        fps = 1.0  # a stream without a usable rate: the original falls back to 1 fps too
    duration = total / fps
    start_s = 0.0 if start is None else float(start)
    end_s = None if end is None else float(end)
    if start_s < 0 or (end_s is not None and end_s < start_s):
        raise ValueError(f"{path}: time window {start_s}..{end_s} s is negative or reversed")
    first = int(start_s * fps)
    if first > total - 1:
        raise ValueError(f"{path}: start {start_s} s is beyond the video's {duration:.3f} s")
    last = total - 1 if end_s is None else min(int(end_s * fps), total - 1)
    return first, max(first, last)


def _resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    try:
        import decord  # noqa: F401
    except ImportError:
        return "av"
    return "decord"


def _indices_for(total: int, fps: float, num_frames, start, end, path) -> np.ndarray:
    first, last = seconds_to_frame_range(total, fps, start, end, path)
    if num_frames is None:
        return np.arange(first, last + 1, dtype=np.int64)
    return sample_indices(total, num_frames, first, last)


def _read_decord(path: Path, num_frames, start, end) -> np.ndarray:
    import decord

    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
        total, fps = len(reader), float(reader.get_avg_fps())
    except Exception as error:  # decord raises its own DECORDError / RuntimeError types
        raise VideoReadError(path, error) from error
    if total < 1:
        raise VideoReadError(path, "contains no video frames")
    indices = _indices_for(total, fps, num_frames, start, end, path)
    unique, inverse = np.unique(indices, return_inverse=True)  # decode a repeated frame once
    try:
        decoded = reader.get_batch(unique.tolist()).asnumpy()
    except Exception as error:
        raise VideoReadError(path, error) from error
    return decoded[inverse.reshape(-1)]


def _open_av(path: Path):
    import av

    try:
        return av.open(str(path))
    except Exception as error:  # av.error.InvalidDataError and friends
        raise VideoReadError(path, error) from error


def _read_av(path: Path, num_frames, start, end) -> np.ndarray:
    with _open_av(path) as container:
        if not container.streams.video:
            raise VideoReadError(path, "has no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        if not rate:
            raise VideoReadError(path, "has no frame rate")
        # Some containers (Matroska) store no frame count; counting means decoding once without conversion.
        total = stream.frames if stream.frames > 0 else len(_decode_wanted(path, container, stream, None))
    if total < 1:
        raise VideoReadError(path, "contains no video frames")
    indices = _indices_for(total, float(rate), num_frames, start, end, path)
    with _open_av(path) as container:
        decoded = _decode_wanted(path, container, container.streams.video[0], set(indices.tolist()))
    missing = sorted(set(indices.tolist()) - decoded.keys())
    if missing:
        raise VideoReadError(path, f"header says {total} frames but frame {missing[0]} does not decode")
    return np.stack([decoded[i] for i in indices.tolist()])


def _decode_wanted(path: Path, container, stream, wanted: set[int] | None) -> dict[int, np.ndarray | None]:
    """Frames decoded in order; only ``wanted`` ones are converted to RGB (None: count all, convert none).

    Keeping only the wanted frames bounds memory by ``num_frames``, not by the video's length.
    """
    stream.thread_type = "AUTO"
    last = max(wanted) if wanted else None
    decoded: dict[int, np.ndarray | None] = {}
    try:
        for index, frame in enumerate(container.decode(stream)):
            if wanted is None:
                decoded[index] = None
            elif index in wanted:
                decoded[index] = frame.to_ndarray(format="rgb24")
            if last is not None and index >= last:
                break
    except Exception as error:  # a corrupt packet mid-stream
        raise VideoReadError(path, error) from error
    return decoded


def read_frames(
    path: str | os.PathLike,
    num_frames: int | None = None,
    start: float | int | None = None,
    end: float | int | None = None,
    backend: str = "auto",
) -> UInt8[np.ndarray, "t h w 3"]:
    """RGB frames of a video, optionally ``num_frames`` sampled uniformly within [start, end] seconds.

    Raises ``FileNotFoundError`` for a missing file and ``VideoReadError`` for one that cannot be
    decoded; ``backend`` forces "decord" or "av" ("auto": decord if importable, PyAV if decord fails).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"video file not found: {path}")
    if path.is_dir():
        raise VideoReadError(path, "is a directory, not a video file")
    chosen = _resolve_backend(backend)
    if chosen == "av":
        frames = _read_av(path, num_frames, start, end)
    elif backend == "decord":
        frames = _read_decord(path, num_frames, start, end)
    else:
        try:
            frames = _read_decord(path, num_frames, start, end)
        except VideoReadError:
            # decord 0.6 fails on some frame widths (16, 24, 48 px: "DECORDArrayCopyFromTo: The size
            # must exactly match"); PyAV reads them, and gives the error if the file really is bad.
            frames = _read_av(path, num_frames, start, end)
    return np.ascontiguousarray(frames, dtype=np.uint8)


def write_video(path: str | os.PathLike, frames: UInt8[np.ndarray, "t h w 3"], fps: int = 8, crf: int = 18) -> Path:
    """Write RGB frames as an H.264 (libx264, yuv420p) mp4; height and width must be even.

    The file appears atomically (written under a temporary name, then renamed), so an interrupted
    run never leaves a truncated video behind. ``crf`` trades size for fidelity (0 = lossless luma).
    """
    import av

    path = Path(path)
    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"{path}: yuv420p needs even frame sizes, got {height}x{width}")
    if len(frames) < 1:
        raise ValueError(f"{path}: no frames to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with av.open(str(tmp_path), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"crf": str(crf)}
            for image in frames:
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode())  # flush the encoder's buffered frames
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)
    return path


def reference_frames(
    path: str | os.PathLike,
    fps: float | None = None,
    nframes: int | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    total_pixels: int | None = None,
    start: float | None = None,
    end: float | None = None,
    patch_size: int = 14,
) -> tuple[UInt8[np.ndarray, "t h w 3"], list[int]]:
    """Frames sampled and resized as Qwen's reference implementation does for its checkpoints
    (``qwen_vl_utils.fetch_video``: ``fps`` frames per second (default 2), at least 4, an even
    count, or exactly ``nframes``; each frame resized to multiples of 2 * ``patch_size`` within
    ``min_pixels``/``max_pixels`` and an even share of ``total_pixels``; bicubic). Returns the
    frames (rounded to uint8, ready for `VLM.prepare`, whose processor then keeps their size)
    and the indices of the source frames taken. Needs ``pip install 'vlminterp[qwen]'``.
    Qwen3-VL and Qwen3.5 use ``patch_size=16``."""
    try:
        from qwen_vl_utils import fetch_video
    except ImportError as error:
        raise ImportError("reference_frames needs qwen-vl-utils: pip install 'vlminterp[qwen]'"
                          ) from error
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"video file not found: {path}")
    if fps is not None and nframes is not None:
        raise ValueError("reference_frames: give fps or nframes, not both")
    options = {"fps": fps, "nframes": nframes, "min_pixels": min_pixels,
               "max_pixels": max_pixels, "total_pixels": total_pixels,
               "video_start": start, "video_end": end}
    ele = {"video": str(path), **{k: v for k, v in options.items() if v is not None}}
    video, meta = fetch_video(ele, image_patch_size=patch_size, return_video_metadata=True)
    frames = np.clip(np.rint(video.numpy()), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(frames), [int(i) for i in meta["frames_indices"]]
