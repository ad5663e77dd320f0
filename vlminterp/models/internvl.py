"""InternVL 3 / 3.5 (the ``-hf`` checkpoints): an image is one run ``<img><IMG_CONTEXT>…</img>``
holding its tiles (row-major over the tile grid the processor picks for the aspect ratio) then a
thumbnail of the whole image, each crop ``image_seq_length`` tokens (a row-major grid after the
pixel shuffle); a video is one such run per frame, labelled ``FrameK: `` and joined by newlines.
Every crop (tile, thumbnail, frame) is one entry of the flat ``pixel_values``."""

from __future__ import annotations

import math

import torch

from ..tokens import Group, ImageGeometry, ImageSpan, TokenLayout, VideoSpan, View
from . import tiny
from .base import Family, ModelInputs
from .layouts import finish_row, visual_runs

EXTRA_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
CHAT_TEMPLATE = (  # the -hf checkpoints' template
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}"
    "{% endif %}")


def crops_per_row(inputs: ModelInputs, vlm) -> list[int]:
    """Entries of ``pixel_values`` per row. The processor drops ``num_patches``; every crop
    becomes ``image_seq_length`` context tokens, so a row's token count says it."""
    per_crop = vlm.processor.image_seq_length
    counts = (inputs["input_ids"] == vlm.torch_model.config.image_token_id).sum(1).tolist()
    if any(c % per_crop for c in counts) or sum(counts) != len(inputs["pixel_values"]) * per_crop:
        raise ValueError(f"pixel_values: {len(inputs['pixel_values'])} crops do not match the "
                         f"rows' image tokens {counts} at {per_crop} per crop")
    return [c // per_crop for c in counts]


def image_span(vlm, pos: torch.Tensor, size, side: int) -> ImageSpan:
    """Tiles (row-major) then the thumbnail; one crop alone is a plain resize of the image."""
    from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

    ip = vlm.processor.image_processor
    tile, n, (w, h) = ip.size["width"], len(pos) // (side * side), size
    chunks = pos.split(side * side)
    markers = torch.stack([pos[0] - 1, pos[-1] + 1])  # <img>, </img>

    def view(k, resized, left=0, top=0, kind="base", source=None):
        geo = ImageGeometry((w, h), resized, (left, top, left + tile, top + tile), tile // side,
                            (side, side))
        return View(chunks[k], (side, side), geo, kind, source=source)

    if n == 1:
        return ImageSpan([view(0, (tile, tile))], markers)
    cols, rows = get_optimal_tiled_canvas((h, w), (tile, tile), ip.min_patches, ip.max_patches)
    if cols * rows + 1 != n:
        raise ValueError(f"image of {w}x{h}: {n} crops, but the processor's tiling gives "
                         f"{cols}x{rows} tiles + a thumbnail")
    views = [view(k, (cols * tile, rows * tile), (k % cols) * tile, (k // cols) * tile, "tile", k)
             for k in range(n - 1)]
    return ImageSpan(views + [view(n - 1, (tile, tile), kind="thumbnail", source=n - 1)], markers)


def _label_start(tok, ids, img: int) -> int:
    """First position of the ``FrameK: `` label that ends just before ``<img>`` at ``img``."""
    for p in range(img - 1, max(img - 16, -1), -1):
        if tok.decode(ids[p:img]).lstrip().startswith("Frame"):
            return p
    raise ValueError(f"no 'FrameK:' label before the video frame at position {img}")


def layout(vlm, inputs: ModelInputs) -> TokenLayout:
    cfg, tok = vlm.torch_model.config, vlm.tokenizer
    per_crop = vlm.processor.image_seq_length
    side = math.isqrt(per_crop)
    sizes = iter(inputs.meta.get("image_sizes", []))
    frames = iter(inputs.meta.get("num_frames", []))
    rows = []
    for b, ids in enumerate(inputs["input_ids"].cpu()):
        runs = [torch.arange(a, z) for a, z, _ in visual_runs(ids, (cfg.image_token_id,))]
        for pos in runs:
            if int(ids[pos[0] - 1]) != tok.start_image_token_id or \
                    int(ids[pos[-1] + 1]) != tok.end_image_token_id:
                raise ValueError(f"row {b}: image tokens at {int(pos[0])} are not inside "
                                 f"<img>…</img>")
        if "num_frames" not in inputs.meta:
            rows.append(finish_row(inputs, b, [image_span(vlm, p, next(sizes), side)
                                               for p in runs]))
            continue
        n = next(frames)
        if len(runs) != n or any(len(p) != per_crop for p in runs):
            raise ValueError(f"row {b}: {len(runs)} frame runs for {n} input frames (frames "
                             f"are given pre-sampled: do_sample_frames must stay False)")
        # Frame k of the processor's output is input frame k: no resampling (video_kwargs).
        groups = [Group(p, (k, k + 1), (side, side)) for k, p in enumerate(runs)]
        first = _label_start(tok, ids, int(runs[0][0]) - 1)
        span = torch.arange(first, int(runs[-1][-1]) + 2)
        marks = span[~torch.isin(span, torch.cat(runs))]
        rows.append(finish_row(inputs, b, videos=[VideoSpan(groups, n, markers=marks)]))
    return TokenLayout(rows)


def build_tiny(seed: int = 0):
    """Tiny InternVL3: Qwen2 LM of 4 layers, 2 vision blocks, 32 px crops of 4x4 tokens (patch
    4, pixel shuffle 0.5), up to 6 tiles + a thumbnail per image."""
    from transformers import (GotOcr2ImageProcessor, InternVLConfig,
                              InternVLForConditionalGeneration, InternVLProcessor, Qwen2Tokenizer)
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    vocab, merges = tiny._bpe(tuple(tiny.QWEN_SPECIALS))
    tok = Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges), unk_token=None, bos_token=None,
                         eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         extra_special_tokens=EXTRA_TOKENS)
    tok.add_special_tokens({"additional_special_tokens": tiny.QWEN_SPECIALS[1:]})
    config = InternVLConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, image_size=32, patch_size=4),
        text_config=dict(model_type="qwen2", vocab_size=len(tok), hidden_size=64,
                         intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, bos_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        image_token_id=tok.context_image_token_id, image_seq_length=16, downsample_ratio=0.5)
    pixels = dict(size={"height": 32, "width": 32}, image_mean=[0.485, 0.456, 0.406],
                  image_std=[0.229, 0.224, 0.225])
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(crop_to_patches=True, max_patches=6, **pixels),
        video_processor=InternVLVideoProcessor(do_sample_frames=False, **pixels),
        tokenizer=tok, image_seq_length=16, chat_template=CHAT_TEMPLATE)
    return tiny.seeded_model(InternVLForConditionalGeneration, config, seed), processor


FAMILY = Family("internvl", ("internvl",), layout, modalities=("image", "video"),
                tiny={"tiny-internvl": build_tiny}, image_token="<IMG_CONTEXT>",
                video_token="<video>", flat_inputs={"pixel_values": crops_per_row},
                video_kwargs={"do_sample_frames": False})
