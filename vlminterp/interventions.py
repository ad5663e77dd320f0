"""Interventions: plain functions called *inside* a trace.

Each takes a site (an nnsight envoy such as ``vlm.layers[3]`` or ``vlm.embed``) and
reads or edits its output in place, so the same program runs locally and with
``remote=True``. The body of each function is torch-only (it executes server-side on NDIF).
Rows are batch rows of one traced forward: clean and counterfactual inputs go through the
processor as one batch, and patches copy between rows (see NOTES: invokes cannot carry
video tensors).

    with vlm.trace(inputs):
        patch(vlm.layers[5], positions, src_row=0, dst_rows=[1])
        logits = vlm.lm_head.output[:, -1].save()
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .attention import head_view
from .models.base import Site

Positions = Int[Tensor, "_pos"] | Sequence[int] | slice | None


def output_tensor(site) -> Tensor:
    """The site's output tensor (element 0 when the module returns a tuple)."""
    out = site.output
    return out[0] if isinstance(out, tuple) else out


def site_tensor(site, at: str = "output") -> Tensor:
    """The tensor an intervention edits in place: the site's output, or (``at="input"``) its
    first input. ``vlm.layers[0]`` with ``at="input"`` is the language model's input *after*
    the visual features are merged in — ``vlm.embed``'s output is overwritten at the visual
    positions, so editing it there does nothing. A `Site` (``vlm.residual(i)``) carries its
    own side."""
    if isinstance(site, Site):
        site, at = site.envoy, site.at
    if at == "output":
        return output_tensor(site)
    if at == "input":
        return site.input
    raise ValueError(f"at {at!r}: expected 'output' or 'input'")


def _index(positions) -> Tensor | slice:
    if positions is None:
        return slice(None)
    if isinstance(positions, slice):
        return positions
    return torch.as_tensor(positions, dtype=torch.long)


def _rows(rows, batch: int) -> Tensor:
    if rows is None:
        return torch.arange(batch)
    return torch.as_tensor([rows] if isinstance(rows, int) else rows, dtype=torch.long)


def _cells(h: Tensor, rows: Tensor, pos, heads=None) -> tuple:
    """Broadcastable (rows, positions[, heads]) index into ``h[b, pos(, head)]``."""
    if heads is None:
        if isinstance(pos, slice):
            return (rows, pos)
        return (rows.to(h.device)[:, None], pos.to(h.device)[None, :])
    if isinstance(pos, slice):
        pos = torch.arange(h.shape[1])[pos]
    heads = torch.arange(h.shape[2])[heads] if isinstance(heads, slice) else heads
    return (rows.to(h.device)[:, None, None], pos.to(h.device)[None, :, None],
            heads.to(h.device)[None, None, :])


def _target(site, at: str, heads) -> tuple:
    """The tensor to edit and the heads index: with ``heads=`` (or on an attention-internal
    site such as ``self_attn.pattern``) the per-head view ``[batch, pos, head, ...]`` of
    `vlminterp.attention.head_view`, which shares storage with the site's tensor."""
    h = site_tensor(site, at)
    view, has_heads = head_view(site, h)
    if heads is not None and not has_heads:
        raise ValueError("heads=: this site has no heads (use a self_attn.q_proj/k_proj/v_proj "
                         "output, o_proj input (z), or self_attn.pattern/scores/q_rot/k_rot)")
    if not has_heads:
        return h, None
    return view, (slice(None) if heads is None else _index([heads] if isinstance(heads, int)
                                                           else heads))


def cache(sites: Mapping[str, object] | Sequence[object], positions: Positions = None,
          rows=None, at: str = "output", heads=None) -> dict:
    """Save the outputs of several sites (at ``positions`` of ``rows``). Sites must be given
    in execution order. Returns ``{name: saved tensor [rows, pos, d]}`` (``[rows, pos, head,
    head_dim]`` with ``heads=``, see `vlminterp.attention`); a sequence of sites is keyed by
    index."""
    import nnsight  # here, not at module import: keeps `--help` light
    items = sites.items() if isinstance(sites, Mapping) else enumerate(sites)
    saved = {}
    for name, site in items:
        h, hd = _target(site, at, heads)
        idx = _cells(h, _rows(rows, h.shape[0]), _index(positions), hd)
        saved[name] = h[idx].detach().clone()
    return nnsight.save(saved)


def patch(site, positions: Positions, *, src_row: int, dst_rows, src_positions: Positions = None,
          at: str = "output", heads=None) -> None:
    """Copy the site's output at ``positions`` from batch row ``src_row`` into ``dst_rows``.

    Denoising patches clean -> counterfactual rows; noising does the reverse.
    ``src_positions`` (same length) reads from other positions of the source row.
    ``heads``: only these heads of a per-head site (`vlminterp.attention`)."""
    h, hd = _target(site, at, heads)
    pos = _index(positions)
    src_pos = pos if src_positions is None else _index(src_positions)
    dst = _rows(dst_rows, h.shape[0])
    value = h[_cells(h, torch.tensor([src_row]), src_pos, hd)][0].detach().clone()
    h[_cells(h, dst, pos, hd)] = value.unsqueeze(0).expand(len(dst), *value.shape)


