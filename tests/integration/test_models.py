"""Tiny models vs the plain HF / open_clip forward: names, traces, interventions, layouts."""

import numpy as np
import pytest
import torch
from support import clean_and_counterfactual, random_image, random_video, tiny

import vlminterp
from vlminterp.interventions import (ablate, add_vector, cache, expand_rows, knockout_attention,
                                     knockout_attention_rows, logit_lens, patch)


def test_standard_names_are_the_hf_modules(hf_vlm):
    m = hf_vlm.torch_model
    lm = m.model.language_model
    vision = m.model.visual if hasattr(m.model, "visual") else m.model.vision_tower
    blocks = vision.blocks if hasattr(vision, "blocks") else vision.encoder.layers
    projector = getattr(m.model, "multi_modal_projector", None) or m.model.visual.merger
    assert len(hf_vlm.layers) == len(lm.layers) == hf_vlm.n_layers
    for i, layer in enumerate(lm.layers):
        assert hf_vlm.layers[i]._module is layer
        assert hf_vlm.layers[i].self_attn._module is layer.self_attn
        assert hf_vlm.layers[i].mlp._module is layer.mlp
    for j, block in enumerate(blocks):
        assert hf_vlm.vision.blocks[j]._module is block
        attn = block.attn if hasattr(block, "attn") else block.self_attn
        assert hf_vlm.vision.blocks[j].attn._module is attn
        assert hf_vlm.vision.blocks[j].mlp._module is block.mlp
    assert hf_vlm.ln_final._module is lm.norm
    assert hf_vlm.lm_head._module is m.lm_head
    assert hf_vlm.embed._module is lm.embed_tokens
    assert hf_vlm.projector._module is projector


def test_clip_standard_names():
    vlm = tiny("tiny-clip-vit")
    for j, block in enumerate(vlm.torch_model.visual.transformer.resblocks):
        assert vlm.vision.blocks[j]._module is block
        assert vlm.vision.blocks[j].attn._module is block.attn
        assert vlm.vision.blocks[j].mlp._module is block.mlp


def test_trace_without_intervention_equals_plain_forward(hf_vlm):
    inputs = clean_and_counterfactual(hf_vlm)
    ref = hf_vlm.forward(inputs)
    with torch.no_grad(), hf_vlm.trace(inputs):
        logits = hf_vlm.lm_head.output.save()
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)


def test_clip_trace_equals_encode_image():
    vlm = tiny("tiny-clip-vit")
    inputs = vlm.prepare(images=[random_image(0), random_image(1, 40, 70)])
    with torch.no_grad():
        ref = vlm.torch_model.encode_image(inputs["image"])
        with vlm.trace(inputs):
            last = vlm.vision.blocks[-1].output.save()
            out = vlm.vision.output.save()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert last.shape == (2, 17, 32)


def test_patch_with_itself_changes_nothing(hf_vlm):
    inputs = clean_and_counterfactual(hf_vlm)
    ref = hf_vlm.forward(inputs)
    lay = hf_vlm.layout(inputs)
    with torch.no_grad(), hf_vlm.trace(inputs):
        for i in range(hf_vlm.n_layers):
            patch(hf_vlm.layers[i], lay[0].visual, src_row=0, dst_rows=[0])
        logits = hf_vlm.lm_head.output.save()
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)


def test_patching_every_position_at_last_layer_reproduces_source(hf_vlm):
    inputs = clean_and_counterfactual(hf_vlm)
    ref = hf_vlm.forward(inputs)
    assert (ref[0] - ref[1]).abs().max() > 1e-3  # the two rows really differ
    with torch.no_grad(), hf_vlm.trace(inputs):
        patch(hf_vlm.layers[-1], None, src_row=1, dst_rows=[0])
        logits = hf_vlm.lm_head.output.save()
    torch.testing.assert_close(logits[0], ref[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[1], ref[1], atol=1e-5, rtol=0)


def _hooked_logits(vlm, inputs, module, edit):
    handle = module.register_forward_hook(lambda mod, args, out: edit(out))
    try:
        return vlm.forward(inputs)
    finally:
        handle.remove()


@pytest.mark.parametrize("kind", ["zero", "mean", "resample"])
def test_ablate_equals_hand_written_hook(hf_vlm, kind):
    inputs = clean_and_counterfactual(hf_vlm)
    pos = hf_vlm.layout(inputs)[0].visual[:5]
    mean = torch.randn(hf_vlm.torch_model.config.text_config.hidden_size,
                       generator=torch.Generator().manual_seed(0))
    layer = 1

    def edit(out):
        h = out[0] if isinstance(out, tuple) else out
        h = h.clone()
        if kind == "zero":
            h[0, pos] = 0
        elif kind == "mean":
            h[0, pos] = mean
        else:
            h[0, pos] = h[1, pos]
        return (h, *out[1:]) if isinstance(out, tuple) else h

    ref = _hooked_logits(hf_vlm, inputs, hf_vlm.torch_model.model.language_model.layers[layer],
                         edit)
    with torch.no_grad(), hf_vlm.trace(inputs):
        ablate(hf_vlm.layers[layer], pos, kind, mean=mean, source_row=1, rows=[0])
        logits = hf_vlm.lm_head.output.save()
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)
    assert (logits[0] - hf_vlm.forward(inputs)[0]).abs().max() > 1e-4  # it did something


