"""Step 4: the strongest (cluster, head, destination-token) edges of the prototype table.

A path ``(k, h, j)`` reads "tokens of FFN cluster k, through head h of block l+1, send attention
logit ``weight = prototypes[k, h, j]`` to token j". `top_k_paths` ranks all K·H·N entries by
``|weight|`` (descending; ties keep the order k, then h, then j, as the original's stable sort)
and gives each path ``support = counts[k]``, the number of tokens in cluster k.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from jaxtyping import Float, Int
from torch import Tensor

from vlminterp.store import atomic_write


@dataclass
class CircuitPath:
    cluster_id: int
    head: int
    dst_token: int
    weight: float
    support: int

    def to_dict(self) -> dict[str, int | float]:
        return asdict(self)


def top_k_paths(prototypes: Float[Tensor, "k heads tokens"], counts: Int[Tensor, " k"],
                top_k: int = 50) -> list[CircuitPath]:
    """The ``top_k`` entries of ``prototypes`` by absolute value (all of them if fewer)."""
    if top_k <= 0:
        raise ValueError(f"top_k: expected a positive number, got {top_k}")
    k, h, n = prototypes.shape
    if counts.shape[0] != k:
        raise ValueError(f"counts has {counts.shape[0]} clusters but prototypes has {k}")
    values = prototypes.detach().to("cpu").float().numpy()
    order = np.argsort(-np.abs(values.reshape(-1)), kind="stable")[:top_k]
    sizes = counts.detach().to("cpu").tolist()
    paths = []
    for flat in order.tolist():
        c, rest = divmod(flat, h * n)
        head, dst = divmod(rest, n)
        paths.append(CircuitPath(cluster_id=c, head=head, dst_token=dst,
                                 weight=float(values[c, head, dst]), support=int(sizes[c])))
    return paths


def group_paths(paths: list[CircuitPath]) -> dict[str, dict[str, list[dict[str, int | float]]]]:
    """``{"by_head": {"head_<h>": [path, ...]}, "by_cluster": {"cluster_<k>": [...]}}``, each list
    in rank order, keys in order of first appearance."""
    by_head: dict[str, list[dict[str, int | float]]] = {}
    by_cluster: dict[str, list[dict[str, int | float]]] = {}
    for path in paths:
        by_head.setdefault(f"head_{path.head}", []).append(path.to_dict())
        by_cluster.setdefault(f"cluster_{path.cluster_id}", []).append(path.to_dict())
    return {"by_head": by_head, "by_cluster": by_cluster}


def token_names(num_tokens: int) -> list[str]:
    """``cls, r0c0, r0c1, ...`` when the tokens are CLS + a square patch grid, else ``0, 1, ...``."""
    side = math.isqrt(max(num_tokens - 1, 0))
    if num_tokens > 1 and side * side == num_tokens - 1:
        return ["cls"] + [f"r{r}c{c}" for r in range(side) for c in range(side)]
    return [str(j) for j in range(num_tokens)]


def save_head_heatmaps(prototypes: Float[Tensor, "k heads tokens"], out_dir: str | os.PathLike,
                       counts: Int[Tensor, " k"] | None = None) -> list[Path]:
    """One ``head_<h>.png`` per head: the K × N table ``prototypes[:, h, :]`` (rows = clusters,
    columns = destination tokens). With a CLS + square patch grid, white lines separate CLS and
    each patch row, and each row's span is labelled ``r<row>`` (columns run left to right inside it)."""
    k, heads, n = prototypes.shape
    names = token_names(n)
    grid = names[0] == "cls" and n > 1
    side = math.isqrt(n - 1) if grid else 0
    values = prototypes.detach().to("cpu").float().numpy()
    limit = float(np.abs(values).max()) or 1.0
    rows = [f"{c}" if counts is None else f"{c} (n={int(counts[c])})" for c in range(k)]
    out = Path(out_dir)
    written = []
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # here: keeps `--help` light
    from matplotlib.figure import Figure

    for head in range(heads):
        fig = Figure(figsize=(min(18.0, 3.0 + 0.06 * n), min(12.0, 1.5 + 0.3 * k)))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        im = ax.imshow(values[:, head, :], aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit,
                       interpolation="nearest")
        fig.colorbar(im, ax=ax, label="prototype attention logit")
        if grid:
            every = max(1, side // 16)
            centres = [1 + r * side + (side - 1) / 2 for r in range(0, side, every)]
            ax.set_xticks([0, *centres], ["cls", *(f"r{r}" for r in range(0, side, every))], fontsize=7)
            for r in range(side):
                ax.axvline(1 + r * side - 0.5, color="white", linewidth=0.6)
        ax.set_yticks(range(k), rows, fontsize=7 if k > 20 else 9)
        ax.set(title=f"head {head}: prototype logits (cluster → destination token)",
               xlabel="destination token" + (f" (CLS + {side}×{side} patch rows)" if grid else ""),
               ylabel="cluster")
        path = out / f"head_{head}.png"
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
        written.append(path)
    return written