def ablate(site, positions: Positions, kind: str = "zero", *,
           mean: Float[Tensor, "*d"] | None = None, source_row: int | None = None,
           rows=None, at: str = "output", heads=None) -> None:
    """Replace the site's output at ``positions``: ``zero``; ``mean`` (a given mean vector,
    e.g. from `store.streaming_mean`; with ``heads=`` one broadcasting to [heads, head_dim]);
    ``resample`` (the same positions of ``source_row``). ``heads``: only these heads."""
    if kind not in ("zero", "mean", "resample"):
        raise ValueError(f"ablate kind {kind!r}: expected 'zero', 'mean' or 'resample'")
    if kind == "mean" and mean is None:
        raise ValueError("ablate kind 'mean' needs mean= (a [d_model] vector)")
    if kind == "resample":
        if source_row is None:
            raise ValueError("ablate kind 'resample' needs source_row=")
        patch(site, positions, src_row=source_row, dst_rows=rows, at=at, heads=heads)
        return
    h, hd = _target(site, at, heads)
    idx = _cells(h, _rows(rows, h.shape[0]), _index(positions), hd)
    if kind == "zero":
        h[idx] = 0.0
    else:
        h[idx] = mean.to(device=h.device, dtype=h.dtype)


def add_vector(site, vector: Float[Tensor, "d"], positions: Positions = None,
               alpha: float = 1.0, rows=None, at: str = "output") -> None:
    """Steering: add ``alpha * vector`` to the site's output (or input) at ``positions``."""
    h = site_tensor(site, at)
    idx = _cells(h, _rows(rows, h.shape[0]), _index(positions))
    h[idx] = h[idx] + alpha * vector.to(device=h.device, dtype=h.dtype)


def expand_rows(vlm, rows=None, *, carry=()) -> None:
    """Run the language model on ``rows`` of the batch (rows may repeat; ``None``: keep the
    batch). Call it first in the trace, after the vision tower and before any decoder layer is
    read. The vision tower and projector run once per input row, so k patched copies of a
    counterfactual cost k extra language-model rows, not k extra vision passes. Batch row i is
    input row ``rows[i]`` from here on (``lm_head.output`` has ``len(rows)`` rows).

    ``carry``: ``[(src_row, dst_rows, positions, after_layer)]`` in the new rows. On families
    whose visual features also enter the LM *after* its input (Qwen3-VL's deepstack), copy
    those later inputs at ``positions`` from ``src_row`` to ``dst_rows`` for every layer after
    ``after_layer`` (``"embed"``: all of them) — with a patch of ``vlm.residual(after_layer)``
    at the same positions, the destination then runs exactly as the source. A no-op on other
    families. (`Family.late_inputs` turns those inputs into dense ``[batch, seq, layer, ...]``
    tensors and back; what the LM computes from its own input — Gemma 4's per-layer
    projection, the keys/values its KV-shared layers reuse — its ``carry_inside`` copies,
    having waited for layer L's attention output: there, sites that run earlier cannot be
    read after this call.)"""
    args, kwargs = vlm.lm.inputs
    late = vlm.family.late_inputs
    dense = late.to_dense(kwargs) if late is not None else {}
    batch = kwargs["inputs_embeds"].shape[0]
    idx = torch.arange(batch) if rows is None else torch.as_tensor(rows, dtype=torch.long)
    new = {key: _take_rows(key, value, idx, batch) for key, value in kwargs.items()
           if key not in dense}
    dense = {key: value[idx.to(value.device)] for key, value in dense.items()}
    for src, dst, positions, after in carry:
        first = 0 if after == "embed" else int(after) + 1
        dst_idx, pos = _rows(dst, len(idx)), _index(positions)
        for value in dense.values():  # [batch, seq, layer, ...]: layer j enters at layer j
            part = value[src, pos, first:].clone()
            dst_cells = _cells(value, dst_idx, pos)
            value[dst_cells[0], dst_cells[1], first:] = part.unsqueeze(0).expand(
                len(dst_idx), *part.shape)
    if late is not None:
        new.update(late.from_dense(new, dense))
    vlm.lm.inputs = (args, new)
    inside = getattr(late, "carry_inside", None)
    if carry and inside is not None:  # inputs the LM derives from its own input (Gemma 4)
        inside(vlm, [(src, _rows(dst, len(idx)), _index(positions), after)
                     for src, dst, positions, after in carry])


def _take_rows(key: str, value, idx: Tensor, batch: int):
    """A language-model input restricted to batch rows ``idx`` (dicts of masks recursively)."""
    if isinstance(value, dict):
        return {k: _take_rows(key, v, idx, batch) for k, v in value.items()}
    if not isinstance(value, Tensor) or value.ndim == 0:
        return value
    if key == "position_ids" and value.ndim == 3:  # Qwen's M-RoPE ids: [3 or 4, batch, seq]
        return value[:, idx.to(value.device)]
    if value.shape[0] == 1 and batch != 1:  # one entry every row shares (PaliGemma's positions)
        return value
    if value.shape[0] == batch:
        return value[idx.to(value.device)]
    raise ValueError(f"expand_rows: cannot index language-model input {key!r} of shape "
                     f"{tuple(value.shape)} by batch row")


