"""The model zoo: tiny VLMs trained on synthetic tasks whose solution is known.

Each model is an architecture of `vlminterp.models.tiny` (a builder + sizes) with trained weights
shipped in ``weights/NAME.safetensors`` and a card ``weights/NAME.json`` (task, data generator,
held-out accuracy, the planted mechanism). ``vlminterp.load(zoo_id)`` loads one offline; the
acceptance tests under ``tests/acceptance/test_zoo_*`` check that each recipe recovers the planted
mechanism. Retrain with ``python -m vlminterp.zoo.train NAME --seed 0``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vlminterp.zoo.specs import SPECS

WEIGHTS_DIR = Path(__file__).parent / "weights"
ZOO_IDS = tuple(SPECS)


def card(zoo_id: str) -> dict:
    """The model card (JSON) of a zoo model."""
    _check_id(zoo_id)
    path = WEIGHTS_DIR / f"{zoo_id}.json"
    if not path.is_file():
        raise ValueError(f"zoo model {zoo_id!r} has no card at {path}: train it with "
                         f"`python -m vlminterp.zoo.train {zoo_id}`")
    return json.loads(path.read_text(encoding="utf-8"))


def build(zoo_id: str):
    """``(torch_model, processor, base_tiny_id)``: the card's architecture with the shipped
    weights, in float32 and eval mode. For the CLIP model the processor is its preprocess."""
    from safetensors.torch import load_file

    from vlminterp.zoo.train import import_name, tokenizer_digest

    info = card(zoo_id)
    arch = info["architecture"]
    model, processor = import_name(arch["builder"])(seed=0, **arch["builder_kwargs"])
    if tokenizer_digest(processor) != arch["tokenizer_digest"]:
        raise ValueError(f"zoo model {zoo_id!r}: the tiny tokenizer changed since the weights "
                         f"were trained (vocabulary digest {tokenizer_digest(processor)} != "
                         f"{arch['tokenizer_digest']} in its card); retrain it")
    state = load_file(str(WEIGHTS_DIR / info["weights"]["file"]))
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.float().eval(), processor, arch["base"]


def evaluate_model(spec, model, processor, *, seed: int, n: int, stored_dtype=torch.float32) -> dict:
    """Held-out accuracy of ``model`` as stored (weights rounded to ``stored_dtype``) on ``n``
    items per question kind from ``seed``'s stream: the numbers a card records."""
    from vlminterp.zoo.train import import_name

    model.load_state_dict({k: v.to(stored_dtype).float() for k, v in model.state_dict().items()})
    module = import_name(spec.task).__module__
    by_kind = import_name(f"{module}:heldout")(model, processor, spec.base, seed=seed, n=n)
    return {"seed": seed, "n_per_kind": n, "by_kind": by_kind}


def _check_id(zoo_id: str) -> None:
    if zoo_id not in SPECS:
        raise ValueError(f"{zoo_id!r} is not a zoo model: use one of {', '.join(ZOO_IDS)}")


__all__ = ["ZOO_IDS", "WEIGHTS_DIR", "build", "card", "evaluate_model"]
