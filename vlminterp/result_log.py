"""Resumable per-sample results: a JSONL log keyed by the run's settings, and the strict-JSON
conversion every writer shares (NaN/inf → null, numpy/torch scalars → Python numbers)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor


def _jsonable(obj: Any) -> Any:
    """Plain JSON values: NaN/inf → None, numpy/torch scalars → Python numbers, arrays → lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.ndarray, np.generic, Tensor)):
        return _jsonable(obj.tolist())  # Tensor/np scalars .tolist() give Python numbers
    return obj


def _dumps(obj: Any, indent: int | None = None) -> str:
    return json.dumps(_jsonable(obj), indent=indent, allow_nan=False, ensure_ascii=False)


def config_hash(config: dict) -> str:
    """sha256 of the canonical JSON of ``config`` (sorted keys): the identity of a run's settings."""
    text = json.dumps(_jsonable(config), sort_keys=True, ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class ConfigMismatch(ValueError):
    """A results log written with other settings than this run's; ``differences`` maps each
    setting that differs to ``(old, new)``. The message is one line."""

    def __init__(self, path: Path, differences: dict[str, tuple], note: str = "") -> None:
        self.path, self.differences = path, differences
        shown = ", ".join(f"--{k} {_short(old)} -> {_short(new)}" for k, (old, new) in differences.items())
        super().__init__(f"{path} holds results of other settings ({note or shown}); rerun with "
                         f"the same settings to resume, or pass --restart to discard them and start over")


def _short(value: Any) -> str:
    text = json.dumps(_jsonable(value), ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


class ResultLog:
    """Resumable per-sample results: one JSONL line per finished sample, fsynced.

    Lines are ``{"key": k, "records": [...]}`` or ``{"key": k, "error": "..."}``. A key whose
    latest line is an error counts as done (a rerun skips it) unless ``retry_errors=True``.
    A truncated last line (the run was killed mid-write) is ignored with a warning and cut off
    before the next append.

    ``config``: the settings that change results (flag name -> value). The log's first line
    records them (``{"config": ..., "config_hash": ...}``, written with the first entry); reopening
    a log with other settings raises `ConfigMismatch` naming every setting that differs, and a
    log with entries but no recorded settings is refused too, so results of two configurations
    never mix. ``config=None`` skips the check.
    """

    def __init__(self, path: str | os.PathLike, *, retry_errors: bool = False,
                 config: dict | None = None) -> None:
        self.path = Path(path)
        self.retry_errors = retry_errors
        self.config = None if config is None else _jsonable(config)
        self._header: dict | None = None  # the config line read from the file
        self._entries: dict[str, dict] = {}  # key → latest line; re-adding moves it to the end
        self._good_end = 0  # byte offset just after the last complete line
        self._needs_repair = False  # the file's tail must be cut or newline-terminated first
        self._read()
        self._check_config()

    def _check_config(self) -> None:
        if self.config is None:
            return
        if self._header is None:
            if self._entries:
                raise ConfigMismatch(self.path, {}, "its settings were not recorded: it was written "
                                                    "by an older vlminterp")
            return
        if self._header.get("config_hash") == config_hash(self.config):
            return
        old, new = self._header.get("config") or {}, self.config
        differences = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
                       if old.get(k) != new.get(k)}
        raise ConfigMismatch(self.path, differences)

    def _read(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        pos, lineno = 0, 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            end = len(data) if nl < 0 else nl + 1
            raw, lineno = data[pos:end], lineno + 1
            if raw.strip():
                try:
                    entry = json.loads(raw)
                    if lineno == 1 and isinstance(entry, dict) and "config_hash" in entry \
                            and "key" not in entry:
                        self._header = entry
                        pos = self._good_end = end
                        continue
                    if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
                        raise ValueError("expected an object with a string 'key'")
                except ValueError as e:
                    if end < len(data):
                        raise ValueError(f"{self.path}:{lineno}: corrupt result line ({e})") from None
                    warnings.warn(f"{self.path}:{lineno}: ignoring truncated last line ({len(raw)} bytes)")
                    break
                self._entries.pop(entry["key"], None)
                self._entries[entry["key"]] = entry
            pos = self._good_end = end
        # cut a truncated tail, or add the newline a complete last line lacks, before appending
        self._needs_repair = self._good_end < len(data) or not data.endswith(b"\n")

    @property
    def done(self) -> set[str]:
        return {k for k, e in self._entries.items() if not (self.retry_errors and "error" in e)}

    @property
    def errors(self) -> dict[str, str]:
        return {k: e["error"] for k, e in self._entries.items() if "error" in e}

    def latest(self) -> dict[str, dict]:
        """Each key's latest line (``{"key", "records"}`` or ``{"key", "error"}``), in order of
        (latest) completion."""
        return dict(self._entries)

    def records(self) -> list[dict]:
        """All records, in order of (latest) completion, one entry per key (last write wins)."""
        return [r for e in self._entries.values() if "records" in e for r in e["records"]]

    def append(self, key: str, records: list[dict]) -> None:
        self._write({"key": key, "records": records})

    def append_error(self, key: str, message: str) -> None:
        self._write({"key": key, "error": message})

    def _write(self, entry: dict) -> None:
        text = _dumps(entry)
        line = (text + "\n").encode("utf-8")
        if self.config is not None and self._header is None:
            header = {"config": self.config, "config_hash": config_hash(self.config)}
            line = (_dumps(header) + "\n").encode("utf-8") + line
            self._header = header
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._needs_repair and self.path.exists():
            with open(self.path, "rb+") as f:
                f.truncate(self._good_end)
                f.seek(max(self._good_end - 1, 0))
                if self._good_end and f.read(1) != b"\n":
                    f.write(b"\n")
                    self._good_end += 1
                f.flush()
                os.fsync(f.fileno())
        self._needs_repair = False
        with open(self.path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self._good_end += len(line)
        self._entries.pop(entry["key"], None)
        self._entries[entry["key"]] = json.loads(text)
