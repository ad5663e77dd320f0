"""Have-1 / Have-2 probes: is the counterfactual's difference (or an annotation label) linearly
(or otherwise) decodable from a stored representation?

* Have-1 (binary): does the representation tell the clean clip from its counterfactual?
  ``single``: clean -> 1, counterfactual -> 0, one clean example per counterfactual (balanced,
  as the original); ``pair``: [clean; cf] -> 1 vs [cf; clean] -> 0 (concatenated along the
  feature axis).
* Have-2 (multi-class): does the clean representation predict an annotation label?

Probe models: ``linear``, ``mlp`` (hidden 128), ``lstm`` (over the rows of ``vprime``), all in
torch (AdamW lr 1e-3, 10 epochs, batch 32, seeded), and ``logreg`` (scikit-learn). Features are
standardised with the training split's mean and std. The split is by sample id (a group: by
default the video, since the questions on one video share its visual tokens; the original grouped
by question id, which let one video's questions fall on both sides): 20% of the groups are held
out and no group is on both sides. Reported: validation accuracy, AUROC (binary), the majority
baseline (training majority class), and a shuffled-label control (the same probe trained on
permuted training labels); selectivity = accuracy - control accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

PROBE_MODELS = ("linear", "mlp", "lstm", "logreg")
REPRESENTATIONS = ("inputs_mean", "visual_mean", "layers_mean", "vprime")
HIDDEN = 128
EPOCHS, BATCH, LR = 10, 32, 1e-3


def split_by_group(groups: Sequence, test_fraction: float = 0.2, seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation indices such that no group is on both sides; ``round(test_fraction
    * n_groups)`` groups (at least 1, at most n_groups - 1) are held out, chosen by a seeded
    permutation of the sorted distinct groups."""
    names = sorted({str(g) for g in groups})
    if len(names) < 2:
        raise ValueError(f"need at least 2 distinct sample ids to split, got {len(names)}")
    n_test = min(max(1, round(test_fraction * len(names))), len(names) - 1)
    held = {names[i] for i in np.random.default_rng(seed).permutation(len(names))[:n_test]}
    is_test = np.array([str(g) in held for g in groups])
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


class _LSTMProbe(nn.Module):
    def __init__(self, d: int, n_classes: int):
        super().__init__()
        self.lstm = nn.LSTM(d, HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, n_classes)

    def forward(self, x):
        _, (h, _) = self.lstm(x)
        return self.head(h[-1])


def _torch_model(kind: str, shape: tuple[int, ...], n_classes: int) -> nn.Module:
    if kind == "lstm":
        if len(shape) != 2:
            raise ValueError(f"probe 'lstm' runs over rows of a [rows, d] representation (vprime), "
                             f"got per-sample shape {shape}")
        return _LSTMProbe(shape[1], n_classes)
    d = int(np.prod(shape))
    if kind == "linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(d, n_classes))
    return nn.Sequential(nn.Flatten(), nn.Linear(d, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, n_classes))


def standardise(x_train: Float[Tensor, "n *f"], x_val: Float[Tensor, "m *f"]
                ) -> tuple[Tensor, Tensor]:
    """Scale both sets by the training set's per-feature mean and std (std 0 -> 1); for
    ``[n, rows, d]`` inputs the statistics pool over samples and rows."""
    dims = tuple(range(x_train.ndim - 1))
    mean, std = x_train.mean(dims), x_train.std(dims, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return (x_train - mean) / std, (x_val - mean) / std


def fit_predict(kind: str, x_train: Float[Tensor, "n *f"], y_train: Int[Tensor, " n"],
                x_val: Float[Tensor, "m *f"], n_classes: int, seed: int = 0
                ) -> Float[Tensor, "m c"]:
    """Class probabilities of ``x_val`` from a ``kind`` probe trained on standardised features."""
    if kind not in PROBE_MODELS:
        raise ValueError(f"probe model {kind!r}: expected one of {', '.join(PROBE_MODELS)}")
    xt, xv = standardise(x_train.float(), x_val.float())
    if kind == "logreg":
        from sklearn.linear_model import LogisticRegression

        clf = LogisticRegression(max_iter=1000, random_state=seed)
        clf.fit(xt.flatten(1).numpy(), y_train.numpy())
        probs = np.zeros((len(xv), n_classes))
        probs[:, clf.classes_] = clf.predict_proba(xv.flatten(1).numpy())
        return torch.from_numpy(probs).float()
    torch.manual_seed(seed)
    model = _torch_model(kind, tuple(xt.shape[1:]), n_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(EPOCHS):
        for idx in torch.randperm(len(xt), generator=gen).split(BATCH):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), y_train[idx]).backward()
            opt.step()
    with torch.no_grad():
        return model.eval()(xv).softmax(-1)


def evaluate_probe(kind: str, x: Float[Tensor, "n *f"], y: Int[Tensor, " n"], groups: Sequence,
                   seed: int = 0, test_fraction: float = 0.2) -> dict:
    """Split by group, fit, and report accuracy, AUROC, majority baseline and shuffled control."""
    from sklearn.metrics import roc_auc_score

    if len(x) != len(y) or len(y) != len(groups):
        raise ValueError(f"x, y and groups differ in length: {len(x)}, {len(y)}, {len(groups)}")
    train, val = split_by_group(groups, test_fraction, seed)
    n_classes = int(y.max()) + 1
    ytr, yv = y[train], y[val]
    probs = fit_predict(kind, x[train], ytr, x[val], n_classes, seed)
    acc = float((probs.argmax(-1) == yv).float().mean())
    shuffled = ytr[torch.randperm(len(ytr), generator=torch.Generator().manual_seed(seed + 1))]
    control = float((fit_predict(kind, x[train], shuffled, x[val], n_classes, seed).argmax(-1)
                     == yv).float().mean())
    majority = int(torch.bincount(ytr, minlength=n_classes).argmax())
    auroc = None
    if n_classes == 2 and len(set(yv.tolist())) == 2:
        auroc = float(roc_auc_score(yv.numpy(), probs[:, 1].numpy()))
    return {"accuracy": acc, "auroc": auroc,
            "majority_baseline": float((yv == majority).float().mean()),
            "control_accuracy": control, "selectivity": acc - control,
            "n_train": len(train), "n_val": len(val), "n_classes": n_classes,
            "val_groups": sorted({str(groups[i]) for i in val})}


