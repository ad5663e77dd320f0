"""Molmo2: a ViT, an attention-pooling adapter, a Qwen3 / OLMo LM. The visual features are
*added* onto the ``<im_patch>`` placeholder embeddings (``visual_entry="add"``), not written
over them. Every image and frame token attends to every other one (a mask built outside the LM
from ``mm_token_type_ids``).

An image is two views: the whole image resized to the crop size (``<low_res_im_start>`` …
``<im_end>``, pooled 2x2) and the high-resolution canvas tiled into overlapping crops
(``<im_start>`` … ``<im_end>``, pooled 2x2, ``<im_col>`` after each row); the pooling grids
are padded evenly, so their cells are offset by the padding. A video is one run per frame,
``{t:.1f} <frame_start>…<frame_end>``, each frame resized to the crop size and pooled 3x3.
The markers (starts, ends, ``<im_col>``, timestamps) are kept apart from the patch tokens."""

from __future__ import annotations

import math
import re

import torch

from ..tokens import Group, ImageGeometry, ImageSpan, TokenLayout, VideoSpan, View
from . import tiny
from .base import Family, ModelInputs
from .layouts import finish_row, positions_of, prepare as generic_prepare, split_grid

MOLMO_TOKENS = ["<im_patch>", "<im_col>", "<im_start>", "<low_res_im_start>", "<frame_start>",
                "<im_end>", "<frame_end>", "<im_low>", "<|image|>", "<|video|>"]
CHAT_TEMPLATE = tiny.QWEN_CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>",
                                                "<|image|>").replace(
    "<|vision_start|><|video_pad|><|vision_end|>", "<|video|>")


def prepare(vlm, *, video=None, fps: float = 2.0, **kw) -> ModelInputs:
    """Timestamps come from the frames' rate (``fps``, default 2 = Molmo2's ``max_fps``); the
    frames given are used as they are. Pooling indices point into the batch's flattened
    patches, so ``meta["index_spans"]`` says how many patches each row owns."""
    if video is not None:
        frames = [len(v) for v in (video if isinstance(video, (list, tuple)) else [video])]
        kw["video_metadata"] = [{"total_num_frames": n, "fps": fps,
                                 "frames_indices": list(range(n))} for n in frames]
    out = generic_prepare(vlm, video=video, **kw)
    spans = {}
    for pooling, pixels in (("image_token_pooling", "pixel_values"),
                            ("video_token_pooling", "pixel_values_videos")):
        if pooling in out:
            per_crop = out[pixels].shape[1]
            spans[pooling] = [n * per_crop for n in out.row_sizes()[pixels]]
    out.meta["index_spans"] = spans
    return out


def _pooled_view(pos, size, resized, patch: int, pool: int, kind, source, col) -> View:
    """A pooled patch grid of an image resized to ``resized`` (w, h): ``arange_for_pooling``
    pads the patch grid evenly to a multiple of ``pool``, so cells start ``pad`` patches
    before the image's edge. ``col``: a separator token after each row of cells."""
    pw, ph = resized[0] // patch, resized[1] // patch
    rows, cols = math.ceil(ph / pool), math.ceil(pw / pool)
    left, top = (cols * pool - pw) // 2 * patch, (rows * pool - ph) // 2 * patch
    cells, seps = split_grid(pos, rows, cols, newline=col)
    cell = pool * patch
    geo = ImageGeometry(tuple(size or resized), tuple(resized),
                        (-left, -top, cols * cell - left, rows * cell - top), cell, (rows, cols))
    return View(cells, (rows, cols), geo, kind, seps, source)


def layout(vlm, inputs: ModelInputs) -> TokenLayout:
    tok = {t: vlm.tokenizer.convert_tokens_to_ids(t) for t in MOLMO_TOKENS}
    grids = iter(inputs.get("image_grids", torch.zeros(0, 4)).tolist())
    video_grids = iter(inputs.get("video_grids", torch.zeros(0, 3)).tolist())
    sizes = iter(inputs.meta.get("image_sizes", []))
    rows = []
    for b, ids in enumerate(inputs["input_ids"].cpu()):
        images = [_image(vlm.processor, s, next(grids), next(sizes))
                  for s in positions_of(ids, (tok["<low_res_im_start>"],)).tolist()]
        starts = positions_of(ids, (tok["<frame_start>"],)).tolist()
        videos = [_video(vlm, ids, starts, next(video_grids))] if starts else []
        rows.append(finish_row(inputs, b, images, videos))
    return TokenLayout(rows)


def _image(proc, s: int, grid, size) -> ImageSpan:
    """The image whose ``<low_res_im_start>`` is at ``s``: thumbnail, ``<im_end>``,
    ``<im_start>``, high-resolution canvas, ``<im_end>``."""
    from transformers.models.molmo2.image_processing_molmo2 import compute_crop_geometry

    ip, col = proc.image_processor, proc.image_use_col_tokens
    low_col = col if proc.use_single_crop_col_tokens is None else proc.use_single_crop_col_tokens
    low_h, low_w, high_h, high_w = [int(x) for x in grid]
    crop, p, pool = ip.size["height"], ip.patch_size, ip.pooling_size[0]
    low_end = s + 1 + low_h * (low_w + int(low_col))
    high_end = low_end + 2 + high_h * (high_w + int(col))
    _, _, ch, cw = compute_crop_geometry(size[1], size[0], ip.max_crops, ip.overlap_margins,
                                         crop, p)
    views = [_pooled_view(torch.arange(s + 1, low_end), size, (crop, crop), p, pool,
                          "thumbnail", 0, low_col),
             _pooled_view(torch.arange(low_end + 2, high_end), size, (cw, ch), p, pool, "tiles",
                          None, col)]
    return ImageSpan(views, torch.tensor([s, low_end, low_end + 1, high_end]))


