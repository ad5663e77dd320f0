"""vlminterp.circuits on arrays: clustering, prototype fit, top-k paths, interventions, target edges.

References are brute-force loops written the way the original runners compute each quantity,
scikit-learn and scipy.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats as sps
from sklearn.cluster import MiniBatchKMeans
from sklearn.metrics import adjusted_rand_score, r2_score

from vlminterp.circuits.causal import reference_draws_pvalue
from vlminterp.circuits import (PrototypeAccumulator, attention_logits_of, cluster_gates, cluster_interventions, edge_columns,
                                fit_prototypes, group_paths, mse_r2, reconstruct, row_effects,
                                save_head_heatmaps, target_edge_effects, token_names, top_k_paths)


def _loop_reconstruct(labels, protos):
    b, n = labels.shape
    out = torch.zeros(b, protos.shape[1], n, protos.shape[2])
    for i in range(b):
        for t in range(n):
            out[i, :, t, :] = protos[int(labels[i, t])]
    return out


def _planted(seed=0, b=6, n=9, h=2, k=3, shift=0.0):
    """Random labels and logits; cluster 0's rows get +shift at (head 0, dst token 2)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (b, n), generator=g)
    logits = torch.randn(b, h, n, n, generator=g)
    logits[:, 0, :, 2] += shift * (labels == 0).float()
    return labels, logits


# -- reconstruction and fit ------------------------------------------------------------------

def test_reconstruct_matches_loops():
    labels, _ = _planted()
    protos = torch.randn(3, 2, 9)
    assert torch.equal(reconstruct(labels, protos), _loop_reconstruct(labels, protos))
    with pytest.raises((ValueError, TypeError)):
        reconstruct(labels, torch.randn(2, 2, 9))  # label 2 has no prototype


def test_fit_matches_brute_force_means():
    labels, logits = _planted(seed=1)
    fit = fit_prototypes(labels, logits, num_clusters=4)  # cluster 3 is empty
    for k in range(4):
        rows = [logits[b, :, i, :] for b in range(6) for i in range(9) if labels[b, i] == k]
        assert fit.counts[k] == len(rows)
        want = torch.stack(rows).mean(0) if rows else torch.zeros(2, 9)
        torch.testing.assert_close(fit.prototypes[k], want, atol=1e-6, rtol=1e-6)
    assert int(fit.counts.sum()) == 6 * 9


def test_r2_is_one_when_logits_are_cluster_determined():
    labels, _ = _planted(seed=2)
    truth = torch.randn(3, 2, 9)
    logits = reconstruct(labels, truth)
    fit = fit_prototypes(labels, logits)
    torch.testing.assert_close(fit.prototypes, truth)
    mse, r2 = mse_r2(logits, reconstruct(labels, fit.prototypes))
    assert mse == pytest.approx(0.0, abs=1e-12) and r2 == pytest.approx(1.0)


def test_mse_r2_matches_sklearn_and_streams():
    labels, logits = _planted(seed=3)
    fit = fit_prototypes(labels, logits)
    recon = reconstruct(labels, fit.prototypes)
    mse, r2 = mse_r2(logits, recon)
    y, yhat = logits.double().reshape(-1).numpy(), recon.double().reshape(-1).numpy()
    assert mse == pytest.approx(np.mean((y - yhat) ** 2))
    assert r2 == pytest.approx(r2_score(y, yhat))
    acc = PrototypeAccumulator(3)
    acc.update(labels[:2], logits[:2])
    acc.update(labels[2:], logits[2:])
    torch.testing.assert_close(acc.result().prototypes, fit.prototypes)
    with pytest.raises((ValueError, TypeError)):
        acc.update(labels[:, :5], logits[:2])


# -- clustering --------------------------------------------------------------------------------

def _gates(seed=0, per=60, d=24):
    rng = np.random.default_rng(seed)
    patterns = rng.random((3, d)) < 0.5
    truth = np.repeat(np.arange(3), per)
    rng.shuffle(truth)
    flips = rng.random((truth.size, d)) < 0.05
    gates = (patterns[truth] ^ flips).astype(np.uint8)
    return torch.from_numpy(gates).reshape(12, 15, d), truth


