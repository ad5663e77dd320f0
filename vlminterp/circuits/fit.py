"""Step 3: cluster-conditioned attention-edge prototypes and the reconstruction they imply.

With ``A = attn_logits_l1`` [B, H, N, N] (row i = source/query token, column j = destination/key
token), ``L = labels`` [B, N] and K clusters:

- ``counts[k] = #{(b, i) : L[b, i] = k}`` (sums to B·N);
- ``prototypes[k, h, :] = mean of A[b, h, i, :] over the (b, i) with L[b, i] = k`` (zeros when
  ``counts[k] = 0``): the attention-logit row a token of cluster k sends out of head h;
- reconstruction ``Â[b, h, i, :] = prototypes[L[b, i], h, :]``;
- ``mse = mean over all B·H·N·N entries of (A - Â)²``; ``r2 = 1 - mse / Var(A)`` with ``Var`` the
  population variance of all entries of A (when ``Var(A) = 0``: 1 if ``mse = 0`` else 0).

Sums and moments are accumulated in float64 one batch at a time, so a trace too large for memory
is fitted shard by shard with `PrototypeAccumulator` and `ReconstructionScore`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor


@dataclass
class PrototypeFit:
    prototypes: Float[Tensor, "k heads tokens"]
    counts: Int[Tensor, " k"]


def _check_labels(labels: Tensor, num_clusters: int, what: str = "labels") -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_clusters):
        raise ValueError(f"{what}: cluster ids must lie in [0, {num_clusters}), got "
                         f"[{int(labels.min())}, {int(labels.max())}]")


def _check_pair(labels: Tensor, logits: Tensor) -> None:
    b, h, n, m = logits.shape
    if n != m:
        raise ValueError(f"attn_logits: expected square [B, H, N, N] logits, got {tuple(logits.shape)}")
    if tuple(labels.shape) != (b, n):
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match attn_logits of shape "
                         f"{tuple(logits.shape)} (expected labels [{b}, {n}])")


class PrototypeAccumulator:
    """Running per-cluster sums of attention-logit rows; `result` divides by the counts."""

    def __init__(self, num_clusters: int) -> None:
        if num_clusters < 1:
            raise ValueError(f"num_clusters: expected >= 1, got {num_clusters}")
        self.num_clusters = num_clusters
        self.sums: Tensor | None = None
        self.counts = torch.zeros(num_clusters, dtype=torch.long)

    def update(self, labels: Int[Tensor, "batch tokens"],
               logits: Float[Tensor, "batch heads tokens tokens"]) -> None:
        _check_pair(labels, logits)
        _check_labels(labels, self.num_clusters)
        b, h, n, _ = logits.shape
        if self.sums is None:
            self.sums = torch.zeros(self.num_clusters, h, n, dtype=torch.float64)
        rows = logits.detach().to("cpu", torch.float64).permute(0, 2, 1, 3).reshape(b * n, h * n).numpy()
        flat = labels.detach().to("cpu").reshape(-1).long()
        # one-hot [K, rows] @ rows in numpy: torch's threaded index_add_ stalls on busy machines
        onehot = np.zeros((self.num_clusters, b * n))
        onehot[flat.numpy(), np.arange(b * n)] = 1.0
        self.sums += torch.from_numpy(onehot @ rows).reshape(self.num_clusters, h, n)
        self.counts += torch.bincount(flat, minlength=self.num_clusters)

    def result(self) -> PrototypeFit:
        if self.sums is None:
            raise ValueError("PrototypeAccumulator: no batch was added")
        safe = self.counts.clamp_min(1).to(torch.float64).view(-1, 1, 1)
        return PrototypeFit(prototypes=(self.sums / safe).float(), counts=self.counts.clone())


def fit_prototypes(labels: Int[Tensor, "batch tokens"], logits: Float[Tensor, "batch heads tokens tokens"],
                   num_clusters: int | None = None) -> PrototypeFit:
    """`PrototypeFit` of one in-memory batch; ``num_clusters`` defaults to ``labels.max() + 1``."""
    k = int(labels.max()) + 1 if num_clusters is None else num_clusters
    acc = PrototypeAccumulator(k)
    acc.update(labels, logits)
    return acc.result()


def reconstruct(labels: Int[Tensor, "batch tokens"],
                prototypes: Float[Tensor, "k heads tokens"]) -> Float[Tensor, "batch heads tokens tokens"]:
    """``Â[b, h, i, :] = prototypes[labels[b, i], h, :]``."""
    k, _, n = prototypes.shape
    if labels.shape[1] != n:
        raise ValueError(f"labels have {labels.shape[1]} tokens but prototypes have {n} destination tokens")
    _check_labels(labels, k)
    return prototypes[labels.long()].permute(0, 2, 1, 3)


class ReconstructionScore:
    """Streaming ``mse`` and ``r2`` of a reconstruction against the real logits (see module doc)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.sse = 0.0

    def update(self, real: Float[Tensor, "*shape"], recon: Float[Tensor, "*shape"]) -> None:
        if real.shape != recon.shape:
            raise ValueError(f"real {tuple(real.shape)} and reconstruction {tuple(recon.shape)} differ in shape")
        y = real.detach().to("cpu", torch.float64)
        nb = y.numel()
        if nb == 0:
            return
        mean_b = float(y.mean())
        m2_b = float(((y - mean_b) ** 2).sum())
        self.sse += float(((y - recon.detach().to("cpu", torch.float64)) ** 2).sum())
        total = self.n + nb
        delta = mean_b - self.mean  # Chan et al.'s pairwise merge of (count, mean, M2)
        self.mean += delta * nb / total
        self.m2 += m2_b + delta * delta * self.n * nb / total
        self.n = total

    def result(self) -> tuple[float, float]:
        if self.n == 0:
            raise ValueError("ReconstructionScore: no values were added")
        mse, var = self.sse / self.n, self.m2 / self.n
        if var == 0:
            return mse, 1.0 if mse == 0 else 0.0
        return mse, 1.0 - mse / var


def mse_r2(real: Float[Tensor, "*shape"], recon: Float[Tensor, "*shape"]) -> tuple[float, float]:
    """``(mse, r2)`` of ``recon`` against ``real`` over all entries (see module doc)."""
    score = ReconstructionScore()
    score.update(real, recon)
    return score.result()
