"""One conformance suite over every model family (each family's tiny offline ids).

A new family passes by adding its file in vlminterp/models/: the ids come from the registry.
References are independent of vlminterp's own layer: the plain HF forward, HF's own module
accessors, hand-written hooks, and pixels put through the real processor.
"""

import pytest
import torch
from support import media_pair, random_video, tiny

import vlminterp
from vlminterp.interventions import (cache, expand_rows, knockout_attention, logit_lens,
                                     output_tensor, patch, site_tensor)
from vlminterp.models import FAMILIES

IDS = [tid for fam in FAMILIES for tid in fam.tiny]
CASES = [(tid, kind) for fam in FAMILIES for tid in fam.tiny for kind in fam.modalities]


@pytest.fixture(params=IDS)
def vlm(request):
    return tiny(request.param)


@pytest.fixture(params=CASES, ids=[f"{t}-{k}" for t, k in CASES])
def case(request):
    model_id, kind = request.param
    vlm = tiny(model_id)
    return vlm, kind, media_pair(vlm, kind)


def lm_input(vlm, inputs):
    with torch.no_grad(), vlm.trace(inputs):
        h = site_tensor(vlm.residual("embed")).save()
    return h


def changed_positions(h, a=0, b=1, tol=1e-6):
    return ((h[a] - h[b]).abs().amax(-1) > tol).nonzero().flatten().tolist()


def test_trace_equals_plain_forward(case):
    vlm, kind, inputs = case
    ref = vlm.forward(inputs)
    with torch.no_grad(), vlm.trace(inputs):
        logits = vlm.lm_head.output.save()
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)


def test_standard_names_are_the_hf_modules(vlm):
    """Checked against HF's own accessors and the data flow of one forward."""
    m = vlm.torch_model
    assert vlm.embed._module is m.get_input_embeddings()
    assert vlm.lm_head._module is m.get_output_embeddings()
    assert vlm.lm._module.layers is vlm.layers._module
    assert len(vlm.layers) == vlm.n_layers == m.config.get_text_config().num_hidden_layers
    kind = vlm.family.modalities[0]
    inputs = media_pair(vlm, kind)
    with torch.no_grad(), vlm.trace(inputs):
        projected = output_tensor(vlm.projector).save()  # first: modules in execution order
        last = vlm.layers[-1].output.save()
        normed_in = vlm.ln_final.input.save()
        normed = vlm.ln_final.output.save()
        head_in = vlm.lm_head.input.save()
    last = last[0] if isinstance(last, tuple) else last
    torch.testing.assert_close(normed_in, last)  # the final norm reads the last layer
    torch.testing.assert_close(head_in, normed)  # the head reads the final norm
    blocks = vlm.vision.blocks
    vcfg = m.config.vision_config
    depth = getattr(vcfg, "depth", None) or getattr(vcfg, "num_hidden_layers")
    assert len(blocks) == depth
    for j in range(len(blocks)):
        assert blocks[j].attn._module in list(blocks[j]._module.children())
    # the projector's output is what enters the LM (a weight-shape check would miss Gemma 3's
    # [vision, text] matmul weight)
    assert projected.shape[-1] == m.config.get_text_config().hidden_size


def test_the_media_changes_the_lm_input(case):
    """Guard against dead paths in random builds (a zero-initialised projector, an adapter
    whose output vanishes): two different images/videos give different LM inputs at the
    visual positions, and the same text elsewhere."""
    vlm, kind, inputs = case
    h = lm_input(vlm, inputs)
    lay = vlm.layout(inputs)
    visual = lay[0].visual
    assert len(visual) > 0
    diff = (h[0, visual] - h[1, visual]).abs().amax(-1)
    assert float(diff.min()) > 1e-4 * float(h[0, visual].abs().max())
    assert set(changed_positions(h)) <= set(visual.tolist())


