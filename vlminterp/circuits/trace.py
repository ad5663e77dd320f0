"""Step 1: one traced forward per batch of images → ``h_l``, ``ffn_gate_l``, ``attn_logits_l1``.

For vision block ``l`` (``--target-layer``) and block ``l1`` (``--next-attn-layer``, usually
l + 1) of an open_clip ViT, per image b, token i (CLS first, then patches row-major):

- ``h_l[b, i, :]`` [D_model]: the input of block l's first MLP linear ``mlp.c_fc``, i.e. the
  ``ln_2`` output;
- ``ffn_gate_l[b, i, :]`` [D_ffn] uint8: the binary gate ``mlp.gelu`` output > 0 (for GELU and
  QuickGELU the same as ``c_fc`` output > 0); ``ffn_act_l`` (float32, opt-in) the output itself;
- ``attn_logits_l1[b, h, i, j]``: the pre-softmax logit of query token i on key token j in head h
  of block l1, ``q_i · k_j / sqrt(head_dim)`` with ``q, k`` from the attention's ``in_proj``
  (or ``qkv``) weights applied to block l1's ``ln_1`` output; softmax over j gives exactly the
  attention weights the block uses.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from PIL import Image, ImageDraw
from torch import Tensor

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def attention_logits(x: Float[Tensor, "batch tokens d_model"], in_proj_weight: Float[Tensor, "three_d d_model"],
                     in_proj_bias: Float[Tensor, " three_d"] | None,
                     num_heads: int) -> Float[Tensor, "batch heads tokens tokens"]:
    """``q kᵀ / sqrt(head_dim)`` per head, with ``[q; k; v] = x W_inᵀ + b_in`` (torch-only)."""
    q, k, _ = F.linear(x, in_proj_weight, in_proj_bias).chunk(3, dim=-1)
    b, n, d = q.shape
    if d % num_heads:
        raise ValueError(f"attention width {d} is not divisible by num_heads={num_heads}")
    q = q.reshape(b, n, num_heads, d // num_heads).transpose(1, 2)
    k = k.reshape(b, n, num_heads, d // num_heads).transpose(1, 2)
    return q @ k.transpose(-2, -1) / math.sqrt(d // num_heads)


def attention_logits_of(attn, x: Float[Tensor, "..."]) -> Float[Tensor, "batch heads tokens tokens"]:
    """`attention_logits` for the input ``x`` of an ``nn.MultiheadAttention`` (``in_proj_*``;
    ``x`` is [N, B, D] unless ``batch_first``) or a timm-style attention with a ``qkv`` linear."""
    if getattr(attn, "qkv", None) is not None:
        return attention_logits(x, attn.qkv.weight, attn.qkv.bias, attn.num_heads)
    if getattr(attn, "in_proj_weight", None) is None:
        raise ValueError(f"{type(attn).__name__}: expected in_proj_weight (nn.MultiheadAttention) or a qkv linear")
    if not getattr(attn, "batch_first", False):
        x = x.transpose(0, 1)
    return attention_logits(x, attn.in_proj_weight, attn.in_proj_bias, attn.num_heads)


def clip_model_id(model: str, pretrained: str | None) -> str:
    """The `vlminterp.load` id of ``--model`` / ``--pretrained``: ``tiny-clip-vit`` and the zoo's
    ``tiny-clip-shapes`` as is, else ``open_clip:MODEL/PRETRAINED`` (``open_clip:MODEL``, random
    init, for '' or 'none')."""
    if model in ("tiny-clip-vit", "tiny-clip-shapes") or model.startswith("open_clip:"):
        return model
    if not pretrained or pretrained.lower() == "none":
        return f"open_clip:{model}"
    return f"open_clip:{model}/{pretrained}"


def pretrained_tag(model: str, pretrained: str | None) -> str | None:
    """The pretrained weights a trace really used, for its metadata: None for random init
    (``tiny-clip-vit``, ``--pretrained ''``/``none``, ``open_clip:MODEL`` without a tag); the
    zoo id for the zoo's trained ``tiny-clip-shapes``."""
    if model in ("tiny-clip-vit", "tiny-clip-shapes"):
        return None if model == "tiny-clip-vit" else model
    if model.startswith("open_clip:"):
        return model.split(":", 1)[1].partition("/")[2] or None
    return None if not pretrained or pretrained.lower() == "none" else pretrained