def knockout_attention(vlm, sources: Positions, targets: Positions, layers, rows=None) -> None:
    """Block attention from ``sources`` (keys) to ``targets`` (queries) in ``layers``, for
    ``rows`` (default: every row).

    The attention mask that reaches each layer's ``self_attn`` is rebuilt as an additive
    float mask (causal + padding as the model had it) with the dtype's minimum at the blocked
    (query, key) entries, so the blocked weights are exactly 0 under eager and SDPA
    attention alike — writing ``False`` into a float mask would block nothing. Call it
    before reading anything from these layers in the same trace."""
    if isinstance(sources, slice) or isinstance(targets, slice):
        raise ValueError("knockout_attention: sources and targets must be explicit positions")
    src, tgt = _index(sources), _index(targets)
    row_list = None if rows is None else ([rows] if isinstance(rows, int) else list(rows))
    knockout_attention_rows(vlm, [(row_list, src, tgt, layers)])


def knockout_attention_rows(vlm, blocks) -> None:
    """Several knockouts in one forward: ``blocks`` is a list of ``(rows, sources, targets,
    layers)``, each row of the batch its own condition (``rows`` an int, a list, or None for
    every row). Each layer's mask is rebuilt once, in layer order."""
    by_layer: dict[int, list] = {}
    for rows, src, tgt, layers in blocks:
        for layer in layers:
            by_layer.setdefault(int(layer), []).append((rows, _index(src), _index(tgt)))
    check_attention_layers(vlm, by_layer, "knockout_attention")
    for layer in sorted(by_layer):
        attn = vlm.layers[layer].self_attn
        args, kwargs = attn.inputs
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        mask = additive_mask(kwargs.get("attention_mask"), hidden)
        lowest = torch.finfo(mask.dtype).min
        for rows, src, tgt in by_layer[layer]:
            if len(src) and len(tgt):
                b = _rows(rows, mask.shape[0]).to(mask.device)
                mask[b[:, None, None], 0, tgt.to(mask.device)[None, :, None],
                     src.to(mask.device)[None, None, :]] = lowest
        attn.inputs = (args, {**kwargs, "attention_mask": mask})


def check_attention_layers(vlm, layers, what: str) -> None:
    """One-line error for a layer without softmax attention (see `VLM.attention_layers`)."""
    allowed = set(vlm.attention_layers)
    for layer in layers:
        if int(layer) % vlm.n_layers not in allowed:
            module = vlm.layers[int(layer)]._module
            kind = next((f"{name} ({type(child).__name__})" for name, child
                         in module.named_children() if "attn" in name or "mixer" in name),
                        type(module).__name__)
            raise ValueError(f"{what}: layer {layer} has no softmax attention (its token mixer "
                             f"is {kind}); attention layers: {sorted(allowed)}")


def additive_mask(mask: Tensor | None, hidden: Float[Tensor, "batch q d"]) -> Tensor:
    """A [batch, 1, q, k] float mask (0 = attend, dtype min = blocked) from whatever the model
    passes: None (causal, no padding), a boolean mask, or an additive float mask."""
    batch, q = hidden.shape[0], hidden.shape[1]
    lowest = torch.finfo(hidden.dtype).min
    if mask is None:
        causal = torch.ones(q, q, dtype=torch.bool, device=hidden.device).tril()
        mask = causal[None, None].expand(batch, 1, q, q)
    if mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=hidden.dtype, device=hidden.device)
        return torch.where(mask, zero, torch.full_like(zero, lowest)).expand(batch, 1, -1, -1
                                                                             ).clone()
    return mask.to(hidden.dtype).expand(batch, 1, -1, -1).clone()


def logit_lens(vlm, hidden: Float[Tensor, "*batch d"]) -> Float[Tensor, "*batch vocab"]:
    """Vocabulary logits of a hidden state through ``ln_final`` then ``lm_head`` (then the
    final logit soft-capping where the model applies one, see `softcap_logits`), so the lens
    of the last layer is the model's logits. Read layer outputs (not HF ``hidden_states``,
    whose last entry is already normed)."""
    return softcap_logits(vlm, vlm.lm_head(vlm.ln_final(hidden)))


def softcap_logits(vlm, logits: Tensor) -> Tensor:
    """``cap * tanh(logits / cap)`` where the text config sets ``final_logit_softcapping``
    (Gemma 2-based PaliGemma 2, Gemma 4) — applied by the model *after* ``lm_head``, so there
    ``vlm.lm_head.output`` is the logits before the cap — else ``logits`` unchanged."""
    model = vlm.torch_model if vlm.torch_model is not None else vlm.model._module  # remote: meta
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap
