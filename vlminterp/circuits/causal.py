"""Steps 5–6: interventions in prototype space (the model is not re-run).

Notation: ``L`` labels [B, N]; ``P`` prototypes [K, H, N]; ``Â`` the reconstruction
``Â[b, h, i, :] = P[L[b, i], h, :]``; a *row* is one source token ``(b, i)``; "rows of k" are
those with ``L[b, i] = k`` (``support`` = their number); ``A`` the real ``attn_logits_l1``.

Cluster interventions (`cluster_interventions`), for each cluster k:

- ablation: ``P'[k] = 0``; row effect ``e_abl(b, i) = mean over (h, j) of |Â - Â'|`` at row
  (b, i); ``ablation_effect = mean of e_abl over the rows of k`` (= mean |P[k]|; 0 without rows);
- injection: every row *outside* k is overwritten with ``P[k]``; ``e_inj(b, i)`` likewise;
  ``injection_effect = mean of e_inj over the rows outside k``;
- ``ablation_pvalue = reference_draws_pvalue(e_abl[rows of k], e_abl[rows outside k])`` and
  ``injection_pvalue = reference_draws_pvalue(e_inj[rows outside k], e_inj[rows of k])``, the
  original's test exactly (seeds ``seed + 2k`` and ``seed + 2k + 1``): ``num_permutations``
  times draw as many reference rows as there are observed rows (without replacement, or with
  it when the reference has fewer rows), count the draws whose mean is >= the observed mean;
  p = (count + 1) / (P + 1); 1 when either side has no rows or P = 0. Note what it tests: an
  ablation of k leaves the other rows untouched (an injection leaves k's rows untouched), so
  the reference effects are exactly 0 and p = 1/(P+1) whenever the effect is non-zero, 1
  otherwise — including clusters of one row or of all rows but one: it certifies a non-zero
  effect, not a large one. Records are sorted by ``ablation_effect``, largest first.

Target edges (`target_edge_effects`), for each path ``(k, h, j)`` with ``p = P[k, h, j]``, zero
``P[k, h, j]`` only; on the rows of k (the only rows that change), with ``r = A[b, h, i, j]``:

- ``edge_effect = mean |Δ Â[b, h, i, j]| = |p|``;
- ``alignment_gain = mean (|r - 0| - |r - p|)``: how much the error against the real logits grows
  without the edge (> 0: the edge helps the reconstruction match reality);
- p-values by relabelling: draw ``num_permutations`` random sets S of ``support`` rows among all
  B·N rows (``numpy.random.default_rng((seed, path_index))``), refit the edge on S as
  ``p_S = mean of r over S`` and recompute both statistics on S; ``pvalue = (#{T_S >= T_obs} + 1)
  / (num_permutations + 1)``. Under the null that cluster k's rows are exchangeable with the
  others, the p-value is uniform. The original compared against the rows outside k, whose deltas
  are identically 0, which no null can match — hence the relabelling. Records are sorted by
  ``edge_effect``, largest first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from vlminterp.stats import permutation_pvalue

from .fit import _check_labels

_CHUNK = 1 << 22  # row indices drawn per vectorised block of relabellings


@dataclass
class ClusterIntervention:
    cluster_id: int
    support: int
    ablation_effect: float
    injection_effect: float
    ablation_pvalue: float
    injection_pvalue: float

    def to_dict(self) -> dict[str, int | float]:
        return asdict(self)


@dataclass
class TargetEdgeEffect:
    cluster_id: int
    head: int
    dst_token: int
    support: int
    edge_effect: float
    edge_pvalue: float
    alignment_gain: float
    alignment_pvalue: float

    def to_dict(self) -> dict[str, int | float]:
        return asdict(self)


def row_effects(labels: Int[Tensor, "batch tokens"], prototypes: Float[Tensor, "k heads tokens"],
                cluster: int) -> tuple[Float[np.ndarray, " rows"], Float[np.ndarray, " rows"]]:
    """``(e_abl, e_inj)`` of ``cluster`` for every row, flattened over (b, i) (see module doc)."""
    k, _, n = prototypes.shape
    if labels.shape[1] != n:
        raise ValueError(f"labels have {labels.shape[1]} tokens but prototypes have {n} destination tokens")
    _check_labels(labels, k)
    protos = prototypes.detach().to("cpu", torch.float64)
    flat = labels.detach().to("cpu").reshape(-1).long().numpy()
    ablation = float(protos[cluster].abs().mean())
    distance = (protos - protos[cluster]).abs().mean(dim=(1, 2)).numpy()  # [K]: mean |P[c] - P[k]|
    inside = flat == cluster
    return np.where(inside, ablation, 0.0), np.where(inside, 0.0, distance[flat])


def cluster_interventions(labels: Int[Tensor, "batch tokens"], prototypes: Float[Tensor, "k heads tokens"],
                          max_clusters: int | None = None, num_permutations: int = 200,
                          seed: int = 0) -> list[ClusterIntervention]:
    """Ablation and injection of clusters ``0 .. min(max_clusters, K) - 1`` (see module doc)."""
    limit = prototypes.shape[0] if max_clusters is None else min(max_clusters, prototypes.shape[0])
    records = []
    for k in range(limit):
        abl, inj = row_effects(labels, prototypes, k)
        inside = labels.detach().to("cpu").reshape(-1).numpy() == k
        support = int(inside.sum())
        records.append(ClusterIntervention(
            cluster_id=k, support=support,
            ablation_effect=float(abl[inside].mean()) if support else 0.0,
            injection_effect=float(inj[~inside].mean()) if support < inside.size else 0.0,
            ablation_pvalue=reference_draws_pvalue(abl[inside], abl[~inside], num_permutations, seed + 2 * k),
            injection_pvalue=reference_draws_pvalue(inj[~inside], inj[inside], num_permutations,
                                                   seed + 2 * k + 1),
        ))
    return sorted(records, key=lambda e: e.ablation_effect, reverse=True)


def reference_draws_pvalue(observed: Float[np.ndarray, " n"], reference: Float[np.ndarray, " m"],
                           num_permutations: int, seed: int) -> float:
    """The original's one-sided test: ``num_permutations`` draws of ``n`` reference values
    (``torch.randperm(m)[:n]``, or ``torch.randint(0, m, (n,))`` when n > m, from a
    ``torch.Generator`` seeded with ``seed``); p = (#{draw mean >= observed mean} + 1) / (P + 1)
    with float32 means; 1.0 when either side is empty or ``num_permutations <= 0``."""
    if observed.size == 0 or reference.size == 0 or num_permutations <= 0:
        return 1.0
    obs = float(torch.as_tensor(observed, dtype=torch.float32).mean())
    ref = torch.as_tensor(reference, dtype=torch.float32).reshape(-1)
    n, m = observed.size, ref.numel()
    if not bool(ref.any()):  # every draw's mean is exactly 0: the draws cannot change the count
        return float(((num_permutations if 0.0 >= obs else 0) + 1) / (num_permutations + 1))
    gen = torch.Generator().manual_seed(seed)
    ge = 0
    for _ in range(num_permutations):
        idx = torch.randint(0, m, (n,), generator=gen) if n > m else torch.randperm(m, generator=gen)[:n]
        ge += float(ref[idx].mean()) >= obs
    return float((ge + 1) / (num_permutations + 1))


def edge_columns(logits: Float[Tensor, "batch heads tokens tokens"],
                 paths: Sequence[Mapping[str, int | float]]) -> Float[Tensor, "paths batch tokens"]:
    """``out[p] = logits[:, h_p, :, j_p]``: the real logits every source row sends along path p."""
    if not paths:
        return logits.new_zeros(0, logits.shape[0], logits.shape[2])
    heads = torch.tensor([int(p["head"]) for p in paths])
    dsts = torch.tensor([int(p["dst_token"]) for p in paths])
    return logits[:, heads, :, dsts]  # advanced indices split by a slice: the path axis comes first


def target_edge_effects(labels: Int[Tensor, "batch tokens"], prototypes: Float[Tensor, "k heads tokens"],
                        real_edges: Float[Tensor, "paths batch tokens"],
                        paths: Sequence[Mapping[str, int | float]], num_permutations: int = 200,
                        seed: int = 0) -> list[TargetEdgeEffect]:
    """Zero each path's prototype entry; ``real_edges[p]`` = `edge_columns` of the real logits."""
    k_count, heads, n = prototypes.shape
    if real_edges.shape[0] != len(paths):
        raise ValueError(f"real_edges holds {real_edges.shape[0]} paths, but {len(paths)} paths were given")
    _check_labels(labels, k_count)
    flat = labels.detach().to("cpu").reshape(-1).numpy()
    protos = prototypes.detach().to("cpu").float()
    records = []
    for idx, path in enumerate(paths):
        k, h, j = int(path["cluster_id"]), int(path["head"]), int(path["dst_token"])
        if not (0 <= k < k_count and 0 <= h < heads and 0 <= j < n):
            raise ValueError(f"paths[{idx}] = (cluster {k}, head {h}, dst_token {j}) is outside the "
                             f"prototypes' range (K={k_count}, H={heads}, N={n})")
        r = real_edges[idx].detach().to("cpu", torch.float64).reshape(-1).numpy()
        inside = flat == k
        support = int(inside.sum())
        p = float(protos[k, h, j])
        rows = r[inside]
        gain = float((np.abs(rows) - np.abs(rows - p)).mean()) if support else 0.0
        edge_p, gain_p = _relabel_pvalues(r, inside, num_permutations, np.random.default_rng((seed, idx)))
        records.append(TargetEdgeEffect(
            cluster_id=k, head=h, dst_token=j, support=support, edge_effect=abs(p) if support else 0.0,
            edge_pvalue=edge_p, alignment_gain=gain, alignment_pvalue=gain_p,
        ))
    return sorted(records, key=lambda e: e.edge_effect, reverse=True)


def _edge_stats(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edge effect |p_S| and alignment gain mean(|r| - |r - p_S|) of row sets ``values`` [S, n]."""
    fitted = values.mean(axis=-1, keepdims=True)
    return np.abs(fitted[..., 0]), (np.abs(values) - np.abs(values - fitted)).mean(axis=-1)


def _relabel_pvalues(r: np.ndarray, inside: np.ndarray, num_permutations: int,
                     rng: np.random.Generator) -> tuple[float, float]:
    support = int(inside.sum())
    if support == 0:
        return 1.0, 1.0
    obs_edge, obs_gain = _edge_stats(r[inside][None])
    null_edge, null_gain = np.empty(num_permutations), np.empty(num_permutations)
    step = max(1, _CHUNK // r.size)
    for start in range(0, num_permutations, step):
        rows = min(step, num_permutations - start)
        # the first `support` entries of a random permutation: a uniform random row set
        chosen = rng.permuted(np.broadcast_to(np.arange(r.size), (rows, r.size)), axis=1)[:, :support]
        null_edge[start:start + rows], null_gain[start:start + rows] = _edge_stats(r[chosen])
    return permutation_pvalue(float(obs_edge[0]), null_edge), permutation_pvalue(float(obs_gain[0]), null_gain)
