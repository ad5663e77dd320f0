"""SmolVLM2 (images and video) and Idefics3 (images). An image is split into row/column tiles
``<fake_token_around_image><row_r_col_c><image>…`` (a newline after each tile row) followed by a
global view ``\\n<fake_token_around_image><global-img><image>…<fake_token_around_image>``; a
small image is the global view alone. A video is an intro sentence, then per frame
``\\nFrame from mm:ss:`` and one global view of the frame. Every view is ``image_seq_len``
tokens, a row-major grid after the pixel shuffle; ``pixel_values`` is ``[batch, crops, …]``
(zero crops pad rows with fewer)."""

from __future__ import annotations

import math
import sys

import torch

from ..tokens import Group, ImageGeometry, ImageSpan, TokenLayout, VideoSpan, View
from . import tiny
from .base import Family, ModelInputs
from .layouts import finish_row, prepare as generic_prepare, visual_runs

ROW_COL = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
SPECIALS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
            "<video>", *ROW_COL]


def prepare(vlm, *, video=None, fps: float = 1.0, **kw) -> ModelInputs:
    """One list of images per row (the processor's shape); frame timestamps ``mm:ss`` come from
    the frames' rate ``fps`` (default 1: SmolVLM2 samples 1 frame per second), frames used as
    given."""
    if video is not None:
        frames = [len(v) for v in (video if isinstance(video, (list, tuple)) else [video])]
        kw["video_metadata"] = [{"total_num_frames": n, "fps": fps, "duration": n / fps,
                                 "frames_indices": list(range(n))} for n in frames]
    return generic_prepare(vlm, video=video, nest_images=True, **kw)


def canvas(ip, size) -> tuple[int, int]:
    """(width, height) of the image the tiles are cut from: the longest edge resized to
    ``size``, then each side rounded up to a multiple of the tile (the processor's steps)."""
    mod, (w, h), tile = sys.modules[type(ip).__module__], size, ip.max_image_size["longest_edge"]
    if ip.do_resize:
        h, w = mod._resize_output_size_rescale_to_max_len(h, w, max_len=ip.size["longest_edge"])
        h, w = mod._resize_output_size_scale_below_upper_bound(h, w, max_len=mod.MAX_IMAGE_SIZE)
    aspect = w / h
    if w >= h:
        w = math.ceil(w / tile) * tile
        h = math.ceil(int(w / aspect) / tile) * tile
    else:
        h = math.ceil(h / tile) * tile
        w = math.ceil(int(h * aspect) / tile) * tile
    return w, h


def _back_to(tok, ids, stop: int, prefix: str, limit: int) -> int | None:
    """The position where the text ending before ``stop`` starts with ``prefix``."""
    for p in range(stop - 1, max(stop - limit, -1), -1):
        if tok.decode(ids[p:stop]).lstrip().startswith(prefix):
            return p
    return None


def layout(vlm, inputs: ModelInputs) -> TokenLayout:
    cfg, tok, ip = vlm.torch_model.config, vlm.tokenizer, vlm.processor.image_processor
    side = math.isqrt(vlm.processor.image_seq_len)
    glob = tok.convert_tokens_to_ids("<global-img>")
    row_col = {tok.convert_tokens_to_ids(t): t for t in ROW_COL}
    sizes = iter(inputs.meta.get("image_sizes", []))
    frames = iter(inputs.meta.get("num_frames", []))
    rows = []
    for b, ids in enumerate(inputs["input_ids"].cpu()):
        views, images, whole = [], [], []
        for start, stop, _ in visual_runs(ids, (cfg.image_token_id,)):
            pos, tag = torch.arange(start, stop), int(ids[start - 1])
            seps = torch.arange(start - 2, start)  # <fake_token_around_image> + row/col or global
            if tag in row_col:
                r, c = (int(x) for x in row_col[tag][5:-1].split("_col_"))
                views.append((r, c, pos, seps))
                continue
            if tag != glob:
                raise ValueError(f"row {b}: image tokens at {start} follow neither a "
                                 f"<row_r_col_c> nor a <global-img> tag")
            whole.append(pos)
            if "num_frames" not in inputs.meta:
                images.append(image_span(ip, views, pos, seps, next(sizes), side))
                views = []
        if "num_frames" not in inputs.meta:
            rows.append(finish_row(inputs, b, images))
            continue
        n = next(frames)
        if len(whole) != n:
            raise ValueError(f"row {b}: {len(whole)} frames for {n} input frames (frames are "
                             f"given pre-sampled: do_sample_frames must stay False)")
        # Frame k of the processor's output is input frame k: no resampling (video_kwargs).
        groups = [Group(p, (k, k + 1), (side, side)) for k, p in enumerate(whole)]
        label = _back_to(tok, ids, int(whole[0][0]) - 2, "Frame from", 32)
        if label is None:
            raise ValueError(f"row {b}: no 'Frame from mm:ss:' label before the first frame")
        intro = _back_to(tok, ids, label, "You are provided", 256)
        span = torch.arange(label if intro is None else intro, int(whole[-1][-1]) + 2)
        marks = span[~torch.isin(span, torch.cat(whole))]
        rows.append(finish_row(inputs, b, videos=[VideoSpan(groups, n, markers=marks)]))
    return TokenLayout(rows)


