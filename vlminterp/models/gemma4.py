"""Gemma 4: images as one run ``<|image><|image|>×n<image|>``; a video as one run per frame,
each preceded by its ``mm:ss`` timestamp (``00:01 <|image><|video|>×n<image|>``, runs joined by
spaces). The start/end tokens and the timestamps are markers. Each image or frame is resized
to the processor's soft-token budget (≥ 70: ~64 tokens per frame) keeping its aspect ratio.

Per-layer inputs: decoder layer j also consumes ``(proj(E)[j] + P[j]) / sqrt 2``, where ``E``
is the LM input (visual features included), ``proj`` the LM's ``per_layer_model_projection``
+ ``per_layer_projection_norm``, and ``P`` the token-identity part computed before the LM (the
pad token's at media positions). KV sharing: the last layers reuse the keys/values the last
earlier layer of their type stored, so with ``logits_to_keep=1`` they run on the last position
only (``Family.logits_to_keep`` is False). ``expand_rows(..., carry=)`` carries both.
The final logits are soft-capped after ``lm_head`` (see `interventions.softcap_logits`)."""

from __future__ import annotations

import re

import torch

from ..tokens import Group, ImageGeometry, ImageSpan, TokenLayout, VideoSpan
from . import tiny
from .base import Family, ModelInputs
from .gemma3 import gemma_tokenizer
from .layouts import finish_row, positions_of, prepare as generic_prepare, visual_runs

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>", "<|image>", "<image|>",
            "<|image|>", "<|audio>", "<audio|>", "<|audio|>", "<|video|>"]
MEDIA = {"boi_token": "<|image>", "eoi_token": "<image|>", "image_token": "<|image|>",
         "boa_token": "<|audio>", "eoa_token": "<audio|>", "audio_token": "<|audio|>"}
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|image|>"
    "{% elif part['type'] == 'video' %}<|video|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}{% endfor %}"
    "{% endif %}<turn|>\n{% endfor %}{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)


class PerLayerInputs:
    """The per-layer inputs as a dense ``[batch, seq, layer, d]`` LM kwarg (``P``); the part the
    LM computes from its own input and the shared keys/values are carried by `carry_inside`."""

    def to_dense(self, kwargs) -> dict:
        p = kwargs.get("per_layer_inputs")
        return {} if p is None else {"per_layer_inputs": p}

    def from_dense(self, kwargs, dense) -> dict:
        return dict(dense)

    def carry_inside(self, vlm, carry) -> None:
        """After the LM input (called by `expand_rows`)."""
        self.carry_projection(vlm, carry)
        self.carry_shared_kv(vlm, carry)

    def carry_projection(self, vlm, carry) -> None:
        """``proj(E)`` for the layers after ``after`` (computed before layer 0)."""
        proj = vlm.lm.per_layer_projection_norm.output  # [batch, seq, layer, d]
        for src, dst, pos, after in carry:
            _copy(proj, src, dst, pos, 0 if after == "embed" else int(after) + 1)

    def carry_shared_kv(self, vlm, carry) -> None:
        """Once layer ``after``'s attention has run, the keys/values that KV-shared layers
        after it read but a layer up to ``after`` stored."""
        cfg = _text_config(vlm)
        modes, types = cfg.kv_sharing_modes, cfg.layer_types
        store = {types[i]: i for i, m in enumerate(modes) if m == "store"}
        for after in sorted({int(a) for *_, a in carry if a != "embed"}):
            if not any(m == "reuse" and j > after and store.get(types[j], j) <= after
                       for j, m in enumerate(modes)):
                continue
            shared = vlm.layers[after].inputs[1]["shared_kv_states"]
            vlm.layers[after].self_attn.output  # noqa: B018 -- after layer `after` used them
            for kind in list(shared.keys()):
                kv = [t.clone() for t in shared[kind]]  # [batch, heads, seq, d]
                for src, dst, pos, a in carry:
                    if a != "embed" and int(a) == after:
                        for t in kv:
                            _copy(t.transpose(1, 2), src, dst, pos)
                shared[kind] = tuple(kv)


def _copy(t, src, dst, pos, first: int = 0) -> None:
    """``t[dst, pos, first:] = t[src, pos, first:]`` for ``t`` = [batch, seq, ...]."""
    rows = dst.to(t.device)
    cells = (rows, pos) if isinstance(pos, slice) else (rows[:, None], pos.to(t.device)[None, :])
    t[(*cells, slice(first, None))] = t[src, pos, first:].clone()


def _text_config(vlm):
    model = vlm.torch_model if vlm.torch_model is not None else vlm.model._module
    return model.config.get_text_config()


def prepare(vlm, *, video=None, fps: float = 1.0, **kw) -> ModelInputs:
    """Timestamps come from the frames' rate (``fps``, default 1); the frames given are used as
    they are (``do_sample_frames=False``: the processor would sample 32)."""
    if video is not None:
        frames = [len(v) for v in (video if isinstance(video, (list, tuple)) else [video])]
        kw["video_metadata"] = [{"total_num_frames": n, "fps": fps,
                                 "frames_indices": list(range(n))} for n in frames]
    return generic_prepare(vlm, video=video, nest_images=True, **kw)


