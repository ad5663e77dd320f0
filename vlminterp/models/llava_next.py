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
from dataclasses import dataclass

import torch

from ..tokens import Group, ImageGeometry, ImageSpan, Size, TokenLayout, View
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
    fit = Fit((w, h), (nw, nh), (pad_x, pad_y), patch)
    if (gh, gw) != (kh, kw):
        return ImageSpan(views + [_shrunk_view(grid, seps, fit, (r0, c0), (kh, kw), (gh, gw))])
    return ImageSpan(views + _tile_views(grid.view(kh, kw), seps, fit, (r0, c0), side,
                                         (tiles_h, tiles_w)))


@dataclass(frozen=True)
class Fit:
    """The tiles' pixels: the original (w, h) resized to ``resized`` (w, h) and pasted at
    ``pad`` (x, y) into the best pinpoint resolution, cut in cells of ``patch`` pixels."""

    original: tuple[int, int]
    resized: tuple[int, int]
    pad: tuple[int, int]
    patch: int

    def geometry(self, top: Size, left: Size, grid: tuple[int, int],
                 resized: tuple[Size, Size] | None = None) -> ImageGeometry:
        """Cells of ``patch`` pixels from (left, top) of the resized image on."""
        box = (left, top, left + grid[1] * self.patch, top + grid[0] * self.patch)
        return ImageGeometry(self.original, resized or self.resized, box, self.patch, grid)


def _tile_views(table, seps, fit: Fit, origin, side: int, tiles) -> list[View]:
    """One view per tile with kept cells; ``table`` holds the kept cells' positions (kh, kw),
    whose cell (0, 0) is the padded grid's cell ``origin``; each row's newline goes to the
    tile that ends the row."""
    (r0, c0), (kh, kw) = origin, table.shape
    none, views = torch.zeros(0, dtype=torch.long), []
    for i in range(tiles[0]):
        for j in range(tiles[1]):
            ra, rz = max(i * side, r0), min((i + 1) * side, r0 + kh)
            ca, cz = max(j * side, c0), min((j + 1) * side, c0 + kw)
            if ra >= rz or ca >= cz:  # the tile is all padding: none of its cells is kept
                continue
            grid = (rz - ra, cz - ca)
            geo = fit.geometry(ra * fit.patch - fit.pad[1], ca * fit.patch - fit.pad[0], grid)
            views.append(View(table[ra - r0:rz - r0, ca - c0:cz - c0].flatten(), grid, geo,
                              "tile", seps[ra - r0:rz - r0] if cz == c0 + kw else none,
                              source=1 + i * tiles[1] + j))
    return views


def _shrunk_view(grid, seps, fit: Fit, origin, kept, shrunk) -> View:
    """OneVision's bilinearly shrunk grid as one view: token (r, c) nominally covers kept
    cells [r, r+1) * kh/gh x [c, c+1) * kw/gw. Scaling the resized image by gh/kh, gw/kw
    makes those footprints square cells of ``patch`` pixels."""
    (r0, c0), (kh, kw), (gh, gw) = origin, kept, shrunk
    sy, sx = kh / gh, kw / gw
    top, left = (r0 * fit.patch - fit.pad[1]) / sy, (c0 * fit.patch - fit.pad[0]) / sx
    geo = fit.geometry(top, left, shrunk, resized=(fit.resized[0] / sx, fit.resized[1] / sy))
    return View(grid, shrunk, geo, "tiles", seps)


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
