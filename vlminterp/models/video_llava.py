"""Video-LLaVA: two CLIP towers of the same shape, ``image_tower`` (``vlm.vision``) for images
and ``video_tower`` (``vlm.video_vision``) for frames, one projector, a Llama LM. An image is
one run of ``<image>``: its patch grid (CLS dropped) after a shortest-edge resize and a centre
crop. A video is one run of ``<video>``: per frame its class token then its patch grid
(``1 + cells`` tokens, CLS kept), frames in order; each frame is a group with its ``cls``."""

from __future__ import annotations

import torch

from ..tokens import Group, ImageGeometry, ImageSpan, TokenLayout, VideoSpan
from . import tiny
from .base import Family, ModelInputs
from .clip import crop_geometry
from .layouts import finish_row, prepare as generic_prepare, visual_runs
from .llava_next import TINY_PATCH, TINY_SIZE, clip_tower, llama_lm, video_frames
from .llava_next_video import CHAT_TEMPLATE


def image_geometry(size, shortest: int, crop: tuple[int, int], patch: int) -> ImageGeometry:
    """Shortest-edge resize, then a centre crop whose offset is floored (this processor's
    numpy `center_crop`; the torchvision-backed ones round it)."""
    geo = crop_geometry(size, shortest, crop, patch)
    (rw, rh), (cw, ch) = geo.resized, crop
    left, top = (rw - cw) // 2, (rh - ch) // 2
    return ImageGeometry(geo.original, geo.resized, (left, top, left + cw, top + ch), patch,
                         geo.grid)


def prepare(vlm, **kw) -> ModelInputs:
    """The processor still names image pixels ``pixel_values_images``, a name the model only
    accepts with a deprecation warning: pass them as ``pixel_values``."""
    out = generic_prepare(vlm, **kw)
    if "pixel_values_images" in out:
        out["pixel_values"] = out.pop("pixel_values_images")
    return out


def layout(vlm, inputs: ModelInputs) -> TokenLayout:
    cfg = vlm.torch_model.config
    ip = vlm.processor.image_processor
    crop = (ip.crop_size["width"], ip.crop_size["height"])
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    sizes = iter(inputs.meta.get("image_sizes", []))
    rows = []
    for b, ids in enumerate(inputs["input_ids"].cpu()):
        images, videos = [], []
        for start, stop, token in visual_runs(ids, (cfg.image_token_id, cfg.video_token_id)):
            pos = torch.arange(start, stop)
            if token == cfg.image_token_id:
                geo = image_geometry(next(sizes), ip.size["shortest_edge"], crop,
                                     cfg.vision_config.patch_size)
                images.append(ImageSpan.single(pos, geo))
                continue
            n = video_frames(inputs)
            if len(pos) != n * (1 + side * side):
                raise ValueError(f"row {b}: {len(pos)} video tokens cannot be {n} frames of "
                                 f"1 class + {side}x{side} patch tokens")
            groups = [Group(p[1:], (f, f + 1), (side, side), cls=p[:1])
                      for f, p in enumerate(pos.split(1 + side * side))]
            videos.append(VideoSpan(groups, n))
        rows.append(finish_row(inputs, b, images, videos))
    return TokenLayout(rows)


def build_tiny(seed: int = 0):
    """Tiny Video-LLaVA: two CLIP towers on 32 px inputs (patch 8: 16 cells, 17 tokens per
    frame with the class token), Llama LM of 4 layers; the LLaVA (Vicuna) prompt format."""
    from transformers import (VideoLlavaConfig, VideoLlavaForConditionalGeneration,
                              VideoLlavaImageProcessor, VideoLlavaProcessor,
                              VideoLlavaVideoProcessor)

    tok = tiny.llava_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    config = VideoLlavaConfig(vision_config=clip_tower(), text_config=llama_lm(tok),
                              image_token_index=tok.convert_tokens_to_ids("<image>"),
                              video_token_index=tok.convert_tokens_to_ids("<video>"),
                              vision_feature_layer=-2, vision_feature_select_strategy="default")
    sizes = dict(size={"shortest_edge": TINY_SIZE},
                 crop_size={"height": TINY_SIZE, "width": TINY_SIZE})
    processor = VideoLlavaProcessor(
        image_processor=VideoLlavaImageProcessor(**sizes),
        video_processor=VideoLlavaVideoProcessor(do_sample_frames=False, **sizes),
        tokenizer=tok, patch_size=TINY_PATCH, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    return tiny.seeded_model(VideoLlavaForConditionalGeneration, config, seed), processor


FAMILY = Family("video_llava", ("video_llava",), layout, prepare=prepare,
                modalities=("image", "video"),
                tiny={"tiny-video-llava": build_tiny}, image_token="<image>",
                video_token="<video>", video_kwargs={"do_sample_frames": False},
                rename={"model.video_tower": "video_vision",
                        "model.video_tower.encoder.layers": "model.video_tower.blocks"})
