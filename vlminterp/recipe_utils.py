"""Plumbing shared by the video recipes: load a video model, open the dataset, check the frame
flags, read a sample's frames quietly, and run every sample resumably (`vlminterp.runs`)."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from pathlib import Path

import torch

from . import load_flags
from .checks import RecipeError, SampleError, check_device, check_output, load_checked
from .shards import add_shard_arg, merging
from .runs import (add_run_args, final_line, logged_results, open_log, recipe_main, result_config,
                   run_logged)
from .video.counterfactuals import check_span, parse_swap_spans
from .tokens import TokenSlice

__all__ = ["RecipeError", "SampleError", "check_device", "check_output", "load_checked",
           "add_run_args", "final_line", "logged_results", "open_log", "recipe_main",
           "result_config", "run_logged", "add_video_args", "load_video_model",
           "exit_on_remote_error", "open_video_dataset", "check_frame_args", "run_resumable",
           "sample_frames", "quiet_native_stderr", "VIDEO_RESULT_FLAGS", "check_run_args"]

# Video flags that change a sample's records (each recipe adds its own).
VIDEO_RESULT_FLAGS = ("model_id", "annotations", "video_root", "synthetic", "num_frames",
                      *load_flags.RESULT_FLAGS)


def add_video_args(p, model_default: str | None = "tiny-qwen2-vl") -> None:
    """The flags every video recipe shares: data, output, model, device and loading
    (``--dtype``, ``--device_map``, ``--offload_folder``, ``--quantization``), frames, resuming,
    ``--shard`` and NDIF (``--remote``, ``--ndif-host``, ``--ndif-api-key``).
    ``model_default=None``: the recipe picks the model (the zoo's ``tiny-qwen2-vl-motion`` with
    ``--synthetic``)."""
    from .remote import add_arguments as add_remote_arguments

    a = p.add_argument
    a("--annotations", type=Path, help="video-QA annotations JSON (a list of entries)")
    a("--video_root", type=Path, help="folder holding the annotations' video_name files "
      "(default: ANNOTATIONS_DIR/videos, else ANNOTATIONS_DIR)")
    a("--output", type=Path, required=True, help="result JSON; OUTPUT.jsonl keeps finished "
      "samples so a re-run with the same --output resumes")
    default = model_default or ("tiny-qwen2-vl-motion (trained on the --synthetic data) with "
                                "--synthetic, else tiny-qwen2-vl")
    a("--model_id", default=model_default, help="video model id or local dir: e.g. "
      "Qwen/Qwen2-VL-7B-Instruct, tiny-qwen2-vl (offline, random weights) or the zoo's "
      f"tiny-qwen2-vl-motion (offline, trained on the --synthetic videos) (default: {default})")
    a("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    a("--num_frames", type=int, default=8, help="frames sampled uniformly within [start, end] "
      "of each video (default: 8)")
    a("--synthetic", type=int, metavar="N", help="without --annotations: write N synthetic "
      "videos (moving squares, known answers) next to --output and use them")
    a("--retry_errors", action="store_true", help="on resume, retry samples that failed before "
      "(default: keep their recorded errors)")
    load_flags.add_load_args(p)
    add_run_args(p)
    add_shard_arg(p)
    add_remote_arguments(p)


def load_video_model(args):
    """The recipe's video-capable model from its flags: `vlminterp.load` of ``args.model_id``
    on ``args.device`` (default: cuda if available) with the loading flags
    (`vlminterp.load_flags`), or with ``args.remote`` a `RemoteVLM` on ``args.ndif_host``
    (`vlminterp.remote.load_from_args`); inside a merge, without weights. Raises ValueError
    naming the flag.
    Tiny offline models run single-threaded: with hidden size 64, intra-op threads cost more
    than they save, and on a busy machine their spin-waiting made the demo ~20x slower."""
    from .remote import load_from_args

    remote = getattr(args, "remote", False)
    if remote and args.device is not None:
        raise ValueError("--device: the NDIF server places the model; drop it with --remote")
    if args.model_id.startswith("tiny-"):
        torch.set_num_threads(1)
    if remote and not merging():
        try:
            vlm = load_from_args(args, args.model_id)
        except ValueError as e:
            raise ValueError(f"--remote: {e}") from None
    else:
        vlm = load_flags.load_model(args)
    if not vlm.family.takes_video:
        from .models import FAMILIES

        video = ", ".join(f.name for f in FAMILIES if f.takes_video)
        raise ValueError(f"--model_id {args.model_id!r} ({vlm.family.name}) does not take video; "
                         f"video families: {video}")
    return vlm


exit_on_remote_error = recipe_main  # the older name


def check_run_args(args) -> None:
    """Before any work: ``--output`` is a writable file path, and for local runs ``--device``
    a device this machine has and the loading flags usable (`vlminterp.load_flags`). Raises
    `RecipeError`."""
    check_output(args.output)
    load_flags.load_kwargs(args)  # checks them (and --dtype auto -> the default it equals)


def open_video_dataset(annotations, video_root, synthetic: int | None, out_dir, num_frames: int):
    """The recipe's dataset: ``annotations`` (+ ``video_root``, default: the annotations' folder's
    ``videos/`` if present, else the folder), or ``synthetic`` N videos written to
    ``out_dir/synthetic``. Raises ValueError naming the bad input."""
    from .data.synthetic import write_dataset
    from .data.videoqa import VideoQADataset

    if annotations is None:
        if synthetic is None:
            raise ValueError("give --annotations FILE (and --video_root DIR) or --synthetic N")
        if synthetic < 1:
            raise ValueError(f"--synthetic: expected a positive number of videos, got {synthetic}")
        annotations = write_dataset(Path(out_dir) / "synthetic", synthetic, num_frames=num_frames)
    annotations = Path(annotations)
    if video_root is None:
        video_root = annotations.parent / "videos"
        video_root = video_root if video_root.is_dir() else annotations.parent
    try:
        return VideoQADataset(annotations, video_root, num_frames=num_frames)
    except OSError as e:
        raise ValueError(f"cannot read annotations {str(annotations)!r}: {e.strerror or e}") from None


def check_frame_args(token_slice: str, swap_spans: str, num_frames: int):
    """Validate the recipe's --token_slice and --swap_spans ('none' = no local_swap) against
    ``num_frames`` before any work; returns ``(TokenSlice, spans or None)``."""
    spans = None if swap_spans == "none" else parse_swap_spans(swap_spans)
    for span in spans or ():
        check_span(span, num_frames, f"--swap_spans {swap_spans!r}")
    sl = TokenSlice.parse(token_slice)
    if sl.kind == "visual_frames" and sl.stop > num_frames:
        raise ValueError(f"--token_slice {token_slice!r} is beyond the video's {num_frames} "
                         f"frames (--num_frames)")
    return sl, spans


def run_resumable(samples, log_path, work, desc: str, retry_errors: bool = False,
                  config: dict | None = None):
    """``work(sample) -> records`` for every sample not yet in the `ResultLog` at ``log_path``
    (`vlminterp.runs.run_logged`: a sample's data error is logged and the run goes on; a
    configuration error stops it). Returns ``(records, errors)`` of ``samples``, in their order."""
    from .store import ResultLog

    log = ResultLog(log_path, retry_errors=retry_errors, config=config)
    run_logged(samples, log, work, desc)
    records, errors = logged_results(samples, log)
    return records, [{"question_id": q, "error": e} for q, e in errors.items()]


@contextlib.contextmanager
def quiet_native_stderr():
    """Send what native libraries write to file descriptor 2 to /dev/null for the block: video
    decoders print their own complaints about a bad file ("moov atom not found"), which the
    sample's one-line error already reports."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _window_frames(path: Path, start, end) -> int | None:
    """Frames inside [start, end] by the container's header (no decoding); None if unknown."""
    from .data.video import seconds_to_frame_range

    try:
        import av

        with quiet_native_stderr(), av.open(str(path)) as container:
            stream = container.streams.video[0]
            total, rate = stream.frames, stream.average_rate or stream.guessed_rate
        if total < 1 or not rate:
            return None
        first, last = seconds_to_frame_range(total, float(rate), start, end, path)
    except Exception:  # unreadable: the read itself reports it
        return None
    return last - first + 1


def sample_frames(data, sample):
    """The sample's frames, read with native decoder noise silenced. Warns when its window
    holds fewer frames than the dataset's ``num_frames`` (sampled frames then repeat). Raises
    `SampleError` / OSError / VideoReadError: a problem of this sample, recorded as its error."""
    path = data.video_path(sample)
    with quiet_native_stderr():
        try:
            frames = data.load_frames(sample)
        except ValueError as e:  # a time window beyond the video, ...
            raise SampleError(str(e)) from None
    want = data.num_frames
    have = _window_frames(path, sample.start, sample.end) if want else None
    if have is not None and have < want:
        warnings.warn(f"{path}: only {have} frame(s) in its [start, end] window, fewer than "
                      f"--num_frames {want}; sampled frames repeat", stacklevel=2)
    return frames
