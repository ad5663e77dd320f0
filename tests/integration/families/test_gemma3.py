"""Gemma 3 specifics: pan-and-scan crops are views, each mapped to pixels through the real
processor; image tokens attend bidirectionally (a mask built outside the LM)."""

import torch
from support import random_image, tiny

from vlminterp.interventions import expand_rows, site_tensor

PAS = dict(do_pan_and_scan=True, pan_and_scan_min_crop_size=16)


def test_pan_and_scan_crops_are_views_that_change_only_their_positions():
    vlm = tiny("tiny-gemma3")
    images = [random_image(0, 96, 32), random_image(1, 96, 32)]
    inputs = vlm.prepare(text="What is this?", images=images, **PAS)
    views = vlm.layout(inputs)[0].images[0].views
    assert [v.kind for v in views] == ["base", "crop", "crop", "crop"]
    assert inputs.row_sizes()["pixel_values"] == [4, 4]
    for v, view in enumerate(views):
        perturbed = inputs.select_rows([0, 0])
        perturbed["pixel_values"][4 + v] = -perturbed["pixel_values"][4 + v]
        with torch.no_grad(), vlm.trace(perturbed):
            h = site_tensor(vlm.residual("embed")).save()
        changed = ((h[0] - h[1]).abs().amax(-1) > 1e-6).nonzero().flatten().tolist()
        assert changed == sorted(view.positions.tolist()), view.kind


def test_a_box_painted_through_the_processor_lands_in_box_positions_of_every_view():
    vlm = tiny("tiny-gemma3")
    box = (40, 8, 56, 24)  # inside the second crop (x 32-64)
    inputs = vlm.prepare(text="What is this?", images=[random_image(0, 96, 32),
                                                          random_image(0, 96, 32, box=box)], **PAS)
    pixels = inputs["pixel_values"]  # the 4 crops of row 0, then those of row 1
    span = vlm.layout(inputs)[0].images[0]
    for v, view in enumerate(span.views):
        cell = view.geometry.cell
        diff = (pixels[v] - pixels[4 + v]).abs().amax(0)
        cells = diff.unfold(0, cell, cell).unfold(1, cell, cell).amax((-1, -2))
        changed = {tuple(c) for c in (cells > 1e-6).nonzero().tolist()}
        named = set(view.geometry.box_cells(box))
        if view.kind == "crop":  # crops are 32 px slices at scale 1: exact
            assert changed == named, v
        else:  # the base view is downscaled 3x: bilinear filtering spills into neighbours
            assert named <= changed <= set(view.geometry.box_cells(box, buffer=1))
    assert len(span.box_positions(box)) == len(span.views[0].box_positions(box)) + 4


def test_image_tokens_attend_bidirectionally_and_expand_rows_keeps_that_mask():
    """The first image token's layer-0 output depends on the last image token's input (no
    causal mask inside the image), also after `expand_rows`."""
    vlm = tiny("tiny-gemma3")
    inputs = vlm.prepare(text="What is this?", images=[random_image(0, 96, 32)])
    visual = vlm.layout(inputs)[0].visual
    first, last = int(visual[0]), int(visual[-1])
    with torch.no_grad(), vlm.trace(inputs):
        expand_rows(vlm, [0, 0])
        h = site_tensor(vlm.residual("embed"))
        h[1, last] = -h[1, last]  # (a rescale would vanish in the RMSNorm)
        out = vlm.layers[0].output.save()
    assert float((out[0, first] - out[1, first]).abs().max()) > 1e-4
    assert float((out[0, :first] - out[1, :first]).abs().max()) == 0.0
