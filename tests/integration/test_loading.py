"""Real-checkpoint loading paths, offline: a saved tiny model dispatched by accelerate."""

import pytest
import torch
from support import media_pair, tiny

import vlminterp
from vlminterp.interventions import patch


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    vlm = tiny("tiny-qwen2-vl")
    path = tmp_path_factory.mktemp("tiny-qwen2-vl")
    vlm.torch_model.save_pretrained(path)
    vlm.processor.save_pretrained(path)
    return vlm, path


def test_device_map_with_disk_offload_traces_like_the_plain_model(saved, tmp_path):
    """Two decoder layers live on disk (accelerate's offload hooks load them per forward):
    the traced logits and a residual patch still equal the plain model's."""
    vlm, path = saved
    device_map = {"model.visual": "cpu", "model.language_model.embed_tokens": "cpu",
                  "model.language_model.layers.0": "cpu",
                  "model.language_model.layers.1": "disk",
                  "model.language_model.layers.2": "disk",
                  "model.language_model.layers.3": "cpu", "model.language_model.norm": "cpu",
                  "model.language_model.rotary_emb": "cpu", "lm_head": "cpu"}
    offloaded = vlminterp.load(str(path), device_map=device_map, offload_folder=str(tmp_path))
    assert offloaded.torch_model.hf_device_map["model.language_model.layers.1"] == "disk"
    assert offloaded.torch_model.model.language_model.layers[1].mlp.up_proj.weight.is_meta
    inputs = media_pair(vlm, "video")
    ref = vlm.forward(inputs)
    with torch.no_grad(), offloaded.trace(inputs):
        logits = offloaded.lm_head.output.save()
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)
    with torch.no_grad(), offloaded.trace(inputs):
        patch(offloaded.residual(1), None, src_row=1, dst_rows=[0])
        patched = offloaded.lm_head.output.save()
    torch.testing.assert_close(patched[0], ref[1], atol=1e-5, rtol=0)


def test_bad_quantization_is_a_one_line_error(saved):
    with pytest.raises(ValueError, match=r"quantization '3bit': expected one of"):
        vlminterp.load(str(saved[1]), quantization="3bit")
