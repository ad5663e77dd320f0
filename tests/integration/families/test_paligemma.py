"""PaliGemma specifics: image tokens first (before BOS), a bidirectional prefix (image + prompt)
built outside the LM, a causal answer, the final logit soft-cap of PaliGemma 2."""

import torch
from support import random_image, tiny

from vlminterp.interventions import expand_rows, logit_lens, site_tensor
from vlminterp.models import wrap
from vlminterp.models.paligemma import build_tiny


def test_image_tokens_come_first_and_the_prefix_attends_both_ways():
    vlm = tiny("tiny-paligemma")
    inputs = vlm.prepare(text="What is this?", images=[random_image(0)])
    row = vlm.layout(inputs)[0]
    assert row.visual.tolist() == list(range(16))
    assert int(inputs["input_ids"][0, 16]) == vlm.tokenizer.bos_token_id
    assert "labels" not in inputs
    with torch.no_grad(), vlm.trace(inputs):
        expand_rows(vlm, [0, 0])  # the prefix-LM mask must survive the row expansion
        h = site_tensor(vlm.residual("embed"))
        h[1, row.last] = -h[1, row.last]
        out = vlm.layers[0].output.save()
    # the first image token sees the last prompt token
    assert float((out[0, 0] - out[1, 0]).abs().max()) > 1e-4


def test_the_answer_prefix_follows_the_newline_causally():
    vlm = tiny("tiny-paligemma")
    plain = vlm.prepare(text="What is this?", images=[random_image(0)])
    answered = vlm.prepare(text="What is this?", images=[random_image(0)], answer_prefix=" It is")
    n = plain["input_ids"].shape[1]
    assert vlm.tokenizer.decode(answered["input_ids"][0, n - 1:]) == "\n It is"
    assert answered["token_type_ids"][0, n:].tolist() == [1, 1]
    # the prefix does not see the answer: its logits are unchanged
    torch.testing.assert_close(vlm.forward(answered)[:, :n], vlm.forward(plain), atol=1e-5,
                               rtol=0)


def test_logit_lens_applies_the_final_soft_cap():
    vlm = wrap(*build_tiny(0, softcap=2.0), "tiny-paligemma-softcap", "paligemma")
    inputs = vlm.prepare(text="What is this?", images=[random_image(0), random_image(1)])
    ref = vlm.forward(inputs)
    assert float(ref.abs().max()) < 2.0  # capped
    with torch.no_grad(), vlm.trace(inputs):
        lens = logit_lens(vlm, site_tensor(vlm.residual(vlm.n_layers - 1))).save()
        head = vlm.lm_head.output.save()
    torch.testing.assert_close(lens, ref, atol=1e-5, rtol=0)
    assert float((head - ref).abs().max()) > 1e-2  # lm_head's output is before the cap