def test_add_vector_equals_hand_written_hook(hf_vlm):
    inputs = clean_and_counterfactual(hf_vlm)
    d = hf_vlm.torch_model.config.text_config.hidden_size
    v = torch.randn(d, generator=torch.Generator().manual_seed(1))
    ref = _hooked_logits(hf_vlm, inputs, hf_vlm.torch_model.model.language_model.layers[2],
                         lambda out: out + 2.0 * v)
    with torch.no_grad(), hf_vlm.trace(inputs):
        add_vector(hf_vlm.layers[2], v, alpha=2.0)
        logits = hf_vlm.lm_head.output.save()
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)


def test_cache_matches_hooks_and_logit_lens_of_last_layer_is_logits(hf_vlm):
    inputs = clean_and_counterfactual(hf_vlm)
    pos = hf_vlm.layout(inputs)[0].visual
    seen = {}
    layers = hf_vlm.torch_model.model.language_model.layers
    hooks = [layers[i].register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o.clone()))
             for i in range(len(layers))]
    ref = hf_vlm.forward(inputs)
    for h in hooks:
        h.remove()
    with torch.no_grad(), hf_vlm.trace(inputs):
        saved = cache(list(hf_vlm.layers), positions=pos)
        lens = logit_lens(hf_vlm, hf_vlm.layers[-1].output).save()
    for i in range(len(layers)):
        torch.testing.assert_close(saved[i], seen[i][:, pos])
    torch.testing.assert_close(lens, ref, atol=1e-5, rtol=0)


def test_knockout_visual_to_later_positions_makes_logits_image_independent(hf_vlm):
    inputs = clean_and_counterfactual(hf_vlm)
    lay = hf_vlm.layout(inputs)
    ref = hf_vlm.forward(inputs)
    later = torch.arange(int(lay[0].visual.max()) + 1, lay[0].seq_len)
    assert (ref[0, later] - ref[1, later]).abs().max() > 1e-3
    with torch.no_grad(), hf_vlm.trace(inputs):
        knockout_attention(hf_vlm, lay[0].visual, later, range(hf_vlm.n_layers))
        logits = hf_vlm.lm_head.output.save()
    torch.testing.assert_close(logits[0, later], logits[1, later], atol=1e-5, rtol=0)


