"""`load(model_id)`: real checkpoints through transformers / open_clip, or offline tiny ones.

Ids: ``tiny-qwen2-vl``, ``tiny-qwen2.5-vl``, ``tiny-llava``, ``tiny-clip-vit`` (built offline,
seeded random weights); ``Qwen/Qwen2-VL-*``, ``Qwen/Qwen2.5-VL-*``, ``llava-hf/llava-1.5-*``
or a local directory saved with ``save_pretrained``; ``open_clip:MODEL/PRETRAINED``.
"""

from __future__ import annotations

import json
import os

import torch

from . import clip, llava, qwen2_vl, tiny
from .base import VLM, ModelInputs

TINY = ("tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-llava", "tiny-clip-vit")
_MODEL_TYPES = {"qwen2_vl": "2", "qwen2_5_vl": "2.5", "llava": "llava"}


def load(model_id: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         seed: int = 0, attn_implementation: str | None = None) -> VLM:
    """Load a model and wrap it in nnsight with the standard names (see `VLM`)."""
    if not isinstance(model_id, str) or not model_id:
        raise ValueError(f"model_id: expected a non-empty string, got {model_id!r}")
    if model_id == "tiny-clip-vit" or model_id.startswith("open_clip:"):
        return _load_clip(model_id, device, dtype, seed)
    kind = _kind(model_id)
    if model_id in TINY:
        model, processor = (tiny.build_llava(seed) if kind == "llava"
                            else tiny.build_qwen2_vl(seed, version=kind))
        model = model.to(device=device, dtype=dtype or torch.float32)
    elif kind == "llava":
        model, processor = llava.load_pretrained(model_id, device=device, dtype=dtype)
    else:
        model, processor = qwen2_vl.load_pretrained(model_id, version=kind, device=device,
                                                    dtype=dtype)
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    return wrap(model, processor, model_id, kind)


def wrap(model, processor, model_id: str, kind: str) -> VLM:
    """Wrap a loaded HF model + processor as a `VLM` (nnsight TransformersModel, renamed)."""
    from nnsight.modeling.transformers import TransformersModel

    family = {"llava": llava.FAMILY, "2": qwen2_vl.FAMILY, "2.5": qwen2_vl.FAMILY_25}[kind]
    rename = llava._rename() if kind == "llava" else family.rename
    nn_model = TransformersModel(model, task="image-text-to-text", processor=processor,
                                 tokenizer=processor.tokenizer, rename=rename)
    return VLM(nn_model, processor, family, model_id, torch_model=model)


def _kind(model_id: str) -> str:
    """'2', '2.5' or 'llava' from a tiny id, a hub id, or a local dir's config.json."""
    if model_id in TINY:
        return {"tiny-qwen2-vl": "2", "tiny-qwen2.5-vl": "2.5", "tiny-llava": "llava"}[model_id]
    if os.path.isdir(model_id):
        path = os.path.join(model_id, "config.json")
        try:
            with open(path) as f:
                model_type = json.load(f).get("model_type")
        except (OSError, ValueError) as e:
            raise ValueError(f"model_id {model_id!r}: cannot read {path}: {e}") from None
        if model_type not in _MODEL_TYPES:
            raise ValueError(f"model_id {model_id!r}: model_type {model_type!r} in {path} is not "
                             f"supported (supported: {', '.join(_MODEL_TYPES)})")
        return _MODEL_TYPES[model_type]
    low = model_id.lower()
    if "qwen2.5-vl" in low or "qwen2_5_vl" in low:
        return "2.5"
    if "qwen2-vl" in low:
        return "2"
    if "llava" in low:
        return "llava"
    raise ValueError(f"model_id {model_id!r} is not a known model: use one of {', '.join(TINY)}, a "
                     f"Qwen2-VL / Qwen2.5-VL / llava-1.5 hub id or local directory, or "
                     f"'open_clip:MODEL/PRETRAINED'")


def _load_clip(model_id: str, device, dtype, seed: int) -> VLM:
    from nnsight import NNsight

    if model_id == "tiny-clip-vit":
        model, preprocess = tiny.build_clip_vit(seed)
        model = model.to(device=device, dtype=dtype or torch.float32)
    else:
        spec = model_id.split(":", 1)[1]
        name, _, pretrained = spec.partition("/")
        model, preprocess = clip.load_pretrained(name, pretrained or None, device=device,
                                                 dtype=dtype)
    vlm = VLM(NNsight(model, rename=clip.RENAME), None, clip.FAMILY, model_id, torch_model=model)
    vlm.preprocess = preprocess
    vlm.image_size = int(model.visual.image_size[0])
    return vlm


__all__ = ["load", "wrap", "VLM", "ModelInputs", "TINY"]
