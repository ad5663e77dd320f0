"""What the three ``recipes.neo2024_*`` command lines share: flags, model and data loading, the
resumable per-image loop (keyed by the settings that change results), and the settings a
results JSON records."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from vlminterp.checks import RecipeError, check_device, check_output, load_checked
from vlminterp.data.coco import CocoError, CocoObjects, ObjectSample
from vlminterp.remote import add_arguments as add_remote_arguments
from vlminterp.runs import add_run_args, logged_results, open_log, result_config, run_logged

# Flags of every neo2024 recipe that change an image's records; each recipe adds its own.
# Which images run (--limit, curation) does not change an image's records: results list only
# this run's images.
RESULT_FLAGS = ("model_id", "dtype", "coco_annotations", "image_root", "synthetic", "seed",
                "use_boxes", "keep_all")
SELECTION_FLAGS = ("limit", "no_curate", "max_annotations", "min_area", "max_area", "inclusive_area",
                   "only_with_questions")


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Model, data and output flags every neo2024 recipe takes."""
    p.add_argument("--model_id", default="tiny-llava", help="tiny-llava (offline, random weights), "
                   "tiny-qwen2-vl, llava-hf/llava-1.5-7b-hf, Qwen/Qwen2-VL-7B-Instruct or a local dir "
                   "(default: tiny-llava)")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--coco_annotations", type=Path, help="COCO instances_*.json (needs --image_root)")
    data.add_argument("--synthetic", type=int, metavar="N", help="generate N images with known "
                      "objects next to --output and use them (offline)")
    p.add_argument("--image_root", type=Path, help="folder the annotations' file_name values are under")
    p.add_argument("--output", type=Path, required=True, help="results JSON; the per-image log "
                   "<output>.jsonl beside it makes reruns skip finished images")
    p.add_argument("--limit", type=int, default=None, help="use at most this many samples")
    p.add_argument("--no_curate", action="store_true", help="keep every annotation, not only "
                   "Neo et al.'s simple scenes (<= 3 annotations, a category present once with "
                   "area in [min_area, max_area])")
    p.add_argument("--max_annotations", type=int, default=3, help="curation: most annotations per image")
    p.add_argument("--min_area", type=float, default=1000.0, help="curation: least object area (px²)")
    p.add_argument("--max_area", type=float, default=2000.0, help="curation: most object area (px²)")
    p.add_argument("--use_boxes", action="store_true", help="map objects to cells by their box, "
                   "ignoring segmentation polygons")
    p.add_argument("--keep_all", action="store_true", help="keep images the un-ablated model gets "
                   "wrong too (offline demos with random-weight tiny models; recorded in the JSON)")
    p.add_argument("--batch_size", type=int, default=16, help="rows per traced forward (default 16)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="model dtype (default: float32 for tiny models, the checkpoint's otherwise)")
    p.add_argument("--seed", type=int, default=0, help="seed for synthetic data and random subsets")
    p.add_argument("--retry_errors", action="store_true", help="on resume, retry images that "
                   "failed before (default: keep their recorded errors)")
    add_run_args(p, limit=False)
    add_remote_arguments(p)


def add_questions_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--questions", type=Path, default=None, help="JSON object: image id or file "
                   "name -> vqa question (or a list; the first is used), as the original's "
                   "per-image questions (default: 'What is the main object in this image?')")


def check_args(p: argparse.ArgumentParser, args) -> None:
    if args.coco_annotations is not None and args.image_root is None:
        p.error("--coco_annotations needs --image_root")
    for flag in ("synthetic", "limit", "batch_size", "ig_steps", "ig_batch_size", "max_new_tokens",
                 "top_k", "window"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            p.error(f"--{flag}: expected a positive number, got {value}")
    for flag in ("heatmap_images", "html_images"):
        value = getattr(args, flag, None)
        if value is not None and value < 0:
            p.error(f"--{flag}: expected 0 or more, got {value}")
    for flag in ("device", "dtype"):
        if args.remote and getattr(args, flag) is not None:
            p.error(f"--{flag}: the NDIF server places the model and picks its dtype; drop it "
                    "with --remote")
    check_output(args.output)  # RecipeError: one line, before any work
    if not args.remote:
        check_device(args.device)


def open_results_log(args, result_flags, outputs=()):
    """The per-image `ResultLog` ``<output>.jsonl`` keyed by the recipe's result flags
    (``--restart`` discards it and ``outputs`` first; other settings are refused)."""
    return open_log(args.output.with_suffix(".jsonl"), result_config(args, result_flags),
                    restart=args.restart, retry_errors=args.retry_errors,
                    outputs=[args.output, *outputs])


def load_model(args):
    """`vlminterp.load` (``--device``, ``--dtype``) or, with ``--remote``, a `RemoteVLM` on
    ``--ndif-host`` (`vlminterp.remote.load_from_args`); a model that cannot be loaded for
    the remote run exits with one line."""
    from vlminterp.remote import load_from_args

    dtype = getattr(torch, args.dtype) if args.dtype else None
    if not args.remote:
        return load_checked(args.model_id, device=check_device(args.device), dtype=dtype)
    try:
        return load_from_args(args, args.model_id)
    except ValueError as e:
        raise RecipeError(f"--remote: {e}") from None


def load_samples(args) -> tuple[CocoObjects, list[ObjectSample]]:
    """The dataset the flags name (``--synthetic`` writes it beside ``--output`` first)."""
    if args.synthetic:
        from vlminterp.data.synthetic_images import write_dataset

        root = args.output.with_name(args.output.stem + "_synthetic")
        annotations, image_root = write_dataset(root, args.synthetic, seed=args.seed), root
    else:
        annotations, image_root = args.coco_annotations, args.image_root
    try:
        coco = CocoObjects(annotations, image_root)
        samples = coco.samples(not args.no_curate, max_annotations=args.max_annotations,
                               min_area=args.min_area, max_area=args.max_area, limit=args.limit)
    except CocoError as e:
        raise RecipeError(str(e).splitlines()[0]) from None
    if not samples:
        raise RecipeError(f"{annotations}: no samples pass the filter (try --no_curate)")
    return coco, samples


def run_samples(samples, log, desc: str, fn) -> None:
    """Call ``fn(sample) -> records`` for each sample the `ResultLog` has not finished, with a
    progress bar (`vlminterp.runs.run_logged`): an unreadable image is that sample's error and
    the run goes on; any other ValueError stops the run with one line. A `RemoteError` is the
    server's fault, not the sample's: it propagates and stops the run."""
    run_logged(samples, log, lambda s: [{"key": s.key, "category": s.category, **r}
                                        for r in fn(s)], desc, key=lambda s: s.key)


def results(samples, log) -> tuple[list[dict], dict]:
    """``(records, errors)`` of this run's samples, in sample order."""
    return logged_results(samples, log, key=lambda s: s.key)


def run_info(args, **extra) -> dict:
    """The settings a results JSON records (paths as strings)."""
    info = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
            if k != "ndif_api_key"}  # a secret: never written to results
    note = ("keep_all: images the un-ablated model gets wrong are kept too (offline demo); "
            "drop rates count only initially correct images") if args.keep_all else None
    return {**info, "keep_all_note": note, **extra}

