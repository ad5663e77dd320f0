"""The centre-crop offset of each family's real processor, found by painting an edge through it.

HF's CLIPImageProcessor (LLaVA) floors (resized - crop) / 2; open_clip's torchvision CenterCrop
rounds it half to even. They differ by one pixel exactly when (resized - crop) % 4 == 3, as for
a 640x427 photo (shortest edge 56 -> 83 px wide, 27 px to crop: 13 floored, 14 rounded).
"""

import copy

import numpy as np
import pytest
import torch
from support import tiny
from PIL import Image

from vlminterp.models.clip import crop_geometry

# (width, height): (resized - crop) % 4 == 3 on the long side for crops of 56 (llava) and 32 (clip)
ODD_SIZES = [(640, 427), (427, 640)]


def _edge_image(w: int, h: int) -> Image.Image:
    """Black, white from the middle on along the long side: one sharp edge to locate."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    if w > h:
        arr[:, w // 2:] = 255
    else:
        arr[h // 2:, :] = 255
    return Image.fromarray(arr)


def _edge_at(pixels: torch.Tensor, w: int, h: int) -> int:
    """Index of the largest step along the long side of a [C, H, W] image."""
    profile = pixels.float().mean(0).mean(0 if w > h else 1)
    return int(torch.argmax(profile[1:] - profile[:-1]))


def _llava_offset(vlm, image: Image.Image, w: int, h: int) -> int:
    """Crop offset of the real processor: where the edge lands resized-only minus cropped."""
    ip = vlm.processor.image_processor
    whole = copy.deepcopy(ip)
    whole.do_center_crop = False
    cropped = ip(images=[image], return_tensors="pt")["pixel_values"][0]
    resized = whole(images=[image], return_tensors="pt")["pixel_values"][0]
    return _edge_at(resized, w, h) - _edge_at(cropped, w, h)


def _clip_offset(vlm, image: Image.Image, w: int, h: int) -> int:
    from torchvision.transforms import CenterCrop, Compose

    steps = vlm.preprocess.transforms
    crop = next(i for i, t in enumerate(steps) if isinstance(t, CenterCrop))
    resized = Compose(steps[:crop] + steps[crop + 1:])(image)
    return _edge_at(resized, w, h) - _edge_at(vlm.preprocess(image), w, h)


@pytest.mark.parametrize("size", ODD_SIZES)
def test_llava_layout_floors_the_crop_offset_as_its_processor(size):
    vlm = tiny("tiny-llava")
    w, h = size
    image = _edge_image(w, h)
    offset = _llava_offset(vlm, image, w, h)
    geo = vlm.layout(vlm.prepare(text="What?", images=[image]))[0].images[0].geometry
    long_side = 0 if w > h else 1
    assert (geo.resized[long_side] - 56) % 4 == 3  # the case where floor and round differ
    assert geo.crop_box[long_side] == offset == (geo.resized[long_side] - 56) // 2


@pytest.mark.parametrize("size", ODD_SIZES)
def test_clip_layout_rounds_the_crop_offset_as_open_clip(size):
    vlm = tiny("tiny-clip-vit")
    w, h = size
    image = _edge_image(w, h)
    offset = _clip_offset(vlm, image, w, h)
    geo = vlm.layout(vlm.prepare(images=[image]))[0].images[0].geometry
    long_side = 0 if w > h else 1
    assert (geo.resized[long_side] - 32) % 4 == 3
    assert geo.crop_box[long_side] == offset == (geo.resized[long_side] - 32) // 2 + 1


def test_crop_geometry_rounding_by_hand():
    # 640x427, shortest edge 336 -> 503x336; 167 px to crop: floor 83, round(83.5) = 84
    assert crop_geometry((640, 427), 336, (336, 336), 14, rounding="floor").crop_box == (83, 0, 419, 336)
    assert crop_geometry((640, 427), 336, (336, 336), 14).crop_box == (84, 0, 420, 336)
    # 640x425 -> 505 wide, 169 to crop: 84.5 rounds to even (84) = floor
    assert crop_geometry((640, 425), 336, (336, 336), 14).crop_box[0] == 84
    with pytest.raises(ValueError, match="rounding 'ceil'"):
        crop_geometry((640, 427), 336, (336, 336), 14, rounding="ceil")
