"""Per-condition summaries of the three experiments' records, with 95% bootstrap intervals,
and their plots."""

from __future__ import annotations

import math
from pathlib import Path

from vlminterp.stats import bootstrap_ci


def mean_ci(values, seed: int = 0) -> dict:
    """Mean with a 95% bootstrap interval (None values when empty; None entries are dropped)."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return {"value": None, "lo": None, "hi": None, "n": 0}
    value, lo, hi = bootstrap_ci(values, num_resamples=1000, seed=seed)
    return {"value": value, "lo": lo, "hi": hi, "n": len(values)}


def rate(flags, seed: int = 0) -> dict:
    """Percentage of true flags with a 95% bootstrap interval (None values when empty)."""
    return mean_ci([100.0 * bool(f) for f in flags], seed)


def values(stats: list[dict], field: str = "value") -> list[float]:
    """One field of a list of `rate`/`mean_ci` results, for plotting (None -> NaN)."""
    return [math.nan if st[field] is None else st[field] for st in stats]


def _group(records, *fields) -> dict:
    out: dict = {}
    for r in records:
        out.setdefault(tuple(r.get(f) for f in fields), []).append(r)
    return out


def summarize_ablation(records: list[dict], seed: int = 0) -> dict:
    """Per task and condition: ``drop_pct`` — the percentage of initially correct answers that
    are wrong after ablation (the paper's metric) — and ``changed_pct`` — the percentage of
    kept images whose answer changed at all — with 95% bootstrap intervals, the mean change in
    the correct token's probability and the mean subset size. An image whose subset is empty
    (e.g. no register token passes the norm threshold) ablated nothing: it is counted in
    ``n_empty`` and left out of the rates, which would otherwise count it as "unchanged"."""
    base = {(r["key"], r["task"]): r for r in records if r["condition"] == "baseline"}
    out: dict = {}
    for (task, cond), all_rows in _group([r for r in records if r["condition"] != "baseline"],
                                         "task", "condition").items():
        rows = [r for r in all_rows if r["n_tokens"] > 0]
        deltas = [r["p_correct"] - base[(r["key"], task)]["p_correct"] for r in rows
                  if r.get("p_correct") is not None]
        out.setdefault(task, {})[cond] = {
            "drop_pct": rate([not r["correct"] for r in rows if r["baseline_correct"]], seed),
            "changed_pct": rate([r["changed"] for r in rows], seed),
            "delta_p_correct": mean_ci(deltas, seed),
            "n_tokens_mean": sum(r["n_tokens"] for r in all_rows) / len(all_rows),
            "n_empty": len(all_rows) - len(rows),
        }
    for task in {t for _, t in base}:
        flags = [r["correct"] for (k, t), r in base.items() if t == task]
        out.setdefault(task, {})["baseline_accuracy_pct"] = rate(flags, seed)
    return out


def summarize_knockout(records: list[dict], seed: int = 0) -> dict:
    """Per ``source->target`` and layer set: accuracy after knockout (% correct) and the mean
    change in the correct token's probability, with 95% bootstrap intervals."""
    out: dict = {}
    for (s, t, layers), rows in _group([r for r in records if r["layers"] != "baseline"],
                                       "source", "target", "layers").items():
        out.setdefault(f"{s}->{t}", {})[layers] = {
            "layer_list": rows[0]["layer_list"],
            "accuracy_pct": rate([r["correct"] for r in rows], seed),
            "drop_pct": rate([not r["correct"] for r in rows if r["baseline_correct"]], seed),
            "delta_p_correct": mean_ci([r["delta_p"] for r in rows], seed),
        }
    base = [r["correct"] for r in records if r["layers"] == "baseline"]
    return {"baseline_accuracy_pct": rate(base, seed), "conditions": out}


def summarize_lens(records: list[dict], n_layers: int, seed: int = 0) -> dict:
    """Per layer, the mean over images of the object / background fractions, with intervals."""
    out = {}
    for field in ("object_fraction", "background_fraction"):
        out[field] = [mean_ci([r[field][layer] for r in records], seed) for layer in range(n_layers)]
    return out


# -- plots ------------------------------------------------------------------------------------

def _bars(stats: dict, path, counts=None, notes=None, **kw) -> Path:
    from vlminterp.plots import bar_plot

    rows = list(stats.values())
    return bar_plot(list(stats), values(rows), path, errors=(values(rows, "lo"), values(rows, "hi")),
                    counts=counts, notes=notes, **kw)


def _empty_subset_note(cond: str) -> str:
    what = "register" if cond == "register" else cond
    return f"no {what} tokens found"


def plot_ablation(summary: dict, tasks, stem: Path, model_id: str) -> list[Path]:
    """``<stem>_<task>.png``: per condition the drop rate (or, when no image was initially
    correct, the rate of changed answers) with its 95% interval and ``n`` images under each bar;
    a condition whose subset was empty in every image says so instead of showing a bar.
    Returns the files written."""
    written = []
    for task in tasks:
        conds = {c: v for c, v in summary.get(task, {}).items() if c != "baseline_accuracy_pct"}
        if not conds:
            continue
        has_drop = any(v["drop_pct"]["n"] for v in conds.values())
        metric = "drop_pct" if has_drop else "changed_pct"
        notes = {c: _empty_subset_note(c) for c, v in conds.items()
                 if v.get("n_empty") and v[metric]["n"] == 0}
        empty = sum(v.get("n_empty", 0) for v in conds.values())
        written.append(_bars(
            {c: v[metric] for c, v in conds.items()}, f"{stem}_{task}.png",
            counts=[v[metric]["n"] for v in conds.values()], notes=notes,
            ylabel="% initially correct now wrong" if has_drop else "% answers changed",
            empty_note="no image was kept for this task (see the records' 'skipped')",
            title=f"Mean ablation at the LM input ({task}, {model_id})" + (
                f"\n{empty} image-condition(s) with an empty subset left out" if empty else "")))
    return written


def plot_knockout(summary: dict, target: str, stem: Path, model_id: str) -> list[Path]:
    """``<stem>.png``: change in p(correct) per sliding window, one line per source (to
    ``target``, ``n`` images in the legend); ``<stem>_groups.png``: accuracy per source and
    layer group with ``n`` under each bar. Returns the files written."""
    from vlminterp.plots import line_plot

    per_source = {k.split("->")[0]: per for k, per in summary["conditions"].items()
                  if k.endswith(f"->{target}")}
    curves, bands, notes, starts = {}, {}, {}, None
    for source, per in per_source.items():
        windows = sorted((int(k.split("_", 1)[1]), v["delta_p_correct"]) for k, v in per.items()
                         if k.startswith("window_"))
        if windows:
            starts, stats = [w for w, _ in windows], [c for _, c in windows]
            curves[source], bands[source] = values(stats), (values(stats, "lo"), values(stats, "hi"))
            notes[source] = f"n={max(st['n'] for st in stats)}"
    written = []
    if curves:
        written.append(line_plot(starts, curves, f"{stem}.png", bands=bands, notes=notes,
                                 xlabel="first layer of the window",
                                 ylabel="change in p(correct token)",
                                 empty_note="no image was kept (see the records)",
                                 title=f"Attention knockout -> {target} ({model_id})"))
    groups = {f"{source}:{g}": v["accuracy_pct"] for source, per in per_source.items()
              for g, v in per.items() if not g.startswith("window_")}
    if groups:
        written.append(_bars(groups, f"{stem}_groups.png", counts=[v["n"] for v in groups.values()],
                             ylabel="accuracy after knockout (%)",
                             title=f"Knockout -> {target} by layer group ({model_id})"))
    return written


def plot_lens(summary: dict, stem: Path, model_id: str, k: int) -> list[Path]:
    """``<stem>.png``: object vs background fraction per layer with 95% intervals (``n``
    images in the legend; an empty plot says why). Returns the files written."""
    from vlminterp.plots import line_plot

    series = {"object": summary["object_fraction"], "background": summary["background_fraction"]}
    notes = {n: f"n={max((st['n'] for st in v), default=0)}" for n, v in series.items()}
    return [line_plot(list(range(len(series["object"]))), {n: values(v) for n, v in series.items()},
                      f"{stem}.png", bands={n: (values(v, "lo"), values(v, "hi")) for n, v in series.items()},
                      notes=notes, empty_note="no image has object or background tokens "
                      "(every image failed or lies outside the model's view)",
                      xlabel="layer", ylabel=f"fraction whose top-{k} holds the category",
                      title=f"Logit lens on visual tokens ({model_id})")]
