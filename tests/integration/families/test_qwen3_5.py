"""Qwen3.5 specifics: a hybrid decoder (Gated-DeltaNet ``linear_attn`` layers beside softmax
``self_attn`` layers) and no deepstack."""

import pytest
import torch
from support import media_pair, random_image, tiny

from vlminterp.interventions import expand_rows, knockout_attention


def test_attention_layers_are_the_full_attention_layers_of_the_config():
    for model_id in ("tiny-qwen3.5", "tiny-qwen3.5-moe"):
        vlm = tiny(model_id)
        types = vlm.torch_model.config.text_config.layer_types
        assert vlm.attention_layers == [i for i, t in enumerate(types) if t == "full_attention"]
        assert 0 < len(vlm.attention_layers) < vlm.n_layers


def test_knockout_on_a_linear_layer_names_the_layer_kind():
    vlm = tiny("tiny-qwen3.5")
    inputs = media_pair(vlm, "image")
    linear = next(i for i in range(vlm.n_layers) if i not in vlm.attention_layers)
    with pytest.raises(ValueError) as err:
        with torch.no_grad(), vlm.trace(inputs):
            knockout_attention(vlm, [0], [1], [linear])
    message = str(err.value)
    assert "\n" not in message
    assert f"layer {linear} has no softmax attention" in message
    assert "linear_attn (Qwen3_5GatedDeltaNet)" in message
    assert str(vlm.attention_layers) in message


def test_knockout_at_the_attention_layers_zeroes_their_weights_but_linear_layers_still_mix():
    """Knockout blocks the softmax edges exactly (weight 0 under eager attention); the
    Gated-DeltaNet layers still carry the image to later positions, so on a hybrid model
    knocking out every attention layer does not isolate the text from the image."""
    vlm = tiny("tiny-qwen3.5")
    inputs = media_pair(vlm, "image")
    row = vlm.layout(inputs)[0]
    later = torch.arange(int(row.visual.max()) + 1, row.seq_len)
    weights = []
    with torch.no_grad(), vlm.trace(inputs):
        for i in vlm.attention_layers:  # in layer order: each edit before that layer's read
            knockout_attention(vlm, row.visual, later, [i])
            weights.append(vlm.layers[i].self_attn.output[1].save())
        logits = vlm.lm_head.output.save()
    for w in weights:
        assert torch.all(w[:, :, later[:, None], row.visual[None, :]] == 0)
        torch.testing.assert_close(w[:, :, later].sum(-1), torch.ones_like(w[:, :, later, 0]))
    assert float((logits[0, later] - logits[1, later]).abs().max()) > 1e-3


def test_expand_rows_on_a_padded_batch():
    """The linear layers' padding mask is built inside the LM from the 2-D attention mask:
    rows of different lengths still expand exactly."""
    vlm = tiny("tiny-qwen3.5")
    inputs = vlm.prepare(text=["What is this?", "Is there a red cat in this image?"],
                         images=[random_image(0), random_image(1)])
    assert not bool(inputs["attention_mask"].all())
    rows = [1, 0, 0]
    ref = vlm.forward(inputs.select_rows(rows))
    with torch.no_grad(), vlm.trace(inputs):
        expand_rows(vlm, rows)
        logits = vlm.lm_head.output.save()
    real = inputs.select_rows(rows)["attention_mask"].bool()
    torch.testing.assert_close(logits[real], ref[real], atol=1e-5, rtol=0)
