"""Neo et al. 2024, experiment 3: block attention from visual sources to target positions over
groups of layers and sliding windows, and measure the object identification answer.

Sources (keys): obj_b0/obj_b1/obj_b2 (object cells with 0/1/2 buffer rings, in every view of a
tiled image), image_minus_obj_b1, visual (every view's patch tokens). Targets (queries): last
(the answer position), last_row (the image's bottom row of tokens; on a tiled image the bottom
row of the view that ends last in the sequence), text (prompt text after the image, markers and
the last position excluded). As in the original, every
(target, source) pair is cut, a position from itself included when it is both (last_row and the
object cells overlap); --knockout_pairs no_self keeps that self-attention. Layer sets: the
original's early 0-9, mid 11-20, late 21-31, early_mid 5-14, mid_late 15-24 and all (scaled
from 32 layers to the model's depth) and windows of --window layers, each cut down to --layers
(default: every layer with softmax attention; a set left empty is dropped).
Writes the JSON, <stem>.jsonl (per-image log, reruns resume), <stem>.png (answer-probability
change per window, target --plot_target) and <stem>_groups.png (accuracy per layer group).

  python -m recipes.neo2024_attention_knockout --synthetic 8 --keep_all --output runs/knockout.json
  python -m recipes.neo2024_attention_knockout --model_id llava-hf/llava-1.5-7b-hf \\
      --coco_annotations coco/annotations/instances_val2017.json --image_root coco/val2017 \\
      --output runs/knockout.json
"""

from __future__ import annotations

import argparse

from pathlib import Path

from vlminterp import neo2024 as neo
from vlminterp.neo2024.cli import RESULT_FLAGS as COMMON_RESULT_FLAGS
from vlminterp.neo2024.cli import SELECTION_FLAGS  # noqa: F401  (not result flags here)
from vlminterp.neo2024.cli import open_results_log, results
from vlminterp.runs import as_recipe_errors, final_line, recipe_main
from vlminterp.shards import start
from vlminterp.store import write_json_atomic

RESULT_FLAGS = COMMON_RESULT_FLAGS + ("questions", "sources", "targets", "window", "no_groups",
                                      "knockout_pairs", "layers")

SOURCES = ("obj_b0", "obj_b1", "obj_b2", "image_minus_obj_b1", "visual")
TARGETS = ("last", "last_row", "text")


def _names(p, flag: str, value: str, allowed) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names or any(n not in allowed for n in names):
        p.error(f"--{flag}: expected a comma list of {', '.join(allowed)}, got {value!r}")
    return names


def _layers(p, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        layers = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        layers = []
    if not layers:
        p.error(f"--layers: expected a comma list of layer numbers, got {value!r}")
    return layers


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
    p.add_argument("--layers", default=None, help="comma list of the decoder layers knockout may "
                   "use; groups and windows keep only these (default: every layer with softmax "
                   "attention; Qwen3.5's and MiniCPM-V's Gated-DeltaNet layers have none, and "
                   "naming one is an error)")
    p.add_argument("--knockout_pairs", choices=neo.PAIRS, default="product",
                   help="edges a (source, target) set cuts: product = every target from every source, "
                        "a position from itself included where the sets overlap (the original's); "
                        "no_self = the same but each position keeps attending to itself "
                        "(default: product)")
    p.add_argument("--plot_target", default="last", choices=TARGETS,
                   help="target whose window curves are plotted (default: last)")
    return p


@recipe_main
def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    run = start(parser, args, argv)
    neo.check_args(parser, args)
    sources = _names(parser, "sources", args.sources, SOURCES)
    targets = _names(parser, "targets", args.targets, TARGETS)
    layers = _layers(parser, args.layers)
    stem = args.output.with_suffix("")
    with as_recipe_errors():
        log = open_results_log(args, RESULT_FLAGS, outputs=[Path(f"{stem}.png"),
                                                            Path(f"{stem}_groups.png")])
        vlm = neo.load_model(args)
        allowed = neo.knockout_layers(vlm, layers)
        coco, samples = neo.load_samples(args)
        samples = run.take(samples, key=lambda s: s.key)
        questions = neo.load_questions(args.questions)
    neo.run_samples(samples, log, "attention knockout", lambda s: neo.attention_knockout(
        vlm, coco.load_image(s), s, window=args.window, groups=not args.no_groups,
        sources=sources, targets=targets, batch_size=args.batch_size, keep_all=args.keep_all,
        use_polygons=not args.use_boxes, question=neo.question_for(questions, s),
        pairs=args.knockout_pairs, layers=allowed))
    records, errors = results(samples, log)
    summary = neo.summarize_knockout(records, args.seed)
    pngs = neo.plot_knockout(summary, args.plot_target, stem, vlm.model_id)
    result = {"experiment": "neo2024_attention_knockout", "model_id": vlm.model_id,
              "settings": neo.run_info(args, sources=sources, targets=targets,
                                       layer_sets=neo.layer_sets(vlm.n_layers, allowed,
                                                                 args.window, not args.no_groups)),
              "n_samples": len(samples), "errors": errors, "summary": summary,
              "records": records}
    write_json_atomic(args.output, result)
    final_line(f"{len(records)} records of {len(samples)} images", [args.output, *pngs],
               len(errors))
    return result


if __name__ == "__main__":
    main()