def test_cluster_recovers_planted_gate_patterns():
    gates, truth = _gates()
    res = cluster_gates(gates, num_clusters=3, sample_tokens=0, seed=0)
    assert res.labels.shape == (12, 15) and res.centroids.shape == (3, 24)
    assert adjusted_rand_score(truth, res.labels.reshape(-1).numpy()) == 1.0
    assert torch.equal(res.cluster_sizes, torch.bincount(res.labels.reshape(-1), minlength=3))
    torch.testing.assert_close(res.cluster_activation_rates, res.centroids.mean(1))
    flat = gates.reshape(-1, 24).float()
    for k in range(3):  # ≈ the share of active units among the cluster's tokens
        share = flat[res.labels.reshape(-1) == k].mean()
        assert float(res.cluster_activation_rates[k]) == pytest.approx(float(share), abs=0.05)


def test_cluster_reproduces_the_original_recipe_exactly():
    gates, _ = _gates(seed=1)
    flat = gates.reshape(-1, 24).float().numpy()
    idx = np.random.default_rng(seed=7).choice(flat.shape[0], size=100, replace=False)
    km = MiniBatchKMeans(n_clusters=4, random_state=7, batch_size=128, n_init="auto").fit(flat[idx])
    res = cluster_gates(gates, num_clusters=4, sample_tokens=100, seed=7)
    assert np.array_equal(res.labels.reshape(-1).numpy(), km.predict(flat))
    assert np.allclose(res.centroids.numpy(), km.cluster_centers_)


def test_cluster_validates_input():
    gates, _ = _gates()
    with pytest.raises(ValueError, match="num_clusters"):
        cluster_gates(gates, num_clusters=1)
    with pytest.raises(ValueError, match="exceeds"):
        cluster_gates(gates[:1, :2], num_clusters=3)
    with pytest.raises(ValueError, match="sample_tokens"):
        cluster_gates(gates, num_clusters=5, sample_tokens=3)
    with pytest.raises(ValueError, match="sample_tokens"):
        cluster_gates(gates, num_clusters=3, sample_tokens=-1)
    with pytest.raises((ValueError, TypeError)):
        cluster_gates(gates.reshape(-1, 24), num_clusters=3)


# -- top-k paths ------------------------------------------------------------------------------

def test_top_k_matches_brute_force_sort_with_ties():
    protos = torch.round(torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(0)) * 2) / 2
    counts = torch.tensor([5, 0, 7, 9])
    scored = [(abs(float(protos[k, h, j])), k, h, j) for k in range(4) for h in range(3) for j in range(5)]
    scored.sort(key=lambda s: s[0], reverse=True)  # stable: ties keep (k, h, j) order
    paths = top_k_paths(protos, counts, top_k=17)
    assert [(p.cluster_id, p.head, p.dst_token) for p in paths] == [s[1:] for s in scored[:17]]
    assert all(p.weight == float(protos[p.cluster_id, p.head, p.dst_token]) for p in paths)
    assert all(p.support == int(counts[p.cluster_id]) for p in paths)
    assert len(top_k_paths(protos, counts, top_k=1000)) == 60
    groups = group_paths(paths)
    for h in range(3):
        assert groups["by_head"].get(f"head_{h}", []) == [p.to_dict() for p in paths if p.head == h]
    assert sum(map(len, groups["by_cluster"].values())) == 17
    with pytest.raises(ValueError, match="top_k"):
        top_k_paths(protos, counts, top_k=0)


def test_head_heatmaps_name_the_patch_grid(tmp_path):
    assert token_names(17)[:3] == ["cls", "r0c0", "r0c1"] and token_names(17)[-1] == "r3c3"
    assert token_names(6) == ["0", "1", "2", "3", "4", "5"]
    written = save_head_heatmaps(torch.randn(4, 2, 17), tmp_path, counts=torch.tensor([1, 2, 3, 4]))
    assert [p.name for p in written] == ["head_0.png", "head_1.png"]
    for p in written:
        with Image.open(p) as im:
            assert im.size[0] > 200 and im.size[1] > 100


# -- cluster interventions ---------------------------------------------------------------------

