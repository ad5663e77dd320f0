"""What the three ``recipes.neo2024_*`` command lines share: flags, model and data loading, the
resumable per-image loop, and the settings a results JSON records."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from vlminterp.data.coco import CocoError, CocoObjects, ObjectSample
from vlminterp.neo2024.prompts import load_questions, question_for
from vlminterp.remote import add_arguments as add_remote_arguments


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
                   "min_area < area < max_area; the first such annotation in the file)")
    p.add_argument("--max_annotations", type=int, default=3, help="curation: most annotations per image")
    p.add_argument("--min_area", type=float, default=1000.0, help="curation: object area must exceed "
                   "this (px², default 1000)")
    p.add_argument("--max_area", type=float, default=2000.0, help="curation: object area must stay "
                   "below this (px², default 2000)")
    p.add_argument("--inclusive_area", action="store_true", help="curation: also keep areas equal "
                   "to --min_area or --max_area (the original's bounds are strict)")
    p.add_argument("--use_boxes", action="store_true", help="map objects to cells by their box, "
                   "ignoring segmentation polygons")
    p.add_argument("--keep_all", action="store_true", help="keep images the un-ablated model gets "
                   "wrong too (offline demos with random-weight tiny models; recorded in the JSON)")
    p.add_argument("--batch_size", type=int, default=16, help="rows per traced forward (default 16)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="model dtype (default: float32 for tiny models, the checkpoint's otherwise)")
    p.add_argument("--seed", type=int, default=0, help="seed for synthetic data and random subsets")
    add_remote_arguments(p)


def add_questions_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--questions", type=Path, default=None, help="JSON object: image id or file "
                   "name -> vqa question, or a list of 0 or 1 questions (the first is used; an "
                   "empty list = none), as the original's clean_questions.json (images without "
                   "one get 'What is the main object in this image?')")
    p.add_argument("--only_with_questions", action="store_true", help="use only the images "
                   "--questions has a question for, as the original does")


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
    if getattr(args, "only_with_questions", False) and args.questions is None:
        p.error("--only_with_questions needs --questions FILE")
    for flag in ("device", "dtype"):
        if args.remote and getattr(args, flag) is not None:
            p.error(f"--{flag}: the NDIF server places the model and picks its dtype; drop it "
                    "with --remote")


def load_model(args):
    """`vlminterp.load` (``--device``, ``--dtype``) or, with ``--remote``, a `RemoteVLM` on
    ``--ndif-host`` (`vlminterp.remote.load_from_args`); a model that cannot be loaded for
    the remote run exits with one line."""
    from vlminterp.remote import load_from_args

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        return load_from_args(args, args.model_id, device=device, dtype=dtype)
    except ValueError as e:
        if not args.remote:
            raise
        raise SystemExit(f"error: --remote: {e}") from None


def load_samples(args) -> tuple[CocoObjects, list[ObjectSample]]:
    """The dataset the flags name (``--synthetic`` writes it beside ``--output`` first)."""
    if args.synthetic:
        from vlminterp.data.synthetic_images import write_dataset

        root = args.output.with_name(args.output.stem + "_synthetic")
        annotations, image_root = write_dataset(root, args.synthetic, seed=args.seed), root
    else:
        annotations, image_root = args.coco_annotations, args.image_root
    coco = CocoObjects(annotations, image_root)
    samples = coco.samples(not args.no_curate, max_annotations=args.max_annotations,
                           min_area=args.min_area, max_area=args.max_area,
                           inclusive_area=args.inclusive_area)
    if not samples:
        raise SystemExit(f"{annotations}: no samples pass the filter (try --no_curate)")
    if getattr(args, "only_with_questions", False):
        questions = load_questions(args.questions)
        samples = [s for s in samples if question_for(questions, s) is not None]
        if not samples:
            raise SystemExit(f"{args.questions}: none of the curated images has a question "
                             f"(--only_with_questions)")
    return coco, samples[:args.limit]


def run_samples(samples, log, desc: str, fn) -> None:
    """Call ``fn(sample) -> records`` for each sample the `ResultLog` has not finished, with a
    progress bar; log the records (or the sample's data error, one line) under its key. A
    `RemoteError` is the server's fault, not the sample's: it propagates and stops the run
    (see `vlminterp.recipe_utils.exit_on_remote_error`)."""
    from tqdm import tqdm

    for s in tqdm([s for s in samples if s.key not in log.done], desc=desc):
        try:
            records = fn(s)
        except CocoError as e:
            log.append_error(s.key, str(e))
            continue
        log.append(s.key, [{"key": s.key, "category": s.category, **r} for r in records])


def run_info(args, **extra) -> dict:
    """The settings a results JSON records (paths as strings)."""
    info = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
            if k != "ndif_api_key"}  # a secret: never written to results
    note = ("keep_all: images the un-ablated model gets wrong are kept too (offline demo); "
            "drop rates count only initially correct images") if args.keep_all else None
    return {**info, "keep_all_note": note, **extra}

