"""Reuse of unchanged computation for patched rows (local runs).

A patch at a site of layer L leaves every layer before it identical to the destination run, and
positions before the first patched one identical at every layer (causal attention). So one
*prepare* forward over the input rows records the destination run's layer outputs, LM input,
position ids, mask and key/value cache (plus the source run's activations at the grid's
sites); each chunk of patched rows then runs the language model only: ``inputs_embeds`` from
the destination run (no vision tower), layers before the chunk's first changed layer
*skipped* (nnsight ``.skip`` with the recorded outputs), and with the prefix reuse only the
positions from the chunk's first patched position on, the prefix's keys/values coming from
the recorded cache. `exact.run_conditions` checks one condition against the plain path first
and falls back when a family does not reproduce it (e.g. bidirectional image attention).
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..attention import head_view
from ..interventions import expand_rows, patch, site_tensor
from .grid import Condition, Site


def forward_kwargs(vlm, at: int, offset: int = 0, cache: bool = False) -> dict:
    """Forward kwargs: logits at position ``at`` only (``logits_to_keep`` as an index tensor;
    being a tensor it also makes nnsight pass the inputs through whole), the key/value cache
    on or off; those the model does not take are left out."""
    params = inspect.signature(vlm.torch_model.forward).parameters
    want = {"use_cache": cache, "logits_to_keep": torch.tensor([at - offset])}
    return {k: v for k, v in want.items() if k in params}


def logits_index(kw: dict, at: int, offset: int = 0) -> int:
    return 0 if "logits_to_keep" in kw else at - offset


def write(h: Tensor, rows: list[int], positions: Tensor, value: Tensor, heads) -> None:
    """``h[rows, positions(, heads)] = value`` (value: [pos, d] or [pos, heads, head_dim])."""
    r = torch.as_tensor(rows, device=h.device)
    p = positions.to(h.device)
    if heads is None:
        h[r[:, None], p[None, :]] = value.to(h.dtype).unsqueeze(0).expand(len(rows), *value.shape)
        return
    hd = torch.as_tensor(heads, device=h.device)
    h[r[:, None, None], p[None, :, None], hd[None, None, :]] = \
        value.to(h.dtype).unsqueeze(0).expand(len(rows), *value.shape)


# language-model inputs the reused rows get back (anything else, e.g. deepstack features or
# per-layer inputs, would be missing from them: such a model is swept without reuse)
_REPLAYED = {"input_ids", "inputs_embeds", "attention_mask", "position_ids", "cache_position",
             "logits_to_keep", "cache", "past_key_values", "use_cache"}


@dataclass
class Prepared:
    """What the prepare forward recorded (destination row ``dst``, source row ``src``)."""

    base: Tensor  # metric of each input row
    src: dict = field(default_factory=dict)  # Site -> source row [seq, (heads,) d]
    dst: dict = field(default_factory=dict)  # Site -> destination row, same layout
    dst_out: dict = field(default_factory=dict)  # layer -> destination output [seq, d]
    embeds: Tensor | None = None  # destination LM input (inputs_embeds) [seq, d]
    position_ids: Tensor | None = None
    attention_mask: Tensor | None = None
    cache: object = None
    extra: dict = field(default_factory=dict)
    probe_values: Tensor | None = None  # metric of the probe conditions' plain-path rows
    other_inputs: list = field(default_factory=list)  # LM inputs reuse cannot replay
    _prefix: dict = field(default_factory=dict)

    def cache_for(self, p0: int, rows: int, dst: int):
        """A key/value cache of the destination run's first ``p0`` positions, ``rows`` copies."""
        if p0 not in self._prefix:
            base = copy.deepcopy(self.cache)
            base.batch_select_indices(torch.tensor([dst]))
            base.crop(p0 - self.embeds.shape[0])
            self._prefix[p0] = base
        out = copy.deepcopy(self._prefix[p0])
        out.batch_repeat_interleave(rows)
        return out


