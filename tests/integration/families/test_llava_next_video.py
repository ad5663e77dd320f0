"""LLaVA-NeXT-Video specifics: each frame is one contiguous group of 2x2-pooled cells, row-major
(the anyres image geometry is tested in test_llava_next.py)."""

import torch
from support import media_pair, tiny


def test_group_cells_are_the_pooled_cells_of_their_frame_row_major():
    """Hand-written hooks feed the pooler features that name each vision cell (row, column,
    frame) and read what reaches the projector, whose outputs fill the video tokens in order:
    the token at a group's grid cell (r, c) holds the mean of cells 2r..2r+1 x 2c..2c+1 of
    that group's frame."""
    vlm = tiny("tiny-llava-next-video")
    inputs = media_pair(vlm, "video")
    inner, vcfg = vlm.torch_model.model, vlm.torch_model.config.vision_config
    side, frames = vcfg.image_size // vcfg.patch_size, inputs["pixel_values_videos"].shape[1]
    seen = []

    def name_cells(module, args):
        feats = torch.zeros_like(args[0])
        rows = torch.arange(side).repeat_interleave(side).float()
        feats[:, :, 0], feats[:, :, 1] = rows, torch.arange(side).repeat(side).float()
        feats[:, :, 2] = torch.arange(len(feats)).float()[:, None] % frames
        return (feats,)

    hooks = [inner.vision_resampler.register_forward_pre_hook(name_cells),
             inner.multi_modal_projector.register_forward_hook(
                 lambda m, a, o: seen.append(a[0].clone()))]
    try:
        vlm.forward(inputs)
    finally:
        for h in hooks:
            h.remove()
    video = vlm.layout(inputs)[0].videos[0]
    pooled = seen[0][:frames].flatten(0, 1)  # row 0's tokens
    start = int(video.positions.min())
    assert len(video.markers) == 0 and len(pooled) == len(video.positions)
    for group in video.groups:
        (frame, stop), (gh, gw) = group.frames, group.grid
        assert stop == frame + 1 and (gh, gw) == (side // 2, side // 2)
        cells = group.positions.view(gh, gw) - start
        for r in range(gh):
            for c in range(gw):
                torch.testing.assert_close(pooled[cells[r, c], :3],
                                           torch.tensor([2 * r + 0.5, 2 * c + 0.5, frame]))
