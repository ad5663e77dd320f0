"""Qwen2-VL and Qwen2.5-VL: standard names, inputs, token layout, real loading."""

from __future__ import annotations

import numpy as np
import torch

from ..tokens import ImageGeometry, ImageSpan, RowLayout, TokenLayout, VideoSpan
from .base import Family, ModelInputs
from .common import as_list, chat_texts

RENAME = {
    "model.language_model": "lm",
    "model.language_model.layers": "layers",
    "model.language_model.norm": "ln_final",
    "model.language_model.embed_tokens": "embed",
    "model.visual": "vision",
    "model.visual.merger": "projector",
}
_PLACEHOLDER = {"image": "<|image_pad|>", "video": "<|video_pad|>"}


def prepare(vlm, *, text, images, video, chat, answer_prefix, fps=None, **kw) -> ModelInputs:
    images, videos = as_list(images, "images"), as_list(video, "video")
    kind = "video" if videos else ("image" if images else None)
    texts = chat_texts(vlm.processor, text, kind, len(images or videos), chat, answer_prefix,
                       _PLACEHOLDER.get(kind))
    call = dict(text=texts, return_tensors="pt", padding=True, **kw)
    meta = {}
    if images:
        pil = [_to_pil(im) for im in images]
        call["images"] = pil
        meta["image_sizes"] = [im.size for im in pil]
    if videos:
        arrays = [np.asarray(v) for v in videos]
        for i, v in enumerate(arrays):
            if v.ndim != 4 or v.shape[-1] != 3 or v.dtype != np.uint8:
                raise ValueError(f"video[{i}]: expected a [T,H,W,3] uint8 array, got "
                                 f"{v.dtype} {tuple(v.shape)}")
        call["videos"] = [list(v) for v in arrays]
        meta["num_frames"] = [len(v) for v in arrays]
        if fps is not None:
            call["fps"] = fps
    out = vlm.processor(**call)
    return ModelInputs(dict(out), meta=meta).to(vlm.device)


def layout(vlm, inputs: ModelInputs) -> TokenLayout:
    cfg = vlm.torch_model.config
    vcfg = cfg.vision_config
    merge, patch, tpatch = vcfg.spatial_merge_size, vcfg.patch_size, vcfg.temporal_patch_size
    ids = inputs["input_ids"].cpu()
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.cpu()
    image_grids = iter(inputs.get("image_grid_thw", torch.zeros(0, 3)).tolist())
    video_grids = iter(inputs.get("video_grid_thw", torch.zeros(0, 3)).tolist())
    sizes = iter(inputs.meta.get("image_sizes", []))
    frames = iter(inputs.meta.get("num_frames", []))
    rows = []
    for b in range(ids.shape[0]):
        row_ids = ids[b]
        visual_mask = (row_ids == cfg.image_token_id) | (row_ids == cfg.video_token_id)
        real = mask[b].bool()
        text = torch.nonzero(real & ~visual_mask).flatten()
        row = RowLayout(seq_len=len(row_ids), text=text,
                        visual=torch.nonzero(visual_mask).flatten(),
                        last=int(torch.nonzero(real).flatten()[-1]))
        for start, stop, token in _runs(row_ids, visual_mask):
            pos = torch.arange(start, stop)
            t, h, w = (next(image_grids) if token == cfg.image_token_id else next(video_grids))
            gh, gw = h // merge, w // merge
            if len(pos) != t * gh * gw:
                raise ValueError(f"row {b}: {len(pos)} visual tokens but grid {t}x{h}x{w} "
                                 f"implies {t * gh * gw}")
            if token == cfg.image_token_id:
                size = next(sizes, None) or (w * patch, h * patch)
                geo = ImageGeometry(tuple(size), (w * patch, h * patch),
                                    (0, 0, w * patch, h * patch), patch * merge, (gh, gw))
                row.images.append(ImageSpan(pos, geo))
            else:
                n = next(frames, None) or t * tpatch
                row.videos.append(VideoSpan(list(pos.split(gh * gw)), n, tpatch))
        rows.append(row)
    return TokenLayout(rows)


def _runs(ids, mask):
    """Maximal runs of visual tokens of one kind: (start, stop, token id)."""
    out, start = [], None
    for i in range(len(ids) + 1):
        inside = i < len(ids) and bool(mask[i])
        if inside and (start is None or ids[i] != ids[start]):
            if start is not None:
                out.append((start, i, int(ids[start])))
            start = i
        elif not inside and start is not None:
            out.append((start, i, int(ids[start])))
            start = None
    return out


def _to_pil(image):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")


def load_pretrained(model_id: str, *, version: str, device, dtype):
    from transformers import AutoProcessor

    if version == "2.5":
        from transformers import Qwen2_5_VLForConditionalGeneration as cls
    else:
        from transformers import Qwen2VLForConditionalGeneration as cls
    model = cls.from_pretrained(model_id, dtype=dtype or "auto").to(device).eval()
    return model, AutoProcessor.from_pretrained(model_id)


FAMILY = Family("qwen2_vl", RENAME, prepare, layout, image_token="<|image_pad|>")
FAMILY_25 = Family("qwen2_5_vl", RENAME, prepare, layout, image_token="<|image_pad|>")
