"""Have-1 / Have-2 probes: the group split, planted signals, controls, sklearn agreement."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from vlminterp.video import probes
from vlminterp.store import ActivationStore

pytestmark = pytest.mark.usefixtures("one_thread")


@settings(max_examples=60, deadline=None)
@given(groups=st.lists(st.integers(0, 25), min_size=2, max_size=80),
       fraction=st.floats(0.05, 0.6), seed=st.integers(0, 2**16))
def test_split_never_puts_one_sample_on_both_sides(groups, fraction, seed):
    n_groups = len(set(groups))
    if n_groups < 2:
        with pytest.raises(ValueError, match="at least 2 distinct"):
            probes.split_by_group(groups, fraction, seed)
        return
    train, val = probes.split_by_group(groups, fraction, seed)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(groups)))
    train_ids, val_ids = {groups[i] for i in train}, {groups[i] for i in val}
    assert not train_ids & val_ids
    assert len(val_ids) == min(max(1, round(fraction * n_groups)), n_groups - 1)
    again = probes.split_by_group(groups, fraction, seed)
    assert np.array_equal(again[1], val)


def planted(n=400, d=32, n_classes=2, strength=1.5, seed=0, rows=None):
    """Features with a class-dependent mean shift along random directions; 2 rows per id."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, n_classes, (n,), generator=g)
    shape = (n, d) if rows is None else (n, rows, d)
    directions = torch.randn((n_classes, d), generator=g)
    x = torch.randn(shape, generator=g)
    shift = strength * directions[y] / directions.norm(dim=1, keepdim=True)[y] * d ** 0.5 / 4
    x = x + (shift if rows is None else shift[:, None, :])
    return x, y, [f"video{i // 2}" for i in range(n)]


@pytest.mark.parametrize("kind", ["linear", "mlp", "logreg"])
def test_planted_signal_beats_baseline_and_control_is_chance(kind):
    x, y, groups = planted()
    r = probes.evaluate_probe(kind, x, y, groups, seed=0)
    assert r["accuracy"] >= r["majority_baseline"] + 0.25
    assert abs(r["control_accuracy"] - 0.5) <= 0.15
    assert r["selectivity"] == pytest.approx(r["accuracy"] - r["control_accuracy"])
    assert r["auroc"] > 0.9 and r["n_val"] == 80


def test_lstm_over_rows_finds_the_signal():
    x, y, groups = planted(n=200, d=16, rows=8)
    r = probes.evaluate_probe("lstm", x, y, groups, seed=0)
    assert r["accuracy"] >= r["majority_baseline"] + 0.25


def test_multiclass_have2_probe():
    x, y, groups = planted(n=300, n_classes=3, strength=2.0)
    r = probes.evaluate_probe("mlp", x, y, groups, seed=1)
    assert r["n_classes"] == 3 and r["auroc"] is None
    assert r["accuracy"] >= r["majority_baseline"] + 0.3


def test_no_signal_stays_near_chance():
    x, y, groups = planted(strength=0.0)
    r = probes.evaluate_probe("linear", x, y, groups, seed=0)
    assert abs(r["accuracy"] - 0.5) <= 0.15


def test_logreg_matches_sklearn_used_directly():
    x, y, groups = planted(strength=0.5, seed=3)
    train, val = probes.split_by_group(groups, 0.2, 0)
    ours = probes.fit_predict("logreg", x[train], y[train], x[val], 2, seed=0)
    scaler = StandardScaler().fit(x[train].numpy())
    clf = LogisticRegression(max_iter=1000, random_state=0).fit(scaler.transform(x[train].numpy()),
                                                                y[train].numpy())
    ref = clf.predict_proba(scaler.transform(x[val].numpy()))
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-5)
    r = probes.evaluate_probe("logreg", x, y, groups, seed=0)
    assert r["accuracy"] == pytest.approx(float((ref.argmax(1) == y[val].numpy()).mean()))
    assert r["auroc"] == pytest.approx(roc_auc_score(y[val].numpy(), ref[:, 1]), abs=1e-6)


def test_torch_probe_is_seeded():
    x, y, groups = planted(n=120)
    a = probes.evaluate_probe("mlp", x, y, groups, seed=4)
    b = probes.evaluate_probe("mlp", x, y, groups, seed=4)
    assert a == b


def test_lstm_needs_row_features():
    x, y, groups = planted(n=40)
    with pytest.raises(ValueError, match="vprime"):
        probes.evaluate_probe("lstm", x, y, groups)
    with pytest.raises(ValueError, match="probe model 'svm'"):
        probes.fit_predict("svm", x, y, x, 2)


@pytest.fixture
def store(tmp_path):
    """Two videos x two questions, each with clean + two counterfactual conditions."""
    s = ActivationStore(tmp_path / "reps")
    g = torch.Generator().manual_seed(0)
    for v in range(2):
        for q in range(2):
            qid = f"{v}{q}"
            for cond in ("clean", "reverse", "local_swap"):
                s.put(f"{qid}/{cond}", {"visual_mean": torch.randn(8, generator=g),
                                        "layers_mean": torch.randn(3, 8, generator=g),
                                        "vprime": torch.randn(128, 8, generator=g).half()},
                      meta={"question_id": qid, "condition": cond, "video_name": f"v{v}.mp4",
                            "task_name": "direction" if q else "colour"})
    return s


def test_have1_datasets_from_a_store(store):
    x, y, groups = probes.have1_dataset(store, "layers_mean", 2, "single")
    # per question and counterfactual one clean (1) and one counterfactual (0): balanced
    assert x.shape == (16, 8) and y.tolist() == [1, 0] * 8
    for i, cond in enumerate(["clean", "reverse", "clean", "local_swap"]):
        torch.testing.assert_close(x[i], store.get(f"00/{cond}")["layers_mean"][2])
    assert groups == ["v0.mp4"] * 8 + ["v1.mp4"] * 8  # by video: a clean copy never crosses the split
    x, y, _ = probes.have1_dataset(store, "vprime", None, "pair", counterfactuals=["reverse"])
    assert x.shape == (8, 128, 16) and y.tolist() == [1, 0] * 4
    x, _, _ = probes.have1_dataset(store, "visual_mean", keep={"00"})
    assert x.shape == (4, 8)
    with pytest.raises(ValueError, match="layer_idx must be in 0..2"):
        probes.have1_dataset(store, "layers_mean", 5)


def test_have2_dataset_labels_clean_representations(store):
    labels = {"00": "colour", "01": "direction", "10": "colour"}  # "11" unlabelled: skipped
    x, y, groups, classes = probes.have2_dataset(store, "visual_mean", labels)
    assert classes == ["colour", "direction"] and y.tolist() == [0, 1, 0]
    assert groups == ["v0.mp4", "v0.mp4", "v1.mp4"] and x.shape == (3, 8)
    with pytest.raises(ValueError, match="at least 2 label values"):
        probes.have2_dataset(store, "visual_mean", {"00": "colour"})
