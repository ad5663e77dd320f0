"""The traced h_l / ffn_gate_l / attn_logits_l1 against plain-PyTorch hooks and hand computations.

Independent reference: forward hooks on the plain open_clip model (no nnsight), q·kᵀ/√d computed
head by head from ``attn.in_proj_weight``, and the attention weights ``nn.MultiheadAttention``
itself returns with ``need_weights=True, average_attn_weights=False``.
"""

import math

import pytest
import torch

import vlminterp
from support import tiny
from recipes import clip_trace
from vlminterp.circuits import capture_batch, image_source, load_trace, pretrained_tag, synthetic_image


def _reference(model, pixels, layer, next_layer):
    blocks = model.visual.transformer.resblocks
    seen = {}
    hooks = [
        blocks[layer].ln_2.register_forward_hook(lambda m, i, o: seen.__setitem__("ln_2", o)),
        blocks[layer].mlp.c_fc.register_forward_hook(lambda m, i, o: seen.__setitem__("c_fc", o)),
        blocks[layer].mlp.gelu.register_forward_hook(lambda m, i, o: seen.__setitem__("gelu", o)),
        blocks[next_layer].attn.register_forward_pre_hook(lambda m, a: seen.__setitem__("attn_in", a[0])),
    ]
    try:
        with torch.no_grad():
            model.encode_image(pixels)
    finally:
        for h in hooks:
            h.remove()
    attn = blocks[next_layer].attn
    x = seen["attn_in"]  # the ln_1 output of block next_layer (batch_first)
    d, heads = attn.embed_dim, attn.num_heads
    dh = d // heads
    w, b = attn.in_proj_weight, attn.in_proj_bias
    logits = []
    for h in range(heads):
        q = x @ w[h * dh:(h + 1) * dh].T + b[h * dh:(h + 1) * dh]
        k = x @ w[d + h * dh:d + (h + 1) * dh].T + b[d + h * dh:d + (h + 1) * dh]
        logits.append(q @ k.transpose(1, 2) / math.sqrt(dh))
    with torch.no_grad():
        _, weights = attn(x, x, x, need_weights=True, average_attn_weights=False)
    return seen, torch.stack(logits, 1), weights


def _check(vlm, images, layer, next_layer, atol):
    inputs = vlm.prepare(images=images)
    out = capture_batch(vlm, inputs, layer, next_layer)
    seen, hand, weights = _reference(vlm.torch_model, inputs["image"], layer, next_layer)
    b, n = len(images), seen["ln_2"].shape[1]
    heads = vlm.torch_model.visual.transformer.resblocks[next_layer].attn.num_heads
    assert out["attn_logits_l1"].shape == (b, heads, n, n)
    torch.testing.assert_close(out["h_l"], seen["ln_2"], atol=atol, rtol=1e-4)
    assert out["ffn_gate_l"].dtype == torch.uint8
    assert torch.equal(out["ffn_gate_l"], (seen["gelu"] > 0).to(torch.uint8))
    assert torch.equal(out["ffn_gate_l"], (seen["c_fc"] > 0).to(torch.uint8))  # GELU(x) > 0 iff x > 0
    torch.testing.assert_close(out["attn_logits_l1"], hand, atol=atol, rtol=1e-4)
    torch.testing.assert_close(out["attn_logits_l1"].softmax(-1), weights, atol=1e-5, rtol=1e-4)
    return out


@pytest.fixture(scope="module")
def tiny_vlm():
    return tiny("tiny-clip-vit")  # shared with the other integration tests


@pytest.mark.parametrize("layer, next_layer", [(0, 1), (1, 2), (2, 0)])
def test_tiny_trace_matches_hand_computation(tiny_vlm, layer, next_layer):
    images = [synthetic_image(i, 32, seed=1) for i in range(3)]
    _check(tiny_vlm, images, layer, next_layer, atol=1e-5)


def test_vit_b16_random_init_trace_matches_hand_computation():
    vlm = vlminterp.load("open_clip:ViT-B-16")  # open_clip.create_model("ViT-B-16", pretrained=None)
    assert len(vlm.vision.blocks) == 12
    out = _check(vlm, [synthetic_image(i, 224) for i in range(2)], 5, 6, atol=1e-4)
    assert out["h_l"].shape == (2, 197, 768) and out["ffn_gate_l"].shape == (2, 197, 3072)
    assert out["attn_logits_l1"].shape == (2, 12, 197, 197)


