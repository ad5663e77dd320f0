"""Does caching cost memory in proportion to what is cached?

One traced forward over a batch of two videos (Qwen2-VL with the 2B model's widths, 4 decoder
layers, random weights), caching every layer's residual stream with ``interventions.cache`` at:
  visual_row0  one video's visual positions (row 0 only),
  visual       the visual positions of both rows,
  full         every position of both rows,
  last         the last position of both rows.
The peak is taken over the language model's part of the forward (from its first call on,
counting what is alive then): the caching happens there, while the whole forward's peak sits in
the vision tower and would hide it. For each selection: "extra" = that peak minus the same
trace's caching nothing, and "retained" = what the trace left alive, against the bytes the
cache returns. Targets: the extra peak of caching one video's visual positions, as a fraction
of the extra peak of caching the full sequence, is within 1.25x of the fraction of positions
selected (``visual_row0.extra_ratio_over_position_ratio``); the trace retains nothing beyond
what the cache returns (``visual_row0.retained_over_stored``); and the library's cache costs no
more than hand-written forward hooks caching the full sequence.

    python benchmarks/cache_memory.py [--quick] [--json PATH] [--device cpu|cuda]
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from vlminterp.interventions import cache  # noqa: E402

TARGETS = {"visual_row0.extra_ratio_over_position_ratio": ("<=", 1.25),
           "visual_row0.retained_over_stored": ("<=", 1.05),
           "full.extra_cache_over_hooks": ("<=", 1.10)}
PROMPT = ("Which direction does the red square move in this video ? Options : A left B right "
          "C up D down . Answer with the letter of the first option that is right . ")


def main() -> int:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    load0 = common.setup(args, memory=True)
    dev = args.device
    size, frames, repeat = (112, 2, 2) if args.quick else (336, 8, 12)
    vlm, _ = common.realistic_qwen2_vl(max_pixels=size * size, device=dev, plain_copy=False)
    inputs = vlm.prepare(text=PROMPT * repeat, video=[common.random_video(0, frames, size),
                                                      common.random_video(1, frames, size)])
    lay = vlm.layout(inputs)
    seq, n_rows = lay[0].seq_len, len(lay)
    layers = list(vlm.layers)
    selections = {  # name: (positions, rows, number of (row, position) cells)
        "visual_row0": (lay[0].visual, [0], len(lay[0].visual)),
        "visual": (lay[0].visual, None, n_rows * len(lay[0].visual)),
        "full": (None, None, n_rows * seq),
        "last": (torch.tensor([lay[0].last]), None, n_rows),
    }
    assert all(torch.equal(lay[r].visual, lay[0].visual) for r in range(n_rows))

    def traced(positions=None, rows=None, do_cache=True):
        if not do_cache:
            with torch.no_grad(), vlm.trace(inputs):
                pass
            return None
        with torch.no_grad(), vlm.trace(inputs):
            got = cache(layers, positions=positions, rows=rows)
        return got

    def hooks_full():
        got = {}
        handles = [m.register_forward_hook(
            lambda mod, a, out, i=i: got.__setitem__(i, out.detach().clone()))
            for i, m in enumerate(vlm.torch_model.model.language_model.layers)]
        try:
            with torch.no_grad():
                vlm.torch_model(**inputs)
        finally:
            for h in handles:
                h.remove()
        return got

    def plain():
        with torch.no_grad():
            vlm.torch_model(**inputs)

    lm = vlm.torch_model.model.language_model
    traced(do_cache=False)  # warm up lazy initialisation outside the measurements
    base = common.peak_memory(lambda: traced(do_cache=False), dev, mark=lm)
    base_plain = common.peak_memory(plain, dev, mark=lm)
    measured = {}
    for name, (pos, rows, cells) in selections.items():
        m = common.peak_memory(lambda: traced(pos, rows), dev, mark=lm)
        m["stored"] = common.nbytes(m.pop("result"))
        m["cells"] = cells
        measured[name] = m
    hk = common.peak_memory(hooks_full, dev, mark=lm)
    hk["stored"] = common.nbytes(hk.pop("result"))
    base.pop("result"), base_plain.pop("result")

    ratios, rows_out = {}, []
    full = measured["full"]
    full_extra = full["tensor_peak"] - base["tensor_peak"]
    for name, m in measured.items():
        extra = m["tensor_peak"] - base["tensor_peak"]
        pos_ratio = m["cells"] / full["cells"]
        extra_ratio = extra / full_extra
        ratios[f"{name}.position_ratio"] = pos_ratio
        ratios[f"{name}.stored_ratio"] = m["stored"] / full["stored"]
        ratios[f"{name}.peak_ratio"] = m["tensor_peak"] / full["tensor_peak"]
        ratios[f"{name}.extra_ratio"] = extra_ratio
        ratios[f"{name}.extra_ratio_over_position_ratio"] = extra_ratio / pos_ratio
        ratios[f"{name}.extra_over_stored"] = extra / m["stored"]
        ratios[f"{name}.retained_over_stored"] = m["retained"] / m["stored"]
        rows_out.append([name, m["cells"], pos_ratio, m["stored"] / 2**20, m["retained"] / 2**20,
                         m["tensor_peak"] / 2**20, extra / 2**20, extra_ratio,
                         extra_ratio / pos_ratio])
    hk_extra = hk["tensor_peak"] - base_plain["tensor_peak"]
    ratios["full.extra_cache_over_hooks"] = full_extra / hk_extra
    rows_out.append(["hooks full", full["cells"], 1.0, hk["stored"] / 2**20, hk["retained"] / 2**20,
                     hk["tensor_peak"] / 2**20, hk_extra / 2**20, None, None])

    print(f"\ncache memory ({dev}; batch {n_rows} x {seq} tokens, {len(lay[0].visual)} visual per "
          f"row, {len(layers)} layers; peak = tensor memory of the language-model part)")
    print(f"trace caching nothing: peak {base['tensor_peak'] / 2**20:.1f} MiB "
          f"(plain forward {base_plain['tensor_peak'] / 2**20:.1f} MiB)")
    common.print_table(rows_out, ["cached", "cells", "cells/full", "stored MiB", "retained MiB",
                                  "peak MiB", "extra MiB", "extra/full",
                                  "(extra/full)/(cells/full)"])
    return common.finish(args, ratios, TARGETS, common.meta(
        args, load0, batch=n_rows, seq_len=seq, visual_per_row=len(lay[0].visual),
        layers=len(layers), video=[frames, size, size], memory={
            "trace_no_cache": base, "plain_forward": base_plain, "hooks_full": hk, **measured},
        definitions={"peak": "tensor bytes alive from the language model's call on, at most",
                     "extra": "peak(trace + cache) - peak(trace caching nothing)",
                     "retained": "bytes allocated in the call still alive after it",
                     "cells": "(row, position) pairs cached per layer"}))


if __name__ == "__main__":
    sys.exit(main())
