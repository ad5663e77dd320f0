"""An exact layer x frame-span patching sweep: `vlminterp.sweep.patch_sweep` vs the seed's loop.

Sweep: every decoder layer x 4 frame spans (``visual_frames:0:2`` … ``6:8``, one temporal group
each), denoising (clean activations patched into the reversed clip's run), metric = the option
margin of the multiple-choice letters. Two models with random weights, Qwen2-VL's vision tower
(1280 wide, 4 blocks) and 8 frames of 112x112:

  realistic  the 2B model's LM widths (1536 / 8960, 12 heads, 2 kv heads), 4 decoder layers;
  deep       16 decoder layers, 512 wide (2816 MLP, 8 heads, 2 kv heads).

Variants, all giving the same scores (asserted, max |diff| <= 1e-5):

  loop           the seed's shape: a plain model, one clean forward caching every layer with
                 hooks, one forward for the counterfactual's score and one forward per condition
                 with a patching hook registered before and removed after;
  rows           the library before reuse (strategy="rows"): per chunk one traced forward, the
                 vision tower on [clean, counterfactual], the LM on [clean, cf, patched x k];
  layers         strategy="layers": one prepare forward, then per chunk the LM alone, the layers
                 before the patched one skipped (their outputs are the counterfactual run's);
  layers+prefix  strategy="layers+prefix": also only the positions from the first patched one
                 on (the prefix's keys/values from the counterfactual's cache), and the final
                 layer's MLP on the metric's position only;
  auto           the default: layers+prefix after checking one condition against the plain
                 path (one extra LM row in the prepare forward).
Targets: loop / layers+prefix >= 5 (realistic) and >= 8 (deep). The JSON's meta gives each
model's vision_over_lm (one vision pass / one LM pass): the loop reruns the vision tower per
condition, so the larger it is the more reuse gains (Qwen2-VL-7B, 8 frames 336x336: ~0.35).

    python benchmarks/patch_sweep.py [--quick] [--json PATH] [--device cpu|cuda]
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from vlminterp import sweep  # noqa: E402
from vlminterp.metrics import option_margin  # noqa: E402
from vlminterp.video.counterfactuals import reverse  # noqa: E402
from vlminterp.video.multiple_choice import mc_prompt, option_ids  # noqa: E402

TARGETS = {"realistic.speedup": (">=", 5.0), "deep.speedup": (">=", 8.0)}
QUESTION = "Which direction does the square move?"
CANDIDATES = ["left", "right", "up", "down"]
SPANS = [f"visual_frames:{a}:{a + 2}" for a in range(0, 8, 2)]
MODELS = {"realistic": dict(layers=4),
          "deep": dict(layers=16, hidden=512, intermediate=2816, heads=8, kv_heads=2)}


def loop_sweep(vlm, plain, clean, cf, prompt, ids, layers):
    """The seed's loop: returns {(layer, span): patched score} plus "cf"."""
    blocks = plain.model.language_model.layers

    def score(inputs):
        with torch.no_grad():
            logits = plain(**inputs, logits_to_keep=1, use_cache=False).logits[:, -1]
        return option_margin(logits.float(), ids, 0).item()

    clean_in = vlm.prepare(text=prompt, video=[clean])
    lay = vlm.layout(clean_in)
    cached = {}
    handles = [blocks[i].register_forward_hook(
        lambda m, a, o, i=i: cached.__setitem__(i, o.detach().clone())) for i in layers]
    score(clean_in)
    for h in handles:
        h.remove()
    cf_in = vlm.prepare(text=prompt, video=[cf])
    out = {"cf": score(cf_in)}
    for layer in layers:
        for spec in SPANS:
            pos = lay.positions(spec).to(cached[layer].device)

            def patch(m, a, o, layer=layer, pos=pos):
                o[0, pos] = cached[layer][0, pos]
                return o

            handle = blocks[layer].register_forward_hook(patch)
            try:
                out[(layer, spec)] = score(cf_in)
            finally:
                handle.remove()
    return out


