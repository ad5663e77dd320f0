"""What every family's `prepare` and `layout` share: the processor call, the visual-run parser,
grid splitting (row newlines) and the assembly of a `RowLayout`.

A family's layout walks each row's *runs* of visual placeholder tokens (`visual_runs`) in
order, pairs them with the processor's per-image / per-video outputs, and builds `ImageSpan`
views and `VideoSpan` groups; `finish_row` then derives ``visual`` (patch tokens), ``markers``
and ``text`` (every real non-patch position) so no family computes them twice.
"""

from __future__ import annotations

import numpy as np
import torch

from ..tokens import ImageSpan, RowLayout, VideoSpan
from .base import ModelInputs
from .common import as_list, chat_texts


def to_pil(image):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")


def check_videos(videos) -> list[np.ndarray]:
    arrays = [np.asarray(v) for v in videos]
    for i, v in enumerate(arrays):
        if v.ndim != 4 or v.shape[-1] != 3 or v.dtype != np.uint8:
            raise ValueError(f"video[{i}]: expected a [T,H,W,3] uint8 array, got "
                             f"{v.dtype} {tuple(v.shape)}")
    return arrays


def prepare(vlm, *, text, images, video, chat, answer_prefix, nest_images: bool = False,
            **kw) -> ModelInputs:
    """The processor over one prompt per row and one image or video per row. ``meta`` keeps
    what the processor does not return: original image sizes, frame counts, and per flattened
    input key (`Family.flat_inputs`) how many entries each row owns. ``nest_images``: the
    processor wants one list of images per row (Idefics3 / SmolVLM)."""
    family = vlm.family
    images, videos = as_list(images, "images"), as_list(video, "video")
    if videos and not family.takes_video:
        raise ValueError(f"video: {family.name} takes images only; pass images=[...]")
    if images and videos:
        raise ValueError("images and video: give one kind of media per batch")
    kind = "video" if videos else ("image" if images else None)
    placeholder = {"image": family.image_token, "video": family.video_token}.get(kind)
    texts = chat_texts(vlm.processor, text, kind, len(images or videos), chat, answer_prefix,
                       placeholder)
    call = dict(text=texts, return_tensors="pt", padding=True, **kw)
    meta: dict = {}
    if images:
        pil = [to_pil(im) for im in images]
        call["images"] = [[im] for im in pil] if nest_images else pil
        meta["image_sizes"] = [im.size for im in pil]
    if videos:
        arrays = check_videos(videos)
        call["videos"] = [list(v) for v in arrays]
        meta["num_frames"] = [len(v) for v in arrays]
        call = {**family.video_kwargs, **call}
    out = ModelInputs(dict(vlm.processor(**call)), meta=meta)
    out.meta["row_sizes"] = {key: sizes(out, vlm) for key, sizes in family.flat_inputs.items()
                             if key in out}
    return out.to(vlm.device)


def visual_runs(ids: torch.Tensor, token_ids) -> list[tuple[int, int, int]]:
    """Maximal runs of one visual token id in a row: ``(start, stop, token id)``, in order."""
    ids = ids.tolist()
    wanted = {int(t) for t in token_ids if t is not None}
    out, start = [], None
    for i in range(len(ids) + 1):
        tok = ids[i] if i < len(ids) else None
        if start is not None and tok != ids[start]:
            out.append((start, i, ids[start]))
            start = None
        if start is None and tok in wanted:
            start = i
    return out


def positions_of(ids: torch.Tensor, token_ids) -> torch.Tensor:
    """Positions of a row whose token is any of ``token_ids`` (ids may be None: skipped)."""
    wanted = [int(t) for t in token_ids if t is not None]
    if not wanted:
        return torch.zeros(0, dtype=torch.long)
    return torch.nonzero(torch.isin(ids, torch.tensor(wanted))).flatten()


def split_grid(positions: torch.Tensor, rows: int, cols: int, newline: bool = False):
    """A run laid out as ``rows`` x ``cols`` cells, each row followed by one separator token
    when ``newline``: returns (cell positions in row-major order, separator positions)."""
    width = cols + int(newline)
    if len(positions) != rows * width:
        raise ValueError(f"{len(positions)} tokens cannot form a {rows}x{cols} grid"
                         f"{' with row newlines' if newline else ''}")
    table = positions.view(rows, width)
    seps = table[:, cols:].flatten() if newline else torch.zeros(0, dtype=torch.long)
    return table[:, :cols].flatten(), seps


def row_mask(inputs: ModelInputs, b: int) -> torch.Tensor:
    mask = inputs.get("attention_mask")
    ids = inputs["input_ids"][b]
    return torch.ones_like(ids, dtype=torch.bool).cpu() if mask is None else mask[b].bool().cpu()


def finish_row(inputs: ModelInputs, b: int, images: list[ImageSpan] = (),
               videos: list[VideoSpan] = (), markers: torch.Tensor | None = None,
               cls: int | None = None) -> RowLayout:
    """The `RowLayout` of row ``b``: ``visual`` = every patch (and per-frame class) token of
    its spans; ``markers`` = the spans' separators/markers plus ``markers``; ``text`` = every
    real position that is not a patch token."""
    real = row_mask(inputs, b)
    parts = [s.positions for s in [*images, *videos]]
    visual = torch.sort(torch.cat(parts)).values if parts else torch.zeros(0, dtype=torch.long)
    mark = [s.separators for s in images] + [s.markers for s in images] + \
        [v.markers for v in videos] + ([markers] if markers is not None else [])
    mark = torch.unique(torch.cat([torch.zeros(0, dtype=torch.long), *mark]))
    is_visual = torch.zeros(len(real), dtype=torch.bool)
    is_visual[visual] = True
    text = torch.nonzero(real & ~is_visual).flatten()
    return RowLayout(seq_len=len(real), text=text, visual=visual,
                     last=int(torch.nonzero(real).flatten()[-1]), images=list(images),
                     videos=list(videos), cls=cls, markers=mark[real[mark]] if len(mark) else mark)
