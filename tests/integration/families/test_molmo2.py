"""Molmo2 specifics: visual features added onto the placeholder embeddings, two pooled views per
image (offset by the pooling padding), one timestamped run per frame."""

import torch
from support import media_pair, random_image, random_video, tiny

from vlminterp.interventions import output_tensor, site_tensor


def test_features_are_added_onto_the_placeholder_embeddings():
    vlm = tiny("tiny-molmo2")
    inputs = media_pair(vlm, "image")
    visual = vlm.layout(inputs)[0].visual
    with torch.no_grad(), vlm.trace(inputs):
        features = output_tensor(vlm.projector).save()  # [tokens of every image, d]
        lm_input = site_tensor(vlm.residual("embed")).save()
    placeholder = vlm.torch_model.get_input_embeddings().weight[vlm.token_id("<im_patch>")]
    added = lm_input[0, visual] - placeholder
    torch.testing.assert_close(added, features[:len(visual)], atol=1e-5, rtol=1e-5)
    assert float(placeholder.abs().max()) > 0  # an overwrite would have lost it


def test_a_box_painted_through_the_processor_lands_in_box_positions_of_both_views():
    """Reference: the processor's own pooling indices say which patches each image token
    pools; a token changes when one of its patches does."""
    vlm = tiny("tiny-molmo2")
    box = (30, 20, 50, 40)
    inputs = vlm.prepare(text="What is this?", images=[random_image(0, 80, 60),
                                                          random_image(0, 80, 60, box=box)])
    n_crops = inputs.row_sizes()["pixel_values"][0]
    pixels = inputs["pixel_values"]
    patch_changed = (pixels[:n_crops] - pixels[n_crops:]).abs().amax(-1).flatten() > 1e-6
    pooling = inputs["image_token_pooling"][:inputs.row_sizes()["image_token_pooling"][0]]
    token_changed = (patch_changed[pooling.clamp(min=0)] & (pooling >= 0)).any(-1)
    span = vlm.layout(inputs)[0].images[0]
    patches = span.positions.sort().values  # the <im_patch> tokens, in the pooling's order
    changed = set(patches[token_changed].tolist())
    for view in span.views:
        mine = changed & set(view.positions.tolist())
        named = set(view.box_positions(box).tolist())
        wide = set(view.box_positions(box, buffer=1).tolist())
        assert named and named <= mine <= wide, view.kind  # bilinear: one pixel of bleed


def test_frames_are_timestamped_runs_with_markers_apart():
    vlm = tiny("tiny-molmo2")
    inputs = vlm.prepare(text="Which?", video=[random_video(0, frames=3)], fps=2.0)
    row = vlm.layout(inputs)[0]
    video = row.videos[0]
    assert [g.frames for g in video.groups] == [(0, 1), (1, 2), (2, 3)]
    assert all(g.grid == (3, 3) for g in video.groups)
    text = vlm.tokenizer.decode(inputs["input_ids"][0, video.markers])
    assert text.split() == ["0.0", "<frame_start><frame_end>", "0.5", "<frame_start><frame_end>",
                            "1.0", "<frame_start><frame_end>"]
    assert set(inputs["input_ids"][0, row.visual].tolist()) == {vlm.token_id("<im_patch>")}
