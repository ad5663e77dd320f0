"""Results and activations on disk: atomic JSON, resumable JSONL logs (`ResultLog`, defined in
`vlminterp.result_log`), safetensors shards.

Nothing here pickles: activations are safetensors + a JSON index, and legacy ``*.pt`` files are
read with ``torch.load(weights_only=True)`` only. Every writer is crash-safe (temp file + fsync +
``os.replace``) so a killed run leaves either the old file or the new one, never half of one.
Single writer per file: concurrent writers to one log or store are not supported.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .result_log import ConfigMismatch, ResultLog, _dumps, _jsonable, config_hash

__all__ = ["atomic_write", "write_json_atomic", "clean_stale_temps", "stale_temp_files",
           "ResultLog", "ConfigMismatch", "config_hash", "ActivationStore", "streaming_mean",
           "legacy_ndim", "save_vector", "load_vector", "vector_meta"]


def _fsync_dir(directory: Path) -> None:
    """Persist a rename itself (best effort: not every platform can open a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a fresh temp path beside ``path``, fsync it, then rename over ``path``.
    Temp files an earlier, killed write of ``path`` left behind are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps([path])
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")  # created by write(): umask perms
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as strict JSON (indent=2, NaN/inf as null); the old file survives any failure."""
    text = _dumps(obj, indent=2) + "\n"  # serialise first: a TypeError here touches no file
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Temp files that a killed `atomic_write` of ``path`` left beside it (``.NAME.*.tmp``)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.glob(f".{glob_escape(path.name)}.*.tmp") if p.is_file())


def clean_stale_temps(paths) -> int:
    """Remove the temp files killed atomic writes of ``paths`` left behind; returns how many.
    Only temps named after these paths are touched (other writers in the folder are not)."""
    removed = 0
    for path in paths:
        for tmp in stale_temp_files(path):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


class ActivationStore:
    """Named tensors per key in ``root/shards/<n>.safetensors``, indexed by ``root/index.json``.

    Each ``put`` writes one shard, then rewrites the index (O(number of keys)); both atomically,
    so a crash leaves at worst an unreferenced shard. Keys are arbitrary strings kept in the index;
    tensor names in shard files are ``t0, t1, ...``. Re-putting a key keeps its position.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.index_path = self.root / "index.json"
        self._index: dict[str, dict] = {}
        if self.index_path.exists():
            try:
                index = json.loads(self.index_path.read_text(encoding="utf-8"))
                if not isinstance(index, dict) or not all(
                    isinstance(v, dict) and isinstance(v.get("shard"), str) and isinstance(v.get("names"), list)
                    for v in index.values()
                ):
                    raise ValueError("expected an object mapping keys to {shard, names, ...} entries")
            except (ValueError, UnicodeDecodeError) as e:
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise ValueError(f"{self.index_path}: corrupt activation-store index ({msg})") from None
            self._index = index
        shards = self.root / "shards"
        self._clean_killed_writes(shards)
        files = [p.name for p in shards.glob("*.safetensors")] if shards.exists() else []
        stems = [f.split(".")[0] for f in files + [e["shard"] for e in self._index.values()]]
        self._next_shard = max((int(s) for s in stems if s.isdigit()), default=-1) + 1

    def _clean_killed_writes(self, shards: Path) -> None:
        """Remove what a killed `put` left: temp files, and a shard written before the index
        that would have referenced it."""
        clean_stale_temps([self.index_path])
        if not shards.is_dir():
            return
        referenced = {e["shard"] for e in self._index.values()}
        for p in shards.iterdir():
            if p.is_file() and (p.name.endswith(".tmp") or
                                p.suffix == ".safetensors" and p.name not in referenced):
                p.unlink(missing_ok=True)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def keys(self) -> list[str]:
        return list(self._index)

    def _entry(self, key: str) -> dict:
        if key not in self._index:
            raise KeyError(f"{key!r} is not in the activation store at {self.root}")
        return self._index[key]

    def names(self, key: str) -> list[str]:
        return list(self._entry(key)["names"])

    def meta(self, key: str) -> dict:
        return dict(self._entry(key).get("meta", {}))

    def put(self, key: str, tensors: dict[str, Tensor], meta: dict | None = None) -> None:
        names = list(tensors)
        for name, t in tensors.items():
            if not isinstance(t, Tensor):
                raise TypeError(f"tensors[{name!r}] for key {key!r}: expected a Tensor, got {type(t).__name__}")
        # clone: safetensors refuses views that share storage; contiguous for its byte layout
        payload = {f"t{i}": tensors[n].detach().to("cpu").contiguous().clone() for i, n in enumerate(names)}
        shard = f"{self._next_shard}.safetensors"
        self._next_shard += 1
        atomic_write(self.root / "shards" / shard, lambda tmp: save_file(payload, str(tmp)))
        old = self._index.get(key)
        self._index[key] = {
            "shard": shard,
            "names": names,
            "shapes": {n: list(tensors[n].shape) for n in names},
            "dtypes": {n: str(tensors[n].dtype).removeprefix("torch.") for n in names},
            "meta": _jsonable(meta or {}),
        }
        write_json_atomic(self.index_path, self._index)
        if old is not None and old["shard"] != shard:
            (self.root / "shards" / old["shard"]).unlink(missing_ok=True)

    def get(self, key: str, names: list[str] | None = None) -> dict[str, Tensor]:
        entry = self._entry(key)
        stored = entry["names"]
        wanted = stored if names is None else names
        missing = [n for n in wanted if n not in stored]
        if missing:
            raise KeyError(f"key {key!r} has no tensors {missing}; it has {stored}")
        with safe_open(str(self.root / "shards" / entry["shard"]), framework="pt", device="cpu") as f:
            return {n: f.get_tensor(f"t{stored.index(n)}") for n in wanted}

    def iter(self, names: list[str] | None = None) -> Iterator[tuple[str, dict[str, Tensor]]]:
        """``(key, tensors)`` in insertion order, loading one shard at a time."""
        for key in list(self._index):
            yield key, self.get(key, names)


def _legacy_tensor(path: Path, name: str) -> Tensor:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for anything beyond tensors and containers
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: refused by torch.load(weights_only=True): {first}") from e
    if isinstance(obj, Tensor):
        return obj
    if isinstance(obj, dict) and isinstance(obj.get(name), Tensor):
        return obj[name]
    raise ValueError(f"{path}: expected a tensor or a dict with tensor {name!r}, got {type(obj).__name__}")


def legacy_ndim(directory: str | os.PathLike, name: str) -> int | None:
    """Dimensions of tensor ``name`` in the first legacy ``*.pt`` file of ``directory`` (None
    when there is none)."""
    first = next(iter(sorted(Path(directory).glob("*.pt"))), None)
    return None if first is None else _legacy_tensor(first, name).ndim


def _named_tensors(source: ActivationStore | str | os.PathLike, name: str) -> Iterator[tuple[str, Tensor]]:
    if isinstance(source, ActivationStore):
        store = source
    elif (Path(source) / "index.json").exists():
        store = ActivationStore(source)
    else:
        for path in sorted(Path(source).glob("*.pt")):
            yield path.name, _legacy_tensor(path, name)
        return
    for key in store.keys():
        if name not in store.names(key):
            raise ValueError(f"key {key!r} in {store.root} has no tensor {name!r} (it has {store.names(key)})")
        yield key, store.get(key, [name])[name]


def streaming_mean(
    store_or_dir: ActivationStore | str | os.PathLike, name: str, over: str | None = None
) -> Float[Tensor, "*shape"]:
    """Mean of tensor ``name`` over all keys, as a float64 running sum (constant memory).

    ``over=None``: each stored tensor is one sample (any shape, the same for every key).
    ``over="rows"``: each stored tensor is ``[..., d]`` (``[n, d]``, or the original scripts'
    ``[1, N, d]`` caches, N differing between files) and every d-vector of every key is a sample.
    ``store_or_dir`` is an ActivationStore, its root, or a directory of legacy ``*.pt`` files.
    """
    if over not in (None, "rows"):
        raise ValueError(f"over: expected None or 'rows', got {over!r}")
    where = store_or_dir.root if isinstance(store_or_dir, ActivationStore) else Path(store_or_dir)
    total: Tensor | None = None
    count = 0
    first_key = ""
    for key, t in _named_tensors(store_or_dir, name):
        if over == "rows":
            if t.ndim < 2:
                raise ValueError(f"key {key!r}: over='rows' needs a [..., d] tensor {name!r} of at "
                                 f"least 2 dimensions, got shape {tuple(t.shape)}")
            t = t.reshape(-1, t.shape[-1])
        sample_shape = tuple(t.shape[1:]) if over == "rows" else tuple(t.shape)
        if total is not None and sample_shape != tuple(total.shape):
            raise ValueError(
                f"key {key!r}: tensor {name!r} has sample shape {sample_shape}, "
                f"but key {first_key!r} had {tuple(total.shape)}"
            )
        t64 = t.to(torch.float64)
        part = t64.sum(0) if over == "rows" else t64
        total = part if total is None else total + part
        first_key = first_key or key
        count += t.shape[0] if over == "rows" else 1
    if total is None or count == 0:
        raise ValueError(f"{where}: no samples of tensor {name!r} (empty store or directory)")
    return (total / count).to(torch.float32)


def _vector_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / "mean_vector.safetensors" if path.is_dir() else path


def save_vector(path: str | os.PathLike, vector: Float[Tensor, " d"], meta: dict | None = None) -> Path:
    """Save one vector as safetensors (tensor ``mean_vector``; ``meta`` as string metadata, non-strings
    JSON-encoded). A directory ``path`` gets ``path/mean_vector.safetensors``."""
    metadata = {str(k): v if isinstance(v, str) else _dumps(v) for k, v in (meta or {}).items()}
    payload = {"mean_vector": vector.detach().to("cpu").contiguous().clone()}
    return atomic_write(_vector_file(path), lambda tmp: save_file(payload, str(tmp), metadata=metadata))


def load_vector(path: str | os.PathLike) -> Float[Tensor, " d"]:
    with safe_open(str(_vector_file(path)), framework="pt", device="cpu") as f:
        return f.get_tensor("mean_vector")


def vector_meta(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata saved with a vector by ``save_vector``."""
    with safe_open(str(_vector_file(path)), framework="pt", device="cpu") as f:
        return dict(f.metadata() or {})
