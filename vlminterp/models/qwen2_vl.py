"""Qwen2-VL and Qwen2.5-VL: one run of ``<|image_pad|>`` per image and of ``<|video_pad|>`` per
video between ``<|vision_start|>`` / ``<|vision_end|>``; ``temporal_patch_size`` (2) frames per
temporal group, groups contiguous in the run, ``spatial_merge_size``² patches per token."""

from __future__ import annotations

import torch

from ..tokens import Group, ImageGeometry, ImageSpan, TokenLayout, VideoSpan
from . import tiny
from .base import Family, ModelInputs
from .layouts import finish_row, positions_of, visual_runs


def image_view(pos, grid_thw, size, patch: int, merge: int) -> ImageSpan:
    """One image of a Qwen-style processor: the resize (smart_resize) is exact to the patch
    grid, so the geometry is a plain resize with no crop."""
    _, h, w = grid_thw
    gh, gw = h // merge, w // merge
    resized = (w * patch, h * patch)
    geo = ImageGeometry(tuple(size or resized), resized, (0, 0, *resized), patch * merge, (gh, gw))
    return ImageSpan.single(pos, geo)


def video_groups(positions, grid_thw, num_frames: int | None, merge: int, tpatch: int,
                 frame_index=None) -> list[Group]:
    """Temporal groups of one video: ``positions`` hold t groups of gh*gw tokens in order.
    Group g holds input frames ``frame_index[g*tpatch : (g+1)*tpatch]`` (the frames the
    processor was given, padding repeats excluded)."""
    t, h, w = grid_thw
    gh, gw = h // merge, w // merge
    n = num_frames or t * tpatch
    index = list(frame_index) if frame_index is not None else list(range(n))
    groups = []
    for g, pos in enumerate(positions.split(gh * gw)):
        held = index[g * tpatch:(g + 1) * tpatch] or index[-1:]
        groups.append(Group(pos, (min(held), max(held) + 1), (gh, gw)))
    return groups


def layout(vlm, inputs: ModelInputs) -> TokenLayout:
    cfg = vlm.torch_model.config
    return grid_layout(vlm, inputs, tokens=(cfg.image_token_id, cfg.video_token_id),
                       markers=(cfg.vision_start_token_id, cfg.vision_end_token_id),
                       is_video=lambda b, start, token: token == cfg.video_token_id)


def grid_layout(vlm, inputs: ModelInputs, *, tokens, markers, is_video,
                timestamps=None) -> TokenLayout:
    """The layout of the grid families (Qwen2-VL, Qwen3-VL, GLM-4.xV): runs of the visual
    ``tokens``, each image one ``image_grid_thw`` grid, each video one ``video_grid_thw`` grid
    (``is_video(row, run_start, token)`` tells them apart). A video is one run, or with
    ``timestamps`` one run per temporal group, ``timestamps(ids, group_runs)`` giving the
    groups' timestamp tokens (the video's markers). ``markers``: the token ids of the other
    marker tokens. Frame indices come from ``inputs.meta["frames_indices"]`` when present."""
    vcfg = vlm.torch_model.config.vision_config
    merge, patch, tpatch = vcfg.spatial_merge_size, vcfg.patch_size, vcfg.temporal_patch_size
    image_grids = iter(inputs.get("image_grid_thw", torch.zeros(0, 3)).tolist())
    video_grids = iter(inputs.get("video_grid_thw", torch.zeros(0, 3)).tolist())
    sizes = iter(inputs.meta.get("image_sizes", []))
    indices = iter(inputs.meta.get("frames_indices", []))
    frames = iter(inputs.meta.get("num_frames", []))
    rows = []
    for b, ids in enumerate(inputs["input_ids"].cpu()):
        runs = iter(visual_runs(ids, tokens))
        images, videos = [], []
        for start, stop, token in runs:
            if not is_video(b, start, token):
                grid = next(image_grids)
                pos = torch.arange(start, stop)
                _check(b, pos, grid, merge)
                images.append(image_view(pos, grid, next(sizes, None), patch, merge))
                continue
            grid = next(video_grids)
            group_runs = [(start, stop)]
            if timestamps is not None:
                group_runs += [next(runs)[:2] for _ in range(int(grid[0]) - 1)]
            pos = torch.cat([torch.arange(a, z) for a, z in group_runs])
            _check(b, pos, grid, merge)
            n = next(frames, None) or int(grid[0]) * tpatch
            groups = video_groups(pos, grid, n, merge, tpatch, next(indices, None))
            marks = {} if timestamps is None else {"markers": timestamps(ids, group_runs)}
            videos.append(VideoSpan(groups, n, **marks))
        rows.append(finish_row(inputs, b, images, videos, positions_of(ids, markers)))
    return TokenLayout(rows)


def _check(b, pos, grid, merge):
    t, h, w = grid
    if len(pos) != t * (h // merge) * (w // merge):
        raise ValueError(f"row {b}: {len(pos)} visual tokens but grid {t}x{h}x{w} implies "
                         f"{t * (h // merge) * (w // merge)}")


# Frames are given pre-sampled (no processor-side resampling), with the reference
# implementation's (qwen-vl-utils) per-frame pixel cap chosen explicitly: transformers 5.24
# warns that its default will change to it.
VIDEO_KWARGS = {"cap_pixels_per_frame": True, "do_sample_frames": False}
_COMMON = dict(layout=layout, modalities=("image", "video"), image_token="<|image_pad|>",
               video_token="<|video_pad|>", video_kwargs=VIDEO_KWARGS)
FAMILIES = [
    Family("qwen2_vl", ("qwen2_vl",),
           tiny={"tiny-qwen2-vl": lambda seed: tiny.build_qwen2_vl(seed, version="2")},
           **_COMMON),
    Family("qwen2_5_vl", ("qwen2_5_vl",),
           tiny={"tiny-qwen2.5-vl": lambda seed: tiny.build_qwen2_vl(seed, version="2.5")},
           **_COMMON),
]
