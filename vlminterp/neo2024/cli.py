"""What the three ``recipes.neo2024_*`` command lines share: flags, model and data loading, the
resumable per-image loop (keyed by the settings that change results), and the settings a
results JSON records."""

from __future__ import annotations

import argparse
from pathlib import Path

from vlminterp import load_flags
from vlminterp.checks import RecipeError, check_output
from vlminterp.data.coco import CocoError, CocoObjects, ObjectSample
from vlminterp.neo2024.prompts import load_questions, question_for
from vlminterp.remote import add_arguments as add_remote_arguments
from vlminterp.runs import add_run_args, logged_results, open_log, result_config, run_logged
from vlminterp.shards import add_shard_arg, merging

# Flags of every neo2024 recipe that change an image's records; each recipe adds its own.
# Which images run (--limit, curation) does not change an image's records: results list only
# this run's images.
RESULT_FLAGS = ("model_id", *load_flags.RESULT_FLAGS, "coco_annotations", "image_root",
                "synthetic", "seed", "use_boxes", "keep_all")
SELECTION_FLAGS = ("limit", "no_curate", "max_annotations", "min_area", "max_area", "inclusive_area",
                   "only_with_questions")


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Model (and its loading: `vlminterp.load_flags`), data, output, resuming, ``--shard``
    and NDIF flags every neo2024 recipe takes."""
    p.add_argument("--model_id", default="tiny-llava", help="tiny-llava (offline, random weights), "
                   "tiny-llava-objects / tiny-llava-onevision-objects (offline, the zoo's trained "
                   "models; --synthetic then writes the zoo's images), tiny-qwen2-vl, llava-hf/llava-1.5-7b-hf, "
                   "Qwen/Qwen2-VL-7B-Instruct or a local dir (default: tiny-llava)")
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
    load_flags.add_load_args(p)
    p.add_argument("--seed", type=int, default=0, help="seed for synthetic data and random subsets")
    p.add_argument("--retry_errors", action="store_true", help="on resume, retry images that "
                   "failed before (default: keep their recorded errors)")
    add_run_args(p, limit=False)
    add_shard_arg(p)
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
    if args.remote and args.device is not None:
        p.error("--device: the NDIF server places the model; drop it with --remote")
    check_output(args.output)  # RecipeError: one line, before any work
    load_flags.load_kwargs(args)  # checks them (and --dtype auto -> the default it equals)


def open_results_log(args, result_flags, outputs=()):
    """The per-image `ResultLog` ``<output>.jsonl`` keyed by the recipe's result flags
    (``--restart`` discards it and ``outputs`` first; other settings are refused)."""
    return open_log(args.output.with_suffix(".jsonl"), result_config(args, result_flags),
                    restart=args.restart, retry_errors=args.retry_errors,
                    outputs=[args.output, *outputs])


def load_model(args):
    """`vlminterp.load` (``--device`` and the loading flags, `vlminterp.load_flags`) or, with
    ``--remote``, a `RemoteVLM` on ``--ndif-host`` (`vlminterp.remote.load_from_args`);
    inside a merge, without weights. A model that cannot be loaded exits with one line."""
    from vlminterp.remote import load_from_args

    if not args.remote or merging():
        return load_flags.load_model(args)
    try:
        return load_from_args(args, args.model_id)
    except ValueError as e:
        raise RecipeError(f"--remote: {e}") from None


def load_samples(args) -> tuple[CocoObjects, list[ObjectSample]]:
    """The dataset the flags name (``--synthetic`` writes it beside ``--output`` first)."""
    if args.synthetic:
        from vlminterp.data.synthetic_images import write_dataset

        root = args.output.with_name(args.output.stem + "_synthetic")
        from vlminterp.zoo.specs import SPECS

        # the zoo's objects models were trained on the zoo's images: give them those
        spec = SPECS.get(args.model_id)
        style = "zoo" if spec and spec.data.startswith("vlminterp.zoo.image_task") else "classic"
        annotations, image_root = write_dataset(root, args.synthetic, seed=args.seed, style=style), root
    else:
        annotations, image_root = args.coco_annotations, args.image_root
    try:
        coco = CocoObjects(annotations, image_root)
        samples = coco.samples(not args.no_curate, max_annotations=args.max_annotations,
                               min_area=args.min_area, max_area=args.max_area,
                               inclusive_area=args.inclusive_area)
        if getattr(args, "only_with_questions", False):
            questions = load_questions(args.questions)
            kept = [s for s in samples if question_for(questions, s) is not None]
            if samples and not kept:
                raise RecipeError(f"{args.questions}: none of the curated images has a question "
                                  f"(--only_with_questions)")
            samples = kept
    except CocoError as e:
        raise RecipeError(str(e).splitlines()[0]) from None
    if not samples:
        raise RecipeError(f"{annotations}: no samples pass the filter (try --no_curate)")
    return coco, samples[:args.limit]


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

