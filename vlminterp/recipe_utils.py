"""Plumbing shared by the video recipes: load a video model, open the dataset, check the frame
flags, and run every sample resumably."""

from __future__ import annotations

from pathlib import Path

import torch

from .video.counterfactuals import check_span, parse_swap_spans
from .tokens import TokenSlice

VIDEO_FAMILIES = ("qwen2_vl", "qwen2_5_vl")


def add_video_args(p) -> None:
    """The flags every video recipe shares: data, output, model, device, frames, resuming and
    NDIF (``--remote``, ``--ndif-host``, ``--ndif-api-key``)."""
    from .remote import add_arguments as add_remote_arguments

    a = p.add_argument
    a("--annotations", type=Path, help="video-QA annotations JSON (a list of entries)")
    a("--video_root", type=Path, help="folder holding the annotations' video_name files "
      "(default: ANNOTATIONS_DIR/videos, else ANNOTATIONS_DIR)")
    a("--output", type=Path, required=True, help="result JSON; OUTPUT.jsonl keeps finished "
      "samples so a re-run with the same --output resumes")
    a("--model_id", default="tiny-qwen2-vl", help="video model id or local dir (default: "
      "tiny-qwen2-vl, offline random weights; e.g. Qwen/Qwen2-VL-7B-Instruct)")
    a("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    a("--num_frames", type=int, default=8, help="frames sampled uniformly within [start, end] "
      "of each video (default: 8)")
    a("--synthetic", type=int, metavar="N", help="without --annotations: write N synthetic "
      "videos (moving squares, known answers) next to --output and use them")
    a("--retry_errors", action="store_true", help="on resume, retry samples that failed before "
      "(default: keep their recorded errors)")
    add_remote_arguments(p)


def load_video_model(args):
    """The recipe's video-capable model from its flags: `vlminterp.load` of ``args.model_id``
    on ``args.device`` (default: cuda if available), or with ``args.remote`` a `RemoteVLM` on
    ``args.ndif_host`` (`vlminterp.remote.load_from_args`). Raises ValueError naming the flag.
    Tiny offline models run single-threaded: with hidden size 64, intra-op threads cost more
    than they save, and on a busy machine their spin-waiting made the demo ~20x slower."""
    from .remote import load_from_args

    remote = getattr(args, "remote", False)
    if remote and args.device is not None:
        raise ValueError("--device: the NDIF server places the model; drop it with --remote")
    if args.model_id.startswith("tiny-"):
        torch.set_num_threads(1)
    try:
        vlm = load_from_args(args, args.model_id,
                             device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except ValueError as e:
        raise ValueError(f"--remote: {e}" if remote else str(e)) from None
    if vlm.family.name not in VIDEO_FAMILIES:
        raise ValueError(f"model_id {args.model_id!r} ({vlm.family.name}) does not take video; "
                         f"use a Qwen2-VL / Qwen2.5-VL model")
    return vlm


def exit_on_remote_error(main):
    """Decorate a recipe's ``main``: a `RemoteError` (NDIF server unreachable, died, refused
    the job) stops the run with its one-line message on stderr and exit status 1. It is
    never a sample's error: the finished samples are already in the results log, so a rerun
    resumes after them."""
    import functools
    import sys

    from .remote import RemoteError

    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except RemoteError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(1) from None

    return run


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


def run_resumable(samples, log_path, work, desc: str, retry_errors: bool = False):
    """``work(sample) -> records`` for every sample not yet in the `ResultLog` at ``log_path``,
    with a tqdm bar. A missing or unreadable video (or another per-sample ValueError) is logged as
    that sample's error and the run goes on; a `RemoteError` (a server fault, not the
    sample's) propagates and stops the run. Returns ``(records, errors)`` in dataset order."""
    from tqdm import tqdm

    from .data.video import VideoReadError
    from .store import ResultLog

    log = ResultLog(log_path, retry_errors=retry_errors)
    todo = [s for s in samples if s.question_id not in log.done]
    for s in tqdm(todo, desc=desc, unit="sample", total=len(samples),
                  initial=len(samples) - len(todo)):
        try:
            records = work(s)
        except (OSError, VideoReadError, ValueError) as e:
            log.append_error(s.question_id, f"{type(e).__name__}: {e}")
            continue
        log.append(s.question_id, records)
    order = {s.question_id: i for i, s in enumerate(samples)}
    records = sorted(log.records(), key=lambda r: order.get(r["question_id"], len(order)))
    errors = [{"question_id": q, "error": log.errors[q]} for q in sorted(
        log.errors, key=lambda q: order.get(q, len(order)))]
    return records, errors