def test_recipe_shards_equal_one_big_capture(tiny_vlm, tmp_path):
    clip_trace.main(["--model", "tiny-clip-vit", "--synthetic", "5", "--batch-size", "2", "--target-layer", "1",
                     "--continuous-gate", "--out", str(tmp_path / "trace.safetensors")])
    trace = load_trace(tmp_path / "trace")
    assert trace.images == [f"synthetic:0:{i}" for i in range(5)]
    assert (trace.meta["layer"], trace.meta["next_layer"]) == (1, 2)
    assert len(trace.meta["batches"]) == 3 and trace.shape("attn_logits_l1") == (5, 2, 17, 17)
    whole = capture_batch(tiny_vlm, tiny_vlm.prepare(images=[synthetic_image(i, 32) for i in range(5)]), 1, 2)
    for key in ("h_l", "attn_logits_l1"):
        torch.testing.assert_close(trace.tensor(key), whole[key], atol=1e-5, rtol=1e-5)
    assert torch.equal(trace.tensor("ffn_gate_l"), whole["ffn_gate_l"])
    assert torch.equal((trace.tensor("ffn_act_l") > 0).to(torch.uint8), trace.tensor("ffn_gate_l"))


def test_image_folder_source_is_sorted_and_filtered(tmp_path):
    for name in ("b.png", "a.jpg", "sub/c.webp"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        synthetic_image(0, 16).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    ids, load = image_source(image_folder=tmp_path, max_images=10)
    assert ids == [str(tmp_path / n) for n in ("a.jpg", "b.png", "sub/c.webp")]
    assert load(1).size == (16, 16) and load(1).mode == "RGB"
    assert len(image_source(image_folder=tmp_path, max_images=2)[0]) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        image_source(image_folder=tmp_path / "empty", max_images=1)


def test_out_of_range_layer_is_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        clip_trace.main(["--model", "tiny-clip-vit", "--synthetic", "2", "--target-layer", "3",
                         "--out", str(tmp_path / "t")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--target-layer 3" in err and "--next-attn-layer 4" in err and "3 vision blocks" in err
    assert not (tmp_path / "t.json").exists()


def _trace_folder(tmp_path, name, *flags):
    clip_trace.main(["--image-folder", str(tmp_path / "images"), "--target-layer", "1",
                     "--batch-size", "2", *flags, "--out", str(tmp_path / name)])
    return load_trace(tmp_path / name)


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "images").mkdir()
    for i in range(2):
        synthetic_image(i, 48, seed=9).save(tmp_path / "images" / f"{i}.png")
    return tmp_path


def test_seed_fixes_random_init_weights_and_random_init_records_no_pretrained_tag(folder):
    """The same images: --seed alone decides tiny-clip-vit's random weights; the trace says
    it used no pretrained weights (not the --pretrained default 'openai')."""
    a = _trace_folder(folder, "a", "--model", "tiny-clip-vit", "--seed", "5")
    b = _trace_folder(folder, "b", "--model", "tiny-clip-vit", "--seed", "5")
    c = _trace_folder(folder, "c", "--model", "tiny-clip-vit", "--seed", "6")
    assert torch.equal(a.tensor("h_l"), b.tensor("h_l"))
    assert not torch.allclose(a.tensor("h_l"), c.tensor("h_l"))
    assert a.meta["pretrained"] is None and a.meta["seed"] == 5


def test_seed_fixes_open_clip_random_init(folder):
    a = _trace_folder(folder, "a", "--model", "ViT-S-32", "--pretrained", "none", "--seed", "3")
    b = _trace_folder(folder, "b", "--model", "ViT-S-32", "--pretrained", "none", "--seed", "3")
    assert torch.equal(a.tensor("attn_logits_l1"), b.tensor("attn_logits_l1"))
    assert a.meta["pretrained"] is None


def test_pretrained_tag_names_the_weights_really_used():
    assert pretrained_tag("ViT-B-16", "openai") == "openai"
    assert pretrained_tag("tiny-clip-vit", "openai") is None
    assert pretrained_tag("ViT-B-16", "none") is None and pretrained_tag("ViT-B-16", "") is None
    assert pretrained_tag("open_clip:ViT-B-16/laion2b_s34b_b88k", "openai") == "laion2b_s34b_b88k"
    assert pretrained_tag("open_clip:ViT-B-16", "openai") is None
