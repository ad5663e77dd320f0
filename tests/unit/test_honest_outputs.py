"""Honest outputs (issue 11): total effects and unstable records, n per cell, empty plots that say
why, probe verdicts against their baselines, free-text answers, and fingerprints that tie CLIP
pipeline files to the trace they came from."""

import json

import numpy as np
import pytest
import torch
from matplotlib.text import Text

import recipes.clip_fit as fit_recipe
from vlminterp import plots
from vlminterp.circuits import (TraceWriter, check_circuit_matches_fit, check_features_match_trace,
                                check_fit_matches_features, load_artifact, load_trace, save_artifact)
from vlminterp.neo2024.summaries import plot_ablation, summarize_ablation
from vlminterp.video import causal_tracing as ct
from vlminterp.video.generation import response_option
from vlminterp.video.probes import compare_with_baselines


@pytest.fixture
def drawn(monkeypatch):
    """Every text a plot function draws (titles, labels, notes), captured at save time."""
    texts = []
    real = plots._save

    def save(fig, path):
        texts.extend(t.get_text() for t in fig.findobj(Text) if t.get_text())
        return real(fig, path)

    monkeypatch.setattr(plots, "_save", save)
    return texts


def _record(cf, layer, clean, cf_score, patched):
    return {"counterfactual": cf, "layer": layer, "token_slice": "visual", "clean_score": clean,
            "counterfactual_score": cf_score, "patched_score": patched,
            "effect": ct._effect("denoise", patched, cf_score, clean)}


def test_unstable_records_are_marked_kept_and_left_out_of_means():
    records = [_record("reverse", 0, 2.0, 1.0, 1.5),        # TE 1.0, effect 0.5
               _record("reverse", 0, 2.0, 0.0, 2.0),        # TE 2.0, effect 1.0
               _record("reverse", 0, 1.003, 1.0, 1.1),      # TE 0.003, effect 33.3: unstable
               _record("reverse", 1, 1.0, 1.0, 1.2)]        # TE 0: effect None, unstable
    assert ct.mark_unstable(records, 0.05) == 2
    assert [r["unstable"] for r in records] == [False, False, True, True]
    assert records[2]["total_effect"] == pytest.approx(0.003)
    assert records[2]["effect"] == pytest.approx(33.33, abs=0.01)  # kept as it is
    cell = ct.summarise(records)["reverse"]["visual"]
    assert cell["0"] == {"mean_effect": pytest.approx(0.75), "n": 2, "n_unstable": 1}
    assert cell["1"] == {"mean_effect": None, "n": 0, "n_unstable": 1}
    both = ct.summarise(records, include_unstable=True)["reverse"]["visual"]["0"]
    assert both["mean_effect"] == pytest.approx((0.5 + 1.0 + 33.333) / 3, abs=1e-3) and both["n"] == 3
    assert ct.mark_unstable(records, 0.0) == 1  # only the undefined effect


def test_heatmap_writes_n_per_cell_and_says_why_it_is_empty(tmp_path, drawn):
    plots.heatmap([[0.5, np.nan]], tmp_path / "a.png", counts=[[3, 0]], annotate=True)
    assert "0.5\nn=3" in drawn and "n=0" in drawn
    drawn.clear()
    plots.heatmap([[np.nan, np.nan]], tmp_path / "b.png", counts=[[0, 0]],
                  empty_note="no stable records: every |clean - counterfactual| is below 0.05")
    assert any("no stable records" in t for t in drawn)


def test_bar_and_line_plots_say_why_a_series_is_missing(tmp_path, drawn):
    plots.bar_plot(["object_b0", "register"], [40.0, np.nan], tmp_path / "a.png", counts=[8, 0],
                   notes={"register": "no register tokens found"})
    assert "object_b0 (n=8)" in drawn and "no register tokens found" in drawn
    drawn.clear()
    plots.line_plot([0, 1], {"object": [0.1, 0.2], "background": [np.nan, np.nan]}, tmp_path / "b.png",
                    xlabel="layer", ylabel="f", notes={"object": "n=4", "background": "n=0"})
    assert "object (n=4)" in drawn and "background: no data (n=0)" in drawn


def test_ablation_summary_leaves_empty_subsets_out_and_the_plot_says_so(tmp_path, drawn):
    base = [{"key": k, "task": "vqa", "condition": "baseline", "correct": True, "p_correct": 0.9,
             "n_tokens": 0, "baseline_correct": True} for k in ("a", "b")]
    rows = [{"key": k, "task": "vqa", "condition": c, "correct": ok, "p_correct": 0.5,
             "n_tokens": n, "baseline_correct": True, "changed": not ok}
            for k, c, n, ok in [("a", "object_b0", 4, False), ("b", "object_b0", 3, True),
                                ("a", "register", 0, True), ("b", "register", 0, True)]]
    summary = summarize_ablation(base + rows)
    assert summary["vqa"]["object_b0"]["drop_pct"]["value"] == 50.0
    reg = summary["vqa"]["register"]
    assert reg["n_empty"] == 2 and reg["drop_pct"]["n"] == 0 and reg["drop_pct"]["value"] is None
    written = plot_ablation(summary, ["vqa"], tmp_path / "abl", "tiny")
    assert written == [tmp_path / "abl_vqa.png"] and written[0].exists()
    assert "no register tokens found" in drawn and "object_b0 (n=2)" in drawn


