"""Summaries of causal-tracing records: total effects, unstable records, means per cell.

A record's normalised effect divides by its total effect TE = clean - counterfactual score; when
|TE| is below a threshold (default 0.05 logits) that ratio is noise, so the record is marked
``unstable``, kept, and left out of the means by default.
"""

from __future__ import annotations

import numpy as np

MIN_TOTAL_EFFECT = 0.05  # logits: below this the normalised effect divides by almost nothing
UNSTABLE_DOC = ("unstable: |total_effect| = |clean_score - counterfactual_score| < threshold "
                "(logits); the normalised effect divides by that difference, so it is noise-"
                "dominated (a 0.003-logit denominator turns a 0.1-logit wobble into 33)")


def effect_grid(summary: dict, layers: list, counterfactuals: list[str], token_slice: str,
                field: str = "mean_effect") -> np.ndarray:
    """[layer, counterfactual] ``field`` (mean effects, or ``"n"``) of one slice from
    `summarise` (NaN where none)."""
    def cell(cf, layer):
        value = summary.get(cf, {}).get(token_slice, {}).get(str(layer), {}).get(field)
        return np.nan if value is None else value

    return np.array([[cell(cf, layer) for cf in counterfactuals] for layer in layers], dtype=float)


def mark_unstable(records: list[dict], threshold: float = MIN_TOTAL_EFFECT) -> int:
    """Set each record's ``total_effect`` (clean - counterfactual score) and ``unstable``
    (|total_effect| < ``threshold`` logits, or no effect at all); returns how many are unstable.
    Records stay in the results; `summarise` leaves unstable ones out of the means."""
    count = 0
    for r in records:
        te = r["clean_score"] - r["counterfactual_score"]
        r["total_effect"] = te
        r["unstable"] = bool(abs(te) < threshold or r["effect"] is None)
        count += r["unstable"]
    return count


def summarise(records: list[dict], include_unstable: bool = False) -> dict:
    """Mean effect per counterfactual, token slice and layer over the records that are not
    ``unstable`` (all records with ``include_unstable``; null effects always skipped), with ``n``
    (records averaged) and ``n_unstable`` (records marked unstable in the cell)."""
    acc: dict = {}
    for r in records:
        cell = acc.setdefault(r["counterfactual"], {}).setdefault(r["token_slice"], {}) \
            .setdefault(str(r["layer"]), {"values": [], "n_unstable": 0})
        cell["n_unstable"] += bool(r.get("unstable"))
        if r["effect"] is not None and (include_unstable or not r.get("unstable")):
            cell["values"].append(r["effect"])
    return {cf: {sl: {layer: {"mean_effect": float(np.mean(c["values"])) if c["values"] else None,
                              "n": len(c["values"]), "n_unstable": c["n_unstable"]}
                      for layer, c in by_layer.items()} for sl, by_layer in slices.items()}
            for cf, slices in acc.items()}


def excluded_note(excluded: int, total: int, threshold: float) -> str:
    """Title suffix saying how many records the means leave out, or ''."""
    if not excluded:
        return ""
    return f"\n{excluded} of {total} records left out: |clean - cf| < {threshold:g} logits"


def empty_note(records: list[dict], excluded: int) -> str:
    """Why a heatmap has no values: no records at all, or every record unstable."""
    if not records:
        return "no records: every sample failed or was skipped (see errors)"
    if excluded >= len(records):
        return ("no stable records: every |clean - counterfactual| is below --min_total_effect "
                "(pass --include_unstable to average them anyway)")
    return "no effects"
