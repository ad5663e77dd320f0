"""Neo et al. 2024, experiment 3: block attention from visual sources to target positions over
groups of layers and sliding windows, and measure the object identification answer.

Sources (keys): obj_b0/obj_b1/obj_b2 (object cells with 0/1/2 buffer rings), image_minus_obj_b1,
visual. Targets (queries): last (the answer position), last_row (the image's bottom row of
tokens), text (text after the image, the last position excluded). As in the original, every
(target, source) pair is cut, a position from itself included when it is both (last_row and the
object cells overlap); --knockout_pairs no_self keeps that self-attention. Layer sets: the
original's early 0-9, mid 11-20, late 21-31, early_mid 5-14, mid_late 15-24 and all (scaled
from 32 layers to the model's depth) and windows of --window layers.
Writes the JSON, <stem>.jsonl (per-image log, reruns resume), <stem>.png (answer-probability
change per window, target --plot_target) and <stem>_groups.png (accuracy per layer group).

  python -m recipes.neo2024_attention_knockout --synthetic 8 --keep_all --output runs/knockout.json
  python -m recipes.neo2024_attention_knockout --model_id llava-hf/llava-1.5-7b-hf \\
      --coco_annotations coco/annotations/instances_val2017.json --image_root coco/val2017 \\
      --output runs/knockout.json
"""

from __future__ import annotations

import argparse

from vlminterp import neo2024 as neo
from vlminterp.recipe_utils import exit_on_remote_error
from vlminterp.store import ResultLog, write_json_atomic

SOURCES = ("obj_b0", "obj_b1", "obj_b2", "image_minus_obj_b1", "visual")
TARGETS = ("last", "last_row", "text")


def _names(p, flag: str, value: str, allowed) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names or any(n not in allowed for n in names):
        p.error(f"--{flag}: expected a comma list of {', '.join(allowed)}, got {value!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m recipes.neo2024_attention_knockout",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    neo.add_common_args(p)
    neo.add_questions_arg(p)
    p.add_argument("--sources", default=",".join(SOURCES), help="comma list (default: all five)")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma list (default: all three)")
    p.add_argument("--window", type=int, default=None,
                   help="sliding-window width in layers (default: 9 of 32, scaled to the depth)")
    p.add_argument("--no_groups", action="store_true", help="sliding windows only, no layer groups")
    p.add_argument("--knockout_pairs", choices=neo.PAIRS, default="product",
                   help="edges a (source, target) set cuts: product = every target from every source, "
                        "a position from itself included where the sets overlap (the original's); "
                        "no_self = the same but each position keeps attending to itself "
                        "(default: product)")
    p.add_argument("--plot_target", default="last", choices=TARGETS,
                   help="target whose window curves are plotted (default: last)")
    return p


@exit_on_remote_error
def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    neo.check_args(parser, args)
    sources = _names(parser, "sources", args.sources, SOURCES)
    targets = _names(parser, "targets", args.targets, TARGETS)
    vlm = neo.load_model(args)
    coco, samples = neo.load_samples(args)
    questions = neo.load_questions(args.questions)
    log = ResultLog(args.output.with_suffix(".jsonl"))
    neo.run_samples(samples, log, "attention knockout", lambda s: neo.attention_knockout(
        vlm, coco.load_image(s), s, window=args.window, groups=not args.no_groups,
        sources=sources, targets=targets, batch_size=args.batch_size, keep_all=args.keep_all,
        use_polygons=not args.use_boxes, question=neo.question_for(questions, s),
        pairs=args.knockout_pairs))
    records = log.records()
    summary = neo.summarize_knockout(records, args.seed)
    neo.plot_knockout(summary, args.plot_target, args.output.with_suffix(""), vlm.model_id)
    result = {"experiment": "neo2024_attention_knockout", "model_id": vlm.model_id,
              "settings": neo.run_info(args, sources=sources, targets=targets,
                                       layer_groups=neo.layer_groups(vlm.n_layers)),
              "n_samples": len(samples), "errors": log.errors, "summary": summary,
              "records": records}
    write_json_atomic(args.output, result)
    return result


if __name__ == "__main__":
    main()
