"""Sites inside attention (vlminterp.attention) and heads= against plain PyTorch references:
HF's own eager weights, an attention function written here and registered with transformers,
and forward pre-hooks on o_proj / forward hooks on the projections."""

import pytest
import torch
from support import clean_and_counterfactual, tiny
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

from vlminterp.attention import (attention_sites, head_site, heads, sites_enabled)
from vlminterp.interventions import ablate, cache, output_tensor, patch

pytestmark = pytest.mark.usefixtures("one_thread")

LAYER = 1


def _hf_attn(vlm, layer):
    return vlm.torch_model.model.language_model.layers[layer].self_attn


def _hooked(vlm, inputs, module, edit, pre=True):
    """Logits of a plain forward with ``edit`` applied to ``module``'s first input (pre=True)
    or its output."""
    if pre:
        handle = module.register_forward_pre_hook(lambda m, args: (edit(args[0].clone()),
                                                                   *args[1:]))
    else:
        handle = module.register_forward_hook(lambda m, args, out: edit(out.clone()))
    try:
        return vlm.forward(inputs)
    finally:
        handle.remove()


def _grab(vlm, inputs, module, pre=True):
    saved = {}
    if pre:
        handle = module.register_forward_pre_hook(lambda m, args: saved.setdefault("x", args[0]))
    else:
        handle = module.register_forward_hook(lambda m, a, out: saved.setdefault("x", out))
    try:
        vlm.forward(inputs)
    finally:
        handle.remove()
    return saved["x"].clone()


def test_sites_leave_logits_unchanged_and_pattern_is_hf_eager(hf_vlm):
    inputs = clean_and_counterfactual(hf_vlm)
    ref = hf_vlm.forward(inputs)
    with torch.no_grad():
        hf = hf_vlm.torch_model(**dict(inputs), output_attentions=True)
    with attention_sites(hf_vlm):
        assert sites_enabled(hf_vlm)
        with torch.no_grad(), hf_vlm.trace(inputs):
            scores = hf_vlm.layers[LAYER].self_attn.scores.output.save()
            pattern = hf_vlm.layers[LAYER].self_attn.pattern.output.save()
            logits = hf_vlm.lm_head.output.save()
    assert not sites_enabled(hf_vlm)  # restored
    torch.testing.assert_close(logits, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(pattern, hf.attentions[LAYER], atol=1e-7, rtol=0)
    torch.testing.assert_close(torch.softmax(scores, -1), pattern, atol=1e-6, rtol=0)
    seq = pattern.shape[-1]
    assert pattern.shape == (2, heads(hf_vlm, LAYER).n_heads, seq, seq)
    assert (pattern.triu(1) == 0).all()  # causal: blocked entries exactly 0


def _edit(scores):
    scores[:, 1, -1, :8] += 3.0  # head 1, last query, first 8 keys


def _hand_eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
    """Plain PyTorch masked attention with the score edit at layer 2 (the reference)."""
    rep = query.shape[1] // key.shape[1]
    k, v = (t[:, :, None].expand(-1, -1, rep, -1, -1).flatten(1, 2) for t in (key, value))
    scores = query @ k.transpose(-1, -2) * scaling + attention_mask
    if module.layer_idx == 2:
        _edit(scores)
    probs = torch.softmax(scores.float(), -1).to(query.dtype)
    return (probs @ v).transpose(1, 2).contiguous(), probs


def test_score_edit_changes_logits_as_hand_computed_attention(hf_vlm):
    inputs = clean_and_counterfactual(hf_vlm)
    AttentionInterface.register("test_hand_eager", _hand_eager)
    ALL_MASK_ATTENTION_FUNCTIONS.register("test_hand_eager", eager_mask)
    config = _hf_attn(hf_vlm, 0).config
    before = config._attn_implementation
    config._attn_implementation = "test_hand_eager"
    try:
        ref = hf_vlm.forward(inputs)
    finally:
        config._attn_implementation = before
    with attention_sites(hf_vlm), torch.no_grad(), hf_vlm.trace(inputs):
        _edit(hf_vlm.layers[2].self_attn.scores.output)
        logits = hf_vlm.lm_head.output.save()
    assert (ref - hf_vlm.forward(inputs)).abs().max() > 1e-3  # the edit matters
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)


def test_patching_z_of_all_heads_equals_patching_the_attention_output(hf_vlm):
    inputs = clean_and_counterfactual(hf_vlm)
    pos = hf_vlm.layout(inputs)[0].visual[2:9]
    with torch.no_grad(), hf_vlm.trace(inputs):
        patch(_z(hf_vlm, LAYER), pos, src_row=0, dst_rows=[1], at="input",
              heads=list(range(heads(hf_vlm, LAYER).n_heads)))
        by_z = hf_vlm.lm_head.output.save()
    with torch.no_grad(), hf_vlm.trace(inputs):
        h = output_tensor(hf_vlm.layers[LAYER].self_attn)
        h[1, pos] = h[0, pos]
        by_out = hf_vlm.lm_head.output.save()
    torch.testing.assert_close(by_z, by_out, atol=1e-6, rtol=0)
    assert (by_z[1] - hf_vlm.forward(inputs)[1]).abs().max() > 1e-4


