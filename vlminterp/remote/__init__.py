"""Run vlminterp programs on an NDIF server: the same traced block, with ``remote=True``.

    vlm = load_remote("llava-hf/llava-1.5-7b-hf")            # host/key from NDIF_HOST/NDIF_API_KEY
    inputs = vlm.prepare(text="What is this?", images=[img])
    with vlm.trace(inputs, remote=True):
        h = vlm.layers[10].output.save()

``vlm.model`` is a meta-device nnsight ``TransformersModel`` keyed by the repo id (or the local
directory a self-hosted server deployed, see `vlminterp.remote.serve`), renamed exactly like a
local `vlminterp.load`, so every function of `vlminterp.interventions` runs unchanged. Faults
surface as one-line `RemoteError`s naming the host and model. vlminterp must be installed on
the server too: a traced block refers to its functions by name.

Results come back as pickles: vlminterp's backend loads them with an allow-list unpickler
(`vlminterp.remote.safe_results`), never nnsight's ``torch.load(weights_only=False)``, and refuses
plain http to a host other than this machine unless ``insecure=True`` (``--ndif-insecure``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .. import models
from ..models.base import VLM
from .safe_results import UnsafeResultError, allow_result_type, load_result

PUBLIC_HOST = "https://api.ndif.us"


class RemoteError(RuntimeError):
    """A remote run failed; the message is one line: host, model, what happened, what to do."""


@dataclass(frozen=True)
class Settings:
    """Where remote traces go: ``host`` (``name:port`` or a URL), ``api_key``, ``ssl``;
    ``insecure`` allows plain http to a host other than this machine."""

    host: str = PUBLIC_HOST
    api_key: str | None = None
    ssl: bool | None = None
    insecure: bool = False

    def check(self) -> str:
        """The URL, after refusing plain http to a non-loopback host (ValueError, one line)
        unless ``insecure``: anyone on the path could read the requests (and the API key) and
        answer with a result of their own."""
        from urllib.parse import urlsplit

        url = self.url
        host = urlsplit(url).hostname or ""
        if url.startswith("http://") and not self.insecure and not _loopback(host):
            raise ValueError(f"NDIF host {url}: plain http to {host}, which is not this machine, "
                             "sends requests and the API key unencrypted and accepts results from "
                             "anyone on the path; use https, or pass --ndif-insecure "
                             "(insecure=True) on a network you trust")
        return url

    @property
    def url(self) -> str:
        """The host as a URL; ``ssl`` picks the scheme when the host has none (default:
        https, except plain http for localhost / 127.0.0.1)."""
        if self.host.startswith(("http://", "https://")):
            return self.host.rstrip("/")
        ssl = self.ssl
        if ssl is None:
            ssl = not self.host.split(":")[0] in ("localhost", "127.0.0.1")
        return f"{'https' if ssl else 'http'}://{self.host.rstrip('/')}"


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def settings(host: str | None = None, api_key: str | None = None,
             ssl: bool | str | None = None, insecure: bool = False) -> Settings:
    """Settings from the arguments, else ``NDIF_HOST`` / ``NDIF_API_KEY`` / ``NDIF_SSL``, else
    nnsight's config (public NDIF)."""
    from nnsight import CONFIG

    host = host or os.environ.get("NDIF_HOST") or CONFIG.API.HOST or PUBLIC_HOST
    api_key = api_key or os.environ.get("NDIF_API_KEY") or CONFIG.API.APIKEY
    ssl = os.environ.get("NDIF_SSL") if ssl is None else ssl
    if isinstance(ssl, str):
        if ssl.strip().lower() not in ("1", "true", "yes", "0", "false", "no", ""):
            raise ValueError(f"NDIF_SSL={ssl!r}: expected true/false")
        ssl = None if not ssl.strip() else ssl.strip().lower() in ("1", "true", "yes")
    return Settings(host=host, api_key=api_key or None, ssl=ssl, insecure=insecure)


