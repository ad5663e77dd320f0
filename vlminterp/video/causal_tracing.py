"""Counterfactual causal tracing over video frames: which layer and which tokens carry the answer.

For one question about a clean clip and a counterfactual clip (reversed, frames swapped, ...):

* score = `option_margin` of the option letters at the last position (correct letter's logit minus
  the best other letter's);
* total effect TE = clean_score - counterfactual_score;
* ``denoise`` (the original study's direction): copy the clean run's activations at one layer and
  token slice into the counterfactual run; effect = (patched - counterfactual) / TE, the fraction of
  the clean answer these activations *restore* (sufficiency);
* ``noise``: copy the counterfactual run's activations into the clean run; effect =
  (clean - patched) / TE, the fraction of the total effect these activations *reproduce* when
  corrupted alone (necessity). In both directions 1 means "all of it", 0 "none", and the effect is
  None when TE = 0.

Layer ``"embed"`` is the language model's input embeddings (text embeddings with the projector's
visual tokens scattered in: the input of ``layers[0]``); layer ``i`` is the residual stream after
``layers[i]`` (``vlm.residual(i)``: ``layers[i]``'s output, plus the visual features a deepstack
family adds after that layer). On families whose visual features also enter *after* the LM input
(Qwen3-VL's deepstack, Gemma 4's per-layer inputs), ``late_inputs="carry"`` (the default) makes a
patch at ``embed`` / layer ``i`` also copy the source run's later inputs at the patched positions,
so the patched positions run as in the source from there on; ``"counterfactual"`` patches the
residual stream alone (at ``embed`` on Qwen3-VL that restores only part of the visual input).

Every condition is one patched batch row scored by `vlminterp.sweep.run_conditions`: one forward
over [clean, counterfactual] records the run being patched, then each patched row starts from
that run's cached state at its layer and first patched position (``batch_size`` rows per
forward, or what a memory budget holds; on NDIF one forward of rows [clean, counterfactual,
patched...]); the results equal one full forward per condition (tested). Frame spans ``visual_frames:a:b`` are mapped to the temporal token groups that hold the
frames (Qwen2-VL merges 2 frames per group); a span that cuts a group patches the whole group and
the record says which groups and frames were really patched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Int
from torch import Tensor

from ..metrics import normalised_effect, option_margin
from ..sweep import Condition as SweepCondition, Site, pair_rows, run_conditions
from .multiple_choice import Frames
from ..tokens import TokenSlice
from .tracing_summary import (MIN_TOTAL_EFFECT, UNSTABLE_DOC, effect_grid, empty_note,  # noqa: F401
                              excluded_note, mark_unstable, summarise)

VPRIME_SHAPE = (128, 1024)  # the original's --vprime_n, --vprime_d
DIRECTIONS = ("denoise", "noise")
LATE_INPUTS = ("carry", "counterfactual")
EFFECT_DOC = {
    "denoise": "(patched - counterfactual) / (clean - counterfactual): clean activations patched "
               "into the counterfactual run; 1 = they restore the clean answer; null when equal",
    "noise": "(clean - patched) / (clean - counterfactual): counterfactual activations patched "
             "into the clean run; 1 = they reproduce the whole drop; null when equal",
}


# -- what to patch ------------------------------------------------------------------------------
def parse_layers(spec: str, n_layers: int) -> list:
    """``"all"`` -> ``["embed", 0, ..., n-1]``; else comma-separated ``embed``, ``i`` (negative
    counts from the end) or ``a:b`` (half-open range)."""
    if spec.strip() == "all":
        return ["embed", *range(n_layers)]
    out = []
    for item in (s.strip() for s in spec.split(",")):
        try:
            if item == "embed":
                new = ["embed"]
            elif ":" in item:
                a, b = (int(x) for x in item.split(":"))
                new = list(range(a, b))
                if not new:
                    raise ValueError
            else:
                new = [int(item)]
        except ValueError:
            raise ValueError(f"layers {spec!r}: {item!r} is not 'embed', an integer or a range "
                             f"a:b; allowed: 'all' or e.g. 'embed,0,2:4'") from None
        for layer in new:
            if layer != "embed" and not -n_layers <= layer < n_layers:
                raise ValueError(f"layers {spec!r}: layer {layer} is beyond the model's "
                                 f"{n_layers} decoder layers (0..{n_layers - 1})")
            layer = layer if layer == "embed" or layer >= 0 else layer + n_layers
            if layer not in out:
                out.append(layer)
    return sorted(out, key=_layer_order)


def _layer_order(layer) -> int:
    return -1 if layer == "embed" else int(layer)


def _frames_spec(spans) -> str:
    """One spec for a union of frame spans: contiguous spans merge into one range."""
    spans = sorted(spans)
    if all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1)):
        return f"visual_frames:{spans[0][0]}:{spans[-1][1]}"
    return "+".join(f"visual_frames:{a}:{b}" for a, b in spans)


def tracing_slices(token_slice: str, counterfactual: str, swap_spans=None) -> list[tuple[str, str]]:
    """``(role, spec)`` pairs to trace for one counterfactual: the main ``token_slice``, and for
    ``local_swap`` also spanA, spanB, their union and the text tokens (duplicates dropped)."""
    pairs = [("main", str(TokenSlice.parse(token_slice)))]
    if counterfactual == "local_swap" and swap_spans is not None:
        a, b = swap_spans
        pairs += [("spanA", _frames_spec([a])), ("spanB", _frames_spec([b])),
                  ("union", _frames_spec([a, b])), ("text", "text")]
    seen, out = set(), []
    for role, spec in pairs:
        if spec not in seen:
            seen.add(spec)
            out.append((role, spec))
    return out


@dataclass(frozen=True)
class SliceInfo:
    """Resolved positions of a spec in one layout row, and what they really cover."""

    positions: Tensor
    groups: tuple[int, ...]  # temporal token groups patched (visual slices)
    frames: tuple[tuple[int, int], ...]  # half-open input-frame ranges those groups hold
    exact: bool  # False when a frame span cut a temporal group and the group was taken whole

    def record(self) -> dict:
        return {"positions": position_runs(self.positions), "num_positions": len(self.positions),
                "groups": list(self.groups), "frames": [list(f) for f in self.frames],
                "exact": self.exact}


def position_runs(positions: Int[Tensor, " n"]) -> list[list[int]]:
    """Sorted positions as half-open ``[start, stop)`` runs: [5,6,7,9] -> [[5, 8], [9, 10]]."""
    runs: list[list[int]] = []
    for p in sorted(int(x) for x in positions):
        if runs and runs[-1][1] == p:
            runs[-1][1] = p + 1
        else:
            runs.append([p, p + 1])
    return runs


def resolve_slice(lay, spec: str, row: int = 0) -> SliceInfo:
    """Positions of ``spec`` (a `TokenSlice`, or several joined by ``+``) in ``lay[row]``."""
    parts = [TokenSlice.parse(s) for s in spec.split("+")]
    positions, groups, frames, exact = [], set(), [], True
    video = lay[row].videos[0] if lay[row].videos else None
    for sl in parts:
        positions.append(lay.positions(sl, row))
        if sl.kind == "visual_frames":
            fs = video.frame_span(sl.start, sl.stop)
            groups.update(fs.groups)
            frames.append(fs.frames)
            exact &= fs.exact
        elif sl.kind in ("visual", "all") and video is not None:
            groups.update(range(len(video.groups)))
            frames.append((0, video.num_frames))
    pos = torch.unique(torch.cat(positions))
    return SliceInfo(pos, tuple(sorted(groups)), tuple(frames), exact)


# -- one batched forward ------------------------------------------------------------------------
@dataclass(frozen=True)
class Condition:
    layer: object  # "embed" or a decoder layer index
    role: str
    token_slice: str


def conditions_for(layers: list, slices: list[tuple[str, str]]) -> list[Condition]:
    return [Condition(layer, role, spec) for layer in layers for role, spec in slices]


def _check_rows_align(lay) -> None:
    first = lay[0]
    for r in range(1, len(lay)):
        if lay[r].seq_len != first.seq_len or not torch.equal(lay[r].visual, first.visual):
            raise ValueError(f"batch row {r} does not share row 0's token layout: clean and "
                             f"counterfactual clips must have the same frame count and size")


@dataclass(frozen=True)
class _Dump:
    """Saves what `_representations` reads, called on rows 0 and 1 (the pair, in every
    strategy) inside the trace. A module-level callable, not a closure: run on NDIF (nnsight
    0.8.1) a closure's variables were undefined there (NameError)."""

    pooled: Tensor
    visual: Tensor

    def __call__(self, site, h, reps) -> None:
        layer = "embed" if site.kind == "embed" else site.layer
        reps[layer] = h[0:2, self.pooled].mean(1).save()
        if layer == "embed":
            reps["visual_mean"] = h[0:2, self.visual].mean(1).save()
            reps["vprime"] = h[0:2, self.visual].save()


