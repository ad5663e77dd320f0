"""Sites inside attention: scores, pattern, post-RoPE q/k, and per-head q/k/v/z.

Every decoder layer whose ``self_attn`` follows the HF pattern (``q_proj``, ``k_proj``,
``v_proj``, ``o_proj`` + an attention function chosen by ``config._attn_implementation``) has:

* per-head **z** (each head's output before ``o_proj``: ``o_proj``'s input) and per-head **q, k,
  v** (the projections' outputs, i.e. *pre*-RoPE; q-/k-norms, where a family has them, come
  after). These need no particular attention implementation: they work under SDPA too.
* **scores** (pre-softmax logits as softmax sees them: scaled, soft-capped where the family does,
  the additive mask added — blocked entries hold the dtype's minimum), **pattern** (post-softmax)
  and **q_rot / k_rot** (post-RoPE queries and keys as attention uses them). These exist only
  under the ``vlminterp_eager`` implementation, switched on by `enable_attention_sites` (or the
  `attention_sites` context manager): eager attention whose tensors pass through identity
  modules attached to each attention module, so nnsight reads and *edits* them like any module
  output and an edit reaches the output (the attention is computed from the edited tensor).

Sites must be reached in execution order (nnsight): q_rot, k_rot, scores, pattern, then
z. Head indices (``heads=`` of `vlminterp.interventions.cache` / ``patch`` / ``ablate``): z, q and
the pattern/scores have ``n_heads`` heads; k and v have ``n_kv_heads``. Under grouped-query
attention kv head ``j`` serves query heads ``j * groups ... (j + 1) * groups - 1`` (HF's
``repeat_kv`` order), so patching one k/v head changes the pattern/output of that whole group.

    enable_attention_sites(vlm)
    with vlm.trace(inputs):
        vlm.layers[2].self_attn.scores.output[:, 1, -1, 5] += 4.0   # head 1, last query, key 5
        pattern = vlm.layers[2].self_attn.pattern.output.save()      # [batch, heads, q, k]
        site, at = head_site(vlm, 3, "z")                            # o_proj, "input"
        patch(site, positions, src_row=0, dst_rows=[1], at=at, heads=[2])
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

IMPLEMENTATION = "vlminterp_eager"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
# kind -> (submodule of self_attn, which side of it): per-head sites under any implementation
HEAD_SITES = {"q": ("q_proj", "output"), "k": ("k_proj", "output"), "v": ("v_proj", "output"),
              "z": ("o_proj", "input")}
# identity modules attached to each attention module (vlminterp_eager only)
INNER_SITES = ("q_rot", "k_rot", "scores", "pattern")


class AttentionSite(nn.Module):
    """An identity module: a tensor of the attention computation passes through it, so nnsight
    can read and replace it. Layout ``[batch, heads, query, key]`` (scores, pattern) or
    ``[batch, heads, seq, head_dim]`` (q_rot, k_rot)."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def forward(self, x: Tensor) -> Tensor:
        return x

    def extra_repr(self) -> str:
        return self.what


def eager_with_sites(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     softcap=None, **kwargs):
    """HF eager attention (repeat_kv, scale, soft-cap, mask, fp32 softmax, dropout) with q_rot,
    k_rot, scores and pattern passing through the module's `AttentionSite` children."""
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("vlminterp_eager: attention sinks (s_aux) are not supported")
    if scaling is None:
        scaling = module.head_dim ** -0.5
    sites = isinstance(getattr(module, "pattern", None), AttentionSite)
    if sites:
        query, key = module.q_rot(query), module.k_rot(key)
    groups = query.shape[1] // key.shape[1]
    keys = key.repeat_interleave(groups, dim=1)
    values = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, keys.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : keys.shape[-2]]
    if sites:
        scores = module.scores(scores)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if sites:
        probs = module.pattern(probs)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, values).transpose(1, 2).contiguous()
    return out, probs


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(IMPLEMENTATION, eager_with_sites)
    ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, eager_mask)


# -- which layers, how many heads ---------------------------------------------------------
def _attn_module(vlm, layer: int):
    return getattr(vlm.layers[layer]._module, "self_attn", None)


def is_softmax_attention(module) -> bool:
    return module is not None and all(hasattr(module, p) for p in PROJECTIONS)


def attention_layers(vlm) -> list[int]:
    """Decoder layers with softmax attention in the HF pattern (linear-attention layers, e.g.
    Gated DeltaNet, have none): the VLM's own ``attention_layers`` where it states them,
    filtered to the modules with q/k/v/o projections."""
    stated = getattr(type(vlm), "attention_layers", None)
    layers = vlm.attention_layers if stated is not None else range(len(vlm.layers))
    return [i for i in layers if is_softmax_attention(_attn_module(vlm, i))]


