"""LLaVA-NeXT (1.6): anyres images. One run of ``<image>`` per image: the base view (the
whole image squashed to the tower's square input), then the tile grid with the padding
rows/columns the model removes (``unpad_image``) and one ``image_newline`` token after each
row. Newlines carry the image token id but no pixels: they are separators, not patches.

`anyres_image` (shared with LLaVA-OneVision and LLaVA-NeXT-Video) gives every tile its own
`View`: its surviving cells, its pixel geometry (aspect-preserving resize into the best
pinpoint resolution, centred padding, tile offset) and ``source`` = its crop index in
``pixel_values[b]`` (0 is the base view, tiles follow in row-major order)."""

from __future__ import annotations

import math

import torch

from ..tokens import Group, ImageGeometry, ImageSpan, TokenLayout, View
from . import tiny
from .base import Family, ModelInputs
from .layouts import finish_row, split_grid, visual_runs


def _fit(h: int, w: int, bh: int, bw: int) -> tuple[int, int]:
    """(h, w) resized into (bh, bw) keeping the aspect ratio, as the processor rounds it."""
    if bw / w < bh / h:
        return min(math.ceil(h * bw / w), bh), bw
    return bh, min(math.ceil(w * bh / h), bw)


def anyres_image(positions: torch.Tensor, size_hw, image_size: int, patch: int, pinpoints,
                 max_tiles: int | None = None) -> ImageSpan:
    """The views of one anyres image whose tokens are ``positions``; ``size_hw`` is the
    original (height, width). ``max_tiles`` (OneVision's ``anyres_max_N``): above ~N tiles'
    worth of cells the model shrinks the unpadded grid by bilinear interpolation; its tokens
    then mix neighbouring cells of several tiles and form one ``tiles`` view (source None)
    whose geometry gives each token its nominal footprint."""
    from transformers.image_processing_utils import select_best_resolution
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    h, w = (int(v) for v in size_hw)
    side = image_size // patch
    whole = (0, 0, image_size, image_size)
    views = [View(positions[:side * side], (side, side),
                  ImageGeometry((w, h), (image_size, image_size), whole, patch, (side, side)),
                  "base", source=0)]
    bh, bw = select_best_resolution((h, w), pinpoints)
    tiles_h, tiles_w = bh // image_size, bw // image_size
    nh, nw = _fit(h, w, bh, bw)
    pad_x, pad_y = (bw - nw) // 2, (bh - nh) // 2
    width = tiles_w * side
    cells = torch.arange(tiles_h * side * width).view(1, tiles_h * side, width)
    kept = unpad_image(cells, [h, w])[0]
    kh, kw = kept.shape
    r0, c0 = divmod(int(kept[0, 0]), width)
    gh, gw = kh, kw
    ratio = math.sqrt(kh * kw / (max_tiles * side ** 2)) if max_tiles else 0.0
    if ratio > 1.1:
        gh, gw = int(kh // ratio), int(kw // ratio)
    rest = positions[side * side:]
    if len(rest) != gh * (gw + 1):
        raise ValueError(f"image of size {w}x{h}: {len(positions)} tokens, expected "
                         f"{side * side + gh * (gw + 1)} (base {side}x{side} + {gh}x{gw} tile "
                         f"cells with row newlines); one image per batch row is supported")
    grid, seps = split_grid(rest, gh, gw, newline=True)
    if (gh, gw) != (kh, kw):
        sy, sx = kh / gh, kw / gw
        box = ((c0 * patch - pad_x) / sx, (r0 * patch - pad_y) / sy)
        geo = ImageGeometry((w, h), (nw / sx, nh / sy),
                            (*box, box[0] + gw * patch, box[1] + gh * patch), patch, (gh, gw))
        return ImageSpan(views + [View(grid, (gh, gw), geo, "tiles", seps)])
    table, none = grid.view(kh, kw), torch.zeros(0, dtype=torch.long)
    for i in range(tiles_h):
        for j in range(tiles_w):
            ra, rz = max(i * side, r0), min((i + 1) * side, r0 + kh)
            ca, cz = max(j * side, c0), min((j + 1) * side, c0 + kw)
            if ra >= rz or ca >= cz:  # the tile is all padding: none of its cells is kept
                continue
            geo = ImageGeometry((w, h), (nw, nh), (ca * patch - pad_x, ra * patch - pad_y,
                                                   cz * patch - pad_x, rz * patch - pad_y),
                                patch, (rz - ra, cz - ca))
            ends_row = cz == c0 + kw  # the row newlines follow this tile's cells
            views.append(View(table[ra - r0:rz - r0, ca - c0:cz - c0].flatten(),
                              (rz - ra, cz - ca), geo, "tile",
                              seps[ra - r0:rz - r0] if ends_row else none,
                              source=1 + i * tiles_w + j))
    return ImageSpan(views)


def frame_groups(positions: torch.Tensor, num_frames: int, grid: tuple[int, int]) -> list[Group]:
    """One group per input frame, each a contiguous block of ``grid`` tokens in frame order."""
    per = grid[0] * grid[1]
    if len(positions) != num_frames * per:
        raise ValueError(f"{len(positions)} video tokens cannot be {num_frames} frames of "
                         f"{grid[0]}x{grid[1]} tokens")
    return [Group(p, (f, f + 1), grid) for f, p in enumerate(positions.split(per))]


def video_frames(inputs: ModelInputs) -> int:
    """Frames per video as the processor output them, checked against the frames given."""
    n = int(inputs["pixel_values_videos"].shape[1])
    given = inputs.meta.get("num_frames") or [n]
    if any(g != n for g in given):
        raise ValueError(f"pixel_values_videos holds {n} frames per video but {given} were "
                         f"given: the processor resampled them (use do_sample_frames=False)")
    return n


def images_of_row(cfg, ids: torch.Tensor, sizes, max_tiles: int | None = None) -> list[ImageSpan]:
    """Every ``<image>`` run of a row as an anyres image; ``sizes`` yields (h, w) per image."""
    vcfg = cfg.vision_config
    return [anyres_image(torch.arange(a, z), next(sizes), vcfg.image_size, vcfg.patch_size,
                         cfg.image_grid_pinpoints, max_tiles)
            for a, z, _ in visual_runs(ids, (cfg.image_token_id,))]


def layout(vlm, inputs: ModelInputs) -> TokenLayout:
    cfg = vlm.torch_model.config
    sizes = iter(inputs.get("image_sizes", torch.zeros(0, 2)).tolist())
    return TokenLayout([finish_row(inputs, b, images_of_row(cfg, ids, sizes))
                        for b, ids in enumerate(inputs["input_ids"].cpu())])


TINY_SIZE, TINY_PATCH = 32, 8
TINY_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]


