"""`load(model_id)`: real checkpoints through transformers / open_clip, or offline tiny ones.

Every module of this package that defines ``FAMILY`` (or ``FAMILIES``) is a model family
(`base.Family`); they are found at import, so adding a family means adding one file. Ids:
the families' tiny ids (``tiny-qwen2-vl``, ``tiny-llava``, ..., built offline with seeded
random weights; ``tiny_ids()`` lists them), ``tiny-clip-vit``, a hub id or a local directory
saved with ``save_pretrained`` (its ``config.json`` ``model_type`` picks the family),
``open_clip:MODEL/PRETRAINED``, and the zoo's trained tiny models (`vlminterp.zoo.ZOO_IDS`).
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import warnings

import torch

from . import clip, tiny
from .base import VLM, Family, ModelInputs, Site

_INFRASTRUCTURE = {"base", "checkpoint", "clip", "common", "layouts", "resolve", "tiny"}
QUANTIZATION = (None, "8bit", "4bit")


def _discover() -> list[Family]:
    found = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name in _INFRASTRUCTURE or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        found += getattr(module, "FAMILIES", [getattr(module, "FAMILY", None)])
    return [f for f in found if f is not None]


FAMILIES: list[Family] = _discover()


def tiny_ids() -> list[str]:
    """Every offline tiny id of every family (plus ``tiny-clip-vit``)."""
    return [i for f in FAMILIES for i in f.tiny] + ["tiny-clip-vit"]


TINY = tuple(tiny_ids())


def family(name_or_model_type: str) -> Family:
    """The family with this name or ``config.model_type``."""
    for f in FAMILIES:
        if name_or_model_type == f.name or name_or_model_type in f.model_types:
            return f
    raise ValueError(f"model_type {name_or_model_type!r} is not supported (supported: "
                     f"{', '.join(t for f in FAMILIES for t in f.model_types)})")


def load(model_id: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         seed: int = 0, attn_implementation: str | None = None, device_map=None,
         quantization: str | None = None, **from_pretrained) -> VLM:
    """Load a model and wrap it in nnsight with the standard names (see `VLM`).

    Hub ids and local directories go through ``from_pretrained`` with ``dtype`` (default: the
    checkpoint's), ``device_map`` (``"auto"`` or a dict, via accelerate; then ``device`` is not
    used), ``quantization`` (``"8bit"`` / ``"4bit"`` via bitsandbytes) and
    ``attn_implementation``; other keyword arguments (``offload_folder``, ``revision``, ...)
    go to ``from_pretrained`` as they are."""
    if not isinstance(model_id, str) or not model_id:
        raise ValueError(f"model_id: expected a non-empty string, got {model_id!r}")
    if quantization not in QUANTIZATION:
        raise ValueError(f"quantization {quantization!r}: expected one of {QUANTIZATION}")
    from .. import zoo  # trained tiny models with known mechanisms (vlminterp/zoo)

    if model_id in zoo.ZOO_IDS:
        model, processor, base = zoo.build(model_id)
        model = model.to(device=device, dtype=dtype or torch.float32)
        if base == "tiny-clip-vit":
            return _load_clip(model_id, device, dtype, seed, built=(model, processor))
        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
        return wrap(model, processor, model_id, family_of(base))
    if model_id == "tiny-clip-vit" or model_id.startswith("open_clip:"):
        return _load_clip(model_id, device, dtype, seed)
    fam = family_of(model_id)
    if model_id in fam.tiny:
        model, processor = fam.tiny[model_id](seed)
        model = model.to(device=device, dtype=dtype or torch.float32)
    else:
        model, processor = _from_pretrained(model_id, device=device, dtype=dtype,
                                            device_map=device_map, quantization=quantization,
                                            attn_implementation=attn_implementation,
                                            **from_pretrained)
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    return wrap(model, processor, model_id, fam)


def family_of(model_id: str) -> Family:
    """The family of a tiny id, a local directory (its config.json) or a hub id (its config,
    which needs the hub or a local cache). A missing directory or a hub id neither cached nor
    reachable raises a one-line ValueError saying so."""
    from . import checkpoint

    for f in FAMILIES:
        if model_id in f.tiny:
            return f
    missing = checkpoint.missing_directory(model_id)
    if missing:
        raise ValueError(missing)
    if os.path.isdir(model_id):
        path = os.path.join(model_id, "config.json")
        try:
            with open(path) as fh:
                model_type = json.load(fh).get("model_type")
        except (OSError, ValueError) as e:
            raise ValueError(f"model_id {model_id!r}: cannot read {path}: {e}") from None
        return _family_or_error(model_id, model_type, path)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_id)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(checkpoint.unreachable(model_id, e) or (
            f"model_id {model_id!r} is not a tiny id ({', '.join(TINY)}), a local directory, "
            f"or a checkpoint reachable from here ({first})")) from None
    return _family_or_error(model_id, config.model_type, "its config")


def _family_or_error(model_id: str, model_type, where: str) -> Family:
    try:
        return family(model_type)
    except ValueError as e:
        raise ValueError(f"model_id {model_id!r}: {e} (read from {where})") from None


def _from_pretrained(model_id, *, device, dtype, device_map, quantization, attn_implementation,
                     **extra):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from . import checkpoint

    corrupt = checkpoint.corrupt_file(model_id, checkpoint.local_dir(model_id))
    if corrupt:  # else safetensors fails deep inside from_pretrained without naming the file
        raise ValueError(corrupt)
    kwargs = {"dtype": dtype or "auto", "output_loading_info": True, **extra}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if quantization is not None:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            **{f"load_in_{quantization}": True})
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model, info = AutoModelForImageTextToText.from_pretrained(model_id, **kwargs)
    if "lm_head.weight" in info.get("missing_keys", ()):
        # Some checkpoints (LLaVA-OneVision) tie lm_head only in text_config: it would be left
        # randomly initialised.
        warnings.warn(f"{model_id}: lm_head.weight is not in the checkpoint; tying it to the "
                      f"input embeddings as the text config says", stacklevel=3)
        model.lm_head.weight = model.get_input_embeddings().weight
    if device_map is None and quantization is None:
        model = model.to(device)
    return model.eval(), AutoProcessor.from_pretrained(model_id)


def wrap(model, processor, model_id: str, fam: Family | str) -> VLM:
    """Wrap a loaded HF model (or, for NDIF, a repo id) + processor as a `VLM`: an nnsight
    TransformersModel with the generic standard names plus the family's overrides."""
    from nnsight.modeling.transformers import TransformersModel

    from .resolve import standard_names

    fam = family(fam) if isinstance(fam, str) else fam
    skeleton = model if isinstance(model, torch.nn.Module) else _skeleton(model)
    rename = {**standard_names(skeleton), **fam.rename}
    nn_model = TransformersModel(model, task="image-text-to-text", processor=processor,
                                 tokenizer=processor.tokenizer, rename=rename)
    return VLM(nn_model, processor, fam, model_id,
               torch_model=model if isinstance(model, torch.nn.Module) else None)


def _skeleton(repo_id: str) -> torch.nn.Module:
    """The module tree of a checkpoint, on the meta device (no weights read)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(repo_id))


def _load_clip(model_id: str, device, dtype, seed: int, built=None) -> VLM:
    from nnsight import NNsight

    if built is not None:  # a zoo model: (model, preprocess)
        model, preprocess = built
    elif model_id == "tiny-clip-vit":
        model, preprocess = tiny.build_clip_vit(seed)
        model = model.to(device=device, dtype=dtype or torch.float32)
    else:
        spec = model_id.split(":", 1)[1]
        name, _, pretrained = spec.partition("/")
        model, preprocess = clip.load_pretrained(name, pretrained or None, device=device,
                                                 dtype=dtype)
    vlm = VLM(NNsight(model, rename=clip.RENAME), None, clip.CLIP, model_id, torch_model=model)
    vlm.preprocess = preprocess
    vlm.image_size = int(model.visual.image_size[0])
    return vlm


__all__ = ["load", "wrap", "family", "family_of", "tiny_ids", "VLM", "ModelInputs", "Site",
           "FAMILIES", "TINY"]
