"""Token subsets to ablate, as indices into a row's visual tokens (``layout.visual``: the
patch tokens of every view of the image, separators and markers excluded), so one subset
serves prompts of any length: the object's cells in every view, high-norm register tokens,
random tokens, and the top tokens by integrated gradients at the LM input."""

from __future__ import annotations

import zlib

import torch
from jaxtyping import Float, Int
from torch import Tensor

from vlminterp.data.coco import ObjectSample, object_cells
from vlminterp.models.base import ModelInputs
from vlminterp.tokens import ImageSpan, RowLayout
from vlminterp.neo2024.prompts import repeat_inputs


def object_indices(where: RowLayout | ImageSpan, sample: ObjectSample, buffer: int = 0,
                   use_polygons: bool = True) -> Int[Tensor, "_n"]:
    """Indices into the visual tokens of the cells the object overlaps (grown by ``buffer``
    rings), in every view of the image that has a pixel geometry: LLaVA-1.5's one grid,
    LLaVA-NeXT's base view and tiles, InternVL's tiles and thumbnail, SmolVLM's tiles and
    global view... Given a `RowLayout`, indices into ``row.visual`` (its first image's
    object); given an `ImageSpan`, into its patch tokens in sequence order (the same for a
    row holding one image). Separators and markers are never part of it."""
    if isinstance(where, RowLayout):
        if not where.images:
            raise ValueError("object_indices: the row holds no image")
        span, visual = where.images[0], where.visual
    else:
        span = where
        visual = torch.sort(span.positions).values
    found = [view.cell_positions(object_cells(sample, view.geometry, buffer, use_polygons))
             for view in span.views if view.geometry is not None]
    positions = torch.unique(torch.cat([torch.zeros(0, dtype=torch.long), *found]))
    return torch.searchsorted(visual, positions)


def register_indices(visual: Float[Tensor, "n d"]) -> Int[Tensor, "_k"]:
    """High-norm "register" tokens: norm > mean + 2·std of the visual-token norms."""
    norms = visual.float().norm(dim=-1)
    return torch.nonzero(norms > norms.mean() + 2 * norms.std()).flatten()


def random_indices(n_visual: int, n: int, key: str, seed: int = 0) -> Int[Tensor, "_n"]:
    """``n`` distinct visual indices, seeded by (seed, sample key) so reruns agree."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{key}".encode()))
    return torch.randperm(n_visual, generator=gen)[:n].sort().values


def top_indices(scores: Float[Tensor, "n"], n: int) -> Int[Tensor, "_n"]:
    return scores.argsort(descending=True)[:n].sort().values


def subset_sizes(sizes, n_visual: int, n_object: int) -> dict[str, int]:
    """``{"5": 5, ..., "obj": n_object}``, dropping sizes beyond the visual token count."""
    out = {str(n): n for n in sizes if 0 < n <= n_visual}
    out["obj"] = n_object
    return out


def integrated_gradients(vlm, inputs: ModelInputs, target_id: int, baseline: Float[Tensor, "d"],
                         steps: int = 50, batch_size: int = 10) -> Float[Tensor, "n d"]:
    """Integrated gradients of the last position's ``target_id`` logit with respect to the
    visual tokens of the (single-row) LM input, from the baseline where every visual token is
    ``baseline`` (midpoint Riemann sum over ``steps`` points, ``batch_size`` per forward).
    Returns per-token, per-dimension attributions; they sum to about f(x) - f(baseline)."""
    pos = vlm.layout(inputs)[0].visual.to(vlm.device)
    alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps
    total = None
    for chunk in alphas.split(batch_size):
        a = chunk.to(vlm.device)[:, None, None]
        with torch.enable_grad(), vlm.trace(repeat_inputs(inputs, len(chunk))):
            h = vlm.layers[0].input
            x = h[:1, pos].detach().float()
            base = baseline.to(device=x.device, dtype=x.dtype).expand_as(x)
            interp = (base + a * (x - base)).requires_grad_(True)
            edited = h.detach().clone()
            edited[:, pos] = interp.to(h.dtype)
            vlm.layers[0].input = edited
            y = vlm.lm_head.output[:, -1, target_id].float().sum()
            grad = torch.autograd.grad(y, interp)[0].sum(0).save()
            diff = (x - base)[0].save()
        total = grad if total is None else total + grad
    return (diff * total / steps).detach().float().cpu()
