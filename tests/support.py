"""Shared test helpers: tiny offline models (built once per session) and synthetic inputs.

Imported as ``from support import ...`` (a unique module name: ``from conftest import`` would
pick whichever conftest.py pytest loaded last, e.g. tests/remote/conftest.py)."""

import os

# Tests never reach a model hub: fail at once instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

HF_FAMILIES = ["tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-llava"]
_CACHE = {}


def tiny(model_id, **kw):
    """A tiny model, built once per session per (id, options)."""
    import vlminterp

    key = (model_id, tuple(sorted(kw.items())))
    if key not in _CACHE:
        _CACHE[key] = vlminterp.load(model_id, **kw)
    return _CACHE[key]


def random_video(seed, frames=8, size=112):
    return np.random.RandomState(seed).randint(0, 255, (frames, size, size, 3), dtype=np.uint8)


def random_image(seed, w=80, h=60, box=None):
    """A random RGB image; ``box`` = (x0, y0, x1, y1): those pixels inverted (a region painted
    to follow through the processor)."""
    from PIL import Image

    pixels = np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8)
    if box is not None:
        x0, y0, x1, y1 = box
        pixels[y0:y1, x0:x1] = 255 - pixels[y0:y1, x0:x1]
    return Image.fromarray(pixels)


def clean_and_counterfactual(vlm, seed=0):
    """One batch: row 0 clean, row 1 counterfactual (video for Qwen, image for LLaVA)."""
    if vlm.family.name.startswith("qwen"):
        return vlm.prepare(text="Which direction does it move?",
                           video=[random_video(seed), random_video(seed + 1)])
    return vlm.prepare(text="What is this?", images=[random_image(seed), random_image(seed + 1)])


def media_pair(vlm, kind: str, seed: int = 0):
    """One batch of two rows with different media of ``kind`` ("image" or "video")."""
    if kind == "video":
        return vlm.prepare(text="Which direction does it move?",
                           video=[random_video(seed), random_video(seed + 1)])
    return vlm.prepare(text="What is this?", images=[random_image(seed), random_image(seed + 1)])