def prepare(vlm, inputs, sites: list[Site], metric, *, src: int, dst: int, at: int,
            skip_layers: int, cache: bool, visit=None, visit_sites=(), probes=()) -> Prepared:
    """One traced forward over the input rows recording what the patched rows reuse; the
    ``probes`` conditions ride along as extra rows patched the plain way (`expand_rows` +
    `patch`), for checking the reuse path against."""
    import nnsight  # here, not at module import: keeps `--help` light
    n = inputs.batch_size
    by_site: dict = {}
    for j, c in enumerate(probes):
        by_site.setdefault(c.site, []).append((n + j, c))
    kw = forward_kwargs(vlm, at, cache=cache)
    wanted, visits = set(sites), set(visit_sites)
    reads = [(s.order, s, *s.envoy(vlm)) for s in wanted | visits]
    # what a skipped layer must hand on: its module output (for deepstack models that is not
    # the residual, but those are swept without reuse)
    reads += [((i, 6.5), ("out", i), vlm.layers[i], "output") for i in range(skip_layers)]
    reads.sort(key=lambda r: r[0])
    with torch.no_grad(), vlm.trace(inputs, **kw):
        extra = nnsight.save({})
        rec = nnsight.save({})
        if probes:
            expand_rows(vlm, list(range(n)) + [dst] * len(probes))
        lm_kw = vlm.lm.inputs[1]
        rec["embeds"] = lm_kw["inputs_embeds"][dst].clone()
        rec["position_ids"], rec["attention_mask"] = (lm_kw.get("position_ids"),
                                                      lm_kw.get("attention_mask"))
        rec["other"] = [k for k, v in lm_kw.items() if k not in _REPLAYED and (
            isinstance(v, Tensor) or (isinstance(v, (list, tuple)) and v and
                                      isinstance(v[0], Tensor)))]
        for _, key, envoy, side in reads:
            h = site_tensor(envoy, side)
            if key in wanted:  # in the per-head layout where the site has heads
                view = head_view(envoy, h)[0]
                rec[key], rec[("dst", key)] = view[src].clone(), view[dst].clone()
            elif isinstance(key, tuple):
                rec[key] = h[dst].clone()
            if key in visits:
                visit(key, h, extra)
            for row, c in by_site.get(key, []):
                patch(envoy, c.positions, src_row=src, dst_rows=[row], at=side,
                      heads=None if c.heads is None else list(c.heads))
        logits = vlm.lm_head.output[:, logits_index(kw, at)].save()
        out = vlm.output.save() if cache else None
    scores = metric(logits.float()).detach().cpu()
    prep = Prepared(scores[:n], extra=dict(extra), probe_values=scores[n:])
    prep.src = {s: rec[s] for s in sites}
    prep.dst = {s: rec[("dst", s)] for s in sites}
    prep.other_inputs = list(rec["other"])
    prep.dst_out = {layer: rec[("out", layer)] for layer in range(skip_layers)}
    prep.embeds, prep.position_ids = rec["embeds"], rec["position_ids"]
    prep.attention_mask = rec["attention_mask"]
    if cache:
        prep.cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        if prep.cache is not None and probes:
            try:
                prep.cache.batch_select_indices(torch.arange(n))  # the input rows only
            except (AttributeError, NotImplementedError, RuntimeError):
                prep.cache = None  # e.g. linear-attention states: no prefix reuse
    return prep


def known_result(prep: Prepared, c: Condition, src: int, dst: int) -> int | None:
    """The input row whose run a patched row reproduces without running it: ``dst`` when the
    source and destination activations are equal at the patched cells (the patch is a no-op),
    ``src`` when the site holds the whole state (the LM input or a layer's output) and the two
    rows differ only inside the patched positions (the patched state is the source run's)."""
    a, b = prep.src[c.site], prep.dst[c.site]
    cells = (slice(None),) if c.heads is None else (slice(None), list(c.heads))
    if torch.equal(a[c.positions][cells], b[c.positions][cells]):
        return dst
    if c.site.kind in ("embed", "resid") and c.heads is None:
        differ = torch.nonzero((a != b).flatten(1).any(1)).flatten()
        if torch.isin(differ, c.positions.to(differ.device)).all():
            return src
    return None


def _row(x: Tensor, dst: int, axis: int, rows: int) -> Tensor:
    """Row ``dst`` of ``x`` along its batch ``axis`` (row 0 where the axis has size 1: shared
    by every row, as PaliGemma's position ids), repeated ``rows`` times."""
    one = x.narrow(axis, dst if x.shape[axis] > dst else 0, 1)
    return one.expand(*[rows if i == axis else -1 for i in range(one.ndim)])


