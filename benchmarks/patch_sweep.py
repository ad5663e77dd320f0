"""A layer x frame-span causal-tracing sweep: the library's batched path vs the original loop.

Sweep: 8 decoder layers x 4 frame spans (``visual_frames:0:2`` … ``6:8``, one temporal group each)
x 2 counterfactuals (reverse, shuffle) = 64 patched conditions on one 8-frame clip, denoising
(clean activations patched into the counterfactual run), on tiny Qwen2-VL with 8 decoder layers.

  library  `vlminterp.video.causal_tracing.run_chunk` (what ``trace_sample`` and the recipe run): per
           counterfactual, one traced forward per ``batch_size`` conditions; the vision tower
           runs on [clean, counterfactual] and the language model on rows [clean,
           counterfactual, patched...] (`interventions.expand_rows`), patches copied between rows;
  loop     the original implementation's shape: a plain model, one clean forward caching every
           layer with hooks, then per counterfactual one forward for its score and one forward
           per condition with a patching hook registered before and removed after.
All run the same forward kwargs (last-position logits only, no KV cache) and are asserted to
give the same scores. Target: loop / library >= 4 at the recipe's default batch size (8).

    python benchmarks/patch_sweep.py [--quick] [--json PATH] [--device cpu|cuda]
"""

from __future__ import annotations

import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from vlminterp.video import causal_tracing as ct  # noqa: E402
from vlminterp.video.counterfactuals import make_counterfactuals  # noqa: E402
from vlminterp.metrics import option_margin  # noqa: E402
from vlminterp.video.multiple_choice import last_logits_kwargs, mc_prompt, option_ids  # noqa: E402

TARGETS = {"speedup_b8": (">=", 4.0)}
QUESTION = "Which direction does the red square move?"
CANDIDATES = ["left", "right", "up", "down"]


def tiny_8_layers(device: str):
    """Tiny Qwen2-VL (offline processor, eager attention) with 8 decoder layers, plus an
    unwrapped copy with the same weights for the loop."""
    from transformers import Qwen2VLForConditionalGeneration

    from vlminterp.models import tiny, wrap

    model, processor = tiny.build_qwen2_vl(0)
    config = copy.deepcopy(model.config)
    config.text_config.num_hidden_layers = 8
    config.text_config.layer_types = ["full_attention"] * 8
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).eval().to(device)
    plain = copy.deepcopy(model)
    return wrap(model, processor, "tiny-qwen2-vl-8layers", "qwen2_vl"), plain


def library_sweep(vlm, clean, cfs, prompt, ids, layers, spans, batch_size):
    slices = [(f"span{k}", spec) for k, spec in enumerate(spans)]
    out = {}
    for name, cf in cfs.items():
        pair = vlm.prepare(text=prompt, video=[clean, cf])
        lay = vlm.layout(pair)
        conds = ct.conditions_for(layers, slices)
        for k in range(0, len(conds), batch_size):
            chunk = conds[k:k + batch_size]
            scores, _, _ = ct.run_chunk(vlm, pair, chunk, ids, 0, "denoise", lay=lay)
            out[(name, "clean")], out[(name, "cf")] = scores[0], scores[1]
            out.update({(name, c.layer, c.token_slice): scores[2 + j] for j, c in enumerate(chunk)})
    return out


def loop_sweep(vlm, plain, clean, cfs, prompt, ids, layers, spans):
    blocks = plain.model.language_model.layers
    kw = last_logits_kwargs(vlm)

    def score(inputs):
        with torch.no_grad():
            logits = plain(**inputs, **kw).logits[:, -1]
        return option_margin(logits.float(), ids, 0).item()

    clean_in = vlm.prepare(text=prompt, video=[clean])
    lay = vlm.layout(clean_in)
    cached = {}
    handles = [blocks[i].register_forward_hook(
        lambda m, a, o, i=i: cached.__setitem__(i, o.detach().clone())) for i in layers]
    clean_score = score(clean_in)
    for h in handles:
        h.remove()
    out = {}
    for name, cf in cfs.items():
        cf_in = vlm.prepare(text=prompt, video=[cf])
        out[(name, "clean")], out[(name, "cf")] = clean_score, score(cf_in)
        for layer in layers:
            for spec in spans:
                pos = lay.positions(spec).to(cached[layer].device)

                def patch(m, a, o, layer=layer, pos=pos):
                    o[0, pos] = cached[layer][0, pos]
                    return o

                handle = blocks[layer].register_forward_hook(patch)
                try:
                    out[(name, layer, spec)] = score(cf_in)
                finally:
                    handle.remove()
    return out


def main() -> int:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    load0 = common.setup(args)
    dev = args.device
    reps, warmup = args.reps, args.warmup
    vlm, plain = tiny_8_layers(dev)
    clean = common.random_video(0, frames=8, size=112)
    cfs = make_counterfactuals(clean, ["reverse", "shuffle"], seed=0)
    prompt = mc_prompt(QUESTION, CANDIDATES)
    ids = option_ids(vlm, len(CANDIDATES))
    layers = list(range(vlm.n_layers))
    spans = [f"visual_frames:{a}:{a + 2}" for a in range(0, 8, 2)]
    batch_sizes = [8] if args.quick else [8, 32]
    n_cond = len(layers) * len(spans) * len(cfs)

    variants = {"loop": lambda: loop_sweep(vlm, plain, clean, cfs, prompt, ids, layers, spans)}
    for b in batch_sizes:
        variants[f"library_b{b}"] = (lambda b=b: library_sweep(vlm, clean, cfs, prompt, ids,
                                                               layers, spans, b))
    ref = variants["loop"]()
    max_diff = {}
    for name in variants:
        if name != "loop":
            got = variants[name]()
            assert got.keys() == ref.keys(), name
            max_diff[name] = max(abs(got[k] - ref[k]) for k in ref)
            assert max_diff[name] < 1e-4, f"{name}: scores differ from the loop by {max_diff[name]}"
    effects = [ref[k] - ref[(k[0], "cf")] for k in ref if len(k) == 3]
    assert max(abs(e) for e in effects) > 1e-4, "no condition moved the score: the sweep is vacuous"

    t = common.time_interleaved(variants, reps=reps, warmup=warmup, device=dev, clock=args.clock)
    ratios, rows = {}, []
    for name in variants:
        forwards = (1 + len(cfs) * (1 + n_cond // len(cfs)) if name == "loop" else
                    len(cfs) * -(-(n_cond // len(cfs)) // int(name.split("_b")[1])))
        speed = t.ratio("loop", name)
        if name != "loop":
            ratios[f"speedup_{name.replace('library_', '')}"] = speed
        rows.append([name, forwards, 1e3 * t.median(name), speed, t.spread(name),
                     max_diff.get(name, 0.0)])
    print(f"\npatch sweep ({dev}, {args.clock} clock, {torch.get_num_threads()} thread(s), "
          f"{reps} interleaved reps): {len(layers)} layers x {len(spans)} spans x {len(cfs)} "
          f"counterfactuals = {n_cond} conditions")
    common.print_table(rows, ["variant", "forwards", "ms / sweep", "loop/this", "IQR/med",
                              "max |score diff|"])
    return common.finish(args, ratios, TARGETS, common.meta(
        args, load0, reps=reps, warmup=warmup, conditions=n_cond, layers=len(layers),
        spans=spans, counterfactuals=list(cfs), batch_sizes=batch_sizes,
        max_score_diff=max_diff, model="tiny qwen2-vl, 8 decoder layers, 8 frames 112x112"))


if __name__ == "__main__":
    sys.exit(main())
