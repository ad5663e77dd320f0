"""The CLIP ViT circuit pipeline: trace → cluster → fit → paths → causal (see each module).

Pipeline files. A step's ``--out P`` names a *stem*: ``P`` minus a ``.json``, ``.safetensors``,
``.pt`` or ``.pth`` suffix. Each step writes ``<stem>.json`` (strict JSON: scalars, strings,
lists, the file's ``format``) plus its arrays: ``<stem>.safetensors`` for features and fits, a
sharded `vlminterp.store.ActivationStore` ``<stem>.shards/`` (one shard per traced batch) for
traces. Readers accept the same ``P`` (any of those suffixes) or the ``.json`` itself, so the
original runners' ``--out x.pt`` / ``--trace x.pt`` arguments keep working unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from vlminterp.store import ActivationStore, atomic_write, write_json_atomic

from .causal import (ClusterIntervention, TargetEdgeEffect, cluster_interventions, edge_columns, row_effects,
                     target_edge_effects)
from .cluster import GateClusters, cluster_gates
from .fit import PrototypeAccumulator, PrototypeFit, ReconstructionScore, fit_prototypes, mse_r2, reconstruct
from .paths import CircuitPath, group_paths, save_head_heatmaps, token_names, top_k_paths
from .trace import (attention_logits, attention_logits_of, capture_batch, check_layers, clip_model_id,
                    image_source, pretrained_tag, synthetic_image)

_SUFFIXES = {".json", ".safetensors", ".pt", ".pth"}


class ArtifactPaths(NamedTuple):
    json: Path
    arrays: Path
    shards: Path


def artifact_paths(path: str | os.PathLike) -> ArtifactPaths:
    p = Path(path)
    stem = p.with_suffix("") if p.suffix.lower() in _SUFFIXES else p
    return ArtifactPaths(stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".safetensors"),
                         stem.with_name(stem.name + ".shards"))


def _read_meta(path: str | os.PathLike, kind: str) -> tuple[Path, dict[str, Any]]:
    where = artifact_paths(path).json
    if not where.is_file():
        raise ValueError(f"{kind} file {where} does not exist")
    try:
        meta = json.loads(where.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{kind} file {where} is not valid JSON ({str(e).splitlines()[0]})") from None
    got = meta.get("format", "?") if isinstance(meta, dict) else "?"
    if got != f"vlminterp.circuits/{kind}":
        raise ValueError(f"{where} is not a {kind} file (its format is {got!r})")
    return where, meta


def hash_tensors(h, tensors: dict[str, Tensor]) -> None:
    """Feed names, dtypes, shapes and raw bytes of ``tensors`` (sorted by name) to hashlib ``h``."""
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())


def fingerprint(tensors: dict[str, Tensor], upstream: dict[str, Any] | None = None) -> str:
    """Content fingerprint (sha256 prefix) of arrays plus the fingerprints they derive from:
    files made from different traces differ even when every shape agrees."""
    h = hashlib.sha256(json.dumps(upstream or {}, sort_keys=True).encode())
    hash_tensors(h, tensors)
    return h.hexdigest()[:32]


def save_artifact(path: str | os.PathLike, kind: str, meta: dict[str, Any], arrays: dict[str, Tensor]) -> Path:
    """``<stem>.safetensors`` (arrays) then ``<stem>.json`` (meta + format + array names + the
    artifact's ``fingerprint``, over its arrays and the ``*_fingerprint`` entries of ``meta``)."""
    paths = artifact_paths(path)
    payload = {k: v.detach().to("cpu").contiguous().clone() for k, v in arrays.items()}
    atomic_write(paths.arrays, lambda tmp: save_file(payload, str(tmp)))
    upstream = {k: v for k, v in meta.items() if k.endswith("_fingerprint")}
    doc = {"format": f"vlminterp.circuits/{kind}", **meta, "arrays": paths.arrays.name,
           "array_keys": list(arrays), "fingerprint": fingerprint(payload, upstream)}
    return write_json_atomic(paths.json, doc)


def load_artifact(path: str | os.PathLike, kind: str) -> dict[str, Any]:
    """The JSON metadata merged with the arrays: the original runners' dict, key for key."""
    where, meta = _read_meta(path, kind)
    arrays = where.with_name(meta["arrays"])
    if not arrays.is_file():
        raise ValueError(f"{kind} file {where} names arrays {arrays}, which do not exist")
    with safe_open(str(arrays), framework="pt", device="cpu") as f:
        meta.update({k: f.get_tensor(k) for k in f.keys()})
    return meta


class TraceWriter:
    """Streams a trace to disk: `add` writes one shard per batch, `close` writes the JSON index."""

    def __init__(self, out: str | os.PathLike, meta: dict[str, Any]) -> None:
        self.paths = artifact_paths(out)
        self.paths.json.unlink(missing_ok=True)  # a run that dies midway must not leave an old index
        if self.paths.shards.exists():
            if not (self.paths.shards / "index.json").is_file():
                raise ValueError(f"{self.paths.shards} exists and is not a trace store; not overwriting it")
            shutil.rmtree(self.paths.shards)
        self.store = ActivationStore(self.paths.shards)
        self.meta, self.images, self.batches, self.keys = dict(meta), [], [], {}
        self._hash = hashlib.sha256()

    def add(self, ids: list[str], tensors: dict[str, Tensor]) -> None:
        self._hash.update(json.dumps(ids).encode())
        hash_tensors(self._hash, tensors)
        key = f"batch-{len(self.batches):05d}"
        self.store.put(key, tensors, meta={"rows": len(ids)})
        self.images.extend(ids)
        self.batches.append({"key": key, "rows": len(ids)})
        for name, t in tensors.items():
            self.keys[name] = {"shape": [len(self.images), *t.shape[1:]], "dtype": str(t.dtype).removeprefix("torch.")}

    def close(self) -> Path:
        if not self.batches:
            raise ValueError("tracing produced no images")
        self._hash.update(json.dumps(self.meta, sort_keys=True, default=str).encode())
        doc = {"format": "vlminterp.circuits/trace", "images": self.images, **self.meta,
               "keys": self.keys, "shards": self.paths.shards.name, "batches": self.batches,
               "fingerprint": self._hash.hexdigest()[:32]}
        return write_json_atomic(self.paths.json, doc)


class TraceFile:
    """A trace on disk: ``meta`` (images, layer, next_layer, keys → shape/dtype, ...) plus the
    tensors, read one batch shard at a time by `batches` or whole by `tensor`."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path, self.meta = _read_meta(path, "trace")
        shards = self.path.with_name(self.meta["shards"])
        if not (shards / "index.json").is_file():
            raise ValueError(f"trace file {self.path} names shards {shards}, which do not exist")
        self.store = ActivationStore(shards)

    @property
    def images(self) -> list[str]:
        return list(self.meta["images"])

    @property
    def fingerprint(self) -> str | None:
        """Content fingerprint of the traced tensors, images and settings (None: an older trace)."""
        return self.meta.get("fingerprint")

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.meta["keys"]:
            raise ValueError(f"trace file {self.path} has no {name!r} (it has {', '.join(self.meta['keys'])})")
        return tuple(self.meta["keys"][name]["shape"])

    def batches(self, names: list[str]) -> Iterator[tuple[slice, dict[str, Tensor]]]:
        """``(rows, tensors)`` per shard; ``rows`` is the shard's slice of the image axis."""
        for name in names:
            self.shape(name)
        start = 0
        for batch in self.meta["batches"]:
            rows = slice(start, start + batch["rows"])
            start = rows.stop
            yield rows, self.store.get(batch["key"], names)

    def tensor(self, name: str) -> Tensor:
        return torch.cat([t[name] for _, t in self.batches([name])], dim=0)


def load_trace(path: str | os.PathLike) -> TraceFile:
    return TraceFile(path)


def check_features_match_trace(trace: TraceFile, features: dict[str, Any], features_path: str | os.PathLike) -> None:
    """The labels must cover the trace's images × tokens, at the same layers."""
    b, _, n, _ = trace.shape("attn_logits_l1")
    got = tuple(features["labels"].shape)
    if got != (b, n):
        raise ValueError(f"features file {features_path} has labels for {got[0]} images × {got[-1]} tokens but "
                         f"trace file {trace.path} has {b} images × {n} tokens: they come from different traces")
    for key in ("layer", "next_layer"):
        if features.get(key) != trace.meta.get(key):
            raise ValueError(f"features file {features_path} is for {key} {features.get(key)} but trace file "
                             f"{trace.path} is for {key} {trace.meta.get(key)}")
    _same_source(features.get("trace_fingerprint"), trace.fingerprint,
                 f"features file {features_path}", f"trace file {trace.path}", "clip_cluster")


def _same_source(recorded: str | None, actual: str | None, child: str, parent: str, step: str) -> None:
    """``child`` was made from ``parent``: its recorded fingerprint of the parent matches."""
    if recorded is None or actual is None:
        warnings.warn(f"{child} or {parent} has no fingerprint (written by an older vlminterp): "
                      f"cannot check that one was made from the other")
    elif recorded != actual:
        raise ValueError(f"{child} was made from another file than {parent} (fingerprint "
                         f"{recorded[:12]} != {actual[:12]}; same shapes, different data): rerun "
                         f"recipes.{step} on it")


def check_circuit_matches_fit(circuit: dict[str, Any], circuit_path: str | os.PathLike, fit: dict[str, Any],
                              fit_path: str | os.PathLike) -> None:
    """The circuit's paths were exported from this fit."""
    _same_source(circuit.get("fit_fingerprint"), fit.get("fingerprint"), f"circuit file {circuit_path}",
                 f"fit file {fit_path}", "clip_circuit")


def check_fit_matches_features(fit: dict[str, Any], fit_path: str | os.PathLike, features: dict[str, Any],
                               features_path: str | os.PathLike) -> None:
    """The fit's counts must be the cluster sizes of these labels (and its tokens their tokens)."""
    labels, protos = features["labels"], fit["prototypes"]
    sizes = torch.bincount(labels.reshape(-1).long(), minlength=protos.shape[0])
    if protos.shape[-1] != labels.shape[-1] or not torch.equal(sizes, fit["counts"].long()):
        raise ValueError(f"fit file {fit_path} (K={protos.shape[0]}, N={protos.shape[-1]}) was not fitted on the "
                         f"labels of features file {features_path} (N={labels.shape[-1]}): cluster sizes differ")
    _same_source(fit.get("features_fingerprint"), features.get("fingerprint"), f"fit file {fit_path}",
                 f"features file {features_path}", "clip_fit")


__all__ = [
    "ArtifactPaths", "artifact_paths", "save_artifact", "load_artifact", "TraceWriter", "TraceFile", "load_trace",
    "check_features_match_trace", "check_fit_matches_features", "check_circuit_matches_fit", "fingerprint",
    "hash_tensors", "clip_model_id", "pretrained_tag",
    "attention_logits", "attention_logits_of", "capture_batch", "check_layers", "image_source", "synthetic_image",
    "GateClusters", "cluster_gates",
    "PrototypeFit", "PrototypeAccumulator", "ReconstructionScore", "fit_prototypes", "reconstruct", "mse_r2",
    "CircuitPath", "top_k_paths", "group_paths", "save_head_heatmaps", "token_names",
    "ClusterIntervention", "TargetEdgeEffect", "cluster_interventions", "row_effects", "edge_columns",
    "target_edge_effects",
]