def test_knockout_of_empty_set_changes_nothing(hf_vlm):
    inputs = clean_and_counterfactual(hf_vlm)
    ref = hf_vlm.forward(inputs)
    with torch.no_grad(), hf_vlm.trace(inputs):
        knockout_attention(hf_vlm, [], [inputs["input_ids"].shape[1] - 1], range(hf_vlm.n_layers))
        logits = hf_vlm.lm_head.output.save()
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_id", ["tiny-llava", "tiny-qwen2-vl"])
def test_knocked_out_edge_has_zero_weight_eager_and_sdpa_agrees(model_id):
    eager, sdpa = tiny(model_id), tiny(model_id, attn_implementation="sdpa")
    inputs = clean_and_counterfactual(eager)
    lay = eager.layout(inputs)
    src, tgt = lay[0].visual[:3], torch.tensor([lay[0].last])
    with torch.no_grad(), eager.trace(inputs, output_attentions=True):
        knockout_attention(eager, src, tgt, [1])
        weights = eager.layers[1].self_attn.output[1].save()
        out_eager = eager.lm_head.output.save()
    assert torch.all(weights[:, :, lay[0].last, src] == 0)
    assert torch.all(weights[:, :, lay[0].last, lay[0].visual[3:]] > 0)
    with torch.no_grad(), sdpa.trace(inputs):
        knockout_attention(sdpa, src, tgt, [1])
        out_sdpa = sdpa.lm_head.output.save()
    torch.testing.assert_close(out_sdpa, out_eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_id", ["tiny-qwen2-vl", "tiny-qwen2.5-vl"])
def test_frame_spans_line_up_with_video_grid(model_id):
    """Perturbing one input frame changes exactly the projector rows of its temporal group."""
    vlm = tiny(model_id)
    base = random_video(3)
    for frame in (0, 3, 6):
        other = base.copy()
        other[frame] = 255 - other[frame]
        inputs = vlm.prepare(text="Which?", video=[base, other])
        lay = vlm.layout(inputs)
        grid = inputs["video_grid_thw"][0].tolist()
        per_group = grid[1] * grid[2] // 4
        with torch.no_grad(), vlm.trace(inputs):
            emb = vlm.embed.output.save()
        changed = (emb[0] - emb[1]).abs().amax(-1) > 1e-6
        want = lay.frame_span(frame, frame + 1).positions
        assert len(want) == per_group and len(lay[0].videos[0].groups) == grid[0]
        assert changed.nonzero().flatten().tolist() == []  # embed is pre-merge: text only
        with torch.no_grad(), vlm.trace(inputs):
            layer0 = vlm.layers[0].input.save()
        changed = (layer0[0] - layer0[1]).abs().amax(-1) > 1e-6
        assert changed.nonzero().flatten().tolist() == want.tolist()


def test_layout_partitions_real_positions(hf_vlm):
    inputs = clean_and_counterfactual(hf_vlm)
    ids = inputs["input_ids"]
    for b, row in enumerate(hf_vlm.layout(inputs).rows):
        both = torch.cat([row.text, row.visual]).sort().values
        assert torch.equal(both, torch.nonzero(inputs["attention_mask"][b]).flatten().cpu())
        token = hf_vlm.tokenizer.convert_tokens_to_ids(
            "<image>" if hf_vlm.family.name == "llava" else "<|video_pad|>")
        assert torch.all(ids[b, row.visual] == token)


@pytest.mark.parametrize("model_id", ["tiny-llava", "tiny-clip-vit"])
def test_box_geometry_matches_the_processor(model_id):
    """A sharp vertical edge at original column x lands where the geometry says."""
    vlm = tiny(model_id)
    from PIL import Image

    for w, h, x in [(120, 80, 70), (60, 150, 20), (90, 90, 45)]:
        arr = np.zeros((h, w, 3), dtype=np.uint8)
        arr[:, x:] = 255
        inputs = (vlm.prepare(images=[Image.fromarray(arr)]) if model_id == "tiny-clip-vit"
                  else vlm.prepare(text="What?", images=[Image.fromarray(arr)]))
        pixels = inputs["image" if model_id == "tiny-clip-vit" else "pixel_values"][0, 0]
        geo = vlm.layout(inputs)[0].images[0].geometry
        expected = x * geo.resized[0] / w - geo.crop_box[0]
        profile = pixels.mean(0)
        edge = int(torch.argmax(profile[1:] - profile[:-1])) + 0.5
        assert abs(edge - expected) <= 1.0, (w, h, x, edge, expected)


def test_unknown_model_id_one_line_error():
    with pytest.raises(ValueError, match=r"model_id 'gpt-5-vision' is not a tiny id .*, a local directory, or a checkpoint reachable"):
        vlminterp.load("gpt-5-vision")


def test_slice_outside_sequence_and_frames_beyond_video_name_value():
    vlm = tiny("tiny-qwen2-vl")
    inputs = vlm.prepare(text="Which?", video=[random_video(0)])
    lay = vlm.layout(inputs)
    n = lay[0].seq_len
    with pytest.raises(ValueError, match=rf"positions:1,{n + 5}.*outside the sequence of length {n}"):
        lay.positions(f"positions:1,{n + 5}")
    with pytest.raises(ValueError, match=r"visual_frames:4:12 is beyond the video's 8 frames"):
        lay.positions("visual_frames:4:12")


@pytest.mark.parametrize("model_id", ["tiny-qwen2-vl", "tiny-llava"])
def test_save_pretrained_dir_loads_through_the_real_path(tmp_path, model_id):
    vlm = tiny(model_id)
    vlm.torch_model.save_pretrained(tmp_path)
    vlm.processor.save_pretrained(tmp_path)
    again = vlminterp.load(str(tmp_path))
    assert again.family.name == vlm.family.name
    inputs = clean_and_counterfactual(vlm)
    torch.testing.assert_close(again.forward(inputs.to("cpu")), vlm.forward(inputs), atol=1e-5,
                               rtol=0)


def test_ablate_at_lm_input_hits_the_merged_visual_tokens(hf_vlm):
    """The LM input (layers[0]'s input) holds the projector's visual features; the embed
    output does not, so an edit there would be overwritten."""
    inputs = clean_and_counterfactual(hf_vlm)
    pos = hf_vlm.layout(inputs)[0].visual[:4]
    layer0 = hf_vlm.torch_model.model.language_model.layers[0]

    def pre_hook(module, args, kwargs):
        h = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).clone()
        h[0, pos] = 0.0
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": h}
        return (h, *args[1:]), kwargs

    handle = layer0.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        ref = hf_vlm.forward(inputs)
    finally:
        handle.remove()
    with torch.no_grad(), hf_vlm.trace(inputs):
        ablate(hf_vlm.layers[0], pos, "zero", rows=[0], at="input")
        logits = hf_vlm.lm_head.output.save()
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)
    with torch.no_grad(), hf_vlm.trace(inputs):
        ablate(hf_vlm.embed, pos, "zero", rows=[0])
        untouched = hf_vlm.lm_head.output.save()
    torch.testing.assert_close(untouched, hf_vlm.forward(inputs), atol=1e-5, rtol=0)