def test_probe_verdict_compares_with_majority_and_control():
    res = {"layer": 0, "n_val": 10}
    below = compare_with_baselines([{**res, "accuracy": 0.7, "majority_baseline": 0.7,
                                     "control_accuracy": 0.5}])
    assert below["above_majority"] == 0 and below["verdict"].startswith("not above the majority")
    noise = compare_with_baselines([{**res, "accuracy": 0.8, "majority_baseline": 0.5,
                                     "control_accuracy": 0.85}])
    assert "not above the shuffled-label control" in noise["verdict"]
    best = compare_with_baselines([{**res, "accuracy": 0.6, "majority_baseline": 0.5, "control_accuracy": 0.5},
                                   {**res, "layer": 3, "accuracy": 0.9, "majority_baseline": 0.5,
                                    "control_accuracy": 0.6}])
    assert best["best_layer"] == 3 and best["selectivity"] == pytest.approx(0.3)
    assert best["verdict"].startswith("above the majority baseline by 0.400")


@pytest.mark.parametrize("response,index", [
    ("B", 1), ("B. The door.", 1), ("(A)", 0), ("Answer: B", 1), ("The person took the clothes.", 0),
    ("A person opens the door", 1), ("C", None), ("nothing", None), ("the clothes and the door", None),
])
def test_response_option(response, index):
    assert response_option(response, ["The clothes.", "The door."]) == index


# --- CLIP pipeline fingerprints -------------------------------------------------------------

def _trace(path, seed):
    gen = torch.Generator().manual_seed(seed)
    writer = TraceWriter(path, {"layer": 0, "next_layer": 1, "model": "tiny", "pretrained": None})
    writer.add(["im0", "im1"], {"attn_logits_l1": torch.randn(2, 2, 5, 5, generator=gen),
                                "ffn_gate_l": (torch.randn(2, 5, 8, generator=gen) > 0).to(torch.uint8)})
    writer.close()
    return load_trace(path)


def test_features_from_another_trace_with_the_same_shapes_are_refused(tmp_path, capsys):
    a, b = _trace(tmp_path / "a", 0), _trace(tmp_path / "b", 1)
    assert a.fingerprint and a.fingerprint != b.fingerprint
    assert _trace(tmp_path / "a2", 0).fingerprint == a.fingerprint  # content, not time
    labels = torch.randint(0, 3, (2, 5), generator=torch.Generator().manual_seed(0))
    save_artifact(tmp_path / "feat", "features", {"layer": 0, "next_layer": 1, "num_clusters": 3,
                                                  "trace_fingerprint": a.fingerprint},
                  {"labels": labels})
    features = load_artifact(tmp_path / "feat", "features")
    check_features_match_trace(a, features, "feat")
    with pytest.raises(ValueError, match="made from another file"):
        check_features_match_trace(b, features, "feat")
    with pytest.raises(SystemExit) as info:
        fit_recipe.main(["--trace", str(tmp_path / "b"), "--features", str(tmp_path / "feat"),
                         "--out", str(tmp_path / "fit")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "made from another file" in err and "Traceback" not in err
    assert not (tmp_path / "fit.json").exists()


def test_fit_and_circuit_fingerprints_chain(tmp_path):
    labels = torch.tensor([[0, 1, 1, 2, 0]])
    other = torch.tensor([[1, 0, 1, 2, 0]])  # same cluster sizes, different rows
    for name, lab in (("f1", labels), ("f2", other)):
        save_artifact(tmp_path / name, "features", {"trace_fingerprint": "t"}, {"labels": lab})
    f1, f2 = load_artifact(tmp_path / "f1", "features"), load_artifact(tmp_path / "f2", "features")
    save_artifact(tmp_path / "fit", "fit", {"features_fingerprint": f1["fingerprint"]},
                  {"prototypes": torch.randn(3, 1, 5), "counts": torch.tensor([2, 2, 1])})
    fit = load_artifact(tmp_path / "fit", "fit")
    check_fit_matches_features(fit, "fit", f1, "f1")
    with pytest.raises(ValueError, match="made from another file"):
        check_fit_matches_features(fit, "fit", f2, "f2")  # counts agree: only the fingerprint tells
    circuit = {"paths": [], "fit_fingerprint": fit["fingerprint"]}
    check_circuit_matches_fit(circuit, "c.json", fit, "fit")
    with pytest.raises(ValueError, match="clip_circuit"):
        check_circuit_matches_fit({**circuit, "fit_fingerprint": "0" * 32}, "c.json", fit, "fit")
    with pytest.warns(UserWarning, match="no fingerprint"):
        check_circuit_matches_fit({"paths": []}, "old.json", fit, "fit")
    assert json.loads((tmp_path / "fit.json").read_text())["features_fingerprint"] == f1["fingerprint"]
