"""The exact batched patching sweep: one batch row per condition, chunked by a memory budget.

Strategies (``strategy=``):

* ``"rows"`` — per chunk one traced forward over the input rows whose language model runs
  [input rows..., destination x k] (`interventions.expand_rows`: the vision tower runs once
  per input row), each patched row copying the source row's activations. Runs on NDIF too.
* ``"layers"`` — `reuse`: a prepare forward, then per chunk the language model alone with the
  layers before the chunk's first changed layer skipped.
* ``"layers+prefix"`` — also only the positions from the chunk's first patched one on.
* ``"auto"`` (default) — ``"layers+prefix"`` locally, after checking one condition against
  ``"rows"``; a family that does not reproduce it (to 1e-3 of the metric's scale) falls back to
  ``"layers"``, then ``"rows"`` (and says so). ``"rows"`` on a remote model.
"""

from __future__ import annotations

import os
import re
import warnings

import torch
from torch import Tensor

from ..interventions import expand_rows, patch, site_tensor
from . import reuse
from .grid import Condition

STRATEGIES = ("auto", "rows", "layers", "layers+prefix")
DEFAULT_CPU_MEMORY = 2 << 30


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}


def parse_memory(text: str | None, flag: str = "max_memory") -> int | float | None:
    """A memory budget: bytes with an optional unit ("4GiB", "512MB", "1e9") -> int, or a
    fraction of the device's free memory ("0.5") -> float in (0, 1]; None stays None."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"{flag} {text!r}: expected bytes with a unit (4GiB, 512MiB, 2GB) or a "
                         f"fraction of the free memory (0.5)")
    value = float(m.group(1))
    if not unit and "e" not in m.group(1).lower() and value <= 1:
        if value <= 0:
            raise ValueError(f"{flag} {text!r}: the fraction must be above 0")
        return value
    if value * _UNITS[unit] < 1:
        raise ValueError(f"{flag} {text!r}: less than one byte")
    return int(value * _UNITS[unit])


def free_memory(device: torch.device) -> int:
    """Free bytes on ``device``: the GPU's free memory, or the machine's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def rows_for_memory(vlm, seq: int, max_memory: int | float | None = None) -> int:
    """Patched rows per forward that fit ``max_memory`` bytes of activations (a float in
    (0, 1]: that fraction of the device's free memory; default: half of the free GPU memory,
    or 2 GiB on CPU), from the text config's sizes: hidden and MLP activations, eager [heads,
    seq, seq] scores, and a row's key/value cache."""
    cfg = vlm.torch_model.config.get_text_config()
    if isinstance(max_memory, float):
        max_memory = int(max_memory * free_memory(vlm.device))
    if max_memory is None:
        if vlm.device.type == "cuda":
            max_memory = torch.cuda.mem_get_info(vlm.device)[0] // 2
        else:
            max_memory = DEFAULT_CPU_MEMORY
    size = next(vlm.torch_model.parameters()).element_size()
    d, inter = cfg.hidden_size, getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", heads) * (d // heads)
    per_row = size * seq * (8 * d + 3 * inter + 3 * heads * seq + 2 * kv * len(vlm.layers))
    return max(1, int(max_memory // per_row))


def _is_remote(vlm) -> bool:
    return type(vlm).__name__ == "RemoteVLM"


def rows_chunk(vlm, inputs, chunk: list[Condition], metric, *, src: int, dst: int, at: int,
               visit=None, visit_sites=(), carry_late: bool = False) -> tuple[Tensor, Tensor, dict]:
    """One traced forward: rows [input rows..., patched...]; returns (metric of the input rows,
    metric of the patched rows, what ``visit(site, tensor, extra)`` put in ``extra``).
    ``carry_late``: a patch of the residual stream (embed / resid sites) also carries the
    source row's later LM inputs at its positions (`expand_rows`' ``carry``: Qwen3-VL's
    deepstack features, Gemma 4's per-layer inputs; a no-op on other families)."""
    import nnsight  # here, not at module import: keeps `--help` light
    n = inputs.batch_size
    by_site: dict = {}
    for j, c in enumerate(chunk):
        key = (tuple(c.positions.tolist()), c.heads)
        by_site.setdefault(c.site, {}).setdefault(key, []).append(n + j)
    visits = set(visit_sites)
    order = sorted(set(by_site) | visits, key=lambda s: s.order)
    kw = reuse.forward_kwargs(vlm, at)
    with torch.no_grad(), vlm.trace(inputs, **kw):
        extra = nnsight.save({})  # made inside the trace and saved: NDIF returns saved objects
        carry = [(src, [n + j], c.positions, "embed" if c.site.kind == "embed" else c.site.layer)
                 for j, c in enumerate(chunk) if carry_late and c.site.kind in ("embed", "resid")]
        expand_rows(vlm, list(range(n)) + [dst] * len(chunk), carry=carry)
        for site in order:
            envoy, side = site.envoy(vlm)
            for (pos, heads), rows in by_site.get(site, {}).items():
                patch(envoy, torch.tensor(pos), src_row=src, dst_rows=rows, at=side,
                      heads=None if heads is None else list(heads))
            if site in visits:
                visit(site, site_tensor(envoy, side), extra)
        logits = vlm.lm_head.output[:, reuse.logits_index(kw, at)].save()
    scores = metric(logits.float()).detach().cpu()
    return scores[:n], scores[n:], dict(extra)


def _chunks(conditions: list[Condition], rows: int, by_layer: bool) -> list[list[int]]:
    """Indices of the conditions per forward: in order, or grouped by first changed layer and
    sorted by first patched position (so each chunk skips as much as it can). Splitting a
    layer's group further by position was slower on a CPU: every forward reads the weights
    again, and short sequences do not pay for it."""
    idx = list(range(len(conditions)))
    if not by_layer:
        return [idx[k:k + rows] for k in range(0, len(idx), rows)]
    groups: dict[int, list[int]] = {}
    for i in sorted(idx, key=lambda i: (conditions[i].site.first_layer,
                                        conditions[i].first_position)):
        groups.setdefault(conditions[i].site.first_layer, []).append(i)
    return [g[k:k + rows] for g in groups.values() for k in range(0, len(g), rows)]


def _agrees(a: Tensor, b: Tensor, scale: float, dtype: torch.dtype) -> bool:
    """Equal up to what batching alone changes: 100 ulps of the model's dtype at the metric's
    scale (1.2e-5 in float32; loose in bfloat16, where the check catches gross mismatches)."""
    return bool((a - b).abs().max() <= 100 * torch.finfo(dtype).eps * max(1.0, scale))


def run_conditions(vlm, inputs, conditions: list[Condition], metric, *, src: int, dst: int,
                   at: int, strategy: str = "auto", rows_per_forward: int | None = None,
                   max_memory: int | float | None = None, progress: bool = False, visit=None,
                   visit_sites=(), carry_late: bool = False) -> tuple[Tensor, Tensor, dict]:
    """The metric of each input row and of each condition's patched row (source row ``src``
    patched into destination row ``dst``); ``info`` says the strategy and rows per forward.
    ``visit(site, tensor, extra)`` runs once on every site of ``visit_sites`` in a forward
    over the input rows (e.g. to save representations); ``info["extra"]`` holds ``extra``.
    ``carry_late``: residual-stream patches also carry the source's later LM inputs at their
    positions (see `rows_chunk`; only families with such inputs, which always sweep by rows)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    if not conditions:
        raise ValueError("run_conditions: no conditions")
    seq = inputs["input_ids"].shape[1]
    rows = rows_per_forward or rows_for_memory(vlm, seq, max_memory)
    if strategy == "auto":
        strategy = "rows" if _is_remote(vlm) else "layers+prefix"
        checked = False
    else:
        checked = True
    info = {"strategy": strategy, "rows_per_forward": rows, "forwards": 0}
    entry = getattr(vlm.family, "visual_entry", "overwrite")
    if strategy != "rows" and entry not in ("overwrite", "add"):
        if checked:
            raise ValueError(f"strategy {strategy!r}: {vlm!r} adds visual features inside the "
                             f"language model ({entry}); reused rows would miss them — use "
                             f"'rows' or 'auto'")
        strategy = info["strategy"] = "rows"
    if strategy == "rows":
        return _run_rows(vlm, inputs, conditions, metric, src, dst, at, rows, progress,
                         visit, visit_sites, info, carry_late)
    sites = sorted({c.site for c in conditions}, key=lambda s: s.order)
    probes = [] if checked else _probes(conditions)
    prep = reuse.prepare(vlm, inputs, sites, metric, src=src, dst=dst, at=at,
                         skip_layers=max(c.site.first_layer for c in conditions),
                         cache=True, visit=visit, visit_sites=visit_sites, probes=probes)
    info["forwards"] += 1
    info["extra"] = prep.extra
    if prep.other_inputs:
        warnings.warn(f"{vlm!r}: the language model also takes {prep.other_inputs}, which "
                      f"reused rows would miss; sweeping with one full forward per chunk")
        return _run_rows(vlm, inputs, conditions, metric, src, dst, at, rows, progress,
                         visit, visit_sites, info, carry_late)
    if prep.cache is None and strategy == "layers+prefix":  # the model returned no cache
        strategy = info["strategy"] = "layers"
    if not checked:
        strategy = info["strategy"] = _check(vlm, prep, probes, metric, dst, at, strategy,
                                             info)
        if strategy == "rows":
            return _run_rows(vlm, inputs, conditions, metric, src, dst, at, rows, progress,
                             visit, visit_sites, info, carry_late)
    out = torch.full((len(conditions),), float("nan"))
    done = dict(zip(map(id, probes), info.pop("probe_values", [])))
    todo = []
    for i, c in enumerate(conditions):
        row = reuse.known_result(prep, c, src, dst)
        if id(c) in done:
            out[i] = done[id(c)]
        elif row is None:
            todo.append(i)
        else:
            out[i] = prep.base[row]
    info["known_without_a_row"] = len(conditions) - len(todo) - len(done)
    bar = _bar(progress, len(conditions), info)
    bar.update(len(conditions) - len(todo))
    trim = info.setdefault("trim_final_mlp", True)
    for part in _chunks([conditions[i] for i in todo], rows, by_layer=True):
        idx = [todo[i] for i in part]
        out[idx] = reuse.run_chunk(vlm, prep, [conditions[i] for i in idx], metric, dst=dst,
                                   at=at, prefix=strategy == "layers+prefix", trim=trim)
        info["forwards"] += 1
        bar.update(len(idx))
    bar.close()
    return prep.base, out, info


def _probes(conditions: list[Condition]) -> list[Condition]:
    """The conditions `_check` compares: the one that runs the most layers (it exercises the
    language-model-only forward: masks and inputs built outside the LM) and the earliest one
    that skips a layer; each with the latest first position among its peers (it exercises
    the prefix reuse at every later layer)."""
    key = lambda c: (c.site.first_layer, -c.first_position)  # noqa: E731
    probes = [min(conditions, key=key)]
    skipping = [c for c in conditions if c.site.first_layer > 0]
    if skipping and min(skipping, key=key) is not probes[0]:
        probes.append(min(skipping, key=key))
    return probes


def _check(vlm, prep, probes, metric, dst, at, strategy, info) -> str:
    """The probes by the reuse path against their plain-path rows (patched in the prepare
    forward): the reuse strategy that reproduces them, or "rows" (with a warning naming what
    did not hold)."""
    plain = prep.probe_values
    scale = float(prep.base.abs().max())
    dtype = next(vlm.torch_model.parameters()).dtype
    ladder = [(c, t) for c in ("layers+prefix", "layers") for t in (True, False)]
    for candidate, trim in ladder[0 if strategy == "layers+prefix" else 2:]:
        try:
            got = torch.cat([reuse.run_chunk(vlm, prep, [c], metric, dst=dst, at=at,
                                             prefix=candidate == "layers+prefix", trim=trim)
                             for c in probes])
        except Exception as e:  # a family the reuse path cannot drive: fall back, say why
            warnings.warn(f"{vlm!r}: sweeping with {candidate!r} (final MLP trimmed: {trim}) "
                          f"failed ({type(e).__name__}: {e})")
            continue
        info["forwards"] += len(probes)
        if _agrees(got, plain, scale, dtype):
            if candidate != strategy:
                warnings.warn(f"{vlm!r}: reusing the unpatched prefix's keys/values does not "
                              f"reproduce the plain forward here; sweeping with layer skipping "
                              f"only")
            info["trim_final_mlp"] = trim
            info["probe_values"] = got  # the probes' metric by the chosen path: kept
            return candidate
    warnings.warn(f"{vlm!r}: skipping unchanged layers does not reproduce the plain forward "
                  f"here; sweeping with one full forward per chunk")
    return "rows"


def _run_rows(vlm, inputs, conditions, metric, src, dst, at, rows, progress, visit,
              visit_sites, info, carry_late=False) -> tuple[Tensor, Tensor, dict]:
    info["strategy"] = "rows"
    out = torch.full((len(conditions),), float("nan"))
    base = None
    bar = _bar(progress, len(conditions), info)
    # carrying what the LM derives inside (Gemma 4's shared keys/values) waits for the patched
    # layer's attention: one layer per forward keeps the sites in execution order
    by_layer = carry_late and hasattr(vlm.family.late_inputs, "carry_inside")
    for n, idx in enumerate(_chunks(conditions, rows, by_layer=by_layer)):
        first = n == 0 and visit is not None
        b, values, extra = rows_chunk(vlm, inputs, [conditions[i] for i in idx], metric,
                                      src=src, dst=dst, at=at, visit=visit if first else None,
                                      visit_sites=visit_sites if first else (),
                                      carry_late=carry_late)
        info["forwards"] += 1
        if first:
            info["extra"] = extra
        base = b if base is None else base
        out[idx] = values
        bar.update(len(idx))
    bar.close()
    return base, out, info


def _bar(progress: bool, total: int, info: dict):
    from tqdm import tqdm

    return tqdm(total=total, disable=not progress, unit="cond", leave=False,
                desc=f"patch sweep ({info['strategy']}, {info['rows_per_forward']} rows/forward)")
