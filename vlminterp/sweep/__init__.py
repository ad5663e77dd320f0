"""Activation-patching sweeps over any grid, for any metric, and attribution patching.

    from vlminterp import sweep
    from vlminterp.metrics import logit_diff

    inputs = vlm.prepare(text=prompt, video=[clean, corrupt])          # rows: clean, corrupt
    grid = sweep.Grid(sweep.sites("embed+resid", "all", vlm.n_layers),
                      {f"frames {a}-{a + 1}": f"visual_frames:{a}:{a + 2}" for a in (0, 2, 4, 6)})
    result = sweep.patch_sweep(vlm, inputs, grid, lambda logits: logit_diff(logits, a_id, b_id))
    result.values            # [site, positions] effect: metric(patched) - metric(corrupt run)
    result.normalised()      # 1 = the patch restores the clean run's metric
    sweep.plot(result, "sweep.png")
    estimate = sweep.attribution(vlm, inputs, grid, metric, steps=4)   # same array, ~3 passes

A grid is sites (``"embed"``, ``"resid.L"``, ``"attn.L"``, ``"mlp.L"``, per-head ``"q.L"``,
``"k.L"``, ``"v.L"``, ``"z.L"``) x named position groups (token-slice specs or positions)
[x heads]. The metric is any torch function of the last-position logits ``[rows, vocab] ->
[rows]`` (`vlminterp.metrics`, or a lambda); ``at=`` reads another position. Denoising
(default) patches the clean row's activations into the corrupt row; ``direction="noise"`` the
reverse. How the rows are batched and what computation is reused: `exact`.
"""

from __future__ import annotations

import numpy as np
import torch

from .exact import STRATEGIES, rows_for_memory, run_conditions
from .grid import KINDS, Condition, Grid, Site, SweepResult, sites

DIRECTIONS = ("denoise", "noise")


def pair_rows(direction: str, clean: int, corrupt: int) -> tuple[int, int]:
    """``(src, dst)`` rows of a direction: denoise copies clean -> corrupt."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction {direction!r}: expected one of {', '.join(DIRECTIONS)}")
    return (clean, corrupt) if direction == "denoise" else (corrupt, clean)


def check_rows_align(layout, rows) -> None:
    first = layout[rows[0]]
    for r in rows[1:]:
        if layout[r].seq_len != first.seq_len or not torch.equal(layout[r].visual, first.visual):
            raise ValueError(f"batch row {r} does not share row {rows[0]}'s token layout: clean "
                             f"and corrupt inputs must have the same frame count, image size "
                             f"and prompt length")


def _setup(vlm, inputs, grid: Grid, direction, clean, corrupt, at):
    src, dst = pair_rows(direction, clean, corrupt)
    layout = vlm.layout(inputs)
    check_rows_align(layout, [src, dst])
    conditions, coords = grid.resolve(vlm, layout, dst)
    at = layout[dst].last if at is None else int(at)
    return src, dst, layout, conditions, coords, at


def _result(values, conditions, coords, base, src, dst, method, meta) -> SweepResult:
    dims = tuple(coords)
    arr = np.full([len(coords[d]) for d in dims], np.nan)
    for c, v in zip(conditions, values.tolist()):
        arr[c.index] = v
    n_pos = {}
    for c in conditions:
        n_pos.setdefault(coords["positions"][c.index[1]], len(c.positions))
    return SweepResult(arr, dims, coords, float(base[src]), float(base[dst]), method, n_pos,
                       meta)


def patch_sweep(vlm, inputs, grid: Grid, metric, *, direction: str = "denoise",
                clean: int = 0, corrupt: int = 1, at: int | None = None,
                strategy: str = "auto", rows_per_forward: int | None = None,
                max_memory: int | None = None, progress: bool = True,
                carry_late: bool = False) -> SweepResult:
    """Exact activation patching of every grid condition, one batch row each (see `exact` for
    the strategies and the memory budget; the result's ``meta`` says what was chosen).
    ``carry_late``: on families whose visual features also enter after the LM input (Qwen3-VL's
    deepstack, Gemma 4's per-layer inputs), embed / resid patches also copy the source run's
    later inputs at their positions (`vlminterp.interventions.expand_rows`' ``carry``), so
    patching every position there reproduces the source run; a no-op elsewhere."""
    src, dst, _, conditions, coords, at = _setup(vlm, inputs, grid, direction, clean, corrupt,
                                                 at)
    base, patched, info = run_conditions(vlm, inputs, conditions, metric, src=src, dst=dst,
                                         at=at, strategy=strategy,
                                         rows_per_forward=rows_per_forward,
                                         max_memory=max_memory, progress=progress,
                                         carry_late=carry_late)
    info.pop("extra", None)
    meta = {**info, "direction": direction, "conditions": len(conditions), "at": at}
    return _result(patched - base[dst], conditions, coords, base, src, dst, "exact", meta)


def attribution(vlm, inputs, grid: Grid, metric, **kwargs) -> SweepResult:
    """Attribution patching over ``grid`` (see `vlminterp.sweep.atp.attribution`)."""
    from .atp import attribution as _attribution

    return _attribution(vlm, inputs, grid, metric, **kwargs)


def plot(result: SweepResult, path, **kwargs):
    """`vlminterp.plots.sweep_heatmap` of a result."""
    from vlminterp.plots import sweep_heatmap

    return sweep_heatmap(result, path, **kwargs)


__all__ = ["Condition", "DIRECTIONS", "Grid", "KINDS", "STRATEGIES", "Site", "SweepResult",
           "attribution", "check_rows_align", "pair_rows", "patch_sweep", "plot",
           "rows_for_memory", "run_conditions", "sites"]
