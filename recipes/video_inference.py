"""Multiple-choice video QA: the option letters' logits at the last position, accuracy per task.

Prompt (inside the model's chat template): ``"{question}\\nOptions:\\nA. ...\\nB. ...\\nAnswer:"``.
The reply starts right after the generation prompt, so each option is scored by the logit of its
line-initial letter token ("A", not " A"). ``--scoring logprob`` scores the full candidate text
instead (summed log-probability as the reply). Resumable: re-run with the same ``--output``.
Example (offline): python -m recipes.video_inference --synthetic 4 --output runs/demo/inference.json
"""

from __future__ import annotations

import argparse

from vlminterp.video.multiple_choice import candidate_logprobs, mc_prompt, option_ids, option_scores
from vlminterp.recipe_utils import (add_video_args, exit_on_remote_error, load_video_model,
                                    open_video_dataset, run_resumable)
from vlminterp.store import write_json_atomic


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m recipes.video_inference",
                                description=__doc__.splitlines()[0])
    add_video_args(p)
    p.add_argument("--scoring", choices=["letter", "logprob"], default="letter", help="'letter': "
                   "option letter logits (default); 'logprob': full-candidate log-probability")
    return p


@exit_on_remote_error
def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_frames < 1:
        parser.error(f"--num_frames: expected a positive number, got {args.num_frames}")
    if args.remote and args.scoring == "logprob":
        parser.error("--scoring logprob cannot run with --remote (it calls the model outside a "
                     "trace); use --scoring letter")
    try:
        data = open_video_dataset(args.annotations, args.video_root, args.synthetic,
                                  args.output.parent, args.num_frames)
        vlm = load_video_model(args)
    except ValueError as e:
        parser.error(str(e))

    def score(s) -> list[dict]:
        if not s.candidates:
            raise ValueError("no candidates: multiple-choice scoring needs 'candidates'")
        frames, prompt = data.load_frames(s), mc_prompt(s.question, s.candidates)
        scores = (option_scores(vlm, frames, prompt, option_ids(vlm, len(s.candidates)))
                  if args.scoring == "letter" else candidate_logprobs(vlm, frames, prompt,
                                                                      s.candidates))
        pred = max(range(len(scores)), key=scores.__getitem__)
        return [{"question_id": s.question_id, "task_name": s.task_name, "video_name": s.video_name,
                 "candidates": s.candidates, "answer": s.answer, "answer_index": s.answer_index,
                 "scores": scores, "prediction_index": pred, "prediction": s.candidates[pred],
                 "correct": None if s.answer_index is None else pred == s.answer_index}]

    records, errors = run_resumable(list(data), args.output.with_suffix(".jsonl"), score,
                                    "inference", args.retry_errors)
    result = {"config": {"model_id": args.model_id, "num_frames": args.num_frames,
                         "scoring": args.scoring, "annotations": str(data.annotations_json),
                         "remote": args.remote},
              "accuracy": accuracy(records), "records": records, "errors": errors}
    write_json_atomic(args.output, result)
    acc = result["accuracy"]["overall"]
    print(f"Saved {len(records)} predictions ({len(errors)} errors) to {args.output}; "
          f"accuracy {acc['accuracy']}")
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