def test_knockout_rows_gives_each_row_its_own_condition(hf_vlm):
    inputs = clean_and_counterfactual(hf_vlm)
    lay = hf_vlm.layout(inputs)
    src, last = lay[0].visual, torch.tensor([lay[0].last])
    with torch.no_grad(), hf_vlm.trace(inputs):
        knockout_attention_rows(hf_vlm, [(0, src, last, range(hf_vlm.n_layers))])
        both = hf_vlm.lm_head.output[:, -1].save()
    with torch.no_grad(), hf_vlm.trace(inputs):
        knockout_attention(hf_vlm, src, last, range(hf_vlm.n_layers), rows=[0])
        single = hf_vlm.lm_head.output[:, -1].save()
    torch.testing.assert_close(both, single, atol=0, rtol=0)
    torch.testing.assert_close(both[1], hf_vlm.forward(inputs)[1, -1], atol=1e-5, rtol=0)
    assert (both[0] - hf_vlm.forward(inputs)[0, -1]).abs().max() > 1e-4


def test_select_rows_equals_processing_the_rows_again(hf_vlm):
    inputs = clean_and_counterfactual(hf_vlm, seed=5)
    picked = inputs.select_rows([1, 0, 1])
    ref = hf_vlm.forward(inputs)
    logits = hf_vlm.forward(picked)
    torch.testing.assert_close(logits, ref[[1, 0, 1]], atol=1e-5, rtol=0)
    assert picked.meta.keys() == inputs.meta.keys()
    lay = hf_vlm.layout(picked)
    assert len(lay) == 3 and torch.equal(lay[2].visual, hf_vlm.layout(inputs)[1].visual)


def test_expand_rows_equals_processing_repeated_rows(hf_vlm):
    """The vision tower runs on 2 rows; the language model on [1, 0, 1, 1]."""
    assert hf_vlm.lm._module is hf_vlm.torch_model.model.language_model
    inputs = clean_and_counterfactual(hf_vlm, seed=7)
    rows = [1, 0, 1, 1]
    ref = hf_vlm.forward(inputs.select_rows(rows))
    with torch.no_grad(), hf_vlm.trace(inputs):
        expand_rows(hf_vlm, rows)
        logits = hf_vlm.lm_head.output.save()
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)
    # A patch on an expanded row acts on that row only.
    with torch.no_grad(), hf_vlm.trace(inputs):
        expand_rows(hf_vlm, rows)
        patch(hf_vlm.layers[1], None, src_row=1, dst_rows=[3])
        patched = hf_vlm.lm_head.output.save()
    torch.testing.assert_close(patched[:3], ref[:3], atol=1e-5, rtol=0)
    torch.testing.assert_close(patched[3], ref[1], atol=1e-5, rtol=0)
