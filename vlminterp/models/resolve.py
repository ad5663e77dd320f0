"""The standard names, found once for every family in the HuggingFace module tree.

`standard_names(model)` returns nnsight ``rename=`` aliases: ``lm`` (the language model),
``layers``, ``embed``, ``ln_final``, ``vision`` (the vision tower), ``vision.blocks``,
``projector`` and, inside vision blocks, ``attn``. A family's spec only lists what this
search gets wrong (``Family.rename``, applied on top).
"""

from __future__ import annotations

from torch import nn

_VISION = ("visual", "vision_tower", "vision_model", "vision_backbone", "vision_encoder",
           "image_tower")
_PROJECTOR = ("multi_modal_projector", "mm_projector", "connector", "mlp1", "vision_adapter",
              "image_projector", "merger")
_NORM = ("norm", "final_layernorm", "ln_f", "final_norm")


def _path(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise ValueError(f"{type(target).__name__} is not inside {type(root).__name__}")


def _first(owner: nn.Module, names) -> tuple[str, nn.Module] | None:
    for name in names:
        child = getattr(owner, name, None)
        if isinstance(child, nn.Module):
            return name, child
    return None


def language_model(model: nn.Module) -> nn.Module:
    """The decoder stack: ``model.model.language_model`` in transformers 5, else the decoder."""
    inner = getattr(model, "model", model)
    lm = getattr(inner, "language_model", None)
    if lm is None and hasattr(model, "get_decoder"):
        lm = model.get_decoder()
    if not isinstance(lm, nn.Module) or not isinstance(getattr(lm, "layers", None), nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: no language model with .layers found")
    return lm


def vision_tower(model: nn.Module) -> nn.Module | None:
    found = _first(getattr(model, "model", model), _VISION)
    return found[1] if found else None


def vision_blocks(vision: nn.Module) -> nn.ModuleList | None:
    """The first ModuleList of the tower whose items hold an attention module."""
    for _, module in vision.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and _attention_child(module[0]):
            return module
    return None


def _attention_child(block: nn.Module) -> tuple[str, nn.Module] | None:
    for name, child in block.named_children():
        if type(child).__name__.endswith(("Attention", "SdpaAttention")) or name in (
                "attn", "self_attn", "attention"):
            return name, child
    return None


def projector(model: nn.Module, vision: nn.Module | None) -> nn.Module | None:
    inner = getattr(model, "model", model)
    found = _first(inner, _PROJECTOR) or (_first(vision, ("merger",)) if vision else None)
    return found[1] if found else None


def standard_names(model: nn.Module) -> dict:
    """``rename=`` aliases for nnsight, keyed by module path (and the vision attention class)."""
    lm = language_model(model)
    lm_path = _path(model, lm)
    names = {lm_path: "lm", f"{lm_path}.layers": "layers"}
    embed = getattr(lm, "embed_tokens", None)
    if embed is not None:
        names[f"{lm_path}.embed_tokens"] = "embed"
    norm = _first(lm, _NORM)
    if norm:
        names[f"{lm_path}.{norm[0]}"] = "ln_final"
    vision = vision_tower(model)
    if vision is not None:
        v_path = _path(model, vision)
        names[v_path] = "vision"
        blocks = vision_blocks(vision)
        if blocks is not None:
            b_path = _path(model, blocks)
            if b_path != f"{v_path}.blocks":
                names[b_path] = f"{v_path}.blocks"
            attn = _attention_child(blocks[0])
            if attn and attn[0] != "attn":
                names[type(attn[1])] = "attn"
    proj = projector(model, vision)
    if proj is not None:
        names[_path(model, proj)] = "projector"
    return names
