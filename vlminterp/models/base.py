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
        processor: ``inputs.select_rows([0] * n)`` repeats a single row n times. Pixel tensors
        flattened over patches (Qwen2-VL) are split per row by their grid; every other tensor
        is indexed on its batch axis. One video or image per row."""
        n, rows = self.batch_size, list(rows)
        out = {}
        for key, value in self.items():
            grid = self.get(_FLAT_PIXELS.get(key))
            if grid is not None:
                parts = value.split(grid.prod(-1).tolist())
                if len(parts) != n:
                    raise ValueError(f"select_rows: {key} holds {len(parts)} items for {n} rows")
                out[key] = torch.cat([parts[r] for r in rows])
            elif isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == n:
                out[key] = value[rows]
            else:
                raise ValueError(f"select_rows: cannot split input {key!r} by batch row")
        meta = {k: [v[r] for r in rows] if isinstance(v, list) and len(v) == n else v
                for k, v in self.meta.items()}
        return ModelInputs(out, meta=meta)


# Qwen2-VL flattens the patches of every image/video of a batch into one tensor.
_FLAT_PIXELS = {"pixel_values": "image_grid_thw", "pixel_values_videos": "video_grid_thw"}


@dataclass
class Family:
    """What differs between model families; one instance per adapter module."""

    name: str
    rename: dict
    prepare: Callable[..., ModelInputs]
    layout: Callable[..., Any]
    image_token: str | None = None
    extra: dict = field(default_factory=dict)


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
                answer_prefix: str = "", **kwargs) -> ModelInputs:
        """Model inputs for a batch. ``text`` is one string or one per row; ``images`` one
        image per row; ``video`` one ``[T,H,W,C]`` uint8 array per row. With ``chat=True``
        the family's chat template wraps each row (user turn + generation prompt) and
        ``answer_prefix`` is appended; with ``chat=False`` the text is used verbatim and
        must already hold the family's image/video placeholder."""
        return self.family.prepare(self, text=text, images=images, video=video, chat=chat,
                                   answer_prefix=answer_prefix, **kwargs)

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
    def device(self) -> torch.device:
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
