"""Experiment 3: block attention from visual sources (keys) to target positions (queries) over
layer groups and sliding windows, and score the vqa answer."""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor

from vlminterp.data.coco import ObjectSample
from vlminterp.interventions import check_attention_layers, knockout_attention_rows
from vlminterp.models.base import ModelInputs
from vlminterp.neo2024.prompts import last_logits, score, task_inputs, vqa_task
from vlminterp.neo2024.subsets import object_indices

LAYER_GROUPS_32 = {"early": (0, 10), "mid": (11, 21), "late": (21, 32), "early_mid": (5, 15),
                   "mid_late": (15, 25), "all": (0, 32)}  # half-open, on LLaVA-1.5's 32 layers


def layer_groups(n_layers: int) -> dict[str, list[int]]:
    """The original's groups on 32 layers (early 0–9, mid 11–20, late 21–31, early_mid 5–14,
    mid_late 15–24, all), scaled to ``n_layers``; each keeps at least one layer."""
    out = {}
    for name, (a, b) in LAYER_GROUPS_32.items():
        lo = min(int(math.floor(a * n_layers / 32 + 0.5)), n_layers - 1)
        hi = min(max(int(math.floor(b * n_layers / 32 + 0.5)), lo + 1), n_layers)
        out[name] = list(range(lo, hi))
    return out


def sliding_windows(n_layers: int, k: int) -> dict[str, list[int]]:
    """Windows of ``k`` consecutive layers, ``window_<start>``."""
    k = max(1, min(k, n_layers))
    return {f"window_{s}": list(range(s, s + k)) for s in range(n_layers - k + 1)}


def last_view(span):
    """The view of ``span`` whose tokens end last in the sequence (LLaVA-1.5's one grid; the
    last tile or the thumbnail/global view of a tiled image)."""
    return max(span.views, key=lambda view: int(view.positions.max()))


def knockout_sets(row, object_pos: dict[int, Tensor]) -> tuple[dict, dict]:
    """Sources (keys) and targets (queries) of the knockout experiment, as sequence positions:
    sources obj_b0/obj_b1/obj_b2 (object cells with buffer, in every view), image_minus_obj_b1,
    visual (every view's patch tokens); targets last, last_row (the original's last row of the
    image grid: the bottom row of the view that ends last in the sequence), text (prompt
    positions after the image, markers and the last position excluded)."""
    visual = row.visual
    keep = ~torch.isin(visual, object_pos[1])
    sources = {f"obj_b{b}": object_pos[b] for b in (0, 1, 2)}
    sources["image_minus_obj_b1"] = visual[keep]
    sources["visual"] = visual
    view = last_view(row.images[0])
    prompt = row.text[~torch.isin(row.text, row.markers)]
    text_after = prompt[(prompt > visual.max()) & (prompt != row.last)]
    targets = {"last": torch.tensor([row.last]), "last_row": view.positions[-view.grid[1]:],
               "text": text_after}
    return sources, targets


def knockout_layers(vlm, layers=None) -> list[int]:
    """The decoder layers knockout may use: ``layers`` (checked: each must have softmax
    attention) or, by default, every attention layer (`VLM.attention_layers`; Qwen3.5's and
    MiniCPM-V's Gated-DeltaNet layers have no attention weights to block)."""
    if layers is None:
        return list(vlm.attention_layers)
    out = []
    for layer in layers:
        if not 0 <= int(layer) < vlm.n_layers:
            raise ValueError(f"--layers: layer {layer} is not among the model's {vlm.n_layers} "
                             f"decoder layers (0..{vlm.n_layers - 1})")
        out.append(int(layer))
    check_attention_layers(vlm, out, "--layers")
    return sorted(set(out))


def layer_sets(n_layers: int, allowed, window: int | None = None, groups: bool = True
               ) -> dict[str, list[int]]:
    """The layer groups (`layer_groups`, when ``groups``) and sliding windows of ``window``
    layers (default: 9 of 32, scaled to the depth), each cut down to the ``allowed`` layers;
    a set left empty is dropped. Groups and windows keep their depth-scaled meaning."""
    sets = dict(layer_groups(n_layers)) if groups else {}
    width = window or max(1, int(math.floor(9 * n_layers / 32 + 0.5)))
    sets.update(sliding_windows(n_layers, width))
    allowed = set(allowed)
    kept = {name: [i for i in layers if i in allowed] for name, layers in sets.items()}
    return {name: layers for name, layers in kept.items() if layers}


