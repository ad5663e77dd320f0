"""Neo et al. 2024 object ablation per image on tiny LLaVA: the batched library vs the previous
one-task-at-a-time flow.

Per image (synthetic COCO-style objects, the recipe's defaults: tasks vqa, polling, generative;
sizes 5..250 (those <= 16 visual tokens kept); 50 integrated-gradient steps; 40 generated
tokens; 16 rows per forward; --keep_all so every condition runs on random weights):

  batched   `vlminterp.neo2024.object_ablation` now: (task x subset) rows share forwards, the
            first-token prompts in one right-padded batch with the vision tower once per prompt
            and only the last positions through lm_head, baselines riding along, IG steps per
            pass from a memory budget (all 50 in one forward+backward here);
  previous  the flow before (kept here as the baseline): one forward per task for its
            baseline, one traced forward per 16 conditions per task with the single-row
            inputs repeated (vision tower per row, full-sequence logits), IG 4 steps per pass.
Both give the same records (asserted). Reported: seconds per image (CPU time of this process
with one thread) and the speedup previous / batched. Target: <= 5 s per image.

    python benchmarks/neo_ablation.py [--quick] [--json PATH] [--device cpu|cuda]
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import vlminterp  # noqa: E402
from vlminterp import neo2024 as neo  # noqa: E402
from vlminterp.data.coco import read_coco  # noqa: E402
from vlminterp.data.synthetic_images import write_dataset  # noqa: E402
from vlminterp.interventions import ablate  # noqa: E402
from vlminterp.neo2024.prompts import last_logits  # noqa: E402

TARGETS = {"seconds_per_image": ("<=", 5.0)}
SETTINGS = dict(tasks=("vqa", "polling", "generative"), sizes=(5, 10, 20, 40, 60, 100, 250),
                ig_steps=50, max_new_tokens=40, batch_size=16, keep_all=True)


def _ablate_rows(vlm, chunk, mean):
    for row, pos in enumerate(chunk):
        if pos is not None and len(pos):
            ablate(vlm.layers[0], pos, "mean", mean=mean, rows=[row], at="input")


def _previous_task(vlm, task, inputs, answer, category, positions, mean, s):
    if task.generate:
        texts = neo.ablated_generate(vlm, inputs, positions, mean, s["max_new_tokens"],
                                     s["batch_size"])
        return [{"text": t, "correct": neo.names_object(t, category)} for t in texts]
    logits = last_logits(vlm, inputs, positions, lambda v, c: _ablate_rows(v, c, mean),
                         s["batch_size"])
    return neo.score(vlm, logits, answer)


def previous_object_ablation(vlm, image, sample, mean, s=SETTINGS) -> list[dict]:
    """The flow before batching (its records are what object_ablation must still give)."""
    prepared = {t: neo.task_inputs(vlm, image, neo.TASKS[t], sample.category) for t in s["tasks"]}
    base = {t: _previous_task(vlm, neo.TASKS[t], p[0], p[2], sample.category, [None], mean, s)[0]
            for t, p in prepared.items()}
    records = [{"task": t, "condition": "baseline", "n_tokens": 0, **base[t],
                "baseline_correct": base[t]["correct"]} for t in s["tasks"]]
    first = prepared[s["tasks"][0]][0]
    span = vlm.layout(first)[0].images[0]
    subsets = {f"object_b{b}": neo.object_indices(span, sample, b) for b in (0, 1, 2)}
    visual = neo.lm_input_visual(vlm, first)
    subsets["register"] = neo.register_indices(visual)
    sizes = neo.subset_sizes(s["sizes"], len(visual), len(subsets["object_b1"]))
    for name, n in sizes.items():
        subsets[f"random_{name}"] = neo.random_indices(len(visual), n, sample.key, 0)
    poll, _, yes = neo.task_inputs(vlm, image, neo.TASKS["polling"], sample.category)
    scores = neo.integrated_gradients(vlm, poll, yes, mean, s["ig_steps"], 4).abs().sum(-1)
    for name, n in sizes.items():
        subsets[f"ig_{name}"] = neo.top_indices(scores, n)
    for t in s["tasks"]:
        inputs, _, answer = prepared[t]
        vis = vlm.layout(inputs)[0].visual
        results = _previous_task(vlm, neo.TASKS[t], inputs, answer, sample.category,
                                 [vis[idx] for idx in subsets.values()], mean, s)
        for (name, idx), res in zip(subsets.items(), results):
            records.append({"task": t, "condition": name, **res})
    return records


def main() -> int:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    if args.quick and args.reps is None:
        args.reps = 3
    load0 = common.setup(args)
    vlm = vlminterp.load("tiny-llava", device=args.device)
    n_images = 2 if args.quick else 3
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        coco, samples = read_coco(write_dataset(root, n_images, seed=0), root)
        mean = neo.dataset_mean(vlm, coco, samples, root / "mean", progress=False)
        images = [(coco.load_image(s), s) for s in samples]

        def batched():
            return [neo.object_ablation(vlm, im, s, mean, **SETTINGS) for im, s in images]

        def previous():
            return [previous_object_ablation(vlm, im, s, mean) for im, s in images]

        new, old = batched(), previous()
        for a, b in zip(new, old):
            assert [(r["task"], r["condition"]) for r in a] == [(r["task"], r["condition"]) for r in b]
            for x, y in zip(a, b):
                assert x.get("token", x.get("text")) == y.get("token", y.get("text")), (x, y)
                assert abs(x.get("p_correct", 0) - y.get("p_correct", 0)) <= 1e-4
        t = common.time_interleaved({"batched": batched, "previous": previous}, reps=args.reps,
                                    warmup=args.warmup, device=args.device, clock=args.clock)
    per_image = t.median("batched") / n_images
    ratios = {"seconds_per_image": per_image,
              "previous_seconds_per_image": t.median("previous") / n_images,
              "speedup": t.ratio("previous", "batched")}
    print(f"\nneo object ablation ({args.device}, {args.clock} clock, {torch.get_num_threads()} "
          f"thread(s), {args.reps} interleaved reps, {n_images} images, "
          f"{sum(len(r) for r in new) // n_images} records per image)")
    common.print_table([["batched", per_image, t.spread("batched")],
                        ["previous", ratios["previous_seconds_per_image"], t.spread("previous")]],
                       ["variant", "s / image", "IQR/med"])
    print(f"speedup previous / batched: {ratios['speedup']:.2f}x")
    return common.finish(args, ratios, TARGETS, common.meta(
        args, load0, reps=args.reps, warmup=args.warmup, images=n_images,
        settings={k: list(v) if isinstance(v, tuple) else v for k, v in SETTINGS.items()},
        model="tiny-llava"))


if __name__ == "__main__":
    sys.exit(main())
