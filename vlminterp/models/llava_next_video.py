"""LLaVA-NeXT-Video: images exactly as LLaVA-NeXT (anyres, `llava_next.anyres_image`); a video is
one run of ``<video>``: per frame its cell grid average-pooled ``spatial_pool_stride`` x
``spatial_pool_stride`` (2x2), one contiguous block per frame, frames in order, no separator.
Frames are resized (shortest edge) and centre-cropped to the tower's input."""

from __future__ import annotations

import torch

from ..tokens import TokenLayout, VideoSpan
from . import tiny
from .base import Family, ModelInputs
from .layouts import finish_row, visual_runs
from .llava_next import (TINY_PATCH, TINY_PINPOINTS, TINY_SIZE, clip_tower, frame_groups,
                         images_of_row, llama_lm, video_frames)

CHAT_TEMPLATE = tiny.LLAVA_CHAT_TEMPLATE.replace(
    "{% if part['type'] == 'image' %}<image>\n",
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'video' %}<video>\n")


def layout(vlm, inputs: ModelInputs) -> TokenLayout:
    cfg = vlm.torch_model.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size // cfg.spatial_pool_stride
    sizes = iter(inputs.get("image_sizes", torch.zeros(0, 2)).tolist())
    rows = []
    for b, ids in enumerate(inputs["input_ids"].cpu()):
        videos = []
        for start, stop, _ in visual_runs(ids, (cfg.video_token_id,)):
            n = video_frames(inputs)
            videos.append(VideoSpan(frame_groups(torch.arange(start, stop), n, (side, side)), n))
        rows.append(finish_row(inputs, b, images_of_row(cfg, ids, sizes), videos))
    return TokenLayout(rows)


def build_tiny(seed: int = 0):
    """Tiny LLaVA-NeXT-Video: LLaVA-NeXT's tiny image path (CLIP on 32 px views, patch 8, up to
    2x2 tiles) and frames of 4x4 cells pooled to 2x2; Llama LM of 4 layers."""
    from transformers import (LlavaNextImageProcessor, LlavaNextVideoConfig,
                              LlavaNextVideoForConditionalGeneration, LlavaNextVideoProcessor)
    from transformers.models.llava_next_video.video_processing_llava_next_video import (
        LlavaNextVideoVideoProcessor)

    tok = tiny.llava_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    config = LlavaNextVideoConfig(
        vision_config=clip_tower(), text_config=llama_lm(tok),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=TINY_PINPOINTS, vision_feature_layer=-2,
        vision_feature_select_strategy="default", spatial_pool_mode="average",
        spatial_pool_stride=2)
    sizes = dict(size={"shortest_edge": TINY_SIZE},
                 crop_size={"height": TINY_SIZE, "width": TINY_SIZE})
    processor = LlavaNextVideoProcessor(
        image_processor=LlavaNextImageProcessor(image_grid_pinpoints=TINY_PINPOINTS, **sizes),
        video_processor=LlavaNextVideoVideoProcessor(do_sample_frames=False, **sizes),
        tokenizer=tok, patch_size=TINY_PATCH, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    return tiny.seeded_model(LlavaNextVideoForConditionalGeneration, config, seed), processor


FAMILY = Family("llava_next_video", ("llava_next_video",), layout,
                modalities=("image", "video"), tiny={"tiny-llava-next-video": build_tiny},
                image_token="<image>", video_token="<video>",
                video_kwargs={"do_sample_frames": False})
