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

from vlminterp import neo2024 as neo
from vlminterp.recipe_utils import exit_on_remote_error
from vlminterp.store import ResultLog, load_vector, write_json_atomic


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
    return p


@exit_on_remote_error
def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
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
    vlm = neo.load_model(args)
    coco, samples = neo.load_samples(args)
    questions = neo.load_questions(args.questions)
    stem = args.output.with_suffix("")
    mean = (load_vector(args.mean_vector) if args.mean_vector else
            neo.dataset_mean(vlm, coco, samples, Path(f"{stem}_mean")))
    log = ResultLog(args.output.with_suffix(".jsonl"))
    neo.run_samples(samples, log, "object ablation", lambda s: neo.object_ablation(
        vlm, coco.load_image(s), s, mean, tasks=tasks, sizes=sizes, ig_steps=args.ig_steps,
        ig_batch_size=args.ig_batch_size, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, seed=args.seed,
        keep_all=args.keep_all, use_polygons=not args.use_boxes,
        question=neo.question_for(questions, s)))
    records = log.records()
    summary = neo.summarize_ablation(records, args.seed)
    neo.plot_ablation(summary, tasks, stem, vlm.model_id)
    result = {"experiment": "neo2024_object_ablation", "model_id": vlm.model_id,
              "settings": neo.run_info(args, tasks=tasks, sizes=sizes),
              "n_samples": len(samples), "errors": log.errors, "summary": summary,
              "records": records}
    write_json_atomic(args.output, result)
    return result


if __name__ == "__main__":
    main()