def check_layers(num_blocks: int, layer: int, next_layer: int, model: str = "the model") -> None:
    """Both indices must name a vision block: ``0 <= index < num_blocks``."""
    for flag, value in (("--target-layer", layer), ("--next-attn-layer", next_layer)):
        if not 0 <= value < num_blocks:
            raise ValueError(f"{flag} {value} is out of range: {model} has {num_blocks} vision blocks "
                             f"(0..{num_blocks - 1}); got --target-layer {layer}, --next-attn-layer {next_layer}")


def capture_batch(vlm, inputs, layer: int, next_layer: int, continuous: bool = False) -> dict[str, Tensor]:
    """One traced forward of ``inputs`` (``vlm.prepare(images=...)``) → the trace tensors (CPU).

    Reads ``vlm.vision.blocks[layer].ln_2`` / ``.mlp.gelu`` and ``vlm.vision.blocks[next_layer].ln_1``
    in execution order; the logits are computed from the saved ``ln_1`` output after the trace."""
    blocks = vlm.vision.blocks
    check_layers(len(blocks), layer, next_layer)
    with torch.no_grad(), vlm.trace(inputs):
        if next_layer <= layer:  # nnsight reads modules in execution order
            ln1 = blocks[next_layer].ln_1.output.save()
        h = blocks[layer].ln_2.output.save()
        act = blocks[layer].mlp.gelu.output.save()
        if next_layer > layer:
            ln1 = blocks[next_layer].ln_1.output.save()
    with torch.no_grad():
        logits = attention_logits_of(blocks[next_layer].attn, ln1)
    out = {"h_l": h.float().cpu(), "ffn_gate_l": (act > 0).to(torch.uint8).cpu(),
           "attn_logits_l1": logits.float().cpu()}
    if continuous:
        out["ffn_act_l"] = act.float().cpu()
    return out


def synthetic_image(index: int, size: int = 224, seed: int = 0) -> Image.Image:
    """Image ``index`` of a seeded set: 1–3 filled ellipses / rectangles / triangles of random
    colours on a random plain background (the same (index, size, seed) gives the same image)."""
    rng = np.random.default_rng((seed, index))
    background = tuple(int(c) for c in rng.integers(0, 256, 3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 4))):
        x0, y0 = (int(v) for v in rng.integers(0, size * 3 // 4, 2))
        w, h = (int(v) for v in rng.integers(size // 8, size // 2, 2))
        box = (x0, y0, min(size - 1, x0 + w), min(size - 1, y0 + h))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = int(rng.integers(0, 3))
        if shape == 0:
            draw.ellipse(box, fill=fill)
        elif shape == 1:
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=fill)
    return image


def image_source(*, imagenet_root: Path | None = None, split: str = "val", image_folder: Path | None = None,
                 synthetic: int | None = None, max_images: int, size: int = 224, seed: int = 0):
    """``(ids, load)``: up to ``max_images`` image ids and ``load(i) -> RGB PIL image``.

    ImageNet (torchvision's ``ImageNet(root, split)``; ids = paths relative to the root), an image
    folder (files with an image suffix, recursive, sorted; ids = their paths) or ``synthetic``
    generated images (ids ``synthetic:<seed>:<i>``), in that order of precedence."""
    if synthetic is not None:
        count = min(synthetic, max_images)
        return [f"synthetic:{seed}:{i}" for i in range(count)], lambda i: synthetic_image(i, size, seed)
    if image_folder is not None:
        if not Path(image_folder).is_dir():
            raise ValueError(f"--image-folder {image_folder} is not a directory")
        files = [p for p in sorted(Path(image_folder).rglob("*")) if p.suffix.lower() in IMAGE_EXTS]
        if not files:
            raise ValueError(f"--image-folder {image_folder} holds no {'/'.join(sorted(IMAGE_EXTS))} files")
        files = files[:max_images]
        return [str(p) for p in files], lambda i: Image.open(files[i]).convert("RGB")
    if imagenet_root is None:
        raise ValueError("no images: give --imagenet-root, --image-folder or --synthetic N")
    if not Path(imagenet_root).exists():
        raise ValueError(f"--imagenet-root {imagenet_root} does not exist")
    from torchvision.datasets import ImageNet

    dataset = ImageNet(root=str(imagenet_root), split=split)
    if len(dataset) == 0:
        raise ValueError(f"ImageNet split is empty: --imagenet-root {imagenet_root} --split {split}")
    ids = []
    for i in range(min(max_images, len(dataset))):
        path = Path(dataset.samples[i][0])
        ids.append(str(path.relative_to(dataset.root)) if path.is_relative_to(dataset.root) else str(path))
    return ids, lambda i: dataset[i][0].convert("RGB")
