"""MiniCPM-V 4.6: a SigLIP-style NaViT tower (patch 14, a 2x2 window merger inside the tower
and a 2x2 merger after it: one token per 56x56 px), a Qwen3.5 hybrid decoder (Gated-DeltaNet
``linear_attn`` layers beside ``self_attn`` layers, see `VLM.attention_layers`).

An image is ``<image_id>k</image_id><image>pad…</image>`` (the resized source view) followed,
for large images, by ``<slice>pad…</slice>`` tiles of a resized copy, row-major, a newline
between tile rows. A video frame is one such unit with ``<|video_pad|>`` (no temporal merge:
one group per input frame). Every crop of the batch is packed along the *last* axis of
``pixel_values`` (``[1, C, patch, L]``) and listed in ``target_sizes`` (patch rows, cols).
``vlm.projector`` is the merger's MLP into the LM's space, called once per crop; every visual
token as the LM reads it is at ``vlm.residual("embed")``."""

from __future__ import annotations

from functools import partial

import torch

from ..tokens import Group, ImageGeometry, ImageSpan, TokenLayout, VideoSpan, View
from . import tiny
from .base import Family, ModelInputs
from .layouts import finish_row, prepare as generic_prepare, visual_runs

MARKERS = {"image_start_token": "<image>", "image_end_token": "</image>",
           "slice_start_token": "<slice>", "slice_end_token": "</slice>",
           "image_id_start_token": "<image_id>", "image_id_end_token": "</image_id>"}
_PIXELS = {"image": ("pixel_values", "target_sizes"),
           "video": ("pixel_values_videos", "target_sizes_videos")}


def prepare(vlm, *, video=None, **kw) -> ModelInputs:
    """The processor's call (frames as given: their indices come back in ``meta``); the
    packed pixel tensors split by row along their last axis."""
    if video is not None:
        frames = [len(v) for v in (video if isinstance(video, (list, tuple)) else [video])]
        kw["video_metadata"] = [{"total_num_frames": n, "fps": 1.0, "duration": float(n),
                                 "frames_indices": list(range(n))} for n in frames]
        kw["return_metadata"] = True
    out = generic_prepare(vlm, video=video, **kw)
    metadata = out.pop("video_metadata", None)
    if metadata is not None:
        out.meta["frames_indices"] = [list(m.frames_indices) for m in metadata]
    out.meta["row_axis"] = {pixels: -1 for pixels, _ in _PIXELS.values()}
    return out


def _crops(inputs, vlm, kind: str) -> list[int]:
    """Crops (source views, tiles, frames) per row: one run of placeholders each."""
    tok = vlm.processor.tokenizer
    token = tok.convert_tokens_to_ids(getattr(tok, f"{kind}_token"))
    return [len(visual_runs(ids, (token,))) for ids in inputs["input_ids"].cpu()]


def _columns(inputs, vlm, kind: str) -> list[int]:
    """Packed pixel columns per row: patch rows x cols x patch width of each of its crops."""
    pixels, sizes = _PIXELS[kind]
    per_crop = (inputs[sizes].prod(-1) * inputs[pixels].shape[2]).tolist()
    bounds = torch.tensor([0, *_crops(inputs, vlm, kind)]).cumsum(0).tolist()
    return [sum(per_crop[a:z]) for a, z in zip(bounds, bounds[1:])]


FLAT_INPUTS = {"pixel_values": partial(_columns, kind="image"),
               "target_sizes": partial(_crops, kind="image"),
               "pixel_values_videos": partial(_columns, kind="video"),
               "target_sizes_videos": partial(_crops, kind="video")}


def _units(ids, runs, start_id):
    """Group a row's runs into units: a run after ``<image>`` starts one (the source view of an
    image or a video frame), ``<slice>`` runs are its tiles. Returns (runs, tile row breaks)."""
    units = []
    for start, stop, _ in runs:
        if int(ids[start - 1]) == start_id or not units:
            units.append(([(start, stop)], 0))
        else:
            spans, breaks = units[-1]
            breaks += int(start - spans[-1][1] > 2)  # a newline between </slice> and <slice>
            units[-1] = (spans + [(start, stop)], breaks)
    return units


