"""open_clip ViT: standard names (``vlm.vision.blocks``), inputs, CLS + patch-grid layout."""

from __future__ import annotations

import torch

from ..tokens import ImageGeometry, ImageSpan, RowLayout, TokenLayout
from .base import Family, ModelInputs
from .layouts import to_pil

RENAME = {"visual": "vision", "visual.transformer.resblocks": "visual.blocks"}


def crop_geometry(size, shortest_edge: int, crop: tuple[int, int], patch: int,
                  rounding: str = "round") -> ImageGeometry:
    """Resize-shortest-edge then centre-crop. The crop offset (resized - crop) / 2 is rounded
    half to even by open_clip / torchvision (``rounding="round"``) and floored by HF's
    CLIPImageProcessor, which LLaVA uses (``"floor"``); they differ when it ends in .5 and
    rounds up, i.e. (resized - crop) % 4 == 3."""
    if rounding not in ("round", "floor"):
        raise ValueError(f"rounding {rounding!r}: expected 'round' or 'floor'")
    w, h = size
    if w <= h:
        rw, rh = shortest_edge, int(shortest_edge * h / w)
    else:
        rw, rh = int(shortest_edge * w / h), shortest_edge
    cw, ch = crop
    if rounding == "floor":
        left, top = (rw - cw) // 2, (rh - ch) // 2
    else:
        left, top = int(round((rw - cw) / 2.0)), int(round((rh - ch) / 2.0))
    return ImageGeometry((w, h), (rw, rh), (left, top, left + cw, top + ch), patch,
                         (ch // patch, cw // patch))


def prepare(vlm, *, text, images, video, chat, answer_prefix, **kw) -> ModelInputs:
    from .common import as_list

    if text or video is not None:
        raise ValueError("clip: the vision encoder takes images only (text=/video= not used)")
    pil = [to_pil(im) for im in as_list(images, "images")]
    if not pil:
        raise ValueError("images: expected at least one image")
    pixels = torch.stack([vlm.preprocess(im) for im in pil]).to(vlm.device)
    return ModelInputs({"image": pixels}, meta={"image_sizes": [im.size for im in pil]})


def layout(vlm, inputs: ModelInputs) -> TokenLayout:
    visual = vlm.torch_model.visual
    gh, gw = visual.grid_size
    size = visual.image_size[0] if isinstance(visual.image_size, tuple) else visual.image_size
    patch = visual.patch_size[0] if isinstance(visual.patch_size, tuple) else visual.patch_size
    n = 1 + gh * gw
    rows = []
    for s in inputs.meta["image_sizes"]:
        geo = crop_geometry(s, size, (size, size), patch)
        row = RowLayout(seq_len=n, text=torch.zeros(0, dtype=torch.long),
                        visual=torch.arange(1, n), last=n - 1, cls=0)
        row.images.append(ImageSpan.single(torch.arange(1, n), geo))
        rows.append(row)
    return TokenLayout(rows)


def load_pretrained(name: str, pretrained: str | None, *, device, dtype):
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    model = model.to(device=device, dtype=dtype or torch.float32).eval()
    return model, preprocess


# open_clip models load through `_load_clip` (not an HF family: no entry in `FAMILIES`).
CLIP = Family("clip", (), layout, prepare=prepare, rename=RENAME)