def library_sweep(vlm, pair, grid, ids, strategy, rows=None):
    res = sweep.patch_sweep(vlm, pair, grid, lambda logits: option_margin(logits, ids, 0),
                            strategy=strategy, rows_per_forward=rows, progress=False)
    out = {"cf": res.destination}
    for i, site in enumerate(res.coords["site"]):
        for j, spec in enumerate(res.coords["positions"]):
            out[(int(site.split(".")[1]), spec)] = res.destination + float(res.values[i, j])
    return out, res.meta


def run_model(name, kw, args):
    dev = args.device
    vlm, plain = common.realistic_qwen2_vl(max_pixels=112 * 112, device=dev, **kw)
    clean = common.random_video(0, frames=8, size=112)
    cf = reverse(clean)
    prompt = mc_prompt(QUESTION, CANDIDATES)
    ids = option_ids(vlm, len(CANDIDATES))
    layers = list(range(vlm.n_layers))
    pair = vlm.prepare(text=prompt, video=[clean, cf])
    grid = sweep.Grid([f"resid.{i}" for i in layers], SPANS)
    variants = {"loop": lambda: loop_sweep(vlm, plain, clean, cf, prompt, ids, layers),
                "rows": lambda: library_sweep(vlm, pair, grid, ids, "rows", 8)[0]}
    for strategy in ("layers", "layers+prefix", "auto"):
        variants[strategy] = lambda s=strategy: library_sweep(vlm, pair, grid, ids, s)[0]
    ref = variants["loop"]()
    diffs = {}
    for v in variants:
        if v != "loop":
            got = variants[v]()
            diffs[v] = max(abs(got[k] - ref[k]) for k in ref)
            assert diffs[v] <= 1e-5, f"{name} {v}: scores differ from the loop by {diffs[v]}"
    assert max(abs(ref[k] - ref["cf"]) for k in ref) > 1e-4, "no condition moved the score"
    meta = library_sweep(vlm, pair, grid, ids, "layers+prefix")[1]
    t = common.time_interleaved(variants, reps=args.reps, warmup=args.warmup, device=dev,
                                clock=args.clock)
    rows = [[f"{name} {v}", 1e3 * t.median(v), t.ratio("loop", v), t.spread(v),
             diffs.get(v, 0.0)] for v in variants]
    ratios = {f"{name}.speedup": t.ratio("loop", "layers+prefix"),
              f"{name}.speedup_layers": t.ratio("loop", "layers"),
              f"{name}.speedup_rows": t.ratio("loop", "rows"),
              f"{name}.speedup_auto": t.ratio("loop", "auto"),
              f"{name}.prefix_over_layers": t.ratio("layers", "layers+prefix")}
    share = common.qwen_vision_share(vlm, vlm.prepare(text=prompt, video=[clean]))
    info = {"conditions": len(layers) * len(SPANS), "seq_len": pair["input_ids"].shape[1],
            "max_score_diff": diffs, "chosen": meta, "vision_over_lm": share, **kw}
    return rows, ratios, info


def main() -> int:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    if args.quick and args.reps is None:
        args.reps = 3
    load0 = common.setup(args)
    models = {"realistic": MODELS["realistic"],
              "deep": {**MODELS["deep"], "layers": 8 if args.quick else 16}}
    if args.smoke:
        models = {"realistic": {**common.SMOKE, "layers": 2}, "deep": {**common.SMOKE, "layers": 4}}
    table, ratios, info = [], {}, {}
    for name, kw in models.items():
        rows, r, i = run_model(name, kw, args)
        table += rows
        ratios.update(r)
        info[name] = i
        print(f"{name}: done", file=sys.stderr)
    print(f"\npatch sweep ({args.device}, {args.clock} clock, {torch.get_num_threads()} thread(s), "
          f"{args.reps} interleaved reps): layers x {len(SPANS)} frame spans, 8 frames 112x112")
    common.print_table(table, ["variant", "ms / sweep", "loop/this", "IQR/med",
                               "max |score diff|"])
    return common.finish(args, ratios, TARGETS, common.meta(
        args, load0, reps=args.reps, warmup=args.warmup, models=info, spans=SPANS,
        vision="Qwen2-VL vision tower 1280 wide, 4 blocks, 8 frames 112x112"))


if __name__ == "__main__":
    sys.exit(main())
