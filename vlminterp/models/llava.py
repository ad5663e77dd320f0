"""LLaVA-1.5: standard names, inputs, token layout, real loading."""

from __future__ import annotations

import torch

from ..tokens import ImageSpan, RowLayout, TokenLayout
from .base import Family, ModelInputs
from .common import as_list, chat_texts
from .qwen2_vl import _to_pil

RENAME = {
    "model.language_model": "lm",
    "model.language_model.layers": "layers",
    "model.language_model.norm": "ln_final",
    "model.language_model.embed_tokens": "embed",
    "model.vision_tower": "vision",
    "model.vision_tower.encoder.layers": "model.vision_tower.blocks",
    "model.multi_modal_projector": "projector",
}


def _rename():
    from transformers.models.clip.modeling_clip import CLIPAttention

    return {**RENAME, CLIPAttention: "attn"}


def prepare(vlm, *, text, images, video, chat, answer_prefix, **kw) -> ModelInputs:
    if video is not None:
        raise ValueError("video: LLaVA-1.5 takes images only; pass images=[...]")
    images = [_to_pil(im) for im in as_list(images, "images")]
    texts = chat_texts(vlm.processor, text, "image" if images else None, len(images), chat,
                       answer_prefix, "<image>")
    call = dict(text=texts, return_tensors="pt", padding=True, **kw)
    if images:
        call["images"] = images
    out = vlm.processor(**call)
    return ModelInputs(dict(out), meta={"image_sizes": [im.size for im in images]}).to(vlm.device)


def layout(vlm, inputs: ModelInputs) -> TokenLayout:
    from .clip import crop_geometry

    cfg = vlm.torch_model.config
    ids = inputs["input_ids"].cpu()
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.cpu()
    ip = vlm.processor.image_processor
    patch = cfg.vision_config.patch_size
    side = cfg.vision_config.image_size // patch
    sizes = iter(inputs.meta.get("image_sizes", []))
    rows = []
    for b in range(ids.shape[0]):
        visual_mask = ids[b] == cfg.image_token_id
        real = mask[b].bool()
        row = RowLayout(seq_len=ids.shape[1], text=torch.nonzero(real & ~visual_mask).flatten(),
                        visual=torch.nonzero(visual_mask).flatten(),
                        last=int(torch.nonzero(real).flatten()[-1]))
        for chunk in row.visual.split(side * side):
            size = next(sizes)
            geo = crop_geometry(size, ip.size["shortest_edge"],
                                (ip.crop_size["width"], ip.crop_size["height"]), patch,
                                rounding="floor")
            row.images.append(ImageSpan(chunk, geo))
        rows.append(row)
    return TokenLayout(rows)


def load_pretrained(model_id: str, *, device, dtype):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_id, dtype=dtype or "auto")
    return model.to(device).eval(), AutoProcessor.from_pretrained(model_id)


FAMILY = Family("llava", RENAME, prepare, layout, image_token="<image>")