def run_chunk(vlm, pair, chunk: list[Condition], option_ids_, correct: int,
              direction: str = "denoise", dump: bool = False, lay=None,
              dump_slice: str = "visual", vprime_shape: tuple[int, int] = VPRIME_SHAPE,
              rows_per_forward: int | None = None, max_memory: int | None = None,
              info: dict | None = None, late_inputs: str = "carry"):
    """Score ``chunk``'s conditions on ``pair`` (prepared rows [clean, counterfactual]) with
    `vlminterp.sweep.run_conditions`: one forward over the pair, then the patched rows, each
    starting from the counterfactual (or clean) run's cached state at its layer and first
    patched position (on NDIF: one forward of rows [clean, counterfactual, patched...]).
    Layer conditions patch the residual stream (``vlm.residual(i)``: on deepstack families
    the layer output plus the visual features added after it). ``lay``: the pair's layout, if
    the caller has it. Returns (scores [2 + k], {spec: SliceInfo}, representations of rows 0
    and 1 or None); with ``dump`` the means pool over ``dump_slice`` (the run's --token_slice,
    see `_representations`). ``rows_per_forward`` patched rows go in one forward (default: as
    many as ``max_memory`` bytes hold, `vlminterp.sweep.exact.rows_for_memory`); ``info``, if
    given, receives the sweep's strategy, rows per forward and forward count. ``late_inputs``
    (families whose visual features also enter after the LM input: Qwen3-VL's deepstack,
    Gemma 4's per-layer inputs): "carry" copies the source run's later inputs at the patched
    positions too, so that visual tokens patched at ``embed`` bring the whole visual input;
    "counterfactual" leaves them the patched run's own (the LM input alone: a lower bound)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction {direction!r}: expected one of {', '.join(DIRECTIONS)}")
    if late_inputs not in LATE_INPUTS:
        raise ValueError(f"late_inputs {late_inputs!r}: expected one of {', '.join(LATE_INPUTS)}")
    src, dst = pair_rows(direction, 0, 1)
    if lay is None:
        lay = vlm.layout(pair)
        _check_rows_align(lay)
    infos = {c.token_slice: resolve_slice(lay, c.token_slice) for c in chunk}
    conds = [SweepCondition(Site.parse(c.layer, vlm.n_layers) if c.layer != "embed"
                            else Site("embed"), infos[c.token_slice].positions) for c in chunk]
    dump_reps = _Dump(resolve_slice(lay, dump_slice).positions, lay[0].visual) if dump else None
    base, patched, run_info = run_conditions(
        vlm, pair, conds, lambda logits: option_margin(logits, option_ids_, correct),
        src=src, dst=dst, at=lay[0].last, rows_per_forward=rows_per_forward,
        max_memory=max_memory, visit=dump_reps, carry_late=late_inputs == "carry",
        visit_sites=[Site("embed")] + [Site("resid", i) for i in range(vlm.n_layers)]
        if dump else ())
    if info is not None:
        info.update({k: v for k, v in run_info.items() if k != "extra"})
    scores = base.tolist() + patched.tolist()
    return scores, infos, (_representations(vlm, run_info["extra"], vprime_shape) if dump else None)


def _representations(vlm, reps: dict, vprime_shape: tuple[int, int] = VPRIME_SHAPE
                     ) -> list[dict[str, Tensor]]:
    """Per row (clean, counterfactual), as the original defines them:

    * ``inputs_mean`` [d]: the language model's input (visual features merged in) averaged over
      the --token_slice positions;
    * ``visual_mean`` [d]: that input averaged over every visual token (the projector's output);
    * ``layers_mean`` [n_layers, d]: each decoder layer's output averaged over --token_slice;
    * ``vprime`` [n', d'] fp16: the LM-input visual tokens [n_visual, d] resized on both axes to
      ``vprime_shape`` (default 128 x 1024) by bilinear interpolation (``align_corners=False``).
    """
    layers = torch.stack([reps[i] for i in range(vlm.n_layers)], dim=1)  # [2, n_layers, d]
    vp = F.interpolate(reps["vprime"].float()[:, None], size=tuple(vprime_shape), mode="bilinear",
                       align_corners=False)[:, 0]
    return [{"inputs_mean": reps["embed"][r].float().cpu(),
             "visual_mean": reps["visual_mean"][r].float().cpu(),
             "layers_mean": layers[r].float().cpu(),
             "vprime": vp[r].to(torch.float16).cpu()} for r in range(2)]


def _effect(direction: str, patched: float, cf: float, clean: float) -> float | None:
    """Denoise: (patched - cf) / (clean - cf); noise: (clean - patched) / (clean - cf), which
    is `normalised_effect` with the clean run as the corrupt one."""
    if direction == "denoise":
        return normalised_effect(patched, cf, clean)
    return normalised_effect(patched, clean, cf)


# -- one sample ---------------------------------------------------------------------------------
def trace_sample(vlm, clean: Frames, counterfactuals: dict[str, Frames], prompt: str,
                 option_ids_: list[int], correct: int, token_slice: str = "visual",
                 layers: list | None = None, direction: str = "denoise", swap_spans=None,
                 batch_size: int | None = None, dump: bool = False, question_id: str = "",
                 vprime_shape: tuple[int, int] = VPRIME_SHAPE, max_memory: int | None = None,
                 info: dict | None = None, late_inputs: str = "carry"):
    """Trace every (counterfactual, layer, slice) condition of one sample: per counterfactual
    one `run_chunk` over all its conditions, ``batch_size`` patched rows per forward (None: as
    many as ``max_memory`` bytes hold; ``info`` receives what was chosen).

    Returns ``(records, representations)``: one record per condition (see the module doc), and
    with ``dump=True`` ``{"clean": tensors, counterfactual name: tensors}`` (`_representations`,
    pooled over ``token_slice``)."""
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    layers = ["embed", *range(vlm.n_layers)] if layers is None else layers
    records, reps = [], {}
    for name, cf in counterfactuals.items():
        conds = conditions_for(layers, tracing_slices(token_slice, name, swap_spans))
        pair = vlm.prepare(text=prompt, video=[clean, cf])
        lay = vlm.layout(pair)
        _check_rows_align(lay)
        scores, infos, rows = run_chunk(vlm, pair, conds, option_ids_, correct, direction,
                                        dump=dump, lay=lay, dump_slice=conds[0].token_slice,
                                        vprime_shape=vprime_shape, rows_per_forward=batch_size,
                                        max_memory=max_memory, info=info,
                                        late_inputs=late_inputs)
        if dump:
            reps.setdefault("clean", rows[0])
            reps[name] = rows[1]
        clean_s, cf_s = scores[0], scores[1]
        for j, c in enumerate(conds):
            records.append({
                "question_id": question_id, "counterfactual": name, "layer": c.layer,
                "token_slice": c.token_slice, "role": c.role, "direction": direction,
                **infos[c.token_slice].record(),
                "clean_score": clean_s, "counterfactual_score": cf_s,
                "patched_score": scores[2 + j], "total_effect": clean_s - cf_s,
                "effect": _effect(direction, scores[2 + j], cf_s, clean_s),
            })
    return records, reps
