"""PaliGemma (1 and 2): a SigLIP tower, one linear projection, a Gemma / Gemma 2 LM. Not a chat
model: the row is ``<image>×n <bos> prompt \\n`` — the image tokens come first, before BOS —
and the whole prefix (image + prompt) attends bidirectionally (a prefix-LM mask built outside
the LM from ``token_type_ids``). The answer follows the ``\\n`` (``answer_prefix``), causally.

``vlm.prepare(text, images)`` prefixes ``<image>`` (``chat=False``: the text is given as is and
must hold it); the processor's ``labels`` (for fine-tuning) are dropped. PaliGemma 2 caps its
final logits (``final_logit_softcapping``) after ``lm_head``: `interventions.logit_lens`
applies the cap, ``vlm.lm_head.output`` is the logits before it."""

from __future__ import annotations

import torch

from ..tokens import ImageGeometry, ImageSpan, TokenLayout
from . import tiny
from .base import Family, ModelInputs
from .common import answer_prefixes, as_list
from .gemma3 import gemma_tokenizer
from .layouts import finish_row, prepare as generic_prepare, visual_runs


def prepare(vlm, *, text=None, images=None, video=None, chat=True, answer_prefix="",
            **kw) -> ModelInputs:
    texts = [("<image>" if chat else "") + t for t in as_list(text, "text") or [""]]
    inputs = generic_prepare(vlm, text=texts, images=images, video=video, chat=False,
                             answer_prefix="", **kw)
    inputs.pop("labels", None)
    prefixes = answer_prefixes(answer_prefix, inputs.batch_size)
    if any(prefixes):
        side = kw.get("padding_side", vlm.tokenizer.padding_side)
        inputs = _append(vlm, inputs, [vlm.tokenizer.encode(p, add_special_tokens=False)
                                       for p in prefixes], left=side == "left")
    return inputs


def _append(vlm, inputs: ModelInputs, ids: list[list[int]], left: bool) -> ModelInputs:
    """Append each row's answer tokens ``ids[row]`` after its prefix (causal, token type 1: as
    generated tokens), padded again on the left or the right."""
    rows = []
    for b in range(inputs.batch_size):
        real = inputs["attention_mask"][b].bool()
        reply = torch.tensor(ids[b], dtype=torch.long)
        rows.append((torch.cat([inputs["input_ids"][b, real], reply]),
                     torch.cat([inputs["token_type_ids"][b, real], torch.ones(len(ids[b]))])))
    width = max(len(r[0]) for r in rows)
    out = {k: torch.zeros(len(rows), width, dtype=torch.long)
           for k in ("input_ids", "attention_mask", "token_type_ids")}
    out["input_ids"].fill_(vlm.tokenizer.pad_token_id)
    for b, (row_ids, types) in enumerate(rows):
        cells = slice(width - len(row_ids), None) if left else slice(0, len(row_ids))
        out["input_ids"][b, cells], out["token_type_ids"][b, cells] = row_ids, types.long()
        out["attention_mask"][b, cells] = 1
    return ModelInputs({**inputs, **out}, meta=inputs.meta).to(vlm.device)


def layout(vlm, inputs: ModelInputs) -> TokenLayout:
    cfg = vlm.torch_model.config
    vcfg = cfg.vision_config
    side, patch = vcfg.image_size, vcfg.patch_size
    grid = (side // patch, side // patch)
    sizes = iter(inputs.meta.get("image_sizes", []))
    rows = []
    for b, ids in enumerate(inputs["input_ids"].cpu()):
        images = []
        for start, stop, _ in visual_runs(ids, (cfg.image_token_id,)):
            for chunk in torch.arange(start, stop).split(grid[0] * grid[1]):  # one per image
                size = next(sizes, None) or (side, side)
                geo = ImageGeometry(tuple(size), (side, side), (0, 0, side, side), patch, grid)
                images.append(ImageSpan.single(chunk, geo))
        rows.append(finish_row(inputs, b, images))
    return TokenLayout(rows)


def build_tiny(seed: int = 0, softcap: float | None = None):
    """Tiny PaliGemma 2: 4 Gemma 2 layers (sliding and global, attention logits capped at 50;
    the final cap is off unless ``softcap`` — real PaliGemma 2 uses 30), 2 SigLIP blocks on
    32 px images, patch 8 -> 16 image tokens."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration
    from transformers import PaliGemmaProcessor, SiglipImageProcessor

    tok = gemma_tokenizer(["<pad>", "<eos>", "<bos>", "<unk>", "<image>"],
                          {"image_token": "<image>"})
    processor = PaliGemmaProcessor(  # adds the <loc…>/<seg…> tokens to the tokenizer
        image_processor=SiglipImageProcessor(size={"height": 32, "width": 32},
                                             image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                             image_seq_length=16),
        tokenizer=tok)
    config = PaliGemmaConfig(
        text_config=dict(model_type="gemma2", vocab_size=len(tok), hidden_size=64,
                         intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                         sliding_window=16, final_logit_softcapping=softcap,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32,
                           intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=64),
        image_token_index=tok.image_token_id, vocab_size=len(tok), projection_dim=64,
        hidden_size=64)
    return tiny.seeded_model(PaliGemmaForConditionalGeneration, config, seed), processor


FAMILY = Family("paligemma", ("paligemma",), layout, tiny={"tiny-paligemma": build_tiny},
                prepare=prepare, image_token="<image>")
