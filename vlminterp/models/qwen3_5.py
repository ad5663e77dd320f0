"""Qwen3.5 (+ MoE): Qwen3-VL's processor and token layout (a video is one run per temporal
group, each preceded by its ``<t seconds>`` text), no deepstack, and a hybrid decoder: most
layers mix tokens with a Gated-DeltaNet ``linear_attn`` (no softmax attention: knockout and
attention sites apply to the ``self_attn`` layers only, `VLM.attention_layers`)."""

from __future__ import annotations

from . import tiny
from .base import Family
from .qwen2_vl import VIDEO_KWARGS
from .qwen3_vl import layout, prepare, tiny_model

# Three linear layers per softmax-attention layer in the real checkpoints; the tiny model
# alternates so that it has two of each.
_TINY_LAYER_TYPES = ["linear_attention", "full_attention"] * 2


def build_tiny(seed: int = 0, moe: bool = False):
    """Tiny Qwen3.5(-MoE): 4 decoder layers (linear, full, linear, full), 2 vision blocks,
    patch 16; images and frames of 64-128 px."""
    tok = tiny.qwen_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in tiny.QWEN_SPECIALS}
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                linear_value_head_dim=16, linear_conv_kernel_dim=4,
                layer_types=_TINY_LAYER_TYPES,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [2, 3, 3], "mrope_interleaved": True},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    if moe:
        from transformers import Qwen3_5MoeConfig as config_cls
        from transformers import Qwen3_5MoeForConditionalGeneration as model_cls

        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                    shared_expert_intermediate_size=32)
        del text["intermediate_size"]
    else:
        from transformers import Qwen3_5Config as config_cls
        from transformers import Qwen3_5ForConditionalGeneration as model_cls
    return tiny_model(seed, tok, model_cls, config_cls, text)


_COMMON = dict(layout=layout, prepare=prepare, modalities=("image", "video"),
               image_token="<|image_pad|>", video_token="<|video_pad|>",
               video_kwargs=VIDEO_KWARGS)
FAMILIES = [
    Family("qwen3_5", ("qwen3_5",), tiny={"tiny-qwen3.5": build_tiny}, **_COMMON),
    Family("qwen3_5_moe", ("qwen3_5_moe",),
           tiny={"tiny-qwen3.5-moe": lambda seed: build_tiny(seed, moe=True)}, **_COMMON),
]
