"""Step 2: group tokens by their FFN gate pattern (MiniBatchKMeans on per-token gate vectors).

Every token ``(b, i)`` of a trace contributes one vector ``ffn_gate_l[b, i, :]`` (D_ffn entries,
binary by default). The k-means model is fitted on a seeded subsample of ``sample_tokens``
vectors and then assigns *every* token to its nearest centroid, so ``labels`` covers the whole
trace. Parameters and sampling follow the original runner exactly (same seed → same labels).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int, Real
from torch import Tensor

_PREDICT_ROWS = 8192  # tokens converted to float32 at a time when assigning labels


@dataclass
class GateClusters:
    """``labels[b, i]`` in ``[0, K)``; ``centroids[k]`` the k-means centre (D_ffn floats);
    ``cluster_sizes[k]`` the number of tokens assigned to k (sums to B·N);
    ``cluster_activation_rates[k]`` = mean of ``centroids[k]`` over its D_ffn units — for binary
    gates, the fraction of gate units that are positive (GELU output > 0) in the cluster's
    centre, i.e. the average share of FFN units a token of that cluster switches on."""

    labels: Int[Tensor, "batch tokens"]
    centroids: Float[Tensor, "k d_ffn"]
    cluster_sizes: Int[Tensor, " k"]
    cluster_activation_rates: Float[Tensor, " k"]


def cluster_gates(
    gates: Real[Tensor, "batch tokens d_ffn"],
    num_clusters: int,
    sample_tokens: int = 20000,
    seed: int = 0,
) -> GateClusters:
    """Fit ``MiniBatchKMeans(num_clusters, random_state=seed, n_init='auto', batch_size=
    min(2048, max(128, n_fit)))`` on ``sample_tokens`` token vectors drawn without replacement by
    ``numpy.random.default_rng(seed)`` (all tokens when ``sample_tokens`` is 0 or >= B·N), then
    assign every token. Vectors are compared as float32, as in the original."""
    if num_clusters < 2:
        raise ValueError(f"num_clusters: expected at least 2, got {num_clusters}")
    if sample_tokens < 0:
        raise ValueError(f"sample_tokens: expected >= 0 (0 = all tokens), got {sample_tokens}")
    batch, tokens, width = gates.shape
    gates = gates.detach().to("cpu")
    if gates.is_floating_point() and gates.dtype != torch.float32:
        gates = gates.float()  # bfloat16/float16 have no numpy twin
    flat = gates.reshape(batch * tokens, width).numpy()
    total = flat.shape[0]
    if num_clusters > total:
        raise ValueError(f"num_clusters={num_clusters} exceeds the {total} tokens in the trace")
    if 0 < sample_tokens < total:
        if sample_tokens < num_clusters:
            raise ValueError(f"sample_tokens={sample_tokens} is smaller than num_clusters={num_clusters}")
        rng = np.random.default_rng(seed=seed)
        train = flat[rng.choice(total, size=sample_tokens, replace=False)]
    else:
        train = flat
    train = train.astype(np.float32)
    from sklearn.cluster import MiniBatchKMeans  # here, not at module import: sklearn takes seconds

    kmeans = MiniBatchKMeans(n_clusters=num_clusters, random_state=seed,
                             batch_size=min(2048, max(128, train.shape[0])), n_init="auto")
    kmeans.fit(train)
    labels = np.concatenate([
        kmeans.predict(flat[s:s + _PREDICT_ROWS].astype(np.float32))
        for s in range(0, total, _PREDICT_ROWS)
    ])
    labels_t = torch.from_numpy(labels.astype(np.int64)).reshape(batch, tokens)
    centroids = torch.from_numpy(kmeans.cluster_centers_).float()
    return GateClusters(
        labels=labels_t,
        centroids=centroids,
        cluster_sizes=torch.bincount(labels_t.reshape(-1), minlength=num_clusters),
        cluster_activation_rates=centroids.mean(dim=-1),
    )