def _backend_class():
    from nnsight.intervention.backends.remote import RemoteBackend
    from nnsight.intervention.backends.remote import RemoteError as NNsightRemoteError

    from nnsight.schema.response import ResponseModel

    class Backend(RemoteBackend):
        """nnsight's RemoteBackend with its faults turned into one-line `RemoteError`s, and
        results (downloaded blobs and binary websocket frames) loaded by `load_result`'s
        allow-list unpickler instead of ``torch.load(weights_only=False)``."""

        def finalize(self, content: bytes):
            if self.compress:
                import zstandard as zstd

                content = zstd.ZstdDecompressor().decompress(content)
            return load_result(content)

        @staticmethod
        def parse(message):
            if isinstance(message, (bytes, bytearray)):
                return ResponseModel(**load_result(bytes(message)))
            return ResponseModel.model_validate_json(message)

        def __call__(self, tracer=None):
            try:
                return super().__call__(tracer)
            except UnsafeResultError as e:
                raise RemoteError(f"NDIF {self.host}: refused the result for "
                                  f"{_model_name(self.model_key)}: {e}; a genuine server sends "
                                  f"only tensors and containers, so this response may not come "
                                  f"from it") from None
            except NNsightRemoteError as e:
                raise RemoteError(_job_failed(self.host, self.model_key, str(e))) from None
            except Exception as e:
                message = _transport_fault(self.host, self.model_key, e)
                if message is None:
                    raise
                raise RemoteError(message) from None

    return Backend


def backend(vlm: VLM, config: Settings | None = None, *, blocking: bool = True):
    """The nnsight backend for ``vlm.trace(inputs, backend=...)`` (what ``remote=True`` uses
    on a `load_remote` model)."""
    config = config or getattr(vlm, "settings", None) or settings()
    key = vlm.model.to_model_key()
    return _backend_class()(key, host=config.check(), api_key=config.api_key, blocking=blocking)


class RemoteVLM(VLM):
    """A `VLM` whose weights live on an NDIF server: inputs are prepared on CPU, traces with
    ``remote=True`` go to ``settings``. A trace without ``remote=`` is refused (no weights)."""

    def __init__(self, *args, settings: Settings, **kwargs):
        super().__init__(*args, **kwargs)
        self.settings = settings

    def trace(self, inputs=None, *, remote: bool = True, **kwargs):
        if not remote:
            raise ValueError(f"{self.model_id}: a remote model has no local weights; trace with "
                             "remote=True or load it with vlminterp.load for a local run")
        if "backend" not in kwargs:
            kwargs["backend"] = backend(self, self.settings,
                                        blocking=kwargs.pop("blocking", True))
        return super().trace(inputs, **kwargs)

    def forward(self, inputs):
        raise ValueError(f"{self.model_id}: a remote model has no local weights; read "
                         "vlm.lm_head.output inside vlm.trace(inputs, remote=True)")

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")


def load_remote(model_id: str, *, host: str | None = None, api_key: str | None = None,
                ssl: bool | str | None = None, insecure: bool = False) -> RemoteVLM:
    """A `RemoteVLM` for a model deployed on an NDIF server: a hub id (public NDIF) or the
    local directory a self-hosted server deployed (the same path on client and server).
    Plain http to a host other than this machine is refused unless ``insecure=True``."""
    from nnsight.modeling import huggingface
    from transformers import AutoProcessor

    config = settings(host, api_key, ssl, insecure)
    config.check()

    if model_id in models.TINY:
        raise ValueError(f"model_id {model_id!r} is built in-process: save it with python -m "
                         "vlminterp.remote.serve --tiny ... --model-dir DIR and load DIR")
    if model_id.startswith("open_clip:"):
        raise ValueError(f"model_id {model_id!r}: open_clip models cannot run on NDIF (not a "
                         "transformers checkpoint)")
    local = os.path.isdir(model_id)
    if local:
        model_id = os.path.abspath(model_id)
        # The key of a local dir is the dir itself; skip nnsight's hub lookup of the id.
        huggingface._ID_CACHE[model_id] = model_id
    fam = models.family_of(model_id)
    processor = AutoProcessor.from_pretrained(model_id)
    wrapped = models.wrap(model_id, processor, model_id, fam)
    return RemoteVLM(wrapped.model, processor, wrapped.family, model_id,
                     torch_model=wrapped.model._module,
                     settings=config)


def add_arguments(parser) -> None:
    """``--remote``, ``--ndif-host``, ``--ndif-api-key`` for a recipe's argparse parser."""
    parser.add_argument("--remote", action="store_true",
                        help="run the traced programs on an NDIF server (model id: hub id or "
                             "the directory the server deployed)")
    parser.add_argument("--ndif-host", default=None, help="NDIF host (default $NDIF_HOST or "
                                                          "public NDIF)")
    parser.add_argument("--ndif-api-key", default=None, help="default $NDIF_API_KEY")
    parser.add_argument("--ndif-insecure", action="store_true", help="allow plain http to an "
                        "NDIF host other than this machine (refused by default: requests, the "
                        "API key and results would travel unencrypted)")


