"""Gemma 3: a SigLIP tower, average-pooled to ``mm_tokens_per_image`` soft tokens per image,
each image ``\\n\\n<start_of_image><image_soft_token>×n<end_of_image>\\n\\n`` (the start/end
tokens are markers). Image tokens attend to each other bidirectionally; that mask is built
outside the language model from ``token_type_ids`` (it reaches the LM as a dict of masks).

Pan-and-scan (off by default, as in the real checkpoints' processor config; pass
``do_pan_and_scan=True`` to `VLM.prepare`): the image becomes the whole-image view plus
crops, each resized to the tower's square input and each its own run — one `View` per run.
"""

from __future__ import annotations

import torch

from ..tokens import ImageGeometry, ImageSpan, TokenLayout, View
from . import tiny
from .base import Family, ModelInputs
from .layouts import finish_row, positions_of, prepare as generic_prepare, visual_runs

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
            "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
MEDIA = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
         "image_token": "<image_soft_token>"}
# The real template's shape: bos, turns, the image as <start_of_image>, "model" for the reply.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<start_of_image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}{% endfor %}"
    "{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def gemma_tokenizer(specials=SPECIALS, media=MEDIA):
    """The tiny BPE with Gemma's specials (pad 0, eos 1, bos 2 as in the real vocabulary)."""
    from transformers import GPT2TokenizerFast

    vocab, merges = tiny._bpe(tuple(specials))
    tok = GPT2TokenizerFast(vocab=dict(vocab), merges=list(merges), unk_token="<unk>",
                            bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                            add_prefix_space=False, extra_special_tokens=dict(media))
    tok.add_special_tokens({"additional_special_tokens": list(specials[4:])})
    return tok


def square_view(pos, size, side: int, tokens_per_side: int, kind="base", source=0,
                box=None) -> View:
    """A run of ``tokens_per_side``² tokens from an image (or the crop ``box`` = (left, top,
    right, bottom) of it) resized to ``side``×``side``: as geometry, the whole image resized by
    the crop's scale, then the crop's window."""
    w, h = size
    left, top, right, bottom = box or (0, 0, w, h)
    sx, sy = side / (right - left), side / (bottom - top)
    geo = ImageGeometry((w, h), (w * sx, h * sy), (left * sx, top * sy, left * sx + side,
                                                    top * sy + side),
                        side // tokens_per_side, (tokens_per_side, tokens_per_side))
    return View(pos, geo.grid, geo, kind, source=source)


def pan_and_scan_boxes(size, n_crops: int) -> list[tuple[int, int, int, int]]:
    """The crops `Gemma3ImageProcessor.pan_and_scan` cut (equal slices along the long side,
    ``ceil`` sizes), given how many it cut."""
    w, h = size
    if not n_crops:
        return []
    nw, nh = (n_crops, 1) if w >= h else (1, n_crops)
    cw, ch = -(-w // nw), -(-h // nh)
    return [(x, y, min(x + cw, w), min(y + ch, h)) for y in range(0, nh * ch, ch)
            for x in range(0, nw * cw, cw)]


def layout(vlm, inputs: ModelInputs) -> TokenLayout:
    cfg = vlm.torch_model.config
    side = cfg.vision_config.image_size
    per_side = int(cfg.mm_tokens_per_image ** 0.5)
    sizes = iter(inputs.meta.get("image_sizes", []))
    rows = []
    for b, ids in enumerate(inputs["input_ids"].cpu()):
        runs = visual_runs(ids, (cfg.image_token_id,))
        images = []
        if runs:  # one image per row (`prepare`); with pan-and-scan, crops follow the base run
            size = next(sizes, None) or (side, side)
            boxes = [None] + pan_and_scan_boxes(size, len(runs) - 1)
            views = [square_view(torch.arange(a, z), size, side, per_side,
                                 "base" if v == 0 else "crop", v, boxes[v])
                     for v, (a, z, _) in enumerate(runs)]
            images.append(ImageSpan(views))
        marks = positions_of(ids, (cfg.boi_token_id, cfg.eoi_token_id))
        rows.append(finish_row(inputs, b, images, markers=marks))
    return TokenLayout(rows)


def crops_per_row(inputs, vlm=None) -> list[int]:
    """``pixel_values`` holds one entry per image run (base + pan-and-scan crops); a run is a
    run of ``token_type_ids == 1``."""
    return [len(visual_runs(row.cpu(), (1,))) for row in inputs["token_type_ids"]]


def build_tiny(seed: int = 0):
    """Tiny Gemma 3: 4 decoder layers (sliding-window and global), 2 SigLIP blocks on 32 px
    images (patch 4), pooled to 4x4 = 16 soft tokens."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor
    from transformers import Gemma3Processor

    tok = gemma_tokenizer()
    config = Gemma3Config(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, query_pre_attn_scalar=16, sliding_window=16,
                         layer_types=["sliding_attention", "full_attention"] * 2,
                         max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32,
                           intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=4),
        mm_tokens_per_image=16, boi_token_index=tok.boi_token_id,
        eoi_token_index=tok.eoi_token_id, image_token_index=tok.image_token_id)
    model = tiny.seeded_model(Gemma3ForConditionalGeneration, config, seed)
    with torch.no_grad():  # HF zero-initialises the projection: images would change nothing
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.2)
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": 32, "width": 32},
                                             image_mean=[0.5] * 3, image_std=[0.5] * 3),
        tokenizer=tok, chat_template=CHAT_TEMPLATE, image_seq_length=16)
    return model, processor


def prepare(vlm, **kw) -> ModelInputs:
    return generic_prepare(vlm, nest_images=True, **kw)  # the processor wants images per row


FAMILY = Family("gemma3", ("gemma3",), layout, tiny={"tiny-gemma3": build_tiny},
                prepare=prepare, image_token="<start_of_image>",
                flat_inputs={"pixel_values": crops_per_row})
