"""Gemma 4 specifics: one run per frame after its mm:ss timestamp, per-layer inputs that carry
the frames, KV-shared layers (logits_to_keep is unsafe; expand_rows carries the shared K/V)."""

import dataclasses

import torch
from support import media_pair, random_video, tiny

from vlminterp.interventions import expand_rows, patch
from vlminterp.models.gemma4 import PerLayerInputs
from vlminterp.video.multiple_choice import last_logits_kwargs, option_scores


def test_frames_are_timestamped_runs_of_at_least_64_tokens():
    vlm = tiny("tiny-gemma4")
    inputs = vlm.prepare(text="Which?", video=[random_video(0, frames=3)], fps=0.5)
    row = vlm.layout(inputs)[0]
    video = row.videos[0]
    assert [g.frames for g in video.groups] == [(0, 1), (1, 2), (2, 3)]
    assert all(len(g.positions) == 64 and g.grid == (8, 8) for g in video.groups)
    stamps = vlm.tokenizer.decode(inputs["input_ids"][0, video.markers]).split()
    assert stamps == ["00:00", "00:02", "00:04"]
    assert set(video.markers.tolist()) <= set(row.markers.tolist())


def test_per_layer_inputs_change_exactly_at_the_perturbed_frame():
    vlm = tiny("tiny-gemma4")
    base = random_video(0, frames=2)
    other = base.copy()
    other[1] = 255 - other[1]
    inputs = vlm.prepare(text="Which?", video=[base, other])
    group = vlm.layout(inputs)[0].videos[0].groups[1]
    with torch.no_grad(), vlm.trace(inputs):
        per_layer = vlm.layers[2].inputs[0][1].save()  # what layer 2 consumes
    changed = ((per_layer[0] - per_layer[1]).abs().amax(-1) > 1e-6).nonzero().flatten()
    assert changed.tolist() == group.positions.tolist()


def test_logits_to_keep_truncates_the_kv_shared_layers_so_it_stays_off():
    vlm = tiny("tiny-gemma4")
    inputs = media_pair(vlm, "image")
    with torch.no_grad(), vlm.trace(inputs, logits_to_keep=1):
        first = vlm.layers[0].output.save()
        last = vlm.layers[-1].output.save()
    assert first.shape[1] == inputs["input_ids"].shape[1] and last.shape[1] == 1
    assert "logits_to_keep" not in last_logits_kwargs(vlm)
    frames = random_video(0, frames=2)
    ids = [vlm.token_id(x) for x in "AB"]
    ref = vlm.forward(vlm.prepare(text="Which?", video=[frames]))[0, -1, ids]
    torch.testing.assert_close(torch.tensor(option_scores(vlm, frames, "Which?", ids)), ref)


class _NoSharedKV(PerLayerInputs):
    def carry_shared_kv(self, vlm, carry):
        return None


def test_full_patch_needs_the_per_layer_and_shared_kv_carry():
    """Layers 2-3 reuse the keys/values layers 0-1 stored: a full patch after layer 0-2 leaves
    a gap unless the per-layer inputs and those keys/values are carried."""
    vlm = tiny("tiny-gemma4")
    inputs = media_pair(vlm, "image")
    ref = vlm.forward(inputs)
    family = vlm.family

    def gap(layer, carry, late):
        vlm.family = dataclasses.replace(family, late_inputs=late)
        try:
            with torch.no_grad(), vlm.trace(inputs):
                expand_rows(vlm, None, carry=[(1, [0], None, layer)] if carry else [])
                patch(vlm.residual(layer), None, src_row=1, dst_rows=[0])
                logits = vlm.lm_head.output.save()
        finally:
            vlm.family = family
        return float((logits[0] - ref[1]).abs().max())

    for layer in ["embed", 0, 1, 2]:
        assert gap(layer, False, family.late_inputs) > 1e-3, layer
        assert gap(layer, True, family.late_inputs) < 1e-4, layer
    for layer in [0, 1, 2]:  # the per-layer inputs alone are not enough
        assert gap(layer, True, _NoSharedKV()) > 1e-3, layer
