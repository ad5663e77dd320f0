"""Qwen3-VL specifics: deepstack features enter after layers 0..k-1, outside the layer modules."""

import torch
from support import media_pair, tiny

from vlminterp.interventions import expand_rows, patch, site_tensor


def test_layer_output_lacks_deepstack_and_residual_includes_it():
    vlm = tiny("tiny-qwen3-vl")
    k = len(vlm.torch_model.config.vision_config.deepstack_visual_indexes)
    inputs = media_pair(vlm, "video")
    visual = vlm.layout(inputs)[0].visual
    outs, resid = [], []  # made before the trace: nnsight returns saved values, not new lists
    with torch.no_grad(), vlm.trace(inputs):
        for i in range(vlm.n_layers):
            outs.append(vlm.layers[i].output.save())  # then layer i+1's input: execution order
            resid.append(site_tensor(vlm.residual(i)).save())
    for i in range(vlm.n_layers):
        gap = (resid[i] - outs[i]).abs()
        if i < k:  # the deepstack addition, at the visual positions only
            assert float(gap[:, visual].amax()) > 1e-4
        else:
            assert float(gap.amax()) == 0.0
        text = torch.ones(gap.shape[1], dtype=torch.bool)
        text[visual] = False
        assert float(gap[:, text].amax()) == 0.0


def test_full_patch_needs_the_deepstack_carry():
    """Without carrying the later deepstack inputs, a full residual patch at the LM input or
    layer 0 leaves a gap (the issue's 0.5-0.8); with it, none."""
    vlm = tiny("tiny-qwen3-vl")
    inputs = media_pair(vlm, "video")
    ref = vlm.forward(inputs)
    for layer in ["embed", 0]:
        gaps = []
        for carry in ([], [(1, [0], None, layer)]):
            with torch.no_grad(), vlm.trace(inputs):
                expand_rows(vlm, None, carry=carry)
                patch(vlm.residual(layer), None, src_row=1, dst_rows=[0])
                logits = vlm.lm_head.output.save()
            gaps.append(float((logits[0] - ref[1]).abs().max()))
        assert gaps[0] > 0.05 and gaps[1] < 1e-4, (layer, gaps)


def test_timestamps_are_markers_between_group_runs():
    vlm = tiny("tiny-qwen3-vl")
    inputs = media_pair(vlm, "video")
    row = vlm.layout(inputs)[0]
    video = row.videos[0]
    text = vlm.tokenizer.decode(inputs["input_ids"][0, video.markers])
    assert text.count("seconds") == len(video.groups) == 4
    assert set(video.markers.tolist()) <= set(row.markers.tolist())
    for a, b in zip(video.groups, video.groups[1:]):  # each group is its own run
        assert int(b.positions.min()) > int(a.positions.max()) + 1