def load_from_args(args, model_id: str, **load_kwargs) -> VLM:
    """`load_remote` when ``args.remote`` is set, else `vlminterp.load`."""
    if getattr(args, "remote", False):
        return load_remote(model_id, host=args.ndif_host, api_key=args.ndif_api_key,
                           insecure=getattr(args, "ndif_insecure", False))
    return models.load(model_id, **load_kwargs)


def trace_kwargs(vlm: VLM) -> dict:
    """``{"remote": True}`` for a `RemoteVLM`, else ``{}``: ``vlm.trace(x, **trace_kwargs(vlm))``."""
    return {"remote": True} if isinstance(vlm, RemoteVLM) else {}


# -- error messages --------------------------------------------------------------------------
def _model_name(key: str) -> str:
    import json

    try:
        return json.loads(key.split(":", 1)[1]).get("repo_id", key)
    except (ValueError, IndexError, AttributeError):
        return key


def _one_line(text: str, limit: int = 240) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _exception_of(description: str) -> str:
    """A server traceback's last line (the exception itself): its first 240 characters are
    only the frames' file names."""
    if "Traceback (most recent call last)" not in description:
        return description
    lines = [ln.strip() for ln in str(description).splitlines() if ln.strip()]
    return lines[-1] if lines else description


def _job_failed(host: str, key: str, description: str) -> str:
    model = _model_name(key)
    low = description.lower()  # classified on the whole text, reported by its exception line
    description = _exception_of(description)
    if "too large" in low or "413" in low or "error parsing the body" in low:
        # ndif 0.1.2's API parses the upload as a form whose parts are capped (~1 MiB).
        return _one_line(f"NDIF {host}: request for {model} is too large for the server "
                         f"({description}); send fewer rows or frames per trace")
    if any(s in low for s in ("could not deploy", "not found", "repository", "no such file", "does not appear",
                              "can't accommodate", "cant_accommodate", "not deployed")):
        hint = ("deploy it on the server (self-hosted: python -m vlminterp.remote.serve "
                "--model-dir DIR) or pick a model listed by nnsight.ndif.status()")
        return _one_line(f"NDIF {host}: model {model} is not deployed there ({description}); "
                         f"{hint}")
    if "too large" in low or "413" in low or "payload" in low:
        return _one_line(f"NDIF {host}: request for {model} is too large ({description}); send "
                         "fewer rows per trace or save less")
    if "stopped" in low or "killed" in low or "died" in low or "actor" in low:
        return _one_line(f"NDIF {host}: the server lost the job for {model} ({description}); "
                         "re-run it (recipes resume from their results log)")
    return _one_line(f"NDIF {host}: job for {model} failed: {description}")


def _transport_fault(host: str, key: str, error: Exception) -> str | None:
    model = _model_name(key)
    name = type(error).__name__
    text = _one_line(f"{name}: {error}", 160)
    if isinstance(error, (ConnectionRefusedError, ConnectionAbortedError)) or "ConnectError" in name \
            or "Name or service not known" in str(error) or "timed out" in str(error).lower() \
            and "Connect" in name:
        return (f"NDIF {host} is unreachable ({text}) while sending a job for {model}; start "
                "the server (python -m vlminterp.remote.serve) or fix NDIF_HOST / --ndif-host")
    if "413" in str(error) or "too large" in str(error).lower():
        return (f"NDIF {host}: request for {model} is too large ({text}); send fewer rows per "
                "trace or save less")
    if isinstance(error, (ConnectionError, EOFError, OSError)) or "WebSocket" in name \
            or "RemoteProtocolError" in name or "ReadError" in name:
        return (f"NDIF {host}: connection lost while running {model} ({text}); the server "
                "stopped or was killed mid-request: restart it and re-run (recipes resume from "
                "their results log)")
    return None


__all__ = ["Settings", "settings", "backend", "load_remote", "RemoteVLM", "RemoteError",
           "add_arguments", "load_from_args", "trace_kwargs", "PUBLIC_HOST", "UnsafeResultError",
           "allow_result_type", "load_result"]