@dataclass(frozen=True)
class Heads:
    """Head counts of one attention module (read from the module, never from a family name)."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_q: int = 0  # head_dim-wide chunks of q_proj's output: n_heads, or 2 * n_heads when it
    # also holds a gate per head (Qwen3.5: chunk 2h is head h's query, 2h + 1 its gate)

    @property
    def gated_query(self) -> bool:
        return self.n_q not in (0, self.n_heads)

    @property
    def groups(self) -> int:
        """Query heads per kv head (1 without grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    def count(self, kind: str) -> int:
        """Heads of a site kind: k and v have n_kv_heads, q q_proj's chunks, the rest
        n_heads."""
        if kind == "q":
            return self.n_q or self.n_heads
        return self.n_kv_heads if kind in ("k", "v", "k_rot") else self.n_heads

    def query_heads(self, kv_head: int) -> list[int]:
        """The query heads a kv head serves (repeat_kv order)."""
        return list(range(kv_head * self.groups, (kv_head + 1) * self.groups))


def _head_dim(module) -> int:
    hd = getattr(module, "head_dim", None)
    if hd is None:
        cfg = module.config
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return int(hd)


def heads(vlm, layer: int) -> Heads:
    """`Heads` of ``vlm.layers[layer].self_attn``; a one-line error for a layer without it."""
    module = _attn_module(vlm, layer)
    if not is_softmax_attention(module):
        raise ValueError(f"layer {layer}: no softmax attention with q/k/v/o projections "
                         f"(attention layers: {attention_layers(vlm)})")
    hd = _head_dim(module)
    return Heads(module.o_proj.in_features // hd, module.k_proj.out_features // hd, hd,
                 module.q_proj.out_features // hd)


def head_site(vlm, layer: int, kind: str) -> tuple:
    """``(site, at)`` of a per-head site: ``"z"`` (o_proj's input), ``"q"``, ``"k"``, ``"v"``
    (the projections' outputs, pre-RoPE); for `interventions.cache/patch/ablate(..., at=at)`."""
    if kind not in HEAD_SITES:
        raise ValueError(f"head site {kind!r}: expected one of {', '.join(HEAD_SITES)}")
    heads(vlm, layer)
    name, at = HEAD_SITES[kind]
    return getattr(vlm.layers[layer].self_attn, name), at


# -- inside a trace: the per-head view of a site's tensor (torch only) ----------------------
def head_view(site, h: Tensor) -> tuple[Tensor, bool]:
    """``(view, has_heads)``: a view of ``h`` laid out ``[batch, pos, heads, ...]`` that shares
    its storage (writes go through) — for the pattern/scores/q_rot/k_rot sites a transpose,
    for a projection's ``[batch, pos, heads * head_dim]`` an unflatten by the parent attention
    module's head_dim; ``(h, False)`` for any other site."""
    site = getattr(site, "envoy", site)  # a (envoy, side) Site object: its envoy
    module = getattr(site, "_module", None)
    if isinstance(module, AttentionSite):
        return h.transpose(1, 2), True
    parent = getattr(site, "parent", None)
    attn = getattr(parent, "_module", None)
    if is_softmax_attention(attn) and module in (attn.q_proj, attn.k_proj, attn.v_proj,
                                                 attn.o_proj):
        return h.unflatten(-1, (-1, _head_dim(attn))), True
    return h, False


# -- switching the implementation -----------------------------------------------------------
def enable_attention_sites(vlm) -> list[int]:
    """Attach the q_rot/k_rot/scores/pattern sites to every softmax-attention layer and switch
    the language model's attention to ``vlminterp_eager`` (the vision tower keeps its own).
    Eager attention materialises [batch, heads, q, k]: slower and larger than SDPA on long
    sequences, so it is on only when asked. Returns the layers that have the sites."""
    _register()
    layers = attention_layers(vlm)
    if not layers:
        raise ValueError(f"{vlm!r}: no decoder layer has softmax attention with q/k/v/o "
                         f"projections; attention sites need one")
    for i in layers:
        module = _attn_module(vlm, i)
        for name in INNER_SITES:
            if not isinstance(getattr(module, name, None), AttentionSite):
                module.add_module(name, AttentionSite(name))  # nnsight mirrors it on first use
        config = module.config
        if config._attn_implementation != IMPLEMENTATION:
            module._vlminterp_previous = config._attn_implementation
            config._attn_implementation = IMPLEMENTATION
    return layers


def disable_attention_sites(vlm) -> None:
    """Restore the attention implementation the model had before `enable_attention_sites` (the
    identity sites stay attached; nothing calls them)."""
    for i in attention_layers(vlm):
        module = _attn_module(vlm, i)
        previous = module.__dict__.pop("_vlminterp_previous", None)
        if previous is not None:
            module.config._attn_implementation = previous


def sites_enabled(vlm) -> bool:
    layers = attention_layers(vlm)
    return bool(layers) and _attn_module(vlm, layers[0]).config._attn_implementation == \
        IMPLEMENTATION


@contextlib.contextmanager
def attention_sites(vlm):
    """``with attention_sites(vlm): ...`` — the sites on inside the block, the previous
    implementation restored after (unless they were already on)."""
    was_on = sites_enabled(vlm)
    enable_attention_sites(vlm)
    try:
        yield vlm
    finally:
        if not was_on:
            disable_attention_sites(vlm)
