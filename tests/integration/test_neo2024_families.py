"""Neo et al. 2024 on tiled (multi-view) images and families beyond LLaVA: object subsets cover
the object in every view, as a region painted through the real processor and model shows; the
knockout's last row and layers; the lens's drawn view; prompts without a chat template."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import tiny

from vlminterp import neo2024 as neo
from vlminterp.data.coco import CocoObjects, ObjectSample
from vlminterp.models.resolve import language_model

# (width, height) and an object box per family: LLaVA-NeXT cuts 80x64 into a base view and 2x2
# tiles, InternVL into 3x2 tiles and a thumbnail, SmolVLM 64x64 (no resize: its two-step resize
# blurs 4 px) into 2x2 tiles and a global view. Each box's edges fall >= 2 resized pixels inside
# a cell in every view, so resampling blur cannot reach a cell the box does not overlap, and
# each box touches every view.
CASES = {"tiny-llava-next": ((80, 64), (33, 27, 46, 37)),
         "tiny-internvl": ((80, 64), (11, 27, 69, 37)),
         "tiny-smolvlm2": ((64, 64), (27, 27, 43, 43))}
SIZE, BOX = CASES["tiny-llava-next"]


def _sample(box, polygon: bool = False, size=SIZE) -> ObjectSample:
    x0, y0, x1, y1 = (float(v) for v in box)
    polygons = ((x0, y0, x1, y0, x1, y1, x0, y1),) if polygon else None
    return ObjectSample("1:1", 1, 1, "x.png", Path("x.png"), "cat", 1, (x0, y0, x1, y1),
                        (x1 - x0) * (y1 - y0), size, polygons)


def _images(box, size=SIZE):
    grey = np.full((size[1], size[0], 3), 90, np.uint8)
    painted = grey.copy()
    x0, y0, x1, y1 = box
    painted[y0:y1, x0:x1] = 230
    return Image.fromarray(grey), Image.fromarray(painted)


def _lm_input_without_vision_attention(vlm, inputs) -> torch.Tensor:
    """Plain PyTorch: layer 0's input with every vision block's attention output zeroed, so a
    visual token depends only on its own patches' pixels (patch embedding, MLPs, merges)."""
    seen = {}

    def grab(module, args, kwargs):
        seen["h"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    def silence(module, args, out):
        return (torch.zeros_like(out[0]), *out[1:]) if isinstance(out, tuple) else torch.zeros_like(out)

    handles = [language_model(vlm.torch_model).layers[0].register_forward_pre_hook(
        grab, with_kwargs=True)]
    handles += [vlm.vision.blocks[j].attn._module.register_forward_hook(silence)
                for j in range(len(vlm.vision.blocks))]
    try:
        vlm.forward(inputs)
    finally:
        for h in handles:
            h.remove()
    return seen["h"][0]


@pytest.mark.parametrize("model_id", list(CASES))
def test_object_indices_are_the_tokens_a_painted_region_reaches_in_every_view(model_id):
    vlm = tiny(model_id)
    size, box = CASES[model_id]
    grey, painted = _images(box, size)
    before = vlm.prepare(text="What is it?", images=[grey])
    after = vlm.prepare(text="What is it?", images=[painted])
    change = (_lm_input_without_vision_attention(vlm, before)
              - _lm_input_without_vision_attention(vlm, after)).abs().amax(-1)
    reached = set(torch.nonzero(change > 1e-5).flatten().tolist())
    row = vlm.layout(before)[0]
    for polygon in (False, True):
        idx = neo.object_indices(row, _sample(box, polygon, size), 0, use_polygons=polygon)
        assert set(row.visual[idx].tolist()) == reached
    views = row.images[0].views
    assert len(views) >= 5 and all(set(v.positions.tolist()) & reached for v in views)
    assert not reached & set(row.markers.tolist())
    # given the image's span, the same indices (the row holds one image)
    sample = _sample(box, size=size)
    assert torch.equal(neo.object_indices(row.images[0], sample, 0, use_polygons=False),
                       neo.object_indices(row, sample, 0, use_polygons=False))


def test_llava_next_object_cells_by_hand():
    """80x64 on tiny LLaVA-NeXT (crop 32, patch 8, pinpoint 64x64). Base view: the image
    squashed to 32x32 (x*0.4, y*0.5): the box (33,27,46,37) -> x [13.2,18.4) y [13.5,18.5) ->
    rows 1-2, cols 1-2. Tiles: resized to fit 64x64 -> 64x52 (x*0.8, y*52/64), pasted 6 px down,
    cut in 2x2 tiles of 4x4 patches, then the padding rows of the 8x8 grid unpadded
    (round(64*8/80) = 6 rows kept: padded rows 1..6; top tiles keep rows 1-3, bottom 4-6):
    x [26.4,36.8) -> columns 3 | 4 (left tile col 3, right tile col 0); y + 6 -> [27.9,36.1)
    -> padded rows 3 | 4 -> top tiles' view row 2, bottom tiles' view row 0."""
    vlm = tiny("tiny-llava-next")
    row = vlm.layout(vlm.prepare(text="What is it?", images=[_images(BOX)[0]]))[0]
    base, top_left, top_right, bottom_left, bottom_right = row.images[0].views
    by_hand = [(base, [(1, 1), (1, 2), (2, 1), (2, 2)]), (top_left, [(2, 3)]),
               (top_right, [(2, 0)]), (bottom_left, [(0, 3)]), (bottom_right, [(0, 0)])]
    expected = torch.cat([view.cell_positions(cells) for view, cells in by_hand])
    idx = neo.object_indices(row, _sample(BOX), 0, use_polygons=False)
    assert row.visual[idx].tolist() == sorted(expected.tolist())


def _image_token_positions(vlm, inputs):
    ids = inputs["input_ids"][0]
    return torch.nonzero(ids == vlm.torch_model.config.image_token_id).flatten()


def test_knockout_last_row_is_the_bottom_row_of_the_view_that_ends_last():
    box, sample = BOX, _sample(BOX)
    # LLaVA-NeXT: the tiles' grid ends the image, each of its rows followed by a newline token:
    # the last row is the 4 cells before the last newline (the bottom-right tile's bottom row)
    vlm = tiny("tiny-llava-next")
    inputs = neo.prompt_inputs(vlm, [_images(box)[0]], "What is it?", "It is a")
    row = vlm.layout(inputs)[0]
    obj = {b: row.visual[neo.object_indices(row, sample, b)] for b in (0, 1, 2)}
    _, targets = neo.knockout_sets(row, obj)
    assert targets["last_row"].tolist() == _image_token_positions(vlm, inputs)[-5:-1].tolist()
    # SmolVLM: tiles first, the global view last: its bottom row = the image's last 4 patches
    vlm = tiny("tiny-smolvlm2")
    inputs = neo.prompt_inputs(vlm, [_images(box)[0]], "What is it?", "It is a")
    row = vlm.layout(inputs)[0]
    obj = {b: row.visual[neo.object_indices(row, sample, b)] for b in (0, 1, 2)}
    sources, targets = neo.knockout_sets(row, obj)
    assert targets["last_row"].tolist() == _image_token_positions(vlm, inputs)[-4:].tolist()
    assert neo.last_view(row.images[0]).kind == "global"
    assert not set(targets["text"].tolist()) & set(row.markers.tolist())
    assert (targets["text"] > row.visual.max()).all() and row.last not in targets["text"].tolist()
    assert set(sources["visual"].tolist()) == set(row.visual.tolist())


def test_knockout_uses_attention_layers_only():
    vlm = tiny("tiny-qwen3.5")  # Gated-DeltaNet layers mixed with attention layers
    attention = vlm.attention_layers
    assert 0 < len(attention) < vlm.n_layers
    assert neo.knockout_layers(vlm) == attention
    linear = next(i for i in range(vlm.n_layers) if i not in attention)
    with pytest.raises(ValueError, match=rf"--layers: layer {linear} has no softmax attention .*linear_attn"):
        neo.knockout_layers(vlm, [linear])
    with pytest.raises(ValueError, match="--layers: layer 99 is not among"):
        neo.knockout_layers(vlm, [99])
    sets = neo.layer_sets(vlm.n_layers, attention, window=2, groups=False)
    assert sets and all(layers and set(layers) <= set(attention) for layers in sets.values())
    image = _images((20, 20, 50, 44))[0]
    records = neo.attention_knockout(vlm, image, _sample((20, 20, 50, 44)), window=2, groups=False,
                                     sources=["visual"], targets=["last"], keep_all=True)
    assert [r["layers"] for r in records[1:]] == list(sets)
    assert all(set(r["layer_list"]) <= set(attention) for r in records[1:])


@pytest.mark.parametrize("model_id, kind", [("tiny-internvl", "thumbnail"),
                                            ("tiny-smolvlm2", "global"),
                                            ("tiny-llava-next", "base")])
def test_lens_draws_the_whole_image_view_and_counts_every_view(model_id, kind):
    vlm = tiny(model_id)
    size, box = CASES[model_id]
    image, sample = _images(box, size)[1], _sample(box, size=size)
    record, tensors, meta = neo.lens_image(vlm, image, sample, k=3)
    row = vlm.layout(neo.prompt_inputs(vlm, [image], "Describe the image."))[0]
    view = next(v for v in row.images[0].views if v.kind == kind)
    assert meta["view"] == kind and meta["view_positions"] == view.positions.tolist()
    assert meta["grid"] == list(view.grid)
    cells = view.geometry.box_cells(box)
    assert meta["view_object"] == sorted(r * view.grid[1] + c for r, c in cells)
    assert record["n_object"] == len(neo.object_indices(row, sample, 0)) > len(cells)
    near = neo.object_indices(row, sample, 1)
    assert record["n_background"] == len(row.visual) - len(near)
    page = neo.lens_view(vlm, image, view.geometry, tensors, meta, "t")
    assert len(page["patches"]) == view.grid[0] * view.grid[1]


def test_paligemma_prompts_without_a_chat_template():
    vlm = tiny("tiny-paligemma")
    assert neo.reply_separator(vlm) == ""
    image = _images((20, 20, 50, 44))[0]
    inputs, prompt, answer = neo.task_inputs(vlm, image, neo.TASKS["vqa"], "cat")
    ids = inputs["input_ids"][0]
    prefix = vlm.tokenizer.encode("It is a", add_special_tokens=False)
    question = vlm.tokenizer.encode("What is the main object in this image?\n",
                                    add_special_tokens=False)
    n_image = int((ids == vlm.torch_model.config.image_token_id).sum())
    # <image> x n, <bos>, question, "\n" (prefix-LM, token type 0), then the reply (type 1)
    assert ids[:n_image].eq(vlm.torch_model.config.image_token_id).all()
    assert ids[n_image] == vlm.tokenizer.bos_token_id
    assert ids[n_image + 1:].tolist() == question + prefix
    assert inputs["token_type_ids"][0].tolist() == [0] * (len(ids) - len(prefix)) + [1] * len(prefix)
    assert answer == vlm.tokenizer.encode("It is a cat", add_special_tokens=False)[len(prefix)]
    _, _, yes = neo.task_inputs(vlm, image, neo.TASKS["polling"], "cat")
    assert yes == vlm.tokenizer.encode("Yes", add_special_tokens=False)[0]


@pytest.mark.parametrize("model_id", ["tiny-paligemma", "tiny-llava-next"])
def test_prompt_batch_rows_equal_single_prompts(model_id):
    """The first-token tasks share one right-padded batch: each row's real tokens are its
    prompt's own, at the same positions."""
    vlm = tiny(model_id)
    image = _images((20, 20, 50, 44))[0]
    prompts = [neo.Prompt("What is the main object in this image?", "It is a"),
               neo.Prompt("Is there a cat in this image?")]
    batch = neo.batch_inputs(vlm, image, prompts, padding_side="right")
    for r, p in enumerate(prompts):
        single = neo.prompt_inputs(vlm, [image], p.question, p.answer_prefix)["input_ids"][0]
        assert batch["input_ids"][r, :len(single)].tolist() == single.tolist()
        assert batch["attention_mask"][r].sum() == len(single)


def _lm_input(vlm, inputs) -> torch.Tensor:
    seen = {}

    def grab(module, args, kwargs):
        seen["h"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    handle = language_model(vlm.torch_model).layers[0].register_forward_pre_hook(
        grab, with_kwargs=True)
    try:
        vlm.forward(inputs)
    finally:
        handle.remove()
    return seen["h"][0]


def test_dataset_mean_weighs_every_visual_token_once(tmp_path):
    """Two images cut into different numbers of InternVL tiles: the mean is the mean over all
    their patch tokens (every view, no separator or marker), not the mean of per-image means."""
    vlm = tiny("tiny-internvl")
    images = {1: _images((20, 20, 50, 44), (80, 64))[1], 2: _images((10, 10, 30, 30), (32, 32))[1]}
    for i, image in images.items():
        image.save(tmp_path / f"{i}.png")
    (tmp_path / "ann.json").write_text(json.dumps({
        "images": [{"id": i, "file_name": f"{i}.png", "width": im.size[0], "height": im.size[1]}
                   for i, im in images.items()],
        "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [1, 1, 8, 8],
                         "area": 64} for i in images],
        "categories": [{"id": 1, "name": "cat"}]}))
    coco = CocoObjects(tmp_path / "ann.json", tmp_path)
    samples = coco.samples(False)
    tokens = []
    for i, image in images.items():
        inputs = neo.prompt_inputs(vlm, [image], neo.TASKS["generative"].question)
        tokens.append(_lm_input(vlm, inputs)[vlm.layout(inputs)[0].visual])
    assert len(tokens[0]) != len(tokens[1])
    mean = neo.dataset_mean(vlm, coco, samples, tmp_path / "mean", progress=False)
    torch.testing.assert_close(mean, torch.cat(tokens).mean(0), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mean, (tokens[0].mean(0) + tokens[1].mean(0)) / 2, atol=1e-4)