def _video(vlm, ids, starts: list[int], grid) -> VideoSpan:
    """One group per ``<frame_start>`` (frame f of the frames given: no resampling)."""
    proc = vlm.processor
    vp, col = proc.video_processor, proc.video_use_col_tokens
    n, gh, gw = [int(x) for x in grid]
    if len(starts) != n:
        raise ValueError(f"{len(starts)} frame runs for a video of {n} frames")
    crop, p, pool = vp.size["height"], vp.patch_size, vp.pooling_size[0]
    groups, marks = [], []
    for f, s in enumerate(starts):
        stop = s + 1 + gh * (gw + int(col))
        view = _pooled_view(torch.arange(s + 1, stop), None, (crop, crop), p, pool, "frame",
                            None, col)
        groups.append(Group(view.positions, (f, f + 1), view.grid))
        marks += [s, stop, *view.separators.tolist(), *_timestamp(vlm.tokenizer, ids, s)]
    return VideoSpan(groups, n, markers=torch.tensor(sorted(marks)))


def _timestamp(tokenizer, ids, start: int) -> list[int]:
    """The ``t.t`` text just before a ``<frame_start>``: tokens of digits, ``.`` and spaces."""
    out, p = [], start - 1
    while p >= 0 and re.fullmatch(r"[\d. ]+", tokenizer.decode([int(ids[p])])):
        out.append(p)
        p -= 1
    return out


def _view_pixels(vlm, inputs, row, v):
    """The thumbnail is the row's first crop; the high-resolution view all the others."""
    start = sum(inputs.row_sizes()["pixel_values"][:row])
    n = inputs.row_sizes()["pixel_values"][row]
    return "pixel_values", start if v == 0 else slice(start + 1, start + n)


def build_tiny(seed: int = 0):
    """Tiny Molmo2: 4 Qwen3 layers, 2 ViT blocks on 28 px crops (patch 4), up to 4 crops
    (margins of 1 patch), images pooled 2x2, frames 3x3 (9 tokens per frame)."""
    from transformers import Molmo2Config, Molmo2ForConditionalGeneration
    from transformers import Molmo2ImageProcessor, Molmo2Processor, Molmo2VideoProcessor

    tok = tiny.qwen_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": tiny.QWEN_SPECIALS[1:] + MOLMO_TOKENS})
    ids = {t: tok.convert_tokens_to_ids(t) for t in MOLMO_TOKENS}
    crop = {"height": 28, "width": 28}
    processor = Molmo2Processor(  # the real checkpoints' processor_config: no col tokens
        image_processor=Molmo2ImageProcessor(size=crop, patch_size=4, max_crops=4,
                                             overlap_margins=[1, 1], pooling_size=[2, 2]),
        video_processor=Molmo2VideoProcessor(size=crop, patch_size=4, pooling_size=[3, 3],
                                             do_sample_frames=False),
        tokenizer=tok, chat_template=CHAT_TEMPLATE, use_single_crop_col_tokens=False)
    heads = dict(num_attention_heads=2, num_key_value_heads=2, head_dim=16)
    config = Molmo2Config(
        text_config=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, vocab_size=len(tok), additional_vocab_size=0,
                         num_hidden_layers=4, intermediate_size=128, max_position_embeddings=2048),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           image_size=[28, 28], patch_size=4, num_position_embeddings=49, **heads),
        adapter_config=dict(vision_feature_layer=[-1, -2], hidden_size=32, intermediate_size=64,
                            text_hidden_size=64, **heads),
        image_start_token_id=ids["<im_start>"], image_end_token_id=ids["<im_end>"],
        low_res_image_start_token_id=ids["<low_res_im_start>"], image_patch_id=ids["<im_patch>"],
        frame_start_token_id=ids["<frame_start>"], frame_end_token_id=ids["<frame_end>"])
    model = tiny.seeded_model(Molmo2ForConditionalGeneration, config, seed)
    with torch.no_grad():  # at the default std the adapter's output is ~1e-10: images are dead
        for module in model.model.multi_modal_projector.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, module.in_features ** -0.5)
    return model, processor


def _tokens_per_image(inputs, vlm=None) -> list[int]:
    """Pooled tokens of each image: thumbnail rows x cols + high-resolution rows x cols."""
    return inputs["image_grids"].view(-1, 2, 2).prod(-1).sum(-1).tolist()


FAMILY = Family(
    "molmo2", ("molmo2",), layout, modalities=("image", "video"), tiny={"tiny-molmo2": build_tiny},
    prepare=prepare,  # the projector into the LM's space is the adapter's MLP (a plain tensor)
    rename={"model.multi_modal_projector": "adapter",
            "model.multi_modal_projector.image_projector": "projector"},
    image_token="<|image|>", video_token="<|video|>", visual_entry="add",
    video_kwargs={"do_sample_frames": False}, extra={"view_pixels": _view_pixels},
    flat_inputs={"pixel_values": lambda out, vlm: out["image_num_crops"].tolist(),
                 "image_token_pooling": _tokens_per_image,
                 "pixel_values_videos": lambda out, vlm: out["video_grids"][:, 0].tolist(),
                 "video_token_pooling": lambda out, vlm: out["video_grids"].prod(-1).tolist()})
