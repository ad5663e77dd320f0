"""Why a checkpoint cannot load, as one line: no such directory, a corrupt or truncated
safetensors file (named), a hub id neither cached nor reachable. `load` raises these itself."""

from __future__ import annotations

import os
from pathlib import Path

HUB_UNREACHABLE = ("couldn't connect", "offline", "Connection", "not a valid model identifier",
                   "does not appear to have", "404", "is not a local folder")


def path_like(model_id: str) -> bool:
    """Written as a path (absolute, ``./``, ``../``, ``~``), so never a hub id."""
    return os.path.isabs(model_id) or model_id.startswith((".", "~"))


def snapshot_dir(model_id: str) -> str | None:
    """The local copy of a hub id in the Hugging Face cache, if any (no network)."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model_id, local_files_only=True)
    except Exception:  # not cached, or not a valid repo id
        return None


def local_dir(model_id: str) -> str | None:
    """The folder ``model_id`` loads from: itself, or its cached hub snapshot."""
    expanded = os.path.expanduser(model_id)
    return expanded if os.path.isdir(expanded) else snapshot_dir(model_id)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def bad_checkpoint_file(directory: str | os.PathLike) -> str | None:
    """``"FILE: reason"`` for the first ``*.safetensors`` in ``directory`` whose header is
    corrupt or whose data is truncated (headers only are read), else None."""
    from safetensors import safe_open

    for path in sorted(Path(directory).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                f.keys()
        except Exception as e:  # SafetensorError: bad header, truncated data
            return f"{path}: {_first_line(e)}"
    return None


def missing_directory(model_id: str) -> str | None:
    if path_like(model_id) and not os.path.exists(os.path.expanduser(model_id)):
        return f"model_id {model_id!r}: no such directory"
    return None


def corrupt_file(model_id: str, directory: str | None) -> str | None:
    bad = bad_checkpoint_file(directory) if directory else None
    return f"model_id {model_id!r}: corrupt or truncated checkpoint file {bad}" if bad else None


def unreachable(model_id: str, error: BaseException) -> str | None:
    """The one line for a hub id that is not cached when the hub cannot be reached or has no
    such model, judged from the loader's ``error``; None if that is not the problem (or
    ``model_id`` is not written as a hub id, ``org/name``)."""
    hub_like = model_id.count("/") == 1 and not path_like(model_id)
    if not hub_like or snapshot_dir(model_id) is not None \
            or not any(s in str(error) for s in HUB_UNREACHABLE):
        return None
    return (f"model_id {model_id!r}: not in the local Hugging Face cache and the hub cannot be "
            f"reached or has no such model; download it first (hf download {model_id}) or give "
            f"a local directory saved with save_pretrained")