def clip_tower(size: int = TINY_SIZE, patch: int = TINY_PATCH) -> dict:
    return dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=2, image_size=size, patch_size=patch,
                projection_dim=32)


def llama_lm(tok, **kw) -> dict:
    return dict(model_type="llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kw)


def build_tiny(seed: int = 0):
    """Tiny LLaVA-NeXT: CLIP tower on 32 px views (patch 8: 4x4 cells + CLS, dropped), up to
    2x2 tiles, Llama LM of 4 layers; the LLaVA-1.5 (Vicuna) prompt format."""
    from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessor, LlavaNextProcessor)

    tok = tiny.llava_tokenizer()
    config = LlavaNextConfig(vision_config=clip_tower(), text_config=llama_lm(tok),
                             image_token_index=tok.convert_tokens_to_ids("<image>"),
                             image_grid_pinpoints=TINY_PINPOINTS, vision_feature_layer=-2,
                             vision_feature_select_strategy="default")
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(
            size={"shortest_edge": TINY_SIZE}, crop_size={"height": TINY_SIZE, "width": TINY_SIZE},
            image_grid_pinpoints=TINY_PINPOINTS),
        tokenizer=tok, patch_size=TINY_PATCH, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=tiny.LLAVA_CHAT_TEMPLATE)
    return tiny.seeded_model(LlavaNextForConditionalGeneration, config, seed), processor


FAMILY = Family("llava_next", ("llava_next",), layout, modalities=("image",),
                tiny={"tiny-llava-next": build_tiny}, image_token="<image>")