def test_layout_partitions_real_positions(case):
    vlm, kind, inputs = case
    ids = inputs["input_ids"].cpu()
    for b, row in enumerate(vlm.layout(inputs).rows):
        real = torch.nonzero(inputs["attention_mask"][b].cpu()).flatten()
        both = torch.cat([row.text, row.visual]).sort().values
        assert torch.equal(both, real)
        assert set(row.markers.tolist()) <= set(row.text.tolist())
        assert row.last == int(real.max())
        spans = row.images if kind == "image" else row.videos
        assert len(spans) == 1
        assert torch.equal(torch.sort(spans[0].positions).values, row.visual)
        assert len(set(ids[b, row.visual].tolist())) <= 2  # one or two placeholder ids


def test_one_frame_changes_exactly_its_group(vlm):
    if not vlm.family.takes_video:
        pytest.skip(f"{vlm.family.name} takes images only")
    base = random_video(3)
    video = vlm.layout(vlm.prepare(text="Which?", video=[base]))[0].videos[0]
    for frame in sorted({0, len(base) // 2 - 1, len(base) - 1}):
        other = base.copy()
        other[frame] = 255 - other[frame]
        inputs = vlm.prepare(text="Which?", video=[base, other])
        lay = vlm.layout(inputs)
        group = lay[0].videos[0].groups[lay[0].videos[0].group_of(frame)]
        assert group.frames[0] <= frame < group.frames[1]
        h = lm_input(vlm, inputs)
        assert changed_positions(h) == sorted(group.all_positions.tolist()), frame
    assert video.groups[0].frames[0] == 0 and video.num_frames == len(base)


def test_one_view_changes_exactly_its_positions(vlm):
    """Perturbing one view's pixels (a tile, the base or thumbnail view) changes exactly that
    view's patch tokens, no separator, marker or text position."""
    if "image" not in vlm.family.modalities:
        pytest.skip("video only")
    inputs = media_pair(vlm, "image")
    span = vlm.layout(inputs)[0].images[0]
    for v, view in enumerate(span.views):
        perturbed = inputs.select_rows([0, 0])
        key, index = view_pixels(vlm, perturbed, 1, v)
        perturbed[key][index] = -perturbed[key][index]
        h = lm_input(vlm, perturbed)
        assert changed_positions(h) == sorted(view.positions.tolist()), view.kind


def view_pixels(vlm, inputs, row, v):
    """(key, index) of the pixel tensor slice of view ``v`` of row ``row``'s first image."""
    hook = vlm.family.extra.get("view_pixels")
    if hook is not None:
        return hook(vlm, inputs, row, v)
    pixels = inputs["pixel_values"]
    view = vlm.layout(inputs)[row].images[0].views[v]
    sizes = inputs.row_sizes().get("pixel_values")
    if sizes is not None:  # flattened over crops/patches: the row's own slice
        start = sum(sizes[:row])
        return "pixel_values", slice(start, start + sizes[row]) if view.source is None \
            else start + view.source
    if view.source is None:
        return "pixel_values", row
    return "pixel_values", (row, view.source)


def test_full_patch_at_every_layer_reproduces_the_source(case):
    """Patching every position of the residual stream at layer L (plus, on deepstack
    families, the visual inputs that enter after L) turns row 0 into row 1 exactly."""
    vlm, kind, inputs = case
    ref = vlm.forward(inputs)
    assert (ref[0, -1] - ref[1, -1]).abs().max() > 1e-4
    for layer in ["embed", *range(vlm.n_layers)]:
        with torch.no_grad(), vlm.trace(inputs):
            expand_rows(vlm, None, carry=[(1, [0], None, layer)])
            patch(vlm.residual(layer), None, src_row=1, dst_rows=[0])
            logits = vlm.lm_head.output.save()
        torch.testing.assert_close(logits[0], ref[1], atol=1e-4, rtol=0, msg=f"layer {layer}")


def test_expand_rows_equals_processing_the_rows(case):
    vlm, kind, inputs = case
    rows = [1, 0, 1]
    ref = vlm.forward(inputs.select_rows(rows))
    torch.testing.assert_close(ref[0], vlm.forward(inputs)[1], atol=1e-5, rtol=0)
    with torch.no_grad(), vlm.trace(inputs):
        expand_rows(vlm, rows)
        logits = vlm.lm_head.output.save()
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)


def test_knockout_of_visual_positions_makes_later_positions_media_independent(case):
    vlm, kind, inputs = case
    layers = vlm.attention_layers
    if len(layers) < vlm.n_layers:
        other = next(i for i in range(vlm.n_layers) if i not in layers)
        with pytest.raises(ValueError, match=rf"layer {other} has no softmax attention"):
            with torch.no_grad(), vlm.trace(inputs):
                knockout_attention(vlm, [0], [1], [other])
        pytest.skip("hybrid model: knockout applies to its attention layers only")
    lay = vlm.layout(inputs)
    visual = set(lay[0].visual.tolist())
    later = torch.tensor([p for p in range(int(lay[0].visual.min()), lay[0].seq_len)
                          if p not in visual])
    # every non-visual query: a marker before the first patch may attend to the patches
    # (Molmo2's image tokens and markers share one bidirectional block)
    others = torch.tensor([p for p in range(lay[0].seq_len) if p not in visual])
    ref = vlm.forward(inputs)
    assert (ref[0, later] - ref[1, later]).abs().max() > 1e-3
    with torch.no_grad(), vlm.trace(inputs):
        knockout_attention(vlm, lay[0].visual, others, layers)
        logits = vlm.lm_head.output.save()
    torch.testing.assert_close(logits[0, later], logits[1, later], atol=1e-5, rtol=0)


def test_logit_lens_of_the_last_layer_is_the_logits(vlm):
    inputs = media_pair(vlm, vlm.family.modalities[0])
    ref = vlm.forward(inputs)
    with torch.no_grad(), vlm.trace(inputs):
        lens = logit_lens(vlm, site_tensor(vlm.residual(vlm.n_layers - 1))).save()
    torch.testing.assert_close(lens, ref, atol=1e-5, rtol=0)


def test_cache_reads_the_residual_stream_hooks_see(vlm):
    """`cache` at layer outputs equals plain forward hooks on the HF decoder layers."""
    inputs = media_pair(vlm, vlm.family.modalities[0])
    pos = vlm.layout(inputs)[0].visual
    seen = {}
    layers = vlm.lm._module.layers
    hooks = [layers[i].register_forward_hook(
        lambda m, a, o, i=i: seen.__setitem__(i, (o[0] if isinstance(o, tuple) else o).clone()))
        for i in range(len(layers))]
    try:
        vlm.forward(inputs)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad(), vlm.trace(inputs):
        saved = cache(list(vlm.layers), positions=pos)
    for i in range(len(layers)):
        torch.testing.assert_close(saved[i], seen[i][:, pos])


def test_save_pretrained_round_trip(tmp_path, vlm):
    vlm.torch_model.save_pretrained(tmp_path)
    vlm.processor.save_pretrained(tmp_path)
    again = vlminterp.load(str(tmp_path))
    assert again.family.name == vlm.family.name
    inputs = media_pair(vlm, vlm.family.modalities[0])
    again_inputs = media_pair(again, vlm.family.modalities[0])
    assert torch.equal(again_inputs["input_ids"], inputs["input_ids"])
    torch.testing.assert_close(again.forward(again_inputs), vlm.forward(inputs), atol=1e-5,
                               rtol=0)


def test_media_of_the_wrong_kind_is_a_one_line_error(vlm):
    if vlm.family.takes_video:
        pytest.skip("takes video")
    with pytest.raises(ValueError, match="takes images only"):
        vlm.prepare(text="Which?", video=[random_video(0)])

