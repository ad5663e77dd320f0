"""Video-LLaVA specifics: a class token per frame (`Group.cls`), two towers, and the floored
centre crop of its image processor."""

import numpy as np
import torch
from support import media_pair, tiny
from PIL import Image

from vlminterp.interventions import site_tensor


def test_each_frame_is_its_class_token_then_its_patches():
    """Hand-written hooks: the video tower's embeddings put the class embedding first in each
    frame; the projector (per token) maps frame f's tokens onto group f's ``cls`` then its
    patch positions, in order."""
    vlm = tiny("tiny-video-llava")
    inner = vlm.torch_model.model
    inputs = media_pair(vlm, "video")
    seen = {}
    hooks = [inner.video_tower.embeddings.register_forward_hook(
                 lambda m, a, o: seen.setdefault("emb", o.clone())),
             inner.multi_modal_projector.register_forward_hook(
                 lambda m, a, o: seen.setdefault("proj", o.clone()))]
    try:
        vlm.forward(inputs)
    finally:
        for h in hooks:
            h.remove()
    emb = inner.video_tower.embeddings
    first = emb.class_embedding + emb.position_embedding.weight[0]
    torch.testing.assert_close(seen["emb"][:, 0], first.expand_as(seen["emb"][:, 0]))
    with torch.no_grad(), vlm.trace(inputs):
        h = site_tensor(vlm.residual("embed")).save()
    video = vlm.layout(inputs)[0].videos[0]
    side = vlm.torch_model.config.vision_config.image_size // \
        vlm.torch_model.config.vision_config.patch_size
    for f, group in enumerate(video.groups):
        assert group.frames == (f, f + 1) and len(group.cls) == 1
        assert len(group.positions) == side * side and group.grid == (side, side)
        torch.testing.assert_close(h[0, group.cls], seen["proj"][f, :1])
        torch.testing.assert_close(h[0, group.positions], seen["proj"][f, 1:])
    assert len(video.positions) == len(video.groups) * (1 + side * side)


def test_video_tower_has_standard_names():
    vlm = tiny("tiny-video-llava")
    tower = vlm.torch_model.model.video_tower
    assert vlm.video_vision._module is tower
    assert vlm.vision._module is vlm.torch_model.model.image_tower
    blocks = vlm.video_vision.blocks
    assert len(blocks) == len(tower.encoder.layers)
    assert all(blocks[j]._module is tower.encoder.layers[j] and
               blocks[j].attn._module is tower.encoder.layers[j].self_attn
               for j in range(len(blocks)))


def test_centre_crop_offset_is_floored_as_the_processor_does():
    """Images whose shortest edge is already the target size (no resampling), with an odd
    surplus on the long side: a sharp edge at original column/row ``x`` lands at crop pixel
    ``x - floor(surplus / 2)`` (rounding would be one pixel off)."""
    vlm = tiny("tiny-video-llava")
    for w, h, x, axis in [(39, 32, 20, 1), (32, 43, 25, 0)]:
        arr = np.zeros((h, w, 3), dtype=np.uint8)
        if axis == 1:
            arr[:, x:] = 255
        else:
            arr[x:] = 255
        inputs = vlm.prepare(text="What?", images=[Image.fromarray(arr)])
        geo = vlm.layout(inputs)[0].images[0].geometry
        profile = inputs["pixel_values"][0].mean(0).mean(1 - axis)
        edge = int(torch.argmax(profile[1:] - profile[:-1])) + 1
        assert edge == x - geo.crop_box[1 - axis], (w, h, edge, geo.crop_box)
        assert geo.crop_box[1 - axis] == (max(w, h) - 32) // 2
