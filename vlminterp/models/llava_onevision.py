"""LLaVA-OneVision (and the LLaVA-Video checkpoints converted to it): a SigLIP tower (no CLS)
and a Qwen2 LM. Images are anyres as in LLaVA-NeXT (`llava_next.anyres_image`), with
``anyres_max_9``: a grid of more than ~9 tiles' worth of cells is shrunk by bilinear
interpolation. A video is one run of ``<video>``: per frame its 2x2 bilinearly pooled grid,
frames in order, then one trailing ``image_newline`` token that no frame changes (a marker)."""

from __future__ import annotations

import math

import torch

from ..tokens import TokenLayout, VideoSpan
from . import tiny
from .base import Family, ModelInputs
from .layouts import finish_row, visual_runs
from .llava_next import (TINY_PATCH, TINY_PINPOINTS, TINY_SIZE, frame_groups, images_of_row,
                         video_frames)

CHAT_TEMPLATE = (  # the real checkpoints' shape: media first, then "\n" + text
    "{% for message in messages %}<|im_start|>{{ message['role'] }} "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'video' %}<video>{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}\n{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def layout(vlm, inputs: ModelInputs) -> TokenLayout:
    cfg = vlm.torch_model.config
    max_tiles = int(cfg.vision_aspect_ratio.removeprefix("anyres_max_"))
    sizes = iter(inputs.get("image_sizes", torch.zeros(0, 2)).tolist())
    side = math.ceil(cfg.vision_config.image_size // cfg.vision_config.patch_size / 2)
    rows = []
    for b, ids in enumerate(inputs["input_ids"].cpu()):
        videos = []
        for start, stop, _ in visual_runs(ids, (cfg.video_token_id,)):
            n = video_frames(inputs)
            groups = frame_groups(torch.arange(start, stop - 1), n, (side, side))
            videos.append(VideoSpan(groups, n, markers=torch.tensor([stop - 1])))
        rows.append(finish_row(inputs, b, images_of_row(cfg, ids, sizes, max_tiles), videos))
    return TokenLayout(rows)


def build_tiny(seed: int = 0, *, image_size: int = TINY_SIZE, patch_size: int = TINY_PATCH):
    """Tiny LLaVA-OneVision: SigLIP tower on 32 px views (patch 8: 4x4 cells, 2x2 pooled per
    video frame), up to 2x2 tiles, Qwen2 LM of 4 layers with tied embeddings. ``image_size``
    / ``patch_size`` size the views (the zoo's objects model: 64 / 16, a 4x4 base view and 2x2
    tiles of 4x4 = 8x8 cells over the image); the tile resolutions scale with them (1x1, 1x2,
    2x1, 2x2 views)."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessor, LlavaOnevisionProcessor,
                              LlavaOnevisionVideoProcessor)

    tok = tiny.qwen_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": tiny.QWEN_SPECIALS[1:] +
                            ["<image>", "<video>"]})
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")}
    pinpoints = [[p * image_size // TINY_SIZE for p in hw] for hw in TINY_PINPOINTS]
    config = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, image_size=image_size,
                           patch_size=patch_size, vision_use_head=False),
        text_config=dict(model_type="qwen2", vocab_size=len(tok), hidden_size=64,
                         intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=ids["<|endoftext|>"],
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints, vision_feature_layer=-1,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")
    size = {"height": image_size, "width": image_size}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=pinpoints),
        video_processor=LlavaOnevisionVideoProcessor(size=size, do_sample_frames=False),
        tokenizer=tok, num_image_tokens=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
        chat_template=CHAT_TEMPLATE)
    return tiny.seeded_model(LlavaOnevisionForConditionalGeneration, config, seed), processor


FAMILY = Family("llava_onevision", ("llava_onevision",), layout, modalities=("image", "video"),
                tiny={"tiny-llava-onevision": build_tiny}, image_token="<image>",
                video_token="<video>", video_kwargs={"do_sample_frames": False})
