"""Bad input caught before long work, each as one line naming the flag, file or model.

`RecipeError` is a problem with the run's flags or files: the recipe stops with its message
(exit 2, no traceback). `SampleError` is a problem with one sample's data: the recipe records it
as that sample's error and goes on. `check_output`, `check_device` and `load_checked` run before
any model or data work.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path


class RecipeError(ValueError):
    """A flag, file or model that cannot work for this run; the message is one line."""


class SampleError(ValueError):
    """One sample's data cannot be used (missing answer, unreadable video, ...): recorded as
    that sample's error, and the run goes on."""


def check_output(path: str | os.PathLike, flag: str = "--output") -> Path:
    """``path`` can be written as a file: not a directory, and its folder can be created and
    written to (a probe file is created and removed). Raises `RecipeError`."""
    path = Path(path)
    if path.is_dir():
        raise RecipeError(f"{flag} {str(path)!r} is a directory; give a file path such as "
                          f"{str(path / 'result.json')!r}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RecipeError(f"{flag} {str(path)!r}: cannot create its folder ({e.strerror or e})") from None
    probe = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.probe")
    try:
        probe.write_bytes(b"")
    except OSError as e:
        raise RecipeError(f"{flag} {str(path)!r}: its folder is not writable ({e.strerror or e})") from None
    finally:
        probe.unlink(missing_ok=True)
    return path


def check_device(spec: str | None, flag: str = "--device") -> str:
    """A usable torch device string (``None``: cuda if available, else cpu). Raises
    `RecipeError` for a malformed device or one this machine does not have."""
    import torch

    if spec is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise RecipeError(f"{flag} {spec!r}: not a torch device (expected cpu, cuda, cuda:N "
                          f"or mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RecipeError(f"{flag} {spec!r}: no CUDA device is available on this machine; "
                              f"use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise RecipeError(f"{flag} {spec!r}: this machine has {count} CUDA device(s) "
                              f"(cuda:0..cuda:{count - 1})")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise RecipeError(f"{flag} {spec!r}: MPS is not available on this machine; use --device cpu")
    elif dev.type != "cpu":
        raise RecipeError(f"{flag} {spec!r}: unsupported device type {dev.type!r} (use cpu, cuda "
                          f"or mps)")
    return spec


def _path_like(model_id: str) -> bool:
    return os.path.isabs(model_id) or model_id.startswith((".", "~"))


def _snapshot_dir(model_id: str) -> str | None:
    """The local copy of a hub id in the Hugging Face cache, if any (no network)."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model_id, local_files_only=True)
    except Exception:  # not cached, or not a valid repo id
        return None


def bad_checkpoint_file(directory: str | os.PathLike) -> str | None:
    """``"FILE: reason"`` for the first ``*.safetensors`` in ``directory`` whose header is
    corrupt or whose data is truncated, else None."""
    from safetensors import safe_open

    for path in sorted(Path(directory).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                f.keys()
        except Exception as e:  # SafetensorError: bad header, truncated data
            return f"{path}: {_first_line(e)}"
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _diagnosis(model_id: str) -> tuple[str | None, str | None]:
    """``(message, local dir)``: a missing directory or a corrupt/truncated shard, if either."""
    expanded = os.path.expanduser(model_id)
    if _path_like(model_id) and not os.path.exists(expanded):
        return f"model_id {model_id!r}: no such directory", None
    local = expanded if os.path.isdir(expanded) else _snapshot_dir(model_id)
    bad = bad_checkpoint_file(local) if local else None
    if bad:
        return f"model_id {model_id!r}: corrupt or truncated checkpoint file {bad}", local
    return None, local


def describe_load_error(model_id: str, error: BaseException) -> str:
    """One line saying why ``model_id`` did not load: no such directory, a corrupt or truncated
    safetensors file (named), not cached with no hub, else the loader's own first line (a
    vlminterp ValueError as it is; anything else with its type)."""
    message, local = _diagnosis(model_id)
    if message:
        return message
    text = str(error)
    if local is None and any(s in text for s in ("couldn't connect", "offline", "Connection",
                                                  "not a valid model identifier",
                                                  "does not appear to have", "404")):
        return (f"model_id {model_id!r}: not in the local Hugging Face cache and the hub "
                f"cannot be reached or has no such model; download it first (hf download "
                f"{model_id}) or give a local directory saved with save_pretrained")
    if local and not os.path.isfile(os.path.join(local, "config.json")):
        return f"model_id {model_id!r}: {local} has no config.json (not a saved checkpoint)"
    if type(error) is ValueError:  # vlminterp's own message
        return _first_line(error)
    return f"model_id {model_id!r}: cannot load it ({type(error).__name__}: {_first_line(error)})"


def load_checked(model_id: str, **kwargs):
    """`vlminterp.load` with every loading failure as a one-line `RecipeError` (see
    `describe_load_error`)."""
    from vlminterp.models import load

    try:
        return load(model_id, **kwargs)
    except RecipeError:
        raise
    except Exception as e:  # ValueError, OSError, SafetensorError, HFValidationError, ...
        raise RecipeError(describe_load_error(model_id, e)) from None