def test_cluster_interventions_match_materialised_reconstructions():
    labels, logits = _planted(seed=4)
    protos = fit_prototypes(labels, logits).prototypes
    base = _loop_reconstruct(labels, protos)
    records = cluster_interventions(labels, protos, num_permutations=50, seed=3)
    assert [r.ablation_effect for r in records] == sorted((r.ablation_effect for r in records), reverse=True)
    for r in records:
        k = r.cluster_id
        mask = labels == k
        ablated = protos.clone()
        ablated[k] = 0
        d_abl = (base - _loop_reconstruct(labels, ablated)).abs()
        injected = base.clone()
        injected.permute(0, 2, 1, 3)[~mask] = protos[k]
        d_inj = (base - injected).abs()
        assert r.support == int(mask.sum())
        assert r.ablation_effect == pytest.approx(float(d_abl.permute(0, 2, 1, 3)[mask].mean()), rel=1e-5)
        assert r.injection_effect == pytest.approx(float(d_inj.permute(0, 2, 1, 3)[~mask].mean()), rel=1e-5)
        abl_rows, inj_rows = d_abl.mean(dim=(1, 3)), d_inj.mean(dim=(1, 3))
        assert r.ablation_pvalue == _original_pvalue(abl_rows[mask], abl_rows[~mask], 50, 3 + 2 * k)
        assert r.injection_pvalue == _original_pvalue(inj_rows[~mask], inj_rows[mask], 50, 3 + 2 * k + 1)
        # Out-of-cluster ablation effects are exactly 0: the p-value sits at its floor.
        assert r.ablation_pvalue == pytest.approx(1 / 51)
    assert len(cluster_interventions(labels, protos, max_clusters=2, num_permutations=0)) == 2


def _original_pvalue(observed, reference, num_permutations, seed):
    """XAI-kit's test as its intervene.py defines it, written out: draw len(observed) reference
    rows (randperm without replacement, randint with it when there are fewer reference rows)
    from a torch.Generator seeded with ``seed``; count draw means >= the observed mean."""
    observed, reference = torch.as_tensor(observed).float(), torch.as_tensor(reference).float()
    if observed.numel() == 0 or reference.numel() == 0 or num_permutations <= 0:
        return 1.0
    gen = torch.Generator().manual_seed(seed)
    obs, n, m = float(observed.mean()), observed.numel(), reference.numel()
    ge = 0
    for _ in range(num_permutations):
        idx = torch.randint(0, m, (n,), generator=gen) if n > m else torch.randperm(m, generator=gen)[:n]
        ge += float(reference[idx].mean()) >= obs
    return (ge + 1) / (num_permutations + 1)


@pytest.mark.parametrize(("n", "m"), [(1, 30), (5, 30), (29, 3), (4, 4), (40, 1)])
def test_reference_draws_pvalue_is_the_originals_test(n, m):
    g = torch.Generator().manual_seed(n * 100 + m)
    reference = torch.rand(m, generator=g)
    for shift in (-0.3, 0.0, 0.2):  # below, like and above the reference
        observed = torch.rand(n, generator=g) + shift
        got = reference_draws_pvalue(observed.numpy(), reference.numpy(), 200, 7)
        assert got == _original_pvalue(observed, reference, 200, 7)
    assert reference_draws_pvalue(np.ones(3), np.zeros(5), 0, 0) == 1.0
    assert reference_draws_pvalue(np.ones(3), np.zeros(0), 10, 0) == 1.0


def test_cluster_pvalues_for_clusters_of_one_row_and_of_all_rows_but_one():
    """Cluster 0 holds one row, cluster 1 all the others, cluster 2 none: the reference
    effects are exactly 0, so p = 1/(P+1) for a non-zero effect, and 1 when a side has no rows — a pooled relabelling test would give other values here."""
    labels = torch.ones(2, 5, dtype=torch.long)
    labels[1, 3] = 0
    protos = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(0))
    protos[2] = 0.5
    by_id = {r.cluster_id: r for r in cluster_interventions(labels, protos, num_permutations=200, seed=1)}
    assert (by_id[0].support, by_id[1].support, by_id[2].support) == (1, 9, 0)
    for k in (0, 1):
        assert by_id[k].ablation_pvalue == by_id[k].injection_pvalue == 1 / 201
    assert by_id[2].ablation_pvalue == by_id[2].injection_pvalue == 1.0  # no rows of 2 to compare
    labels[:] = 1  # every row in cluster 1: nothing outside it to compare with
    one = {r.cluster_id: r for r in cluster_interventions(labels, protos, num_permutations=200)}[1]
    assert one.ablation_pvalue == one.injection_pvalue == 1.0


