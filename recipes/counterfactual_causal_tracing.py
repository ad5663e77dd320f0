"""Counterfactual causal tracing on video QA: which layer and which frames carry the answer.

For each sample and counterfactual clip (local_swap, reverse, motion_destroy[, motion_only]),
patch one layer's activations at --token_slice between the clean and counterfactual runs
(denoise: clean -> counterfactual; noise: the reverse), all conditions as rows of batched
forwards. Score = option-letter margin at the last position; effect = (patched - cf) / (clean - cf)
for denoise, (clean - patched) / (clean - cf) for noise (null when clean == cf). Frame spans map
to Qwen2-VL's temporal token groups (2 frames per group); records name the groups really patched.
Writes OUTPUT (JSON), OUTPUT_heatmap.png, OUTPUT.jsonl (resume log) and, with
--dump_representations, an activation store. Definitions: `vlminterp.video.causal_tracing`.
Example (offline, the zoo's trained tiny-qwen2-vl-motion on synthetic videos):
  python -m recipes.counterfactual_causal_tracing --synthetic 4 --output runs/demo/tracing.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from vlminterp.video import causal_tracing as ct
from vlminterp.video.counterfactuals import make_counterfactuals
from vlminterp.video.multiple_choice import mc_prompt, option_ids
from vlminterp.plots import heatmap
from vlminterp.recipe_utils import (VIDEO_RESULT_FLAGS, RecipeError, SampleError, add_video_args,
                                    check_frame_args, check_run_args, final_line, load_video_model,
                                    logged_results, open_log, open_video_dataset, recipe_main,
                                    result_config, run_logged, sample_frames)
from vlminterp.shards import start
from vlminterp.sweep.exact import parse_memory
from vlminterp.store import ActivationStore, write_json_atomic

RESULT_FLAGS = VIDEO_RESULT_FLAGS + ("token_slice", "swap_spans", "include_motion_only",
                                     "dump_representations", "layers", "direction", "vprime_n",
                                     "vprime_d", "late_inputs")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m recipes.counterfactual_causal_tracing",
                                description=__doc__.splitlines()[0])
    a = p.add_argument
    add_video_args(p, model_default=None)
    a("--representations_output", type=Path, help="activation store folder for "
      "--dump_representations (default: OUTPUT_representations/)")
    a("--token_slice", default="visual", help="positions to patch: visual | text | all | "
      "visual_frames:a:b (input frames, mapped to temporal token groups) (default: visual)")
    a("--swap_spans", default="0:2,2:4", help="frame spans local_swap exchanges, 'a0:a1,b0:b1'; "
      "'none' skips local_swap (default: 0:2,2:4)")
    a("--include_motion_only", action="store_true", help="also trace the motion_only "
      "counterfactual (frame 0, then |f_t - f_t-1|)")
    a("--dump_representations", action="store_true", help="store inputs_mean and layers_mean "
      "(means over --token_slice of the LM input / each layer's output), visual_mean (mean LM "
      "input over the visual tokens) and vprime of the clean and each counterfactual run "
      "(safetensors + JSON index)")
    a("--vprime_n", type=int, default=ct.VPRIME_SHAPE[0], help="vprime rows: the visual tokens "
      f"are resized to vprime_n x vprime_d (default: {ct.VPRIME_SHAPE[0]})")
    a("--vprime_d", type=int, default=ct.VPRIME_SHAPE[1], help="vprime columns: the hidden size "
      f"is resized to this (default: {ct.VPRIME_SHAPE[1]}, as the original)")
    a("--layers", default="all", help="'all' (embed + every decoder layer) or e.g. 'embed,0,4:8' "
      "(default: all)")
    a("--batch_size", type=int, default=None, help="patched rows per forward (default: as "
      "many as --max_memory holds; the run says what it chose)")
    a("--max_memory", default=None, help="activation memory budget that sets the rows per "
      "forward when --batch_size is not given: bytes with a unit ('4GiB', '512MiB') or a "
      "fraction of the device's free memory ('0.5') (default: half the free GPU memory, or 2GiB "
      "on CPU)")
    a("--direction", choices=ct.DIRECTIONS, default="denoise", help="denoise: clean -> "
      "counterfactual run (as the original); noise: counterfactual -> clean run")
    a("--late_inputs", choices=ct.LATE_INPUTS, default="carry", help="families whose visual "
      "features also enter after the LM input (Qwen3-VL's deepstack, Gemma 4's per-layer "
      "inputs): carry = a patch at embed / layer i also copies the source run's later inputs at "
      "the patched positions (visual tokens patched at embed bring the whole visual input); "
      "counterfactual = the patched run keeps its own (the residual stream alone: a lower bound "
      "at embed). No effect on other families (default: carry)")
    a("--min_total_effect", type=float, default=ct.MIN_TOTAL_EFFECT, help="records whose total "
      "effect |clean - counterfactual| is below this many logits are marked unstable (their "
      "normalised effect divides by almost 0) and left out of the means (default: "
      f"{ct.MIN_TOTAL_EFFECT})")
    a("--include_unstable", action="store_true", help="average the unstable records too")
    return p


@recipe_main
def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model_id is None:  # the demo: the zoo model trained on the --synthetic videos
        args.model_id = "tiny-qwen2-vl-motion" if args.annotations is None else "tiny-qwen2-vl"
    run = start(parser, args, argv, outputs=("output", "representations_output"))
    png = args.output.with_name(args.output.stem + "_heatmap.png")
    store_dir = args.representations_output or args.output.with_name(
        args.output.stem + "_representations")
    try:
        sl, spans = check_frame_args(args.token_slice, args.swap_spans, args.num_frames)
        max_memory = parse_memory(args.max_memory, "--max_memory")
        if min(1 if args.batch_size is None else args.batch_size, args.num_frames, args.vprime_n, args.vprime_d,
               1 if args.limit is None else args.limit) < 1:
            raise ValueError("--batch_size, --num_frames, --vprime_n, --vprime_d and --limit must "
                             "be positive")
        if args.min_total_effect < 0:
            raise ValueError(f"--min_total_effect: expected >= 0, got {args.min_total_effect}")
        check_run_args(args)
        log = open_log(args.output.with_suffix(".jsonl"), result_config(args, RESULT_FLAGS),
                       restart=args.restart, retry_errors=args.retry_errors,
                       outputs=[args.output, png, store_dir])
        data = open_video_dataset(args.annotations, args.video_root, args.synthetic,
                                  run.own_dir(args.output.parent), args.num_frames)
        vlm = load_video_model(args)
        layers = ct.parse_layers(args.layers, vlm.n_layers)
        samples = run.take(list(data)[:args.limit], key=lambda s: s.question_id,
                           stores=[store_dir] if args.dump_representations else [])
    except RecipeError:
        raise
    except ValueError as e:
        parser.error(str(e))
    names = (["local_swap"] if spans else []) + ["reverse", "motion_destroy"] + \
        (["motion_only"] if args.include_motion_only else [])
    store = ActivationStore(store_dir) if args.dump_representations else None
    chosen, said = {}, []

    def trace(s) -> list[dict]:
        if s.answer_index is None or not s.candidates:
            raise SampleError("tracing needs candidates and a known answer")
        clean = sample_frames(data, s)
        records, reps = ct.trace_sample(
            vlm, clean, make_counterfactuals(clean, names, swap_spans=spans),
            mc_prompt(s.question, s.candidates), option_ids(vlm, len(s.candidates)),
            s.answer_index, token_slice=str(sl), layers=layers, direction=args.direction,
            swap_spans=spans, batch_size=args.batch_size, dump=store is not None,
            question_id=s.question_id, vprime_shape=(args.vprime_n, args.vprime_d),
            max_memory=max_memory, info=chosen, late_inputs=args.late_inputs)
        if not said and chosen:
            said.append(True)
            tqdm.write(f"sweep: {chosen['strategy']} strategy, {chosen['rows_per_forward']} "
                       f"patched rows per forward" + ("" if args.batch_size else
                                                      " (from the memory budget)"))
        for condition, tensors in reps.items():
            store.put(f"{s.question_id}/{condition}", tensors, meta={
                **s.scalar_extra(), "question_id": s.question_id, "condition": condition,
                "video_name": s.video_name, "task_name": s.task_name, "answer": s.answer})
        return records

    run_logged(samples, log, trace, "tracing")
    records, errors = logged_results(samples, log)
    unstable = ct.mark_unstable(records, args.min_total_effect)
    summary = ct.summarise(records, include_unstable=args.include_unstable)
    excluded = 0 if args.include_unstable else unstable
    heatmap(ct.effect_grid(summary, layers, names, str(sl)), png, row_labels=[str(x) for x in layers],
            col_labels=names, counts=ct.effect_grid(summary, layers, names, str(sl), "n"),
            title=f"mean {args.direction} effect, {sl}" + ct.excluded_note(excluded, len(records),
                                                                            args.min_total_effect),
            xlabel="counterfactual", ylabel="layer", cbar_label="effect", center=0,
            empty_note=ct.empty_note(records, excluded))
    result = {"config": {"model_id": args.model_id, "num_frames": args.num_frames,
                         "token_slice": str(sl), "swap_spans": args.swap_spans,
                         "counterfactuals": names, "layers": layers, "direction": args.direction,
                         "late_inputs": args.late_inputs,
                         "batch_size": args.batch_size, "annotations": str(data.annotations_json),
                         "remote": args.remote, "min_total_effect": args.min_total_effect,
                         "include_unstable": args.include_unstable},
              "effect": ct.EFFECT_DOC[args.direction],
              "unstable": {"threshold": args.min_total_effect, "records": unstable,
                           "excluded_from_means": excluded, "of": len(records),
                           "definition": ct.UNSTABLE_DOC},
              "summary": summary, "heatmap": png.name, "records": records,
              "errors": [{"question_id": q, "error": e} for q, e in errors.items()]}
    write_json_atomic(args.output, result)
    final_line(f"{len(records)} records ({excluded} unstable left out of the means)",
               [args.output, png] + ([store_dir] if store else []), len(errors))
    return result


if __name__ == "__main__":
    main()
