"""Offline tiny models: the real architectures from small configs, seeded random weights.

Nothing here touches a hub. Each builder returns ``(torch_model, processor)`` where the
processor (tokenizer included) is constructed in-process: a byte-level BPE trained on a
small built-in corpus, so words tokenize the way real BPE does ("Ġleft").
"""

from __future__ import annotations

import functools

import torch

# Words the demos, recipes and tests use: prompts, option letters, colours, shapes, COCO names.
_CORPUS_WORDS = """
USER ASSISTANT user assistant system It is a an the Is there in this image video Yes No yes no
Describe describe What which Which colour color direction does object move moving moves left right
up down Options Answer A B C D E The shape square circle triangle frames frame contain contains
red green blue yellow white black orange purple cat dog car person bus bird horse sheep cow bottle
chair cup banana apple pizza clock bear zebra giraffe train boat plane truck bench kite umbrella
of on at to and or with is was what where how many first last before after appear appears
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 . , ? ! : ; ' " ( ) - \n
"""

QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
]
LLAVA_SPECIALS = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@functools.lru_cache(maxsize=None)
def _bpe(specials: tuple[str, ...], vocab_size: int = 600):
    """Train a deterministic byte-level BPE on the built-in corpus; return (vocab, merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    words = _CORPUS_WORDS.split()
    lines = [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 4
    tok.train_from_iterator(lines, trainer)
    model = tok.model
    import json
    state = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    del model
    return state["vocab"], merges


def qwen_tokenizer():
    from transformers import Qwen2Tokenizer

    vocab, merges = _bpe(tuple(QWEN_SPECIALS))
    tok = Qwen2Tokenizer(
        vocab=dict(vocab), merges=list(merges), unk_token=None, bos_token=None,
        eos_token="<|im_end|>", pad_token="<|endoftext|>",
    )
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS[1:]})
    return tok


def llava_tokenizer():
    from transformers import GPT2TokenizerFast

    vocab, merges = _bpe(tuple(LLAVA_SPECIALS))
    tok = GPT2TokenizerFast(
        vocab=dict(vocab), merges=list(merges), unk_token="<unk>", bos_token="<s>",
        eos_token="</s>", pad_token="<pad>", add_prefix_space=False,
    )
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok


def _seeded(seed: int):
    torch.manual_seed(seed)


def seeded_model(model_cls, config, seed: int, attn_implementation: str = "eager"):
    """``model_cls(config)`` with seeded random weights, eager attention, in eval mode: the
    harness every family's tiny builder ends with."""
    config._attn_implementation = attn_implementation
    _seeded(seed)
    return model_cls(config).eval()


def _mrope_section(head_dim: int) -> list[int]:
    """Rotary pairs for (time, height, width): a quarter for time, the rest split evenly, as in
    Qwen2-VL's [16, 24, 24] for head_dim 128 ([2, 3, 3] for 16)."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def build_qwen2_vl(seed: int = 0, version: str = "2", *, hidden_size: int = 64,
                   intermediate_size: int = 128, num_layers: int = 4, num_heads: int = 4,
                   num_kv_heads: int = 2, vision_depth: int = 2, vision_dim: int = 32,
                   vision_heads: int = 2, rope_theta: float = 10000.0,
                   max_pixels: int = 112 * 112):
    """Tiny Qwen2-VL (version "2") or Qwen2.5-VL (version "2.5"): 4 decoder layers, 2 vision blocks.

    The size arguments default to the tiny model every test uses; the model zoo passes others
    where its task needs them (its cards record them): ``max_pixels`` caps the processor's
    frame size (56 * 56 -> 2x2 tokens per temporal group), a small ``rope_theta`` lets the
    language model's rotary positions tell the few grid columns apart."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tok = qwen_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text = dict(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta,
                         "mrope_section": _mrope_section(hidden_size // num_heads)},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    common = dict(
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        text_config=text,
    )
    proc_kw = dict(min_pixels=56 * 56, max_pixels=max_pixels, patch_size=14, merge_size=2,
                   temporal_patch_size=2)
    if version == "2":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration as cls

        config = Qwen2VLConfig(
            vision_config=dict(depth=vision_depth, embed_dim=vision_dim, hidden_size=hidden_size,
                               num_heads=vision_heads, mlp_ratio=2,
                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
            **common,
        )
        processor_cls = Qwen2VLProcessor
    elif version == "2.5":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration as cls
        from transformers import Qwen2_5_VLProcessor as processor_cls

        config = Qwen2_5_VLConfig(
            vision_config=dict(depth=vision_depth, hidden_size=vision_dim,
                               intermediate_size=2 * vision_dim, num_heads=vision_heads,
                               out_hidden_size=hidden_size, patch_size=14, spatial_merge_size=2,
                               temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
                               tokens_per_second=2),
            **common,
        )
    else:
        raise ValueError(f"version: expected '2' or '2.5', got {version!r}")
    config._attn_implementation = "eager"
    _seeded(seed)
    model = cls(config).eval()
    processor = processor_cls(
        image_processor=Qwen2VLImageProcessor(**proc_kw),
        video_processor=Qwen2VLVideoProcessor(do_sample_frames=False, cap_pixels_per_frame=True,
                                              **proc_kw),
        tokenizer=tok, chat_template=QWEN_CHAT_TEMPLATE,
    )
    return model, processor


def build_llava(seed: int = 0, *, image_size: int = 56, vision_dim: int = 32,
                vision_layers: int = 3, hidden_size: int = 64, intermediate_size: int = 128,
                num_layers: int = 4, num_heads: int = 4):
    """Tiny LLaVA-1.5: CLIP vision tower (56px, patch 14 -> 16 image tokens), Llama LM of 4 layers.

    Size arguments as in `build_qwen2_vl` (``image_size`` must be a multiple of 14)."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = llava_tokenizer()
    image_id = tok.convert_tokens_to_ids("<image>")
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=vision_dim,
                           intermediate_size=2 * vision_dim, num_hidden_layers=vision_layers,
                           num_attention_heads=2, image_size=image_size, patch_size=14,
                           projection_dim=32),
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=hidden_size,
                         intermediate_size=intermediate_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, num_key_value_heads=num_heads,
                         max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id),
        image_token_index=image_id, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    config._attn_implementation = "eager"
    _seeded(seed)
    model = LlavaForConditionalGeneration(config).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=14,
        vision_feature_select_strategy="default", chat_template=LLAVA_CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    return model, processor


def build_clip_vit(seed: int = 0, *, image_size: int = 32, patch_size: int = 8, width: int = 32,
                   layers: int = 3):
    """Tiny open_clip ViT: 32px images, patch 8 (4x4 grid + CLS), width 32, 3 blocks, 2 heads
    (heads of 16 dims: width // 16 of them). Size arguments as in `build_qwen2_vl`."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    _seeded(seed)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=layers, width=width, head_width=16, mlp_ratio=4.0,
                                 patch_size=patch_size, image_size=image_size),
        text_cfg=CLIPTextCfg(context_length=16, vocab_size=100, width=32, heads=2, layers=1),
    ).eval()
    preprocess = open_clip.transform.image_transform(image_size, is_train=False)
    return model, preprocess