def _view(pos, positions, k: int, patch: int, size) -> tuple:
    """Token grid and geometry of one image/frame from its patch (x, y) positions: the
    processor resized it to (x+1)·patch by (y+1)·patch, pooled k×k patches per token."""
    real = positions[(positions >= 0).all(-1)]
    cols, rows = int(real[:, 0].max()) + 1, int(real[:, 1].max()) + 1
    grid = (rows // k, cols // k)
    if len(pos) != grid[0] * grid[1]:
        raise ValueError(f"{len(pos)} tokens but the patch grid {rows}x{cols} pooled by {k} "
                         f"gives {grid[0] * grid[1]}")
    resized = (cols * patch, rows * patch)
    return grid, ImageGeometry(tuple(size or resized), resized, (0, 0, *resized), patch * k, grid)


def layout(vlm, inputs: ModelInputs) -> TokenLayout:
    cfg = vlm.torch_model.config
    k, patch = cfg.vision_config.pooling_kernel_size, cfg.vision_config.patch_size
    image_pos = iter(inputs.get("image_position_ids", torch.zeros(0)).cpu())
    frame_pos = iter(inputs.get("video_position_ids", torch.zeros(0)).cpu())
    frames = iter(inputs.get("num_frames_per_video", torch.zeros(0)).tolist())
    sizes = iter(inputs.meta.get("image_sizes", []))
    rows = []
    for b, ids in enumerate(inputs["input_ids"].cpu()):
        images, videos = [], []
        for start, stop, _ in visual_runs(ids, (cfg.image_token_id,)):
            _, geo = _view(torch.arange(start, stop), next(image_pos), k, patch, next(sizes, None))
            images.append(ImageSpan.single(torch.arange(start, stop), geo))
        runs = visual_runs(ids, (cfg.video_token_id,))
        if runs:  # one video per row, one run per frame
            n = int(next(frames))
            if len(runs) != n:
                raise ValueError(f"row {b}: {len(runs)} frame runs for {n} frames")
            groups = []
            for f, (start, stop, _) in enumerate(runs):
                pos = torch.arange(start, stop)
                grid = _view(pos, next(frame_pos), k, patch, None)[0]
                groups.append(Group(pos, (f, f + 1), grid))
            stamps = [_timestamp(vlm.tokenizer, ids, a, cfg) for a, _, _ in runs]
            videos.append(VideoSpan(groups, n, markers=torch.cat(stamps)))
        marks = positions_of(ids, (cfg.boi_token_id, cfg.eoi_token_id))
        rows.append(finish_row(inputs, b, images, videos, marks))
    return TokenLayout(rows)


def _timestamp(tokenizer, ids, run_start: int, cfg) -> torch.Tensor:
    """The ``mm:ss`` text before a frame's ``<|image>`` start token: the tokens just before it
    made only of digits, ``:`` and spaces."""
    out, p = [], run_start - 2
    while p >= 0 and int(ids[p]) not in (cfg.boi_token_id, cfg.eoi_token_id) and \
            re.fullmatch(r"[\d: ]+", tokenizer.decode([int(ids[p])])):
        out.append(p)
        p -= 1
    return torch.tensor(sorted(out), dtype=torch.long)


def build_tiny(seed: int = 0, softcap: float | None = None):
    """Tiny Gemma 4: 4 decoder layers (sliding, global; the last two reuse the first two's
    keys/values), per-layer inputs of 8, 2 vision blocks of patch 4 pooled 2x2, the real
    processors at their smallest budget (70 soft tokens: 64 per 112 px frame)."""
    from transformers import Gemma4AudioFeatureExtractor, Gemma4Config
    from transformers import Gemma4ForConditionalGeneration, Gemma4ImageProcessor
    from transformers import Gemma4Processor, Gemma4VideoProcessor

    tok = gemma_tokenizer(SPECIALS, MEDIA)
    kw = dict(patch_size=4, max_soft_tokens=70, pooling_kernel_size=2)
    processor = Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(), image_processor=Gemma4ImageProcessor(**kw),
        video_processor=Gemma4VideoProcessor(do_sample_frames=False, **kw), tokenizer=tok,
        chat_template=CHAT_TEMPLATE, image_seq_length=70)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    config = Gemma4Config(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, global_head_dim=16, sliding_window=32,
                         layer_types=["sliding_attention", "full_attention"] * 2,
                         num_kv_shared_layers=2, hidden_size_per_layer_input=8,
                         vocab_size_per_layer_input=len(tok), use_bidirectional_attention="vision",
                         final_logit_softcapping=softcap, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                           patch_size=4, pooling_kernel_size=2, position_embedding_size=64),
        audio_config=None, boi_token_id=ids["<|image>"], eoi_token_id=ids["<image|>"],
        image_token_id=ids["<|image|>"], video_token_id=ids["<|video|>"],
        audio_token_id=ids["<|audio|>"], boa_token_id=ids["<|audio>"],
        eoa_token_index=ids["<audio|>"])
    return tiny.seeded_model(Gemma4ForConditionalGeneration, config, seed), processor


def _frames_per_row(inputs, vlm=None) -> list[int]:
    return inputs["num_frames_per_video"].tolist()


FAMILY = Family(
    "gemma4", ("gemma4",), layout, modalities=("image", "video"),
    tiny={"tiny-gemma4": build_tiny}, prepare=prepare, rename={"model.embed_vision": "projector"},
    image_token="<|image|>", video_token="<|video|>", visual_entry="per_layer",
    late_inputs=PerLayerInputs(), logits_to_keep=False, video_kwargs={"do_sample_frames": False},
    flat_inputs={"pixel_values_videos": _frames_per_row, "video_position_ids": _frames_per_row})
