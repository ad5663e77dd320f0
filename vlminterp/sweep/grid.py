"""What a sweep patches (sites x position groups [x heads]) and what it returns (a labelled array)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..attention import head_site, heads as heads_of

KINDS = ("embed", "resid", "attn", "mlp", "q", "k", "v", "z")
HEAD_KINDS = ("q", "k", "v", "z")
# order of the sites inside one decoder layer, as the forward reaches them
_ORDER = {"embed": -1, "q": 0, "k": 1, "v": 2, "z": 3, "attn": 4, "mlp": 5, "resid": 6}
_SITES_HELP = ("'embed' (the LM input after the visual features are merged), 'resid.L' (or "
               "'L': layer L's output), 'attn.L', 'mlp.L' (their outputs), 'q.L', 'k.L', 'v.L' "
               "(pre-RoPE projections), 'z.L' (heads' outputs before o_proj)")


@dataclass(frozen=True)
class Site:
    """One place to patch: ``kind`` in `KINDS` at decoder ``layer`` (None for embed)."""

    kind: str
    layer: int | None = None

    @classmethod
    def parse(cls, spec, n_layers: int) -> "Site":
        if isinstance(spec, Site):
            site = spec
        elif isinstance(spec, int) or (isinstance(spec, str) and spec.lstrip("-").isdigit()):
            site = cls("resid", int(spec))
        elif isinstance(spec, str) and spec == "embed":
            site = cls("embed")
        elif isinstance(spec, str) and spec.partition(".")[0] in KINDS and \
                spec.partition(".")[2].lstrip("-").isdigit():
            kind, _, layer = spec.partition(".")
            site = cls(kind, int(layer))
        else:
            raise ValueError(f"site {spec!r} is not understood; allowed: {_SITES_HELP}")
        if site.kind != "embed":
            if not -n_layers <= site.layer < n_layers:
                raise ValueError(f"site {spec!r}: layer {site.layer} is beyond the model's "
                                 f"{n_layers} decoder layers (0..{n_layers - 1})")
            site = cls(site.kind, site.layer % n_layers)
        return site

    def __str__(self) -> str:
        return "embed" if self.kind == "embed" else f"{self.kind}.{self.layer}"

    @property
    def per_head(self) -> bool:
        return self.kind in HEAD_KINDS

    @property
    def order(self) -> tuple[int, int]:
        """Sort key: the order in which one forward reaches the sites."""
        return (-1, -1) if self.kind == "embed" else (self.layer, _ORDER[self.kind])

    @property
    def first_layer(self) -> int:
        """The first decoder layer whose computation a patch here can change."""
        if self.kind == "embed":
            return 0
        return self.layer + 1 if self.kind == "resid" else self.layer

    def envoy(self, vlm) -> tuple:
        """``(site, at)`` for `vlminterp.interventions` (``at`` "input" or "output")."""
        if self.kind in ("embed", "resid"):
            if getattr(type(vlm), "residual", None) is not None:  # the VLM says where it is
                site = vlm.residual("embed" if self.kind == "embed" else self.layer)
                return site.envoy, site.at
            return (vlm.layers[0], "input") if self.kind == "embed" else \
                (vlm.layers[self.layer], "output")
        if self.kind in ("attn", "mlp"):
            layer = vlm.layers[self.layer]
            return (layer.self_attn if self.kind == "attn" else layer.mlp), "output"
        return head_site(vlm, self.layer, self.kind)


def sites(kind: str, layers="all", n_layers: int | None = None) -> list[str]:
    """Site specs of one kind: ``sites("resid", range(4))`` -> ["resid.0", ...]. ``"all"``
    needs ``n_layers``; ``kind="embed+resid"`` puts "embed" first (the causal-tracing grid)."""
    if layers == "all":
        if n_layers is None:
            raise ValueError("sites(..., 'all') needs n_layers=")
        layers = range(n_layers)
    prefix = ["embed"] if kind == "embed+resid" else []
    kind = "resid" if kind == "embed+resid" else kind
    return prefix + [f"{kind}.{int(i)}" for i in layers]


@dataclass(frozen=True)
class Condition:
    """One patched row: a site, its positions, its heads (None = the whole site), and the
    condition's index in the grid (for the labelled array)."""

    site: Site
    positions: Tensor
    heads: tuple[int, ...] | None = None
    index: tuple[int, ...] = ()

    @property
    def first_position(self) -> int:
        return int(self.positions.min())


