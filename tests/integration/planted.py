"""A planted tiny Qwen2-VL whose answer mechanism is set by hand (for attribution tests).

From the tiny model's random weights:
* the vision blocks add nothing (their output projections are zero), so each video token
  depends only on its own patches: the frame groups do not mix before the LM;
* LM layers 0 and 3 are identities (zero attention and MLP outputs);
* layers 1 and 2 each have one *reading head*: every query is the same constant vector on the
  head dimensions RoPE barely rotates (its lowest frequency: < 0.03 rad over the sequence),
  the keys measure a "redness" direction ``w`` of the token (softmax over the sequence:
  the last token attends to the reddest tokens), the value reads ``w`` too and ``o_proj``
  writes it onto ``r``; layer 1 keeps its random MLP (a per-position nonlinearity);
* ``lm_head`` rows 5 and 7 read +/- ``r``: the metric logit[5] - logit[7] at the last position
  is how much redness the last token gathered, a third at layer 1 and the rest at layer 2.
Clean and corrupt clips are the same random frames except that the clean one moves frames
2-3, 4-5 and 6-7 towards red by 15%, 60% and 35%. Known effects: none for frames 0-1 or from
layer 2 on; for the others, ordered by redness (4-5 > 6-7 > 2-3), largest at the LM input
and layer 0, smaller at layer 1's output (its head has already read the corrupt tokens).
"""

import numpy as np
import torch

import vlminterp

METRIC_IDS = (5, 7)
REDNESS = {2: 0.15, 4: 0.6, 6: 0.35}  # first frame of a 2-frame group -> move towards red
SHARPNESS = 1.5  # spread of the attention scores over the visual tokens, in standard deviations
READOUT = {1: 0.01, 2: 0.02}


def metric(logits):
    return logits[:, METRIC_IDS[0]] - logits[:, METRIC_IDS[1]]


def videos(seed: int = 0):
    corrupt = np.random.RandomState(seed).randint(0, 255, (8, 112, 112, 3), dtype=np.uint8)
    clean = corrupt.copy()
    red = np.array([255, 0, 0], dtype=np.float64)
    for frame, amount in REDNESS.items():
        part = corrupt[frame:frame + 2].astype(np.float64)
        clean[frame:frame + 2] = ((1 - amount) * part + amount * red).astype(np.uint8)
    return clean, corrupt


def _normed_input(model, inputs, layer: int) -> torch.Tensor:
    seen = {}
    attn = model.model.language_model.layers[layer].self_attn
    hook = attn.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(x=kwargs["hidden_states"].clone()),
        with_kwargs=True)
    try:
        model(**dict(inputs))
    finally:
        hook.remove()
    return seen["x"]  # the layer's normed input [rows, seq, d]


def _reading_head(attn, w, r, spread, scale):
    hd = attn.head_dim
    for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
        lin.weight.zero_()
        lin.bias.zero_()
    slow = [hd // 2 - 1, hd - 1]  # the rotary pair of the lowest frequency
    attn.q_proj.bias[slow] = SHARPNESS / (spread * attn.scaling * len(slow))
    attn.k_proj.weight[slow] = w
    attn.v_proj.weight[0] = w
    attn.o_proj.weight.zero_()
    attn.o_proj.weight[:, 0] = r * scale


@torch.no_grad()
def planted_qwen2_vl(seed: int = 0):
    """(vlm, inputs [clean, corrupt]) of the planted model."""
    vlm = vlminterp.load("tiny-qwen2-vl", seed=seed + 11)
    m = vlm.torch_model
    for block in m.model.visual.blocks:
        for lin in (block.attn.proj, block.mlp.fc2):
            lin.weight.zero_()
            lin.bias.zero_()
    layers = m.model.language_model.layers
    for i, layer in enumerate(layers):
        layer.self_attn.o_proj.weight.zero_()
        if i != 1:
            layer.mlp.down_proj.weight.zero_()
    inputs = vlm.prepare(text="Which direction does it move?", video=list(videos(seed)))
    lay = vlm.layout(inputs)
    red = lay[0].videos[0].groups[2].positions
    r = torch.randn(m.config.text_config.hidden_size, generator=torch.Generator().manual_seed(seed))
    r = r / r.norm()
    for layer in (1, 2):  # layer 2's input depends on layer 1's head: plant in order
        x = _normed_input(m, inputs, layer)
        w = x[0, red].mean(0) - x[1, red].mean(0)
        w = w / w.norm()
        spread = (x[:, lay[0].visual] @ w).std()
        _reading_head(layers[layer].self_attn, w, r, spread, READOUT[layer])
    m.lm_head.weight[METRIC_IDS[0]] = r
    m.lm_head.weight[METRIC_IDS[1]] = -r
    return vlm, inputs


def attend_both_ways(vlm, layer: int):
    """Make decoder ``layer`` attend in both directions (its mask zeroed) until the returned
    hook handle is removed: earlier positions then see a patch, which breaks prefix reuse."""
    attn = vlm.torch_model.model.language_model.layers[layer].self_attn

    def both_ways(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        return args, {**kwargs, "attention_mask": None if mask is None else torch.zeros_like(mask)}

    return attn.register_forward_pre_hook(both_ways, with_kwargs=True)