PAIRS = ("product", "no_self")


def knockout_blocks(sources: Tensor, targets: Tensor, pairs: str = "product"
                    ) -> list[tuple[Tensor, Tensor]]:
    """``(sources, targets)`` blocks whose (target, source) products together make the blocked
    attention edges. ``product`` (the original's ``itertools.product(targets, sources)``): every
    target is cut from every source, itself included when it is both; ``no_self``: the same
    but a position keeps its attention to itself."""
    if pairs not in PAIRS:
        raise ValueError(f"knockout pairs {pairs!r}: expected one of {', '.join(PAIRS)}")
    if pairs == "product":
        return [(sources, targets)]
    both = torch.isin(targets, sources)
    blocks = [(sources, targets[~both])] if (~both).any() else []
    return blocks + [(sources[sources != t], t.reshape(1)) for t in targets[both]]


def _knockout_rows(vlm, chunk) -> None:
    """Inside a trace: batch row ``i`` gets the knockout ``chunk[i]`` (None = none): one
    ``(sources, targets, layers)`` or a list of them."""
    knockout_attention_rows(vlm, [(row, *b) for row, c in enumerate(chunk) if c is not None
                                  for b in (c if isinstance(c, list) else [c])])


def knockout_logits(vlm, inputs: ModelInputs, conditions, batch_size: int = 16
                    ) -> Float[Tensor, "rows vocab"]:
    """Last-position logits of the single-row ``inputs`` once per condition: a ``(sources,
    targets, layers)`` knockout, a list of them applied together, or None (no knockout);
    ``batch_size`` rows per traced forward."""
    return last_logits(vlm, inputs, conditions, _knockout_rows, batch_size)


def attention_knockout(vlm, image, sample: ObjectSample, *, window: int | None = None,
                       groups: bool = True, sources=None, targets=None, batch_size: int = 16,
                       keep_all: bool = False, use_polygons: bool = True,
                       question: str | None = None, pairs: str = "product",
                       layers=None) -> list[dict]:
    """Knock out attention source -> target over layer groups and sliding windows of
    ``window`` layers (default: 9 of 32, scaled) under the vqa prompt, each cut down to
    ``layers`` (default: every attention layer, `knockout_layers`); one record per (source,
    target, layers) plus the baseline. ``pairs``: which edges a (source, target) set cuts
    (`knockout_blocks`; default the original's full product)."""
    allowed = knockout_layers(vlm, layers)
    task = vqa_task(question)
    inputs, _, answer_id = task_inputs(vlm, image, task, sample.category)
    base = score(vlm, knockout_logits(vlm, inputs, [None]), answer_id)[0]
    records = [{"source": None, "target": None, "layers": "baseline", "layer_list": [], **base,
                "delta_p": 0.0, "baseline_correct": base["correct"]}]
    row = vlm.layout(inputs)[0]
    obj = {b: row.visual[object_indices(row, sample, b, use_polygons)] for b in (0, 1, 2)}
    if not (keep_all or base["correct"]) or not len(obj[0]):
        reason = "baseline incorrect" if len(obj[0]) else "object outside the model's view"
        return [{**records[0], "skipped": reason}]
    src_sets, tgt_sets = knockout_sets(row, obj)
    sets = layer_sets(vlm.n_layers, allowed, window, groups)
    conds = [(s, t, name) for s in (sources or src_sets) for t in (targets or tgt_sets)
             for name in sets]
    masks = [[(src, tgt, sets[name])
              for src, tgt in knockout_blocks(src_sets[s], tgt_sets[t], pairs)]
             for s, t, name in conds]
    results = score(vlm, knockout_logits(vlm, inputs, masks, batch_size), answer_id)
    for (s, t, name), res in zip(conds, results):
        src, tgt = src_sets[s], tgt_sets[t]
        records.append({"source": s, "target": t, "layers": name,
                        "layer_list": sets[name], **res,
                        "n_sources": len(src), "n_targets": len(tgt), "pairs": pairs,
                        "n_overlap": int(torch.isin(tgt, src).sum()),
                        "delta_p": res["p_correct"] - base["p_correct"],
                        "baseline_correct": base["correct"]})
    return records