def image_span(ip, tiles, pos, seps, size, side: int) -> ImageSpan:
    """Tiles in the processor's row-major order (their ``<row_r_col_c>`` tags give the grid),
    then the global view: the whole image resized to one tile."""
    tile = ip.max_image_size["longest_edge"]
    full = (0, 0, tile, tile)
    geo = ImageGeometry(tuple(size), (tile, tile), full, tile // side, (side, side))
    if not tiles:
        return ImageSpan([View(pos, (side, side), geo, "global", seps)],
                         markers=torch.tensor([int(pos[-1]) + 1]))
    n_rows, n_cols = tiles[-1][0], tiles[-1][1]
    w, h = canvas(ip, size)
    if (n_cols * tile, n_rows * tile) != (w, h) or len(tiles) != n_rows * n_cols:
        raise ValueError(f"image of {size[0]}x{size[1]}: {n_rows}x{n_cols} tiles, but the "
                         f"processor's resize gives a {w}x{h} canvas of {tile}px tiles")
    views = [View(p, (side, side), ImageGeometry(
        tuple(size), (w, h), ((c - 1) * tile, (r - 1) * tile, c * tile, r * tile), tile // side,
        (side, side)), "tile", s, source=k) for k, (r, c, p, s) in enumerate(tiles)]
    views.append(View(pos, (side, side), geo, "global", seps, source=len(tiles)))
    first, last = int(tiles[0][3][0]), int(pos[-1]) + 1  # the closing <fake_token_around_image>
    span = torch.arange(first, last + 1)
    inside = torch.cat([torch.cat([v.positions, v.separators]) for v in views])
    return ImageSpan(views, markers=span[~torch.isin(span, inside)])


def build_tiny(seed: int = 0, kind: str = "smolvlm"):
    """Tiny SmolVLM2 / Idefics3: Llama LM of 4 layers, 2 vision blocks, 32 px tiles of 4x4
    tokens (patch 4, pixel shuffle 2), images resized to a longest edge of 64 (up to 2x2 tiles
    + the global view); SmolVLM2 video frames squared to 32 px."""
    from transformers import GPT2TokenizerFast
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    vocab, merges = tiny._bpe(tuple(tiny.QWEN_SPECIALS))
    tok = GPT2TokenizerFast(vocab=dict(vocab), merges=list(merges), unk_token="<|endoftext|>",
                            bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                            pad_token="<|endoftext|>", add_prefix_space=False)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", *SPECIALS]})
    config = dict(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=4),
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=64,
                         intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"))
    pixels = dict(max_image_size={"longest_edge": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    common = dict(tokenizer=tok, image_seq_len=16, chat_template=DEFAULT_CHAT_TEMPLATE)
    if kind == "idefics3":
        from transformers import (Idefics3Config, Idefics3ForConditionalGeneration,
                                  Idefics3ImageProcessor, Idefics3Processor)

        processor = Idefics3Processor(
            image_processor=Idefics3ImageProcessor(size={"longest_edge": 64}, **pixels), **common)
        return tiny.seeded_model(Idefics3ForConditionalGeneration, Idefics3Config(**config),
                                 seed), processor
    from transformers import (SmolVLMConfig, SmolVLMForConditionalGeneration,
                              SmolVLMImageProcessor, SmolVLMProcessor)
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

    processor = SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(size={"longest_edge": 64}, **pixels),
        video_processor=SmolVLMVideoProcessor(size={"longest_edge": 32}, do_sample_frames=False,
                                              **pixels), **common)
    return tiny.seeded_model(SmolVLMForConditionalGeneration, SmolVLMConfig(**config),
                             seed), processor


FAMILIES = [
    Family("smolvlm", ("smolvlm",), layout, prepare=prepare, modalities=("image", "video"),
           tiny={"tiny-smolvlm2": build_tiny}, image_token="<image>", video_token="<video>",
           video_kwargs={"do_sample_frames": False}),
    Family("idefics3", ("idefics3",), layout, prepare=prepare, modalities=("image",),
           tiny={"tiny-idefics3": lambda seed: build_tiny(seed, "idefics3")},
           image_token="<image>"),
]