@dataclass
class Grid:
    """``sites`` x ``positions`` (name -> token-slice spec such as ``"visual_frames:0:2"`` or
    explicit positions) [x ``heads``: head indices or ``"all"``; every site must then be a
    per-head one (q, k, v, z)]. A list of specs names each group by its spec."""

    sites: Sequence
    positions: Mapping[str, object] | Sequence[str]
    heads: object = None

    def resolve(self, vlm, layout, row: int) -> tuple[list[Condition], dict]:
        """The grid's conditions in row-major order, and ``(dims, coords)`` of its array."""
        n = vlm.n_layers
        parsed = [Site.parse(s, n) for s in self.sites]
        if not parsed:
            raise ValueError("grid.sites: empty")
        groups = (dict(self.positions) if isinstance(self.positions, Mapping)
                  else {str(s): s for s in self.positions})
        if not groups:
            raise ValueError("grid.positions: empty")
        resolved = {name: _positions(layout, spec, row, name) for name, spec in groups.items()}
        coords = {"site": [str(s) for s in parsed], "positions": list(groups)}
        if self.heads is None:
            conds = [Condition(s, p, None, (i, j)) for i, s in enumerate(parsed)
                     for j, p in enumerate(resolved.values())]
            return conds, coords
        bad = [str(s) for s in parsed if not s.per_head]
        if bad:
            raise ValueError(f"grid.heads: sites {bad} have no heads (per-head sites: "
                             f"{', '.join(HEAD_KINDS)})")
        counts = {s: heads_of(vlm, s.layer).count(s.kind) for s in parsed}
        head_list = (list(range(max(counts.values()))) if self.heads == "all"
                     else [int(h) for h in self.heads])
        coords["head"] = head_list
        conds = []
        for i, s in enumerate(parsed):
            for j, p in enumerate(resolved.values()):
                for k, h in enumerate(head_list):
                    if h < counts[s]:  # k/v under GQA have fewer heads: those cells stay NaN
                        conds.append(Condition(s, p, (h,), (i, j, k)))
        return conds, coords


def _positions(layout, spec, row: int, name: str) -> Tensor:
    if isinstance(spec, str):
        out = torch.cat([layout.positions(part, row) for part in spec.split("+")]).unique()
    else:
        out = torch.as_tensor(spec, dtype=torch.long).flatten().unique()
    if not len(out):
        raise ValueError(f"grid.positions[{name!r}]: selects no position")
    if out.max() >= layout[row].seq_len or out.min() < 0:
        raise ValueError(f"grid.positions[{name!r}]: positions outside the sequence of length "
                         f"{layout[row].seq_len}")
    return out


@dataclass
class SweepResult:
    """A labelled array of patching effects.

    ``values[i, j(, k)]`` is the effect on the metric of patching condition (site i, position
    group j(, head k)) from the source run into the destination run: metric(patched) -
    metric(destination) — measured (``method="exact"``) or estimated (attribution patching).
    NaN marks a cell that does not exist (a k/v head beyond n_kv_heads). ``source`` /
    ``destination`` are the unpatched runs' metrics; `normalised` divides by their difference
    (1 = the patch moves the metric all the way to the source run's)."""

    values: np.ndarray
    dims: tuple[str, ...]
    coords: dict[str, list]
    source: float
    destination: float
    method: str = "exact"
    n_positions: dict[str, int] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def normalised(self) -> np.ndarray:
        total = self.source - self.destination
        return np.full_like(self.values, np.nan) if total == 0 else self.values / total

    def records(self) -> list[dict]:
        """One dict per cell: the coordinates, ``value`` and ``normalised``."""
        norm = self.normalised()
        out = []
        for idx in np.ndindex(self.values.shape):
            labels = {d: self.coords[d][i] for d, i in zip(self.dims, idx)}
            out.append({**labels, "value": float(self.values[idx]),
                        "normalised": float(norm[idx])})
        return out

    def to_frame(self):
        """A long pandas DataFrame (one row per cell); needs pandas."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("SweepResult.to_frame needs pandas (pip install pandas); "
                              "SweepResult.records() gives the same rows as dicts") from None
        return pd.DataFrame(self.records())

    def top(self, k: int = 5, by_abs: bool = True) -> list[tuple]:
        """The ``k`` cells with the largest (absolute) values, as coordinate tuples."""
        flat = np.nan_to_num(np.abs(self.values) if by_abs else self.values, nan=-np.inf)
        order = np.argsort(-flat, axis=None, kind="stable")[:k]
        return [tuple(self.coords[d][i] for d, i in zip(self.dims, np.unravel_index(o, flat.shape)))
                for o in order]