def _mask(mask, dst: int, p0: int, rows: int):
    """The destination row's mask for positions >= p0: a 2-D padding mask as it is, a 4-D
    [batch, heads, q, k] one (built outside the LM, e.g. Gemma 3's bidirectional image
    blocks) with its queries from p0 on; a dict of those per layer type."""
    if isinstance(mask, dict):
        return {k: _mask(v, dst, p0, rows) for k, v in mask.items()}
    if isinstance(mask, Tensor) and mask.ndim == 2:
        return _row(mask, dst, 0, rows)
    if isinstance(mask, Tensor) and mask.ndim == 4:
        return _row(mask, dst, 0, rows)[:, :, p0:]
    return mask


def lm_kwargs(prep: Prepared, dst: int, p0: int, rows: int, top: bool = False) -> dict:
    """Position ids and mask of the destination row for ``rows`` copies of positions >= p0,
    as the language model got them; ``top``: only what the top-level forward takes (ids and
    a 2-D mask; a 4-D one goes to the language model directly)."""
    out = {}
    pid = prep.position_ids
    if isinstance(pid, Tensor):
        out["position_ids"] = _row(pid, dst, 1 if pid.ndim == 3 else 0, rows)[..., p0:]
    mask = prep.attention_mask
    if mask is not None and not (top and not (isinstance(mask, Tensor) and mask.ndim == 2)):
        out["attention_mask"] = _mask(mask, dst, p0, rows)
    return out


def run_chunk(vlm, prep: Prepared, chunk: list[Condition], metric, *, dst: int, at: int,
              prefix: bool, trim: bool = True) -> Tensor:
    """Metric of each patched row of ``chunk``: the language model from the chunk's first
    changed layer (earlier layers skipped) and, with ``prefix``, from its first patched
    position (earlier positions' keys/values from the destination run's cache). With
    ``trim`` the final layer's MLP runs on the metric's position only: nothing else of the
    final layer reaches the logits (the MLP is position-wise)."""
    k = len(chunk)
    first = min(c.site.first_layer for c in chunk)
    p0 = min(min(c.first_position for c in chunk), at) if prefix else 0
    skips = {layer: prep.dst_out[layer][p0:].unsqueeze(0).expand(k, -1, -1)
             for layer in range(first)}
    inline: dict = {}
    if any(c.site.kind == "resid" and c.site.layer == first - 1 for c in chunk):
        skips[first - 1] = skips[first - 1].clone()  # never write into the recorded run
    for j, c in enumerate(chunk):
        if c.site.kind == "resid" and c.site.layer == first - 1:  # written into the replacement
            write(skips[first - 1], [j], c.positions - p0, prep.src[c.site][c.positions], None)
        else:
            inline.setdefault(c.site, []).append((j, c))
    last = len(vlm.layers) - 1
    actions = sorted(inline, key=lambda s: s.order)
    if trim and first <= last:
        actions.append(("trim", last))
        actions.sort(key=lambda a: (last, 4.9) if isinstance(a, tuple) else a.order)
    kw = {**forward_kwargs(vlm, at, p0, cache=p0 > 0), **lm_kwargs(prep, dst, p0, k, top=True)}
    if p0 > 0:
        kw["cache"] = prep.cache_for(p0, k, dst)
    embeds = prep.embeds[p0:].unsqueeze(0).repeat(k, 1, 1)
    with torch.no_grad(), vlm.trace(inputs_embeds=embeds, **kw):
        args, lm_kw = vlm.lm.inputs  # what the language model gets, whatever the top level did
        vlm.lm.inputs = (args, {**lm_kw, **lm_kwargs(prep, dst, p0, k)})
        for layer in range(first):
            vlm.layers[layer].skip(skips[layer])
        for action in actions:
            if isinstance(action, tuple):
                _mlp_at(vlm.layers[last].mlp, at - p0)
                continue
            envoy, side = action.envoy(vlm)
            h, _ = head_view(envoy, site_tensor(envoy, side))
            for j, c in inline[action]:
                value = prep.src[action][c.positions]
                value = value if c.heads is None else value[:, list(c.heads)]
                write(h, [j], c.positions - p0, value, c.heads)
        logits = vlm.lm_head.output[:, logits_index(kw, at, p0)].save()
    return metric(logits.float()).detach().cpu()


def _mlp_at(mlp, idx: int) -> None:
    """Inside a trace: run the (position-wise) MLP on position ``idx`` only; the other
    positions' outputs are left at zero (nothing downstream reads them)."""
    x = mlp.input
    out = torch.zeros_like(x)
    out[:, idx:idx + 1] = mlp(x[:, idx:idx + 1])
    mlp.skip(out)
