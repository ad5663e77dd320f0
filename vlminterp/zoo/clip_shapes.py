"""Training and held-out scoring of ``tiny-clip-shapes``: an open_clip ViT that classifies the zoo's
object images the CLIP way, by similarity to a text embedding per class.

The text tower's input for class k is the token ids ``[k + 1, EOT]`` (padded with 0; EOT = the
largest id, where open_clip's argmax pooling reads): there is no vocabulary to speak of, so the
classes are token ids. Loss: cross-entropy of ``logit_scale * cos(image, text_k)`` over the 8
classes, both towers trained. Only the vision tower matters to the circuit recipes (`recipes.clip_*`).

One more term plants what the circuit pipeline's clustering should find: in blocks `GATE_BLOCKS`
the first `GATE_UNITS` FFN units switch on (``c_fc`` output >= +1) at patch tokens the object
covers >= 50% and off (<= -1) at tokens it does not touch (hinge loss, weight `GATE_WEIGHT`;
partly covered cells, CLS and the other units get no target). With the classification loss
alone the gate clusters did not separate object from texture tokens (object recall 0.0 at k=8):
the class needs only a few units, which k-means on 128 binary gates does not see.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from vlminterp.zoo import image_task

GATE_BLOCKS = (1, 2)  # block 0's FFN computes the colour features the later gates threshold
GATE_UNITS = 32
GATE_WEIGHT = 1.0
GATE_COVER = 0.5  # a patch token is an object token from this coverage of its cell
# ... and what the target-causal step should find: in head ATTN_HEAD of block ATTN_BLOCK, CLS and
# the object's tokens send attention logits >= ATTN_LOGIT to the object's tokens (hinge). With the
# gate term alone, the strongest 50 prototype edges all ran between texture clusters.
ATTN_BLOCK, ATTN_HEAD, ATTN_LOGIT, ATTN_WEIGHT = 2, 1, 15.0, 0.1


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
        with capture_planted(self.model) as (gates, logits):
            loss = F.cross_entropy(class_logits(self.model, pixels), labels)
        sign = gate_targets(items)
        return (loss + GATE_WEIGHT * gate_loss(gates, sign)
                + ATTN_WEIGHT * attention_loss(logits[0], sign))

    def self_check(self, rng: np.random.Generator) -> float:
        return 0.0

    def fast(self):
        return contextlib.nullcontext()


@contextlib.contextmanager
def capture_planted(model):
    """Collects ``(gates, logits)``: the ``[batch, 1 + patches, GATE_UNITS]`` ``c_fc`` outputs of
    `GATE_BLOCKS` and block `ATTN_BLOCK`'s ``[batch, heads, tokens, tokens]`` attention logits."""
    from vlminterp.circuits.trace import attention_logits_of

    gates, logits = [], []
    blocks = model.visual.transformer.resblocks
    handles = [blocks[b].mlp.c_fc.register_forward_hook(lambda _m, _i, out: gates.append(out[..., :GATE_UNITS]))
               for b in GATE_BLOCKS]
    attn = blocks[ATTN_BLOCK].attn
    handles.append(blocks[ATTN_BLOCK].ln_1.register_forward_hook(
        lambda _m, _i, out: logits.append(attention_logits_of(attn, out))))
    try:
        yield gates, logits
    finally:
        for h in handles:
            h.remove()


def gate_targets(items) -> torch.Tensor:
    """[batch, 1 + patches]: +1 at object tokens, -1 at untouched tokens, 0 (no target) at partly
    covered cells and at CLS."""
    cover = torch.from_numpy(np.stack([it.coverage().reshape(-1) for it in items]))
    sign = torch.where(cover >= GATE_COVER, 1.0, torch.where(cover == 0, -1.0, 0.0))
    return F.pad(sign, (1, 0))


def gate_loss(pre: list[torch.Tensor], sign: torch.Tensor) -> torch.Tensor:
    """Hinge: the planted units' pre-activations on the right side of +-1 at the tokens
    `gate_targets` gives a ``sign``; the object and the untouched tokens weigh the same (the
    object covers ~3% of the tokens)."""
    total = 0.0
    for out in pre:
        miss = F.relu(1 - sign[..., None] * out.float()).mean(-1)  # [batch, tokens]
        total = total + sum(miss[sign == s].mean() for s in (1.0, -1.0)) / 2
    return total / len(pre)


def attention_loss(logits: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Hinge: head `ATTN_HEAD`'s logits from CLS and object tokens (``sign`` > 0, see
    `gate_targets`) to object tokens >= `ATTN_LOGIT`."""
    obj = sign > 0
    queries = obj.clone()
    queries[:, 0] = True
    pairs = queries[:, :, None] & obj[:, None, :]
    return F.relu(ATTN_LOGIT - logits[:, ATTN_HEAD].float())[pairs].mean() / ATTN_LOGIT


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
