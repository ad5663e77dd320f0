"""The six CLIP circuit recipes end to end on --synthetic images and tiny-clip-vit (offline).

Every output is checked for its keys and shapes and against the files it was computed from:
labels in range, counts = cluster sizes summing to B·N, prototypes = numpy per-cluster means of
the traced logits, paths = the largest |prototype| entries, effects = their definitions.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from recipes import clip_causal, clip_circuit, clip_cluster, clip_fit, clip_target_causal, clip_trace
from vlminterp.circuits import load_artifact, load_trace

RECIPES = [clip_trace, clip_cluster, clip_fit, clip_circuit, clip_causal, clip_target_causal]
ROOT = Path(__file__).resolve().parents[2]
B, N, H, K, D_FFN = 24, 17, 2, 4, 128


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    t0 = time.perf_counter()
    clip_trace.main(["--model", "tiny-clip-vit", "--synthetic", str(B), "--max-images", "64", "--batch-size", "10",
                     "--target-layer", "1", "--next-attn-layer", "2", "--out", str(d / "trace.pt")])
    clip_cluster.main(["--trace", str(d / "trace.pt"), "--num-clusters", str(K), "--sample-tokens", "300",
                       "--seed", "1", "--out", str(d / "features.pt")])
    clip_fit.main(["--trace", str(d / "trace.pt"), "--features", str(d / "features.pt"), "--out", str(d / "fit.pt")])
    clip_circuit.main(["--fit", str(d / "fit.pt"), "--top-k", "12", "--heatmap-dir", str(d / "heat"),
                       "--out", str(d / "circuit.json")])
    clip_causal.main(["--features", str(d / "features.pt"), "--fit", str(d / "fit.pt"), "--max-clusters", "3",
                      "--num-permutations", "50", "--seed", "2", "--out", str(d / "causal.json")])
    clip_target_causal.main(["--trace", str(d / "trace.pt"), "--features", str(d / "features.pt"), "--fit",
                             str(d / "fit.pt"), "--circuit", str(d / "circuit.json"), "--top-n", "6",
                             "--num-permutations", "50", "--seed", "3", "--out", str(d / "target.json")])
    return d, time.perf_counter() - t0


@pytest.mark.slow
def test_pipeline_outputs_are_consistent(run):
    d, seconds = run
    assert seconds < 120
    trace = load_trace(d / "trace.json")
    assert {"images", "layer", "next_layer"} <= set(trace.meta) and len(trace.images) == B
    assert trace.shape("h_l") == (B, N, 32) and trace.shape("ffn_gate_l") == (B, N, D_FFN)
    logits = trace.tensor("attn_logits_l1")
    assert logits.shape == (B, H, N, N) and set(trace.tensor("ffn_gate_l").unique().tolist()) <= {0, 1}

    feats = load_artifact(d / "features.pt", "features")
    assert {"trace_file", "layer", "next_layer", "num_clusters", "labels", "centroids", "cluster_sizes",
            "cluster_activation_rates"} <= set(feats)
    labels = feats["labels"]
    assert labels.shape == (B, N) and 0 <= int(labels.min()) and int(labels.max()) < K
    assert feats["centroids"].shape == (K, D_FFN) and int(feats["cluster_sizes"].sum()) == B * N
    assert torch.equal(feats["cluster_sizes"], torch.bincount(labels.reshape(-1), minlength=K))
    rates = feats["cluster_activation_rates"]
    assert torch.allclose(rates, feats["centroids"].mean(1)) and bool(((rates >= 0) & (rates <= 1)).all())

    fit = load_artifact(d / "fit.json", "fit")
    assert {"trace_file", "features_file", "layer", "next_layer", "prototypes", "counts", "mse", "r2"} <= set(fit)
    assert torch.equal(fit["counts"], feats["cluster_sizes"])
    rows = logits.permute(0, 2, 1, 3).reshape(B * N, H, N).double().numpy()
    flat = labels.reshape(-1).numpy()
    means = np.stack([rows[flat == k].mean(0) if (flat == k).any() else np.zeros((H, N)) for k in range(K)])
    assert np.allclose(fit["prototypes"].numpy(), means, atol=1e-5)
    resid = rows - means[flat]
    assert fit["mse"] == pytest.approx(np.mean(resid ** 2), rel=1e-6)
    assert fit["r2"] == pytest.approx(1 - np.mean(resid ** 2) / np.var(rows), rel=1e-6) and 0 < fit["r2"] < 1

    circuit = json.loads((d / "circuit.json").read_text())
    assert {"fit_file", "layer", "next_layer", "top_k", "paths", "groups"} <= set(circuit)
    weights = [p["weight"] for p in circuit["paths"]]
    assert len(weights) == 12 and abs(weights[-1]) == pytest.approx(np.sort(np.abs(means).ravel())[-12], rel=1e-5)
    for p in circuit["paths"]:
        assert p["weight"] == pytest.approx(means[p["cluster_id"], p["head"], p["dst_token"]], rel=1e-5)
        assert p["support"] == int(feats["cluster_sizes"][p["cluster_id"]])
    assert sum(map(len, circuit["groups"]["by_head"].values())) == 12
    assert sorted(q.name for q in (d / "heat").iterdir()) == ["head_0.png", "head_1.png"]

    causal = json.loads((d / "causal.json").read_text())
    effects = causal["effects"]
    assert {"features_file", "fit_file", "max_clusters", "num_permutations", "seed"} <= set(causal)
    assert len(effects) == 3 and [e["ablation_effect"] for e in effects] == sorted(
        (e["ablation_effect"] for e in effects), reverse=True)
    for e in effects:
        assert set(e) == {"cluster_id", "support", "ablation_effect", "injection_effect", "ablation_pvalue",
                          "injection_pvalue"}
        assert e["ablation_effect"] == pytest.approx(np.abs(means[e["cluster_id"]]).mean(), rel=1e-5)
        assert e["support"] == int(feats["cluster_sizes"][e["cluster_id"]])

    target = json.loads((d / "target.json").read_text())
    assert {"trace_file", "features_file", "fit_file", "circuit_file", "top_n", "num_permutations"} <= set(target)
    assert len(target["effects"]) == 6
    top6 = {(p["cluster_id"], p["head"], p["dst_token"]): p for p in circuit["paths"][:6]}
    for e in target["effects"]:
        p = top6[(e["cluster_id"], e["head"], e["dst_token"])]
        assert e["edge_effect"] == pytest.approx(abs(p["weight"])) and e["support"] == p["support"]
        assert 1 / 51 <= e["edge_pvalue"] <= 1 and 1 / 51 <= e["alignment_pvalue"] <= 1
        r = rows[flat == e["cluster_id"], e["head"], e["dst_token"]]
        assert e["alignment_gain"] == pytest.approx(np.mean(np.abs(r) - np.abs(r - p["weight"])), rel=1e-4)


def test_features_from_another_trace_is_a_one_line_error(run, capsys):
    d, _ = run
    clip_trace.main(["--model", "tiny-clip-vit", "--synthetic", "3", "--target-layer", "1",
                     "--out", str(d / "other.pt")])
    capsys.readouterr()
    for recipe, argv in [
        (clip_fit, ["--trace", str(d / "other.pt"), "--features", str(d / "features.pt"), "--out", str(d / "x")]),
        (clip_target_causal, ["--trace", str(d / "other.pt"), "--features", str(d / "features.pt"), "--fit",
                              str(d / "fit.pt"), "--circuit", str(d / "circuit.json"), "--out", str(d / "x.json")]),
    ]:
        with pytest.raises(SystemExit) as exc:
            recipe.main(argv)
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and len(err.splitlines()) == 1
        assert str(d / "features.pt") in err and str(d / "other.json") in err and "24 images" in err


def test_cli_error_has_no_traceback(run):
    d, _ = run
    proc = subprocess.run([sys.executable, "-m", "recipes.clip_causal", "--features", str(d / "features.pt"),
                           "--fit", str(d / "missing.pt"), "--out", str(d / "y.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"python -m recipes.clip_causal: error: fit file {d / 'missing.json'} does not exist"]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.__name__.split(".")[-1])
def test_every_flag_is_explained(recipe, capsys):
    parser = recipe.build_parser()
    for action in parser._actions:
        assert action.help, f"{recipe.__name__}: {action.option_strings} has no help"
    with pytest.raises(SystemExit) as exc:
        recipe.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(opt in out for a in parser._actions for opt in a.option_strings)