def test_row_effects_are_zero_where_the_intervention_changes_nothing():
    labels, logits = _planted(seed=5)
    protos = fit_prototypes(labels, logits).prototypes
    abl, inj = row_effects(labels, protos, 1)
    inside = (labels == 1).reshape(-1).numpy()
    assert np.all(abl[~inside] == 0) and np.all(abl[inside] > 0)
    assert np.all(inj[inside] == 0) and np.all(inj[~inside] > 0)


# -- target edges ------------------------------------------------------------------------------

def test_target_edge_effects_match_the_definitions():
    labels, logits = _planted(seed=6, shift=1.0)
    protos = fit_prototypes(labels, logits).prototypes
    paths = [p.to_dict() for p in top_k_paths(protos, torch.bincount(labels.reshape(-1)), 5)]
    records = target_edge_effects(labels, protos, edge_columns(logits, paths), paths, num_permutations=20)
    assert [r.edge_effect for r in records] == sorted((r.edge_effect for r in records), reverse=True)
    base = _loop_reconstruct(labels, protos)
    for r in records:
        k, h, j, mask = r.cluster_id, r.head, r.dst_token, labels == r.cluster_id
        ablated = protos.clone()
        ablated[k, h, j] = 0
        new = _loop_reconstruct(labels, ablated)
        real, b_edge, a_edge = logits[:, h, :, j], base[:, h, :, j], new[:, h, :, j]
        assert r.edge_effect == pytest.approx(float((b_edge - a_edge).abs()[mask].mean()), rel=1e-6)
        gain = ((real - a_edge).abs() - (real - b_edge).abs())[mask].mean()
        assert r.alignment_gain == pytest.approx(float(gain), rel=1e-5, abs=1e-6)
        assert r.support == int(mask.sum()) and 0 < r.edge_pvalue <= 1 and 0 < r.alignment_pvalue <= 1
    with pytest.raises(ValueError, match="outside"):
        target_edge_effects(labels, protos, edge_columns(logits, paths[:1]),
                            [{"cluster_id": 9, "head": 0, "dst_token": 0}])


def _edge_pvalues(labels, logits, num_permutations, seed):
    protos = fit_prototypes(labels, logits, num_clusters=3).prototypes
    path = [{"cluster_id": 0, "head": 0, "dst_token": 2}]
    (r,) = target_edge_effects(labels, protos, edge_columns(logits, path), path, num_permutations, seed)
    return r.edge_pvalue, r.alignment_pvalue


def test_planted_edge_is_significant():
    labels, logits = _planted(seed=7, shift=3.0)
    edge_p, align_p = _edge_pvalues(labels, logits, 199, seed=0)
    assert edge_p < 0.01 and align_p < 0.01


def test_null_edge_pvalues_are_uniform_over_seeds():
    edge, align = [], []
    for seed in range(200):
        labels, logits = _planted(seed=seed, shift=3.0)
        order = torch.from_numpy(np.random.default_rng(10_000 + seed).permutation(labels.numel()))
        shuffled = labels.reshape(-1)[order]  # cluster 0 no longer marks the shifted rows
        e, a = _edge_pvalues(shuffled.reshape(labels.shape), logits, 99, seed)
        edge.append(e)
        align.append(a)
    for ps in (np.array(edge), np.array(align)):
        assert sps.kstest(ps, "uniform").pvalue > 0.01
        assert 0.0 < np.mean(ps <= 0.1) < 0.18
        counts, _ = np.histogram(ps, bins=5, range=(0, 1))
        assert counts.min() > 20  # ~40 expected per fifth


# -- attention logits from projection weights ----------------------------------------------------

@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_logits_of_mha_and_qkv_modules(batch_first):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=batch_first).eval()
    x = torch.randn(3, 5, 8)  # [B, N, D]
    given = x if batch_first else x.transpose(0, 1)
    with torch.no_grad():
        _, weights = mha(given, given, given, need_weights=True, average_attn_weights=False)
        logits = attention_logits_of(mha, given)
        qkv = torch.nn.Linear(8, 24)
        qkv.weight.copy_(mha.in_proj_weight)
        qkv.bias.copy_(mha.in_proj_bias)
        timm_style = SimpleNamespace(qkv=qkv, num_heads=2)
        torch.testing.assert_close(attention_logits_of(timm_style, x), logits)
    assert logits.shape == (3, 2, 5, 5)
    torch.testing.assert_close(logits.softmax(-1), weights)
