"""The `VLM` object every recipe speaks to: an nnsight model with standard names.

Standard names (bound with nnsight's ``rename=``, verified per family in tests):
``vlm.layers[i]`` (decoder layers, with ``.self_attn`` and ``.mlp``), ``vlm.ln_final``,
``vlm.lm_head``, ``vlm.embed``, ``vlm.vision.blocks[j]`` (with ``.attn``, ``.mlp``),
``vlm.projector``. Anything else falls through to the wrapped nnsight model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

import torch


class ModelInputs(dict):
    """Model keyword inputs plus ``meta`` (what the processor does not return: original
    image sizes, frame counts), which `VLM.layout` needs to map pixels and frames to tokens."""

    def __init__(self, *args, meta: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.meta = dict(meta or {})

    def to(self, device) -> "ModelInputs":
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.items()}
        return ModelInputs(moved, meta=self.meta)

    @property
    def batch_size(self) -> int:
        ids = self.get("input_ids", self.get("image"))
        return int(ids.shape[0])

    def select_rows(self, rows) -> "ModelInputs":
        """A batch made of ``rows`` of this one (rows may repeat), without re-running the
        processor: ``inputs.select_rows([0] * n)`` repeats a single row n times. Tensors
        flattened over patches (``meta["row_sizes"]``, set by the family's `prepare`; Qwen's
        pixel tensors by their grid) are split per row, along the axis ``meta["row_axis"]``
        names (default 0; MiniCPM-V packs every crop of a batch along the last axis); every
        other tensor is indexed on its batch axis. Flattened inputs that hold indices into
        another flattened input (``meta["index_spans"]``: per key, how many indexed entries
        each row owns — Molmo2's pooling indices) are shifted to the rows' new places."""
        n, rows = self.batch_size, list(rows)
        sizes, spans = self.row_sizes(), self.meta.get("index_spans", {})
        axes = self.meta.get("row_axis", {})
        out = {}
        for key, value in self.items():
            if key in sizes:
                parts = value.split(sizes[key], dim=axes.get(key, 0))
                if len(parts) != n:
                    raise ValueError(f"select_rows: {key} holds {len(parts)} items for {n} rows")
                if key in spans:
                    parts = _shift_indices(parts, rows, spans[key])
                    rows_here = range(len(rows))
                else:
                    rows_here = rows
                out[key] = torch.cat([parts[r] for r in rows_here], dim=axes.get(key, 0))
            elif isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == n:
                out[key] = value[rows]
            else:
                raise ValueError(f"select_rows: cannot split input {key!r} by batch row")
        meta = {k: [v[r] for r in rows] if isinstance(v, list) and len(v) == n else v
                for k, v in self.meta.items() if k not in ("row_sizes", "index_spans")}
        meta["row_sizes"] = {k: [s[r] for r in rows] for k, s in sizes.items()}
        if "index_spans" in self.meta:
            meta["index_spans"] = {k: [s[r] for r in rows] for k, s in spans.items()}
        return ModelInputs(out, meta=meta)

    def row_sizes(self) -> dict[str, list[int]]:
        """Per flattened input key, how many of its entries (along its row axis) belong to
        each row."""
        sizes = dict(self.meta.get("row_sizes", {}))
        for key, grid_key in _FLAT_PIXELS.items():
            if key in self and key not in sizes and grid_key in self:
                sizes[key] = self[grid_key].prod(-1).tolist()
        return sizes


def _shift_indices(parts, rows, spans) -> list:
    """Row r's parts index entries [sum(spans[:r]), +spans[r]) of another flattened input;
    in the selected batch those entries start elsewhere (negative indices are padding)."""
    starts = [sum(spans[:r]) for r in range(len(spans))]
    out, start = [], 0
    for r in rows:
        out.append(torch.where(parts[r] >= 0, parts[r] - starts[r] + start, parts[r]))
        start += spans[r]
    return out


# Qwen-style families flatten the patches of every image/video of a batch into one tensor;
# a family adds its own keys in `Family.flat_inputs`.
_FLAT_PIXELS = {"pixel_values": "image_grid_thw", "pixel_values_videos": "video_grid_thw"}


@dataclass
class Family:
    """What differs between model families: one instance per file in `vlminterp.models`.

    Everything a recipe needs is reached through the `VLM` and its layout; a family lists
    facts, as data where it can:

    - ``model_types``: ``config.model_type`` values it loads (hub ids and local dirs are
      matched by their config); ``tiny``: offline ids -> builder(seed) -> (model, processor);
    - ``layout``: the `TokenLayout` builder (see `vlminterp.models.layouts` for the shared
      visual-run parser); ``prepare``: processor call (default: `layouts.prepare`);
    - ``rename``: standard-name overrides on top of `resolve.standard_names`;
    - ``image_token`` / ``video_token``: the placeholders a ``chat=False`` prompt must hold;
    - ``visual_entry``: where visual features enter the LM: ``overwrite`` (placeholder
      embeddings replaced), ``add`` (added onto them), ``deepstack`` (also added after early
      decoder layers, outside the layer modules), ``per_layer`` (per-layer inputs);
    - ``late_inputs``: for ``deepstack`` / ``per_layer``, how the LM's extra visual inputs
      become per-row dense tensors and back (see `interventions.expand_rows`); its optional
      ``carry_inside(vlm, carry)`` carries what the LM derives from its own input (Gemma 4);
    - ``flat_inputs``: input keys flattened over patches -> ``sizes(inputs, vlm)``, how many
      leading entries each row owns (the processor may not return it: InternVL drops
      ``num_patches``, so the vlm is there to recover it);
    - ``attention``: predicate on a decoder layer module: does it use softmax attention
      (default: it has ``self_attn``); ``logits_to_keep``: whether ``logits_to_keep=1`` is safe.
    """

    name: str
    model_types: tuple[str, ...]
    layout: Callable[..., Any]
    modalities: tuple[str, ...] = ("image",)
    tiny: dict = field(default_factory=dict)
    prepare: Callable[..., ModelInputs] | None = None
    rename: dict = field(default_factory=dict)
    image_token: str | None = None
    video_token: str | None = None
    visual_entry: str = "overwrite"
    late_inputs: Any = None
    flat_inputs: dict = field(default_factory=dict)
    attention: Callable[[Any], bool] | None = None
    logits_to_keep: bool = True
    video_kwargs: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def takes_video(self) -> bool:
        return "video" in self.modalities


@dataclass(frozen=True)
class Site:
    """A place an intervention reads or edits: an nnsight envoy and which side of it
    (``"output"``, or ``"input"`` = its first positional input)."""

    envoy: Any
    at: str = "output"

    def __repr__(self) -> str:
        return f"Site({getattr(self.envoy, 'path', self.envoy)!s}, at={self.at!r})"


class VLM:
    """A loaded model: ``vlm.model`` (nnsight envoy), ``vlm.processor``, standard names.

    ``vlm.trace(inputs)`` opens the nnsight trace over `prepare`'s output; inside it the
    functions of `vlminterp.interventions` read and write ``vlm.layers[i]`` and friends.
    """

    def __init__(self, model, processor, family: Family, model_id: str, torch_model=None):
        self.model = model
        self.processor = processor
        self.family = family
        self.model_id = model_id
        self.torch_model = torch_model if torch_model is not None else model._module

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("model", "family"):
            raise AttributeError(name)
        return getattr(self.model, name)

    def __repr__(self) -> str:
        return f"VLM({self.model_id!r}, family={self.family.name!r})"

    # -- inputs ----------------------------------------------------------------------------
    def prepare(self, text=None, images=None, video=None, *, chat: bool = True,
                answer_prefix: str | list[str] = "", **kwargs) -> ModelInputs:
        """Model inputs for a batch. ``text`` is one string or one per row; ``images`` one
        image per row; ``video`` one ``[T,H,W,C]`` uint8 array per row. With ``chat=True``
        the family's chat template wraps each row (user turn + generation prompt) and
        ``answer_prefix`` is appended (one string, or one per row); with ``chat=False`` the
        text is used verbatim and must already hold the family's image/video placeholder."""
        from .layouts import prepare

        return (self.family.prepare or prepare)(self, text=text, images=images, video=video,
                                                chat=chat, answer_prefix=answer_prefix, **kwargs)

    def trace(self, inputs: ModelInputs | None = None, **kwargs):
        """``vlm.model.trace`` over prepared inputs; extra kwargs go to nnsight (``remote=``…)."""
        if inputs is None:
            return self.model.trace(**kwargs)
        return self.model.trace(**_model_kwargs(inputs), **kwargs)

    def forward(self, inputs: ModelInputs) -> torch.Tensor:
        """The plain (untraced) forward's output logits — the reference a trace must match."""
        with torch.no_grad():
            out = self.torch_model(**_model_kwargs(inputs))
        return out.logits if hasattr(out, "logits") else out

    def layout(self, inputs: ModelInputs):
        """The `TokenLayout` of a prepared batch: text / visual / per-frame / per-patch spans."""
        return self.family.layout(self, inputs)

    # -- facts -----------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.model.layers)

    @property
    def attention_layers(self) -> list[int]:
        """Decoder layers with softmax attention (where knockout and attention sites apply);
        Qwen3.5's Gated-DeltaNet ``linear_attn`` layers, for one, are not."""
        from .resolve import language_model

        test = self.family.attention or (lambda layer: hasattr(layer, "self_attn"))
        return [i for i, layer in enumerate(language_model(self.torch_model).layers)
                if test(layer)]

    def residual(self, layer) -> Site:
        """The residual stream after decoder layer ``layer`` (``"embed"``: the LM input, after
        the visual features are merged in). On every family but the deepstack ones this is
        ``layers[i]``'s output. Qwen3-VL adds deepstack visual features to the hidden states
        after layers 0..k-1 *outside* the layer modules, so there ``layers[i].output`` lacks
        them and the residual is the next layer's input (``ln_final``'s input after the last)."""
        if layer == "embed":
            return Site(self.model.layers[0], "input")
        i = int(layer)
        if not -self.n_layers <= i < self.n_layers:
            raise ValueError(f"layer {layer}: the model has {self.n_layers} decoder layers")
        i %= self.n_layers
        if self.family.visual_entry != "deepstack":
            return Site(self.model.layers[i], "output")
        if i + 1 < self.n_layers:
            return Site(self.model.layers[i + 1], "input")
        return Site(self.model.ln_final, "input")

    @property
    def device(self) -> torch.device:
        """Where inputs go: the input embeddings' device (models split by ``device_map`` too)."""
        try:
            return self.torch_model.get_input_embeddings().weight.device
        except (AttributeError, NotImplementedError):
            return next(self.torch_model.parameters()).device

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", None)

    def token_id(self, text: str) -> int:
        """Id of the first token of ``text`` (as the model would tokenize it mid-sentence)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if not ids:
            raise ValueError(f"token_id: {text!r} encodes to no token")
        return ids[0]


def _model_kwargs(inputs) -> dict:
    return {k: v for k, v in dict(inputs).items()}