def compare_with_baselines(results: list[dict]) -> dict:
    """The best result (by validation accuracy) against its two references: the majority
    baseline (always predicting the training majority class) and the shuffled-label control
    (the same probe trained on permuted labels). ``verdict`` says whether the probe beats both;
    a probe that does not beat the majority baseline shows no evidence the representation
    encodes the label, however high its accuracy looks."""
    best = max(results, key=lambda r: r["accuracy"])
    over_majority = best["accuracy"] - best["majority_baseline"]
    over_control = best["accuracy"] - best["control_accuracy"]
    if over_majority <= 0:
        verdict = (f"not above the majority baseline ({best['accuracy']:.3f} <= "
                   f"{best['majority_baseline']:.3f}): no evidence the representation encodes it")
    elif over_control <= 0:
        verdict = (f"above the majority baseline but not above the shuffled-label control "
                   f"({best['accuracy']:.3f} <= {best['control_accuracy']:.3f}): the probe fits "
                   f"noise as well")
    else:
        verdict = (f"above the majority baseline by {over_majority:.3f} and the shuffled-label "
                   f"control by {over_control:.3f}")
    return {"best_layer": best.get("layer"), "accuracy": best["accuracy"],
            "majority_baseline": best["majority_baseline"],
            "control_accuracy": best["control_accuracy"], "above_majority": over_majority,
            "selectivity": over_control, "n_val": best["n_val"], "verdict": verdict}


# -- datasets from an activation store ----------------------------------------------------------
def feature(tensors: dict[str, Tensor], representation: str, layer: int | None = None) -> Tensor:
    """One sample's features: ``layers_mean`` needs ``layer`` (its row); ``vprime`` stays
    [rows, d]; the means are [d]."""
    if representation not in REPRESENTATIONS:
        raise ValueError(f"representation {representation!r}: expected one of "
                         f"{', '.join(REPRESENTATIONS)}")
    t = tensors[representation].float()
    if representation == "layers_mean":
        if layer is None or not -t.shape[0] <= layer < t.shape[0]:
            raise ValueError(f"layers_mean has {t.shape[0]} layers: layer_idx must be in "
                             f"0..{t.shape[0] - 1}, got {layer}")
        return t[layer]
    return t


def _by_question(store, keep=None) -> dict[str, dict]:
    """``{question_id: {condition: key}}`` from the store's index metadata."""
    out: dict[str, dict] = {}
    for key in store.keys():
        meta = store.meta(key)
        qid = meta.get("question_id", key.split("/")[0])
        if keep is None or qid in keep:
            out.setdefault(qid, {})[meta.get("condition", key.split("/")[-1])] = key
    return out


def have1_dataset(store, representation: str, layer: int | None = None, mode: str = "single",
                  counterfactuals: Sequence[str] | None = None, keep=None):
    """``(x, y, groups)`` for Have-1 (see the module doc): per question and counterfactual,
    ``single`` adds (clean, 1) and (cf, 0) — the clean representation once per counterfactual,
    so the classes are balanced as in the original — and ``pair`` adds ([clean; cf], 1) and
    ([cf; clean], 0). Groups are video names (the question id where none is stored), so every
    copy of a clean representation falls on the same side of the split."""
    if mode not in ("single", "pair"):
        raise ValueError(f"mode {mode!r}: expected 'single' or 'pair'")
    xs, ys, groups = [], [], []
    for qid, conds in _by_question(store, keep).items():
        cfs = [k for n, k in conds.items() if n != "clean" and (not counterfactuals or
                                                                 n in counterfactuals)]
        if "clean" not in conds or not cfs:
            continue
        clean = feature(store.get(conds["clean"]), representation, layer)
        items = []  # per counterfactual one positive and one negative: balanced, as the original
        for key in cfs:
            cf = feature(store.get(key), representation, layer)
            items += ([(clean, 1), (cf, 0)] if mode == "single" else
                      [(torch.cat([clean, cf], -1), 1), (torch.cat([cf, clean], -1), 0)])
        group = store.meta(conds["clean"]).get("video_name") or qid
        for x, label in items:
            xs.append(x), ys.append(label), groups.append(group)
    if not xs:
        raise ValueError("no clean/counterfactual pairs in the store")
    return torch.stack(xs), torch.tensor(ys), groups


def have2_dataset(store, representation: str, labels: dict[str, str], layer: int | None = None,
                  keep=None):
    """``(x, y, groups, classes)``: the clean representation of each question with a label."""
    xs, names, groups = [], [], []
    for qid, conds in _by_question(store, keep).items():
        if "clean" in conds and labels.get(qid) is not None:
            xs.append(feature(store.get(conds["clean"]), representation, layer))
            names.append(str(labels[qid]))
            groups.append(store.meta(conds["clean"]).get("video_name") or qid)
    classes = sorted(set(names))
    if len(classes) < 2:
        raise ValueError(f"Have-2 needs at least 2 label values among the stored questions, got "
                         f"{classes}")
    return (torch.stack(xs), torch.tensor([classes.index(n) for n in names]), groups, classes)
