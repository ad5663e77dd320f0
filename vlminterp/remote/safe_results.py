"""Load NDIF server responses without letting the server run code on this machine.

nnsight 0.8.1's `RemoteBackend` unpickles every result (and every binary websocket frame) with
``torch.load(weights_only=False)``: a malicious or intercepted server can send a pickle whose
``__reduce__`` runs any function on the client. vlminterp's backend (`vlminterp.remote.backend`)
loads them with `load_result` instead: ``torch.load`` with a restricted unpickler whose
``find_class`` resolves only an allow-list of types, so a pickle naming anything else is refused
before any of its objects is built. The allow-list is what nnsight results hold:

* torch's own ``weights_only`` set (tensors of every dtype and layout, ``torch.Size``, devices,
  dtypes, ``OrderedDict``, ``set``, ...) plus ``slice``, ``range`` and ``frozenset``;
* numpy arrays and scalars;
* transformers' model outputs (``ModelOutput`` subclasses) and key/value caches;
* nnsight's ``Status`` (in response frames) and its activation ``Cache`` / ``Entry``.

Anything else — a saved object of your own class — raises `UnsafeResultError` naming the type;
`allow_result_type` adds a class you trust.
"""

from __future__ import annotations

import _compat_pickle
import importlib
import io
import pickle
import types

import torch

_EXTRA = {
    "builtins.slice": slice, "builtins.range": range, "builtins.frozenset": frozenset,
}
_NUMPY = ("numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
          "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.ndarray",
          "numpy.dtype")
_NNSIGHT = ("nnsight.schema.response.Status", "nnsight.intervention.cache.Cache",
            "nnsight.intervention.cache.Entry")
_USER: dict[str, type] = {}


class UnsafeResultError(pickle.UnpicklingError):
    """A server response names a type outside the allow-list; nothing of it was built."""


def allow_result_type(cls: type) -> None:
    """Trust ``cls`` in remote results too (a class of yours that you save inside traces)."""
    _USER[f"{cls.__module__}.{cls.__qualname__}"] = cls


def _torch_allowed() -> dict:
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        return dict(_get_allowed_globals())
    except (ImportError, AttributeError):  # a torch without the helper: tensors and dtypes
        import torch._utils as tu

        base = {f"torch._utils.{n}": getattr(tu, n) for n in dir(tu) if n.startswith("_rebuild_")}
        base.update({f"torch.{n}": getattr(torch, n) for n in dir(torch)
                     if isinstance(getattr(torch, n, None), torch.dtype)})
        base.update({"torch.Size": torch.Size, "torch.device": torch.device})
        return base


def _import(name: str):
    module, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None


def _numpy_dtypes() -> dict:
    try:
        import numpy.dtypes as nd
    except ImportError:
        return {}
    return {f"numpy.dtypes.{n}": getattr(nd, n) for n in getattr(nd, "__all__", [])}


def _transformers_type(module: str, name: str):
    """A transformers model-output or cache class named ``module.name``, else None. Only
    modules inside the installed transformers package are imported to find out."""
    if not module.startswith("transformers."):
        return None
    obj = _import(f"{module}.{name}")
    if not isinstance(obj, type):
        return None
    from transformers.utils import ModelOutput

    bases = [ModelOutput]
    for base in ("Cache", "CacheLayerMixin"):
        cls = _import(f"transformers.cache_utils.{base}")
        if cls is not None:
            bases.append(cls)
    return obj if issubclass(obj, tuple(bases)) else None


_ALLOWED: dict | None = None


def allowed_globals() -> dict:
    """``{"module.name": object}`` every result may name (built once), plus `allow_result_type`'s."""
    global _ALLOWED
    if _ALLOWED is None:
        allowed = {**_torch_allowed(), **_EXTRA, **_numpy_dtypes()}
        for name in _NUMPY + _NNSIGHT:
            obj = _import(name)
            if obj is not None:
                allowed[name] = obj
        _ALLOWED = allowed
    return {**_ALLOWED, **_USER}


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only allow-listed globals (see the module doc)."""

    def find_class(self, module: str, name: str):
        # protocol 2 (torch.save's default) names Python 2 modules, e.g. __builtin__.set
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        obj = allowed_globals().get(full)
        if obj is None:
            obj = _transformers_type(module, name)
        if obj is None:
            raise UnsafeResultError(f"refused to load {full}: not a type nnsight results hold "
                                    f"(vlminterp.remote.allow_result_type trusts a class of yours)")
        return obj


def _restricted_load(file, **kwargs):
    return RestrictedUnpickler(file, **kwargs).load()


# torch.load(pickle_module=...) takes a module with Unpickler and load.
restricted_pickle = types.ModuleType("vlminterp_restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler
restricted_pickle.load = _restricted_load
restricted_pickle.__dict__.update({k: getattr(pickle, k) for k in ("UnpicklingError", "HIGHEST_PROTOCOL")})


def load_result(content: bytes):
    """``torch.load`` of a server response's bytes with the restricted unpickler; raises
    `UnsafeResultError` (naming the refused type): nothing outside the list is ever called."""
    return torch.load(io.BytesIO(content), map_location="cpu", weights_only=False,
                      pickle_module=restricted_pickle)
