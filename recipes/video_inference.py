"""Multiple-choice video QA: the option letters' logits at the last position, accuracy per task.

Prompt (inside the model's chat template): ``"{question}\\nOptions:\\nA. ...\\nB. ...\\nAnswer:"``.
The reply starts right after the generation prompt, so each option is scored by the logit of its
line-initial letter token ("A", not " A"). ``--scoring logprob`` scores the full candidate text
instead (summed log-probability as the reply); ``--scoring generate`` generates a free-text
response (greedy, ``--max_new_tokens``) as the original script does, records it, and takes the
option it names (its leading letter, else the one candidate it contains). Questions without
candidates are answered with the bare question in generate mode. Resumable: re-run with the same
``--output``. Example (offline): python -m recipes.video_inference --synthetic 4 --output runs/demo/inference.json
"""

from __future__ import annotations

import argparse

from vlminterp.video.generation import generate_response, response_option
from vlminterp.video.multiple_choice import candidate_logprobs, mc_prompt, option_ids, option_scores
from vlminterp.recipe_utils import (VIDEO_RESULT_FLAGS, RecipeError, SampleError, add_video_args,
                                    check_run_args, final_line, load_video_model, logged_results,
                                    open_log, open_video_dataset, recipe_main, result_config,
                                    run_logged, sample_frames)
from vlminterp.shards import start
from vlminterp.store import write_json_atomic

RESULT_FLAGS = VIDEO_RESULT_FLAGS + ("scoring", "max_new_tokens")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m recipes.video_inference",
                                description=__doc__.splitlines()[0])
    add_video_args(p)
    p.add_argument("--scoring", choices=["letter", "logprob", "generate"], default="letter",
                   help="'letter': option letter logits (default); 'logprob': full-candidate "
                   "log-probability; 'generate': greedy free-text response (the original script)")
    p.add_argument("--max_new_tokens", type=int, default=64, help="--scoring generate: most "
                   "tokens to generate (default: 64, as the original)")
    return p


@recipe_main
def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    run = start(parser, args, argv)
    for flag in ("num_frames", "max_new_tokens", "limit"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag}: expected a positive number, got {getattr(args, flag)}")
    if args.remote and args.scoring != "letter":
        parser.error(f"--scoring {args.scoring} cannot run with --remote (it calls the model "
                     "outside a trace); use --scoring letter")
    try:
        check_run_args(args)
        log = open_log(args.output.with_suffix(".jsonl"), result_config(args, RESULT_FLAGS),
                       restart=args.restart, retry_errors=args.retry_errors,
                       outputs=[args.output])
        data = open_video_dataset(args.annotations, args.video_root, args.synthetic,
                                  run.own_dir(args.output.parent), args.num_frames)
        vlm = load_video_model(args)
        samples = run.take(list(data)[:args.limit], key=lambda s: s.question_id)
    except RecipeError:
        raise
    except ValueError as e:
        parser.error(str(e))

    def score(s) -> list[dict]:
        if not s.candidates and args.scoring != "generate":
            raise SampleError("no candidates: multiple-choice scoring needs 'candidates' "
                              "(--scoring generate answers open questions)")
        frames = sample_frames(data, s)
        prompt = mc_prompt(s.question, s.candidates) if s.candidates else s.question
        record = {"question_id": s.question_id, "task_name": s.task_name,
                  "video_name": s.video_name, "candidates": s.candidates, "answer": s.answer,
                  "answer_index": s.answer_index}
        if args.scoring == "generate":
            response = generate_response(vlm, frames, prompt, args.max_new_tokens)
            pred = response_option(response, s.candidates or [])
            record.update(response=response, scores=None)
        else:
            scores = (option_scores(vlm, frames, prompt, option_ids(vlm, len(s.candidates)))
                      if args.scoring == "letter" else candidate_logprobs(vlm, frames, prompt,
                                                                          s.candidates))
            pred = max(range(len(scores)), key=scores.__getitem__)
            record["scores"] = scores
        record.update(prediction_index=pred,
                      prediction=None if pred is None else s.candidates[pred],
                      correct=None if s.answer_index is None else pred == s.answer_index)
        return [record]

    run_logged(samples, log, score, "inference")
    records, errors = logged_results(samples, log)
    result = {"config": {"model_id": args.model_id, "num_frames": args.num_frames,
                         "scoring": args.scoring, "annotations": str(data.annotations_json),
                         "remote": args.remote,
                         "max_new_tokens": args.max_new_tokens if args.scoring == "generate" else None},
              "accuracy": accuracy(records), "records": records,
              "errors": [{"question_id": q, "error": e} for q, e in errors.items()]}
    write_json_atomic(args.output, result)
    acc = result["accuracy"]["overall"]
    final_line(f"{len(records)} predictions (accuracy {acc['accuracy']} over {acc['n']})",
               [args.output], len(errors))
    return result


def accuracy(records: list[dict]) -> dict:
    """Overall and per-task accuracy over the records with a known answer."""
    overall, tasks = [], {}
    for r in records:
        if r["correct"] is not None:
            overall.append(r["correct"])
            tasks.setdefault(str(r["task_name"]), []).append(r["correct"])

    def cell(v):
        return {"n": len(v), "correct": sum(v), "accuracy": sum(v) / len(v) if v else None}

    return {"overall": cell(overall), "per_task": {t: cell(v) for t, v in tasks.items()}}


if __name__ == "__main__":
    main()
