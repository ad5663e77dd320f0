"""Anyres images (LLaVA-NeXT, LLaVA-OneVision, LLaVA-NeXT-Video share `llava_next.anyres_image`):
a bright square painted into the original image lands, in every view, in exactly the cells
`box_positions` names. References: the real processor's pixel crops, and the model's own
`pack_image_features` (unpadding, newlines, interpolation) to place crop cells in the sequence."""

import inspect

import numpy as np
import pytest
import torch
from support import tiny
from PIL import Image

from vlminterp.models import FAMILIES

ANYRES = [tid for fam in FAMILIES if fam.name in ("llava_next", "llava_onevision",
                                                    "llava_next_video") for tid in fam.tiny]
NEWLINE = -7.0


def cell_features(vlm, pixels: torch.Tensor) -> torch.Tensor:
    """Per crop and vision cell: (fraction of bright pixels, crop index) -> [crops, cells, 2],
    the shape of the vision features the model packs."""
    ip = vlm.processor.image_processor
    mean = torch.tensor(ip.image_mean)[:, None, None]
    std = torch.tensor(ip.image_std)[:, None, None]
    bright = ((pixels * std + mean).mean(1) > 0.5).float()  # [crops, S, S]
    p = vlm.torch_model.config.vision_config.patch_size
    cover = torch.nn.functional.avg_pool2d(bright[:, None], p)[:, 0].flatten(1)
    crop = torch.arange(len(pixels), dtype=torch.float)[:, None].expand_as(cover)
    return torch.stack([cover, crop], -1)


def packed(vlm, inputs) -> torch.Tensor:
    """The model's own packing of `cell_features` of row 0's image: one row per image token."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg = vlm.torch_model.config
    inner = vlm.torch_model.model
    size = inputs["image_sizes"][0].cpu()
    n = image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    kw = dict(image_features=[cell_features(vlm, inputs["pixel_values"][0, :n].cpu())],
              image_sizes=size[None], image_newline=torch.full((2,), NEWLINE))
    if "vision_aspect_ratio" in inspect.signature(inner.pack_image_features).parameters:
        kw["vision_aspect_ratio"] = cfg.vision_aspect_ratio
    else:
        kw["vision_feature_select_strategy"] = cfg.vision_feature_select_strategy
    return inner.pack_image_features(**kw)[0][0]


def clear_box(span, w, h, margin=2.0):
    """A box whose edges fall at least ``margin`` resized pixels from every cell boundary of
    every view (the processor's resampling blurs an edge over ~1-2 pixels)."""
    def clear(c, axis):
        for g in (v.geometry for v in span.views):
            x = c * g.resized[axis] / g.original[axis] - g.crop_box[axis]
            if min(abs(x - k * g.cell) for k in range(g.grid[1 - axis] + 1)) < margin:
                return False
        return True

    def first(lo, hi, axis):
        found = next((c for c in range(int(lo), int(hi)) if clear(c, axis)), None)
        assert found is not None, f"no clear box edge in [{lo}, {hi}) for a {w}x{h} image"
        return found
    x0, y0 = first(0.15 * w, 0.5 * w, 0), first(0.15 * h, 0.5 * h, 1)
    return x0, y0, first(x0 + 0.2 * w, w, 0), first(y0 + 0.2 * h, h, 1)


@pytest.mark.parametrize("model_id", ANYRES)
@pytest.mark.parametrize("w,h", [(80, 60), (50, 140), (130, 41), (45, 45)])
def test_painted_box_lands_where_box_positions_says_in_every_view(model_id, w, h):
    vlm = tiny(model_id)
    blank = vlm.prepare(text="What?", images=[Image.new("RGB", (w, h))])
    box = clear_box(vlm.layout(blank)[0].images[0], w, h)
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[box[1]:box[3], box[0]:box[2]] = 255
    inputs = vlm.prepare(text="What?", images=[Image.fromarray(arr)])
    span = vlm.layout(inputs)[0].images[0]
    feats = packed(vlm, inputs)
    run = torch.arange(int(span.positions.min()), int(span.positions.min()) + len(feats))
    assert torch.equal(torch.sort(torch.cat([span.positions, span.separators])).values, run)
    token = dict(zip(run.tolist(), feats.tolist()))
    assert all(token[p] == [NEWLINE, NEWLINE] for p in span.separators.tolist())
    assert len(span.views) >= 2
    for view in span.views:
        pos = view.positions.tolist()
        assert {token[p][1] for p in pos} == {view.source}, view.kind  # its own crop only
        bright = {p for p in pos if token[p][0] > 0}
        assert set(view.box_positions(box).tolist()) == bright, (view.kind, view.source)
    assert len(span.box_positions(box)) > 0



@pytest.mark.parametrize("model_id", ["tiny-llava-next", "tiny-llava-onevision"])
def test_rows_of_different_sizes_map_to_their_own_crops(model_id):
    """Two images with different tile grids in one (padded) batch: perturbing one crop of
    row 1 changes exactly the positions of that view of row 1, and nothing in row 0."""
    vlm = tiny(model_id)
    images = [Image.new("RGB", (80, 60), (90, 30, 200)),
              Image.new("RGB", (50, 140), (20, 220, 60))]
    inputs = vlm.prepare(text="What?", images=images)
    lay = vlm.layout(inputs)
    assert [len(r.images[0].views) for r in lay.rows] == [5, 3]
    with torch.no_grad(), vlm.trace(inputs):
        clean = vlm.layers[0].input.save()
    for view in lay[1].images[0].views:
        perturbed = inputs.select_rows([0, 1])
        perturbed["pixel_values"][1, view.source] += 1.0
        with torch.no_grad(), vlm.trace(perturbed):
            h = vlm.layers[0].input.save()
        changed = ((h - clean).abs().amax(-1) > 1e-6).nonzero().tolist()
        assert changed == [[1, p] for p in sorted(view.positions.tolist())], view.kind
