"""Training and held-out scoring of ``tiny-clip-shapes``: an open_clip ViT that classifies the zoo's
object images the CLIP way, by similarity to a text embedding per class.

The text tower's input for class k is the token ids ``[k + 1, EOT]`` (padded with 0; EOT = the
largest id, where open_clip's argmax pooling reads): there is no vocabulary to speak of, so the
classes are token ids. Loss: cross-entropy of ``logit_scale * cos(image, text_k)`` over the 8
classes, both towers trained. Only the vision tower matters to the circuit recipes (`recipes.clip_*`).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from vlminterp.zoo import image_task


def class_tokens(model) -> torch.Tensor:
    """[8, context_length] token ids of the class texts."""
    n, eot = len(image_task.CLASSES), model.vocab_size - 1
    ids = torch.zeros(n, model.context_length, dtype=torch.long)
    ids[:, 0] = torch.arange(1, n + 1)
    ids[:, 1] = eot
    return ids


def class_logits(model, pixels: torch.Tensor) -> torch.Tensor:
    image = F.normalize(model.encode_image(pixels), dim=-1)
    text = F.normalize(model.encode_text(class_tokens(model)), dim=-1)
    return model.logit_scale.exp() * image @ text.T


class ShapesCLIP:
    def __init__(self, model, preprocess):
        self.model, self.preprocess = model, preprocess

    def loss(self, rng: np.random.Generator, batch_size: int, progress: float = 1.0) -> torch.Tensor:
        items = image_task.train_items(rng, batch_size)
        pixels = torch.stack([self.preprocess(it.image) for it in items])
        labels = torch.tensor([it.label for it in items])
        return F.cross_entropy(class_logits(self.model, pixels), labels)

    def self_check(self, rng: np.random.Generator) -> float:
        return 0.0

    def fast(self):
        return contextlib.nullcontext()


def heldout(model, preprocess, base: str, *, seed: int, n: int) -> dict:
    """Accuracy per class (argmax over the 8 class texts) on ``n`` held-out images per class."""
    items = image_task.heldout_items(seed, n)
    with torch.no_grad():
        pred = torch.cat([class_logits(model, torch.stack([preprocess(it.image) for it in items[i:i + 64]]))
                          .argmax(-1) for i in range(0, len(items), 64)])
    hits = pred == torch.tensor([it.label for it in items])
    out = {c: {"accuracy": float(hits[[it.category == c for it in items]].float().mean()), "n": n}
           for c in image_task.CLASSES}
    out["all"] = {"accuracy": float(hits.float().mean()), "n": len(items)}
    return out
