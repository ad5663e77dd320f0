"""Training-time speed-ups that leave the model's function unchanged (checked when switched on).

Qwen2-VL's and Qwen3-VL's vision attention runs one small attention per temporal group in a
Python loop (their eager and SDPA paths); with hundreds of groups per batch that loop costs more
than the maths. All groups of a batch of equal-sized clips have the same length, so one batched
SDPA call computes the same thing. `fast_attention` swaps that in (per module instance, not the class) and the language
model's eager attention for SDPA, and restores both on exit; the shipped models run eager.
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F


def _batched_vision_attention(self, hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    if not bool((lengths == lengths[0]).all()):  # unequal groups: the original loop
        return self._zoo_forward(hidden_states, cu_seqlens, position_embeddings=position_embeddings,
                                 **kwargs)
    n, size = hidden_states.shape[0], int(lengths[0])
    q, k, v = self.qkv(hidden_states).reshape(n, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    q, k, v = (t.reshape(n // size, size, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=self.scaling)
    return self.proj(out.transpose(1, 2).reshape(n, -1))


@contextlib.contextmanager
def fast_attention(model):
    """Inside the block: batched vision attention (Qwen2-VL, Qwen3-VL) and SDPA in the language
    model."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import VisionAttention
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionAttention

    looped = (VisionAttention, Qwen3VLVisionAttention)  # the same maths, the same loop
    patched = [m for m in model.modules() if type(m) in looped]
    for m in patched:
        m._zoo_forward = m.forward
        m.forward = types.MethodType(_batched_vision_attention, m)
    previous = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)
        for m in patched:
            m.forward = m._zoo_forward
            del m._zoo_forward


def check_same_function(model, inputs: dict, atol: float = 1e-4) -> float:
    """Max |logit difference| between the model with and without `fast_attention` on ``inputs``;
    raises when above ``atol`` (so a transformers change cannot silently alter training)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        plain = model(**inputs).logits
        with fast_attention(model):
            fast = model(**inputs).logits
    model.train(was_training)
    diff = float((plain - fast).abs().max())
    if diff > atol:
        raise RuntimeError(f"fast_attention changes the model's logits by {diff:.2e} (> {atol})")
    return diff
