"""Qwen3-VL (+ MoE): Qwen2-VL's token layout for images; a video is one run per temporal group,
each run preceded by its timestamp text (``<0.2 seconds><|vision_start|>…<|vision_end|>``).

Deepstack: visual features of early vision blocks are *added* to the hidden states at the
visual positions after LM layers 0..k-1, outside the layer modules (``vlm.residual(i)`` is the
next layer's input there, and `expand_rows` carries them per row)."""

from __future__ import annotations

import torch

from ..tokens import TokenLayout
from . import tiny
from .base import Family, ModelInputs
from .layouts import prepare as generic_prepare
from .qwen2_vl import VIDEO_KWARGS, grid_layout


class Deepstack:
    """The LM's ``deepstack_visual_embeds`` (k tensors [n_visual, d], flattened over the
    batch's visual positions) as one dense [batch, seq, k, d] tensor, and back."""

    def to_dense(self, kwargs) -> dict:
        embeds, mask = kwargs.get("deepstack_visual_embeds"), kwargs.get("visual_pos_masks")
        if embeds is None or mask is None:
            return {}
        stacked = torch.stack(list(embeds), dim=1)
        dense = stacked.new_zeros(*mask.shape, *stacked.shape[1:])
        dense[mask] = stacked
        return {"deepstack_visual_embeds": dense}

    def from_dense(self, kwargs, dense) -> dict:
        if "deepstack_visual_embeds" not in dense:
            return {}
        flat = dense["deepstack_visual_embeds"][kwargs["visual_pos_masks"]]
        return {"deepstack_visual_embeds": list(flat.unbind(1))}


def prepare(vlm, *, video=None, fps: float = 2.0, **kw) -> ModelInputs:
    """Timestamps come from the frames' rate (``fps``, default 2: Qwen3-VL samples 2 frames per
    second); the frames given are used as they are (no resampling)."""
    if video is not None:
        frames = [len(v) for v in (video if isinstance(video, (list, tuple)) else [video])]
        kw["video_metadata"] = [{"total_num_frames": n, "fps": fps,
                                 "frames_indices": list(range(n))} for n in frames]
    return generic_prepare(vlm, video=video, **kw)


def layout(vlm, inputs: ModelInputs) -> TokenLayout:
    """One run per temporal group, after its ``<t seconds>`` text (`grid_layout`)."""
    cfg = vlm.torch_model.config
    start_id, end_id = cfg.vision_start_token_id, cfg.vision_end_token_id
    return grid_layout(vlm, inputs, tokens=(cfg.image_token_id, cfg.video_token_id),
                       markers=(start_id, end_id),
                       is_video=lambda b, start, token: token == cfg.video_token_id,
                       timestamps=lambda ids, runs: _timestamps(ids, runs, start_id, end_id))


def _timestamps(ids, group_runs, start_id, end_id) -> torch.Tensor:
    """Each group's ``<t seconds>`` text: the tokens between the previous vision start/end
    token and the ``<|vision_start|>`` just before the group's run."""
    out = []
    for start, _ in group_runs:
        p = start - 2
        while p >= 0 and int(ids[p]) not in (start_id, end_id):
            out.append(p)
            p -= 1
    return torch.tensor(sorted(out), dtype=torch.long)


def build_tiny(seed: int = 0, moe: bool = False, *, rope_theta: float = 10000.0,
               frame_pixels: int = 128 * 128):
    """Tiny Qwen3-VL(-MoE): 4 decoder layers (deepstack after layers 0 and 1), 2 vision blocks,
    patch 16; images and frames of 64-128 px. The model zoo passes other sizes where its task
    needs them (its card records them): ``frame_pixels`` caps a video frame's size (64 * 64 ->
    2x2 tokens per temporal group), ``rope_theta`` the language model's rotary base."""
    tok = tiny.qwen_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in tiny.QWEN_SPECIALS}
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                rope_parameters={"rope_type": "default", "rope_theta": rope_theta,
                                 "mrope_section": [2, 3, 3], "mrope_interleaved": True},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    if moe:
        from transformers import Qwen3VLMoeConfig as config_cls
        from transformers import Qwen3VLMoeForConditionalGeneration as model_cls

        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                    decoder_sparse_step=1)
    else:
        from transformers import Qwen3VLConfig as config_cls
        from transformers import Qwen3VLForConditionalGeneration as model_cls
    return tiny_model(seed, tok, model_cls, config_cls, text, frame_pixels=frame_pixels,
                      deepstack_visual_indexes=[0, 1])


def tiny_model(seed: int, tok, model_cls, config_cls, text: dict, *,
               frame_pixels: int = 128 * 128, **vision):
    """The tiny Qwen3-VL-style model and processor around ``text`` (the text config): 2
    vision blocks of patch 16 (``vision`` adds to them), images of 64-128 px, video frames of
    at most ``frame_pixels``. Shared by the Qwen3-VL and Qwen3.5 builders."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    ids = {t: tok.convert_tokens_to_ids(t) for t in tiny.QWEN_SPECIALS}
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                  num_position_embeddings=64, **vision)
    config = config_cls(text_config=text, vision_config=vision,
                        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                        vision_start_token_id=ids["<|vision_start|>"],
                        vision_end_token_id=ids["<|vision_end|>"])
    kw = dict(patch_size=16, merge_size=2, temporal_patch_size=2)
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=64 * 64, max_pixels=128 * 128, **kw),
        video_processor=Qwen3VLVideoProcessor(
            size={"shortest_edge": 64 * 64, "longest_edge": frame_pixels * 8},
            do_sample_frames=False, **kw),
        tokenizer=tok, chat_template=tiny.QWEN_CHAT_TEMPLATE)
    return tiny.seeded_model(model_cls, config, seed), processor


_COMMON = dict(layout=layout, prepare=prepare, modalities=("image", "video"),
               image_token="<|image_pad|>", video_token="<|video_pad|>",
               visual_entry="deepstack", late_inputs=Deepstack(),
               video_kwargs=VIDEO_KWARGS)
FAMILIES = [
    Family("qwen3_vl", ("qwen3_vl",), tiny={"tiny-qwen3-vl": build_tiny}, **_COMMON),
    Family("qwen3_vl_moe", ("qwen3_vl_moe",),
           tiny={"tiny-qwen3-vl-moe": lambda seed: build_tiny(seed, moe=True)}, **_COMMON),
]
