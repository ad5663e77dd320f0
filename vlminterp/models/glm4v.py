"""GLM-4.1V, GLM-4.5V (MoE) and GLM-4.6V: Qwen2-VL-style patches (14 px, 2x2 merge, 2 frames per
temporal group), but video frames use the *image* token: a video is
``<|begin_of_video|>`` + one ``<|begin_of_image|>pad…<|end_of_image|>T`` run per group +
``<|end_of_video|>``, where T is the group's timestamp text (GLM-4.1V/4.5V: integer seconds,
GLM-4.6V: ``x.x seconds``). Only ``mm_token_type_ids`` (2 = video; from the begin/end-of-video
markers) tells a video's runs from an image's."""

from __future__ import annotations

import torch

from ..tokens import TokenLayout
from . import tiny
from .base import Family, ModelInputs
from .layouts import prepare as generic_prepare
from .qwen2_vl import grid_layout

MARKERS = ["<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>"]
SPECIALS = ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|image|>",
            "<|video|>", *MARKERS]
CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|begin_of_image|><|image|><|end_of_image|>"
    "{% elif part['type'] == 'video' %}<|begin_of_video|><|video|><|end_of_video|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_VIDEO = 2  # mm_token_type_ids: 0 text, 1 image, 2 video


def prepare(vlm, *, video=None, fps: float = 2.0, **kw) -> ModelInputs:
    """Frames are taken as given (``do_sample_frames=False``); their timestamps come from
    ``fps`` (default 2, the rate GLM-4.1V's processor samples at). The processor's own
    ``frames_indices`` are kept in ``meta`` for the layout."""
    if video is not None:
        frames = [len(v) for v in (video if isinstance(video, (list, tuple)) else [video])]
        kw["video_metadata"] = [{"total_num_frames": n, "fps": fps,
                                 "frames_indices": list(range(n))} for n in frames]
        kw["return_metadata"] = True
    out = generic_prepare(vlm, video=video, **kw)
    metadata = out.pop("video_metadata", None)
    if metadata is not None:
        out.meta["frames_indices"] = [list(m.frames_indices) for m in metadata]
    return out


def layout(vlm, inputs: ModelInputs) -> TokenLayout:
    """Images and video frames share the image token (``mm_token_type_ids`` tells them apart);
    one run per frame group, followed by its timestamp text (`grid_layout`)."""
    cfg = vlm.torch_model.config
    kinds = inputs["mm_token_type_ids"].cpu()
    marker_ids = [cfg.image_start_token_id, cfg.image_end_token_id, cfg.video_start_token_id,
                  cfg.video_end_token_id]
    return grid_layout(vlm, inputs, tokens=(cfg.image_token_id,), markers=marker_ids,
                       is_video=lambda b, start, token: int(kinds[b, start]) == _VIDEO,
                       timestamps=lambda ids, runs: _timestamps(ids, runs, marker_ids))


def _timestamps(ids, group_runs, marker_ids) -> torch.Tensor:
    """Each group's timestamp text: the tokens after its ``<|end_of_image|>`` up to the next
    marker (the next group's ``<|begin_of_image|>`` or ``<|end_of_video|>``)."""
    out = []
    for _, stop in group_runs:
        p = stop + 1
        while p < len(ids) and int(ids[p]) not in marker_ids:
            out.append(p)
            p += 1
    return torch.tensor(out, dtype=torch.long)


def build_tiny(seed: int = 0, variant: str = "4.1"):
    """Tiny GLM-4.1V (``variant`` "4.1"), GLM-4.5V ("4.5": MoE text) or GLM-4.6V ("4.6"):
    4 decoder layers, 2 vision blocks, patch 14; images and frames of 56-112 px."""
    import transformers as tf

    tok = tiny.qwen_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [1, 1, 2], "partial_rotary_factor": 0.5},
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  patch_size=14, image_size=56, spatial_merge_size=2, temporal_patch_size=2)
    config_cls, model_cls, processor_cls, video_cls = {
        "4.1": ("Glm4vConfig", "Glm4vForConditionalGeneration", "Glm4vProcessor",
                "Glm4vVideoProcessor"),
        "4.5": ("Glm4vMoeConfig", "Glm4vMoeForConditionalGeneration", "Glm4vProcessor",
                "Glm4vVideoProcessor"),
        "4.6": ("Glm46VConfig", "Glm46VForConditionalGeneration", "Glm46VProcessor",
                "Glm46VVideoProcessor"),
    }[variant]
    if variant == "4.5":
        text.update(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                    n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1)
    config = getattr(tf, config_cls)(
        text_config=text, vision_config=vision, image_token_id=ids["<|image|>"],
        video_token_id=ids["<|video|>"], image_start_token_id=ids["<|begin_of_image|>"],
        image_end_token_id=ids["<|end_of_image|>"], video_start_token_id=ids["<|begin_of_video|>"],
        video_end_token_id=ids["<|end_of_video|>"])
    kw = dict(patch_size=14, merge_size=2, temporal_patch_size=2)
    size = {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}
    processor = getattr(tf, processor_cls)(
        image_processor=tf.Glm4vImageProcessor(size=size, **kw),
        video_processor=getattr(tf, video_cls)(
            size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112 * 8},
            do_sample_frames=False, **kw),
        tokenizer=tok, chat_template=CHAT_TEMPLATE)
    return tiny.seeded_model(getattr(tf, model_cls), config, seed), processor


_COMMON = dict(layout=layout, prepare=prepare, modalities=("image", "video"),
               image_token="<|image|>", video_token="<|video|>",
               video_kwargs={"do_sample_frames": False})
FAMILIES = [
    Family("glm4v", ("glm4v",), tiny={"tiny-glm4.1v": build_tiny}, **_COMMON),
    Family("glm4v_moe", ("glm4v_moe",),
           tiny={"tiny-glm4.5v": lambda seed: build_tiny(seed, "4.5")}, **_COMMON),
    Family("glm46v", ("glm46v",), tiny={"tiny-glm4.6v": lambda seed: build_tiny(seed, "4.6")},
           **_COMMON),
]
