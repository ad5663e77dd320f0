"""Shared fixtures: tiny offline models (built once per session) and synthetic inputs."""

import os
import warnings

# Tests never reach a model hub: fail at once instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# vlminterp first: importing nnsight before beartype's import hook has seen vlminterp breaks
# beartype 0.23 ("unhashable type: 'instancemethod'") in a test file run on its own.
import vlminterp  # noqa: F401,E402

warnings.filterwarnings("ignore", message=".*per-frame pixel cap.*")

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


def random_image(seed, w=80, h=60):
    from PIL import Image

    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8))


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


@pytest.fixture(params=HF_FAMILIES)
def hf_vlm(request):
    return tiny(request.param)
