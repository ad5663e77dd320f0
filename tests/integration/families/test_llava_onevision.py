"""LLaVA-OneVision specifics: the video's trailing newline marker, the interpolated anyres grid
(the plain anyres geometry is tested in test_llava_next.py), and checkpoints that tie
``lm_head`` only in ``text_config``."""

import json
import warnings

import numpy as np
import pytest
import torch
from support import media_pair, tiny
from PIL import Image
from safetensors.torch import load_file, save_file
from test_llava_next import packed

import vlminterp
from vlminterp.interventions import site_tensor


def test_video_is_pooled_frames_then_one_newline_marker():
    vlm = tiny("tiny-llava-onevision")
    inputs = media_pair(vlm, "video")
    row = vlm.layout(inputs)[0]
    video = row.videos[0]
    vcfg = vlm.torch_model.config.vision_config
    pooled = -(-(vcfg.image_size // vcfg.patch_size) // 2)
    assert [g.frames for g in video.groups] == [(f, f + 1) for f in range(8)]
    assert all(len(g.positions) == pooled ** 2 and g.grid == (pooled, pooled)
               for g in video.groups)
    newline = int(video.markers.item())
    assert newline == int(video.positions.max()) + 1
    assert newline in row.markers.tolist() and newline not in row.visual.tolist()
    assert int(inputs["input_ids"][0, newline]) == vlm.torch_model.config.video_token_id
    with torch.no_grad(), vlm.trace(inputs):
        h = site_tensor(vlm.residual("embed")).save()
    torch.testing.assert_close(h[:, newline], vlm.torch_model.model.image_newline.expand(2, -1))


@pytest.mark.parametrize("text_tie", [True, None])
def test_lm_head_tied_only_in_text_config_or_missing_is_tied(tmp_path, text_tie):
    """Real OneVision configs say ``tie_word_embeddings: false`` at the top level and tie (or
    say nothing) in ``text_config``, and carry no ``lm_head.weight``. transformers 5 copies the
    text config's tie up; where nothing says tie, `load` re-ties and warns. Either way the
    loaded model computes the same logits as the tied original."""
    vlm = tiny("tiny-llava-onevision")
    vlm.torch_model.save_pretrained(tmp_path)
    vlm.processor.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights.pop("lm_head.weight", None)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    cfg["text_config"].pop("tie_word_embeddings", None)
    if text_tie is not None:
        cfg["text_config"]["tie_word_embeddings"] = text_tie
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = vlminterp.load(str(tmp_path))
    retied = [w for w in caught if "lm_head.weight is not in the checkpoint" in str(w.message)]
    assert len(retied) == (0 if text_tie else 1)
    m = again.torch_model
    assert m.lm_head.weight.data_ptr() == m.get_input_embeddings().weight.data_ptr()
    inputs = media_pair(vlm, "image")
    torch.testing.assert_close(again.forward(media_pair(again, "image")), vlm.forward(inputs),
                               atol=1e-5, rtol=0)


def test_interpolated_grid_nominal_footprints():
    """OneVision shrinks a grid of more than anyres_max_N tiles' worth of cells by bilinear
    interpolation: one ``tiles`` view; tokens fully inside the box are named, named tokens
    see some of it."""
    vlm = tiny("tiny-llava-onevision")
    cfg, proc = vlm.torch_model.config, vlm.processor
    saved = cfg.vision_aspect_ratio, proc.vision_aspect_ratio
    cfg.vision_aspect_ratio = proc.vision_aspect_ratio = "anyres_max_1"
    try:
        arr = np.zeros((60, 80, 3), dtype=np.uint8)
        box = (20, 14, 50, 40)
        arr[box[1]:box[3], box[0]:box[2]] = 255
        inputs = vlm.prepare(text="What?", images=[Image.fromarray(arr)])
        span = vlm.layout(inputs)[0].images[0]
        feats = packed(vlm, inputs)
        tiles = span.views[1]
        assert [v.kind for v in span.views] == ["base", "tiles"] and tiles.source is None
        assert tiles.grid == (3, 4) and len(span.separators) == 3
        start = int(span.positions.min())
        cover = {p: feats[p - start, 0].item() for p in tiles.positions.tolist()}
        named = set(tiles.box_positions(box).tolist())
        assert {p for p, c in cover.items() if c >= 0.9} <= named
        assert all(cover[p] > 0 for p in named)
        assert vlm.forward(inputs).shape[1] == inputs["input_ids"].shape[1]
    finally:
        cfg.vision_aspect_ratio, proc.vision_aspect_ratio = saved
