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


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _diagnosis(model_id: str) -> tuple[str | None, str | None]:
    """``(message, local dir)``: a missing directory or a corrupt/truncated shard, if either."""
    from .models import checkpoint

    missing = checkpoint.missing_directory(model_id)
    if missing:
        return missing, None
    local = checkpoint.local_dir(model_id)
    return checkpoint.corrupt_file(model_id, local), local


def describe_load_error(model_id: str, error: BaseException) -> str:
    """One line saying why ``model_id`` did not load: no such directory, a corrupt or truncated
    safetensors file (named), not cached with no hub, else the loader's own first line (a
    vlminterp ValueError as it is; anything else with its type)."""
    from .models import checkpoint

    message, local = _diagnosis(model_id)
    if message:
        return message
    unreachable = checkpoint.unreachable(model_id, error) if local is None else None
    if unreachable:
        return unreachable
    if local and not os.path.isfile(os.path.join(local, "config.json")):
        return f"model_id {model_id!r}: {local} has no config.json (not a saved checkpoint)"
    if type(error) is ValueError:  # vlminterp's own message
        return _first_line(error)
    return f"model_id {model_id!r}: cannot load it ({type(error).__name__}: {_first_line(error)})"


def bad_checkpoint_file(directory: str | os.PathLike) -> str | None:
    """See `vlminterp.models.checkpoint.bad_checkpoint_file`."""
    from .models.checkpoint import bad_checkpoint_file as bad

    return bad(directory)


def load_checked(model_id: str, **kwargs):
    """`vlminterp.load` with every loading failure as a one-line `RecipeError`. `load` itself
    names a missing directory, a corrupt file and an unreachable hub; `describe_load_error`
    gives the rest one line too."""
    from vlminterp.models import load

    try:
        return load(model_id, **kwargs)
    except RecipeError:
        raise
    except Exception as e:  # ValueError, OSError, SafetensorError, HFValidationError, ...
        raise RecipeError(describe_load_error(model_id, e)) from None