def _views(unit, sizes, merge: int, patch: int, original) -> list[View]:
    """The source view (plain resize) and the tiles (a resize to the tile grid, then a crop)."""
    (spans, breaks), views = unit, []
    rows = breaks + 1
    cols = max(len(spans) - 1, 1) // rows
    for k, ((a, z), (h, w)) in enumerate(zip(spans, sizes)):
        pos, grid = torch.arange(a, z), (h // merge, w // merge)
        tw, th = w * patch, h * patch
        r, c = divmod(k - 1, cols)
        resized, box = ((tw, th), (0, 0, tw, th)) if k == 0 else \
            ((tw * cols, th * rows), (c * tw, r * th, (c + 1) * tw, (r + 1) * th))
        geo = ImageGeometry(tuple(original), resized, box, patch * merge, grid) \
            if original else None
        views.append(View(pos, grid, geo, "base" if k == 0 else "tile", source=k))
    return views


def layout(vlm, inputs: ModelInputs) -> TokenLayout:
    proc, tok = vlm.processor, vlm.processor.tokenizer
    ids_of = {name: tok.convert_tokens_to_ids(getattr(tok, name)) for name in MARKERS}
    patch = vlm.torch_model.config.vision_config.patch_size
    merge = {"image": 2 if proc.image_token_divisor == 4 else 4,
             "video": 2 if proc.video_token_divisor == 4 else 4}
    sizes = {k: iter(inputs[s].tolist()) if s in inputs else iter(()) for k, (_, s) in
             _PIXELS.items()}
    originals = iter(inputs.meta.get("image_sizes", []))
    indices = iter(inputs.meta.get("frames_indices", []))
    rows = []
    for b, ids in enumerate(inputs["input_ids"].cpu()):
        images, videos = [], []
        marks = torch.nonzero(torch.isin(ids, torch.tensor(list(ids_of.values())))).flatten()
        tags = ids_of["image_id_start_token"], ids_of["image_id_end_token"]
        for kind in ("image", "video"):
            runs = visual_runs(ids, (tok.convert_tokens_to_ids(getattr(tok, f"{kind}_token")),))
            units = _units(ids, runs, ids_of["image_start_token"])
            views = [_views(u, [next(sizes[kind]) for _ in u[0]], merge[kind], patch,
                            next(originals, None) if kind == "image" else None) for u in units]
            if kind == "image":
                images += [ImageSpan(v, _between(ids, v, *tags)) for v in views]
            elif views:
                index = next(indices, None) or list(range(len(views)))
                if len(index) != len(views):
                    raise ValueError(f"row {b}: {len(views)} frame units for {len(index)} "
                                     f"frames; stacked sub-second frames (stack_frames > 1) "
                                     f"are not supported")
                groups = [Group(torch.cat([x.positions for x in v]), (i, i + 1), v[0].grid)
                          for v, i in zip(views, index)]
                span = [x for v in views for x in v]
                videos.append(VideoSpan(groups, inputs.meta["num_frames"][b],
                                        markers=_between(ids, span, *tags)))
        rows.append(finish_row(inputs, b, images, videos, marks))
    return TokenLayout(rows)


def _between(ids, views, id_start: int, id_end: int) -> torch.Tensor:
    """Non-patch positions from the unit's ``<image>`` (or the ``<image_id>k</image_id>`` just
    before it) to the end tag after its last view: tags, id digits, newlines between tiles."""
    first = int(views[0].positions.min()) - 1
    if first >= 1 and int(ids[first - 1]) == id_end:
        first -= 1
        while first > 0 and int(ids[first]) != id_start:
            first -= 1
    last = max(int(v.positions.max()) for v in views) + 1
    inside = torch.arange(first, last + 1)
    return inside[~torch.isin(inside, torch.cat([v.positions for v in views]))]


def view_pixels(vlm, inputs, row: int, v: int):
    """(key, index) of view ``v`` of row ``row``'s first image in the packed pixel tensor."""
    lay = vlm.layout(inputs)
    before = sum(len(s.views) for r in lay.rows[:row] for s in r.images)
    per_crop = inputs["target_sizes"].prod(-1) * inputs["pixel_values"].shape[2]
    start = int(per_crop[:before + v].sum())
    return "pixel_values", (slice(None),) * 3 + (slice(start, start + int(per_crop[before + v])),)


CHAT_TEMPLATE = tiny.QWEN_CHAT_TEMPLATE.replace(
    "<|vision_start|><|image_pad|><|vision_end|>", "<|image_pad|>\n").replace(
    "<|vision_start|><|video_pad|><|vision_end|>", "<|video_pad|>\n")


def build_tiny(seed: int = 0):
    """Tiny MiniCPM-V 4.6: a 2-block tower (window merger after block 0), 4 Qwen3.5 decoder
    layers (linear, full, linear, full); views of at most 112x112 px (4 tokens), so images
    larger than that are cut into tiles."""
    import transformers as tf

    vocab, merges = tiny._bpe(tuple(tiny.QWEN_SPECIALS))
    named = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", **MARKERS}
    tok = tf.Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges), unk_token=None,
                            bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            extra_special_tokens=named)
    tok.add_special_tokens({"additional_special_tokens": tiny.QWEN_SPECIALS[1:] +
                            list(MARKERS.values())}, replace_extra_special_tokens=False)
    text = dict(model_type="qwen3_5_text", vocab_size=len(tok), hidden_size=64,
                intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, linear_num_key_heads=2,
                linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                layer_types=["linear_attention", "full_attention"] * 2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [2, 3, 3], "mrope_interleaved": True},
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=112, patch_size=14)
    config = tf.MiniCPMV4_6Config(text_config=text, vision_config=vision, insert_layer_id=0,
                                  image_size=112, image_token_id=tok.image_token_id,
                                  video_token_id=tok.video_token_id)
    kw = dict(scale_resolution=112, patch_size=14, max_slice_nums=4)
    processor = tf.MiniCPMV4_6Processor(
        image_processor=tf.MiniCPMV4_6ImageProcessor(**kw),
        video_processor=tf.MiniCPMV4_6VideoProcessor(do_sample_frames=False, stack_frames=1,
                                                     **kw),
        tokenizer=tok, chat_template=CHAT_TEMPLATE)
    return tiny.seeded_model(tf.MiniCPMV4_6ForConditionalGeneration, config, seed), processor


# Frames are given pre-sampled: no processor-side sampling, and no stacking of sub-second
# frames into composite images (one token group per input frame).
FAMILY = Family("minicpmv4_6", ("minicpmv4_6",), layout, prepare=prepare,
                modalities=("image", "video"), tiny={"tiny-minicpm-v4.6": build_tiny},
                image_token="<|image_pad|>", video_token="<|video_pad|>",
                video_kwargs={"do_sample_frames": False, "stack_frames": 1},
                flat_inputs=FLAT_INPUTS,
                # the merger returns one tensor per crop; its MLP into the LM's space returns a
                # plain tensor (called once per crop: ``.output`` is the first crop's)
                rename={"model.merger": "merger", "model.merger.mlp.0": "projector"},
                extra={"view_pixels": view_pixels})