def _z(vlm, layer):
    site, at = head_site(vlm, layer, "z")
    assert at == "input"
    return site


@pytest.mark.parametrize("kind", ["z", "q", "v"])
def test_head_patch_equals_hand_written_hook(hf_vlm, kind):
    inputs = clean_and_counterfactual(hf_vlm)
    pos = hf_vlm.layout(inputs)[0].visual[:6]
    info = heads(hf_vlm, LAYER)
    head = info.count(kind) - 1
    attn = _hf_attn(hf_vlm, LAYER)
    module, pre = (attn.o_proj, True) if kind == "z" else (getattr(attn, f"{kind}_proj"), False)
    src = _grab(hf_vlm, inputs, module, pre)
    cols = slice(head * info.head_dim, (head + 1) * info.head_dim)

    def edit(x):
        x[1, pos, cols] = src[0, pos, cols]
        return x

    ref = _hooked(hf_vlm, inputs, module, edit, pre)
    with torch.no_grad(), hf_vlm.trace(inputs):
        site, at = head_site(hf_vlm, LAYER, kind)
        patch(site, pos, src_row=0, dst_rows=[1], at=at, heads=[head])
        logits = hf_vlm.lm_head.output.save()
    torch.testing.assert_close(logits, ref, atol=1e-6, rtol=0)
    assert (logits[1] - hf_vlm.forward(inputs)[1]).abs().max() > 1e-5


def test_head_ablate_and_cache_equal_slices_of_the_projection(hf_vlm):
    inputs = clean_and_counterfactual(hf_vlm)
    pos = hf_vlm.layout(inputs)[0].visual[:4]
    info = heads(hf_vlm, LAYER)
    attn = _hf_attn(hf_vlm, LAYER)
    z = _grab(hf_vlm, inputs, attn.o_proj)
    cols = slice(0, info.head_dim)

    def zero(x):
        x[:, pos, cols] = 0
        return x

    ref = _hooked(hf_vlm, inputs, attn.o_proj, zero)
    with torch.no_grad(), hf_vlm.trace(inputs):
        saved = cache({"z": _z(hf_vlm, LAYER)}, pos, at="input", heads=[0, 1])
        ablate(_z(hf_vlm, LAYER), pos, "zero", at="input", heads=0)
        logits = hf_vlm.lm_head.output.save()
    torch.testing.assert_close(logits, ref, atol=1e-6, rtol=0)
    assert saved["z"].shape == (2, len(pos), 2, info.head_dim)
    torch.testing.assert_close(saved["z"].flatten(-2), z[:, pos, :2 * info.head_dim])


def test_gqa_kv_head_patch_changes_exactly_its_query_group():
    vlm = tiny("tiny-qwen2-vl")  # 4 query heads, 2 kv heads
    info = heads(vlm, LAYER)
    assert (info.n_heads, info.n_kv_heads, info.groups) == (4, 2, 2)
    inputs = clean_and_counterfactual(vlm)
    pos = vlm.layout(inputs)[0].visual
    with attention_sites(vlm):
        with torch.no_grad(), vlm.trace(inputs):
            base = vlm.layers[LAYER].self_attn.pattern.output.save()
        with torch.no_grad(), vlm.trace(inputs):
            patch(head_site(vlm, LAYER, "k")[0], pos, src_row=0, dst_rows=[1], heads=[1])
            patched = vlm.layers[LAYER].self_attn.pattern.output.save()
    changed = (patched[1] - base[1]).abs().flatten(1).amax(1)
    assert info.query_heads(1) == [2, 3]
    assert (changed[[0, 1]] == 0).all() and (changed[[2, 3]] > 1e-4).all()


def test_head_sites_work_under_sdpa():
    vlm = tiny("tiny-qwen2-vl", attn_implementation="sdpa")
    inputs = clean_and_counterfactual(vlm)
    pos = vlm.layout(inputs)[0].visual[:6]
    attn = _hf_attn(vlm, LAYER)
    assert attn.config._attn_implementation == "sdpa"
    src = _grab(vlm, inputs, attn.o_proj)

    def edit(x):
        x[1, pos, 16:32] = src[0, pos, 16:32]  # head 1 of head_dim 16
        return x

    ref = _hooked(vlm, inputs, attn.o_proj, edit)
    with torch.no_grad(), vlm.trace(inputs):
        patch(_z(vlm, LAYER), pos, src_row=0, dst_rows=[1], at="input", heads=[1])
        logits = vlm.lm_head.output.save()
    torch.testing.assert_close(logits, ref, atol=1e-6, rtol=0)


def test_heads_on_a_site_without_heads_names_the_problem(hf_vlm):
    inputs = clean_and_counterfactual(hf_vlm)
    with pytest.raises(ValueError, match="heads=: this site has no heads"):
        with torch.no_grad(), hf_vlm.trace(inputs):
            patch(hf_vlm.layers[0], [1], src_row=0, dst_rows=[1], heads=[0])
    with pytest.raises(ValueError, match="head site 'x'"):
        head_site(hf_vlm, 0, "x")
