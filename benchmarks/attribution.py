"""Attribution patching vs the exact library sweep: cost and agreement on one grid.

Model: Qwen2-VL with random weights, 8 frames of 112x112, an LM of 16 layers x 512 (8 heads,
2 kv heads) and a vision tower 1280 wide with 1 block, so that one vision pass costs about
0.4 of an LM pass, as on Qwen2-VL-7B with 8 frames of 336x336 (the JSON's vision_over_lm) —
a deep, narrow stand-in where the exact sweep's cost (one row per condition, ~half the layers
each) and AtP's (a constant number of passes, two of them with the vision tower) separate as
they do on a real model. Grid: every layer's per-head outputs (z) x 8
heads x 4 frame spans = 512 conditions, denoising, metric = logit difference of two letters.

  exact   `vlminterp.sweep.patch_sweep` (strategy "auto": layer skipping + prefix reuse);
  atp_N   `vlminterp.sweep.attribution(steps=N)` for N = 0 (plain AtP), 2, 4, 8
          integrated-gradient steps.
Reported: time ratios exact / atp_N, and Spearman's rho and top-k overlap (k = 10 and 25) of
atp_N vs exact. Target: exact / atp_N >= 20 at the smallest N whose rho >= 0.9.

    python benchmarks/attribution.py [--quick] [--json PATH] [--device cpu|cuda]
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from vlminterp import sweep  # noqa: E402
from vlminterp.metrics import logit_diff  # noqa: E402
from vlminterp.video.counterfactuals import reverse  # noqa: E402

TARGETS = {"speedup_at_rho_0.9": (">=", 20.0)}
STEPS = (0, 2, 4, 8)
SPANS = [f"visual_frames:{a}:{a + 2}" for a in range(0, 8, 2)]


def overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    top = lambda v: set(np.argsort(-np.abs(v), kind="stable")[:k])  # noqa: E731
    return len(top(a) & top(b)) / k


def main() -> int:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    if args.quick and args.reps is None:
        args.reps = 3
    load0 = common.setup(args)
    layers = 2 if args.smoke else 8 if args.quick else 16
    size = common.SMOKE if args.smoke else dict(hidden=512, intermediate=2816, heads=8,
                                                kv_heads=2, vision_depth=1)
    vlm, _ = common.realistic_qwen2_vl(max_pixels=112 * 112, device=args.device, layers=layers,
                                       plain_copy=False, **size)
    clean = common.random_video(0, frames=8, size=112)
    pair = vlm.prepare(text="Which direction does the square move? Answer:",
                       video=[clean, reverse(clean)])
    a, b = vlm.token_id(" A"), vlm.token_id(" B")

    def metric(logits):
        return logit_diff(logits, a, b)

    grid = sweep.Grid([f"z.{i}" for i in range(layers)], SPANS, heads="all")
    variants = {"exact": lambda: sweep.patch_sweep(vlm, pair, grid, metric, progress=False)}
    for n in STEPS:
        variants[f"atp_{n}"] = lambda n=n: sweep.attribution(vlm, pair, grid, metric, steps=n)
    results = {name: fn() for name, fn in variants.items()}
    exact = results["exact"].values.ravel()
    assert np.abs(exact).max() > 1e-4, "no condition moved the metric: the comparison is vacuous"
    agree = {}
    for n in STEPS:
        est = results[f"atp_{n}"].values.ravel()
        agree[n] = {"spearman": float(spearmanr(exact, est)[0]), "top10": overlap(exact, est, 10),
                    "top25": overlap(exact, est, 25)}
    t = common.time_interleaved(variants, reps=args.reps, warmup=args.warmup,
                                device=args.device, clock=args.clock)
    ratios = {f"speedup_atp_{n}": t.ratio("exact", f"atp_{n}") for n in STEPS}
    ratios.update({f"spearman_atp_{n}": agree[n]["spearman"] for n in STEPS})
    good = [n for n in STEPS if agree[n]["spearman"] >= 0.9]
    if good:
        ratios["speedup_at_rho_0.9"] = ratios[f"speedup_atp_{good[0]}"]
    rows = [["exact", 1e3 * t.median("exact"), 1.0, None, None, None, t.spread("exact")]]
    rows += [[f"atp_{n}", 1e3 * t.median(f"atp_{n}"), ratios[f"speedup_atp_{n}"],
              agree[n]["spearman"], agree[n]["top10"], agree[n]["top25"],
              t.spread(f"atp_{n}")] for n in STEPS]
    n_cond = int(np.isfinite(results["exact"].values).sum())
    print(f"\nattribution ({args.device}, {args.clock} clock, {torch.get_num_threads()} thread(s), "
          f"{args.reps} interleaved reps): z heads x {len(SPANS)} frame spans x {layers} layers "
          f"= {n_cond} conditions")
    common.print_table(rows, ["variant", "ms", "exact/this", "spearman", "top10", "top25",
                              "IQR/med"])
    return common.finish(args, ratios, TARGETS, common.meta(
        args, load0, reps=args.reps, warmup=args.warmup, conditions=n_cond, layers=layers,
        agreement={str(n): v for n, v in agree.items()},
        step_count_used=good[0] if good else None,
        exact_meta=results["exact"].meta, atp_meta=results["atp_0"].meta,
        vision_over_lm=common.qwen_vision_share(vlm, vlm.prepare(
            text="Which direction does the square move? Answer:", video=[clean])),
        model="Qwen2-VL, LM 512 wide x layers (8 heads, 2 kv), vision 1280 x 1 block, "
              "8 frames 112x112, random weights"))


if __name__ == "__main__":
    sys.exit(main())
