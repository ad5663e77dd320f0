"""Qwen3.5 (+ MoE): Qwen3-VL's processor and token layout (a video is one run per temporal
group, each preceded by its ``<t seconds>`` text), no deepstack, and a hybrid decoder: most
layers mix tokens with a Gated-DeltaNet ``linear_attn`` (no softmax attention: knockout and
attention sites apply to the ``self_attn`` layers only, `VLM.attention_layers`)."""

from __future__ import annotations

from . import tiny
from .base import Family
from .qwen2_vl import VIDEO_KWARGS
from .qwen3_vl import layout, prepare

# Three linear layers per softmax-attention layer in the real checkpoints; the tiny model
# alternates so that it has two of each.
_TINY_LAYER_TYPES = ["linear_attention", "full_attention"] * 2


def build_tiny(seed: int = 0, moe: bool = False):
    """Tiny Qwen3.5(-MoE): 4 decoder layers (linear, full, linear, full), 2 vision blocks,
    patch 16; images and frames of 64-128 px."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

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
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                  num_position_embeddings=64)
    config = config_cls(text_config=text, vision_config=vision,
                        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                        vision_start_token_id=ids["<|vision_start|>"],
                        vision_end_token_id=ids["<|vision_end|>"])
    kw = dict(patch_size=16, merge_size=2, temporal_patch_size=2)
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=64 * 64, max_pixels=128 * 128, **kw),
        video_processor=Qwen3VLVideoProcessor(
            size={"shortest_edge": 64 * 64, "longest_edge": 128 * 128 * 8},
            do_sample_frames=False, **kw),
        tokenizer=tok, chat_template=tiny.QWEN_CHAT_TEMPLATE)
    return tiny.seeded_model(model_cls, config, seed), processor


_COMMON = dict(layout=layout, prepare=prepare, modalities=("image", "video"),
               image_token="<|image_pad|>", video_token="<|video_pad|>",
               video_kwargs=VIDEO_KWARGS)
FAMILIES = [
    Family("qwen3_5", ("qwen3_5",), tiny={"tiny-qwen3.5": build_tiny}, **_COMMON),
    Family("qwen3_5_moe", ("qwen3_5_moe",),
           tiny={"tiny-qwen3.5-moe": lambda seed: build_tiny(seed, moe=True)}, **_COMMON),
]
