"""Neo et al. 2024, experiment 1: mean-ablate visual tokens at the LM input and count how often a
correct object identification becomes wrong.

Subsets: object cells (buffer 0/1/2 rings), high-norm register tokens, random n and
integrated-gradients top n (n in --sizes and n = the buffer-1 object set's size). Tasks: vqa
(``... ASSISTANT: It is a`` + first token), polling (``Is there a {category} in this image?``),
generative (greedy description names the object). Writes the JSON, <stem>.jsonl (per-image log,
reruns resume), <stem>_mean/ (the mean vector's store) and <stem>_<task>.png (bar plots).

  python -m recipes.neo2024_object_ablation --synthetic 8 --keep_all --output runs/ablation.json
  python -m recipes.neo2024_object_ablation --model_id llava-hf/llava-1.5-7b-hf \\
      --coco_annotations coco/annotations/instances_val2017.json --image_root coco/val2017 \\
      --output runs/ablation.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from vlminterp import neo2024 as neo
from vlminterp.neo2024.cli import RESULT_FLAGS as COMMON_RESULT_FLAGS
from vlminterp.neo2024.cli import open_results_log, results
from vlminterp.checks import RecipeError
from vlminterp.runs import as_recipe_errors, final_line, recipe_main
from vlminterp.shards import start
from vlminterp.store import load_vector, write_json_atomic

# The default ablation vector is the mean over the selected images, so which images run
# (--limit, curation) changes every record here.
RESULT_FLAGS = COMMON_RESULT_FLAGS + (
    "questions", "tasks", "sizes", "ig_steps", "max_new_tokens", "mean_vector", "zero_ablation",
    "limit", "no_curate", "max_annotations", "min_area", "max_area", "inclusive_area",
    "only_with_questions")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m recipes.neo2024_object_ablation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    neo.add_common_args(p)
    neo.add_questions_arg(p)
    p.add_argument("--tasks", default="vqa,polling,generative",
                   help="comma list of vqa, polling, generative (default: all three)")
    p.add_argument("--sizes", default="5,10,20,40,60,100,250",
                   help="n of the random and IG subsets; sizes above the visual token count are "
                        "skipped (default: 5,10,20,40,60,100,250)")
    p.add_argument("--ig_steps", type=int, default=50, help="integrated-gradients steps (default 50)")
    p.add_argument("--ig_batch_size", type=int, default=None, help="integrated-gradients steps "
                   "per forward+backward (default: as many as fit a 2 GiB activation budget on "
                   "CPU, half the free memory on a GPU; 4 is ~20 GB on LLaVA-1.5-7B)")
    p.add_argument("--max_new_tokens", type=int, default=40,
                   help="generative task: greedy tokens to generate (default 40; the original 200)")
    p.add_argument("--mean_vector", type=Path, default=None, help="ablation vector saved with "
                   "vlminterp.store.save_vector (default: mean visual token over the dataset)")
    p.add_argument("--zero_ablation", action="store_true", help="ablate with zeros instead of "
                   "the mean vector, also as the integrated-gradients baseline (the original's "
                   "--zero_ablation)")
    return p


@recipe_main
def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    run = start(parser, args, argv)
    neo.check_args(parser, args)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks or any(t not in neo.TASKS for t in tasks):
        parser.error(f"--tasks: expected a comma list of {', '.join(neo.TASKS)}, got {args.tasks!r}")
    if args.remote and "generative" in tasks:
        parser.error("--tasks generative cannot run with --remote (greedy generation runs outside "
                     "a remote trace); pass --tasks vqa,polling")
    try:
        sizes = [int(n) for n in args.sizes.split(",") if n.strip()]
    except ValueError:
        parser.error(f"--sizes: expected comma-separated integers, got {args.sizes!r}")
    stem = args.output.with_suffix("")
    with as_recipe_errors():
        log = open_results_log(args, RESULT_FLAGS, outputs=[Path(f"{stem}_mean")] + [
            Path(f"{stem}_{t}.png") for t in neo.TASKS])
        vlm = neo.load_model(args)
        coco, samples = neo.load_samples(args)
        mine = run.take(samples, key=lambda s: s.key, stores=[] if args.mean_vector or
                        args.zero_ablation else [Path(f"{stem}_mean")])
        questions = neo.load_questions(args.questions)
        mean = _ablation_vector(args, vlm, coco, samples, stem)  # over every shard's images
    neo.run_samples(mine, log, "object ablation", lambda s: neo.object_ablation(
        vlm, coco.load_image(s), s, mean, tasks=tasks, sizes=sizes, ig_steps=args.ig_steps,
        ig_batch_size=args.ig_batch_size, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, seed=args.seed,
        keep_all=args.keep_all, use_polygons=not args.use_boxes,
        question=neo.question_for(questions, s)))
    records, errors = results(mine, log)
    summary = neo.summarize_ablation(records, args.seed)
    pngs = neo.plot_ablation(summary, tasks, stem, vlm.model_id)
    result = {"experiment": "neo2024_object_ablation", "model_id": vlm.model_id,
              "settings": neo.run_info(args, tasks=tasks, sizes=sizes),
              "n_samples": len(mine), "errors": errors, "summary": summary,
              "records": records}
    write_json_atomic(args.output, result)
    final_line(f"{len(records)} records of {len(mine)} images", [args.output, *pngs],
               len(errors))
    return result


def _ablation_vector(args, vlm, coco, samples, stem):
    """--mean_vector, else the dataset's mean visual token; zeros of its size with
    --zero_ablation (as the original, which zeroes the loaded mean)."""
    if args.mean_vector:
        try:
            mean = load_vector(args.mean_vector)
        except Exception as e:  # missing file, SafetensorError, no 'mean_vector' tensor
            raise RecipeError(f"--mean_vector {str(args.mean_vector)!r}: cannot read it "
                              f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
        return torch.zeros_like(mean) if args.zero_ablation else mean
    if args.zero_ablation:
        return torch.zeros(vlm.torch_model.get_input_embeddings().weight.shape[-1])
    return neo.dataset_mean(vlm, coco, samples, Path(f"{stem}_mean"))


if __name__ == "__main__":
    main()
