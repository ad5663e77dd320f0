"""LLaVA-1.5: a CLIP tower (CLS dropped), one run of ``<image>`` per image laid out as the
square patch grid of the resized and centre-cropped image."""

from __future__ import annotations

import torch

from ..tokens import ImageSpan, TokenLayout
from . import tiny
from .base import Family, ModelInputs
from .layouts import finish_row, visual_runs


def layout(vlm, inputs: ModelInputs) -> TokenLayout:
    from .clip import crop_geometry

    cfg = vlm.torch_model.config
    ip = vlm.processor.image_processor
    patch = cfg.vision_config.patch_size
    side = cfg.vision_config.image_size // patch
    sizes = iter(inputs.meta.get("image_sizes", []))
    rows = []
    for b, ids in enumerate(inputs["input_ids"].cpu()):
        images = []
        for start, stop, _ in visual_runs(ids, (cfg.image_token_id,)):
            for chunk in torch.arange(start, stop).split(side * side):
                geo = crop_geometry(next(sizes), ip.size["shortest_edge"],
                                    (ip.crop_size["width"], ip.crop_size["height"]), patch,
                                    rounding="floor")  # HF's CLIPImageProcessor floors
                images.append(ImageSpan.single(chunk, geo))
        rows.append(finish_row(inputs, b, images))
    return TokenLayout(rows)


FAMILY = Family("llava", ("llava",), layout, modalities=("image",),
                tiny={"tiny-llava": tiny.build_llava}, image_token="<image>")
