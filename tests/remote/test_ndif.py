"""The same intervention program locally and on a real NDIF server (started by conftest).

Remote results must be *identical* to local ones: the server runs the same torch/transformers
build on CPU in float32, so any difference means the program changed on the way.
"""

import json

import numpy as np
import pytest
import torch

import vlminterp
from vlminterp import interventions as iv
from vlminterp import metrics
from vlminterp.remote import RemoteError, load_remote
from vlminterp.store import write_json_atomic

pytestmark = pytest.mark.remote
# tiny-qwen2-vl is deployed too, but two 8-frame videos exceed what ndif 0.1.2's API accepts
# in one request (its form parser caps a part at ~1 MiB): it is the "request too large" case.
FAMILIES = ["tiny-llava"]


@pytest.fixture(scope="module")
def pairs(ndif):
    """{family: (local VLM, remote VLM)} over the same saved directory."""
    stack, dirs = ndif
    return {m: (vlminterp.load(dirs[m]), load_remote(dirs[m], host=stack.host))
            for m in [*FAMILIES, "tiny-qwen2-vl"]}


def _residual_program(vlm, inputs, remote):
    layers = [0, vlm.n_layers - 1]
    with torch.no_grad(), vlm.trace(inputs, remote=remote):
        vision = iv.output_tensor(vlm.vision.blocks[0]).save()
        resid = iv.cache({f"layer{i}": vlm.layers[i] for i in layers})
        logits = vlm.lm_head.output[:, -1].save()
    return vision, resid, logits


@pytest.mark.parametrize("family", FAMILIES)
def test_residual_stream_identical(pairs, family):
    local, remote = pairs[family]
    inputs = clean_and_counterfactual(local)
    v_local, r_local, l_local = _residual_program(local, inputs, False)
    v_remote, r_remote, l_remote = _residual_program(remote, inputs, True)
    assert torch.equal(v_local, v_remote)
    assert r_local.keys() == r_remote.keys()
    for name in r_local:
        assert torch.equal(r_local[name], r_remote[name]), name
    assert torch.equal(l_local, l_remote)


def _patched_logits(vlm, inputs, layer, positions, remote):
    with torch.no_grad(), vlm.trace(inputs, remote=remote):
        iv.patch(vlm.layers[layer], positions, src_row=0, dst_rows=[1])
        logits = vlm.lm_head.output[:, -1].save()
    return logits


@pytest.mark.parametrize("family", FAMILIES)
def test_patching_identical(pairs, family):
    local, remote = pairs[family]
    inputs = clean_and_counterfactual(local)
    visual = local.layout(inputs)[0].visual
    patched_local = _patched_logits(local, inputs, 1, visual, remote=False)
    patched_remote = _patched_logits(remote, inputs, 1, visual, remote=True)
    assert torch.equal(patched_local, patched_remote)
    assert not torch.equal(patched_remote[1], local.forward(inputs)[1, -1])  # the patch acted


def _recipe(vlm, inputs, remote, out_path):
    """A recipe in miniature: per-layer denoising patch of the visual tokens -> JSON."""
    lay = vlm.layout(inputs)
    correct, incorrect = vlm.token_id("left"), vlm.token_id("right")
    records = []
    for layer in range(vlm.n_layers):
        logits = _patched_logits(vlm, inputs, layer, lay[0].visual, remote)
        diff = metrics.logit_diff(logits, correct, incorrect)
        records.append({"layer": layer, "clean": float(diff[0]), "patched": float(diff[1])})
    write_json_atomic(out_path, {"model": "tiny", "records": records})
    return out_path.read_text()


def test_recipe_json_identical(pairs, tmp_path):
    local, remote = pairs["tiny-llava"]
    inputs = clean_and_counterfactual(local, seed=3)
    text_local = _recipe(local, inputs, False, tmp_path / "local.json")
    text_remote = _recipe(remote, inputs, True, tmp_path / "remote.json")
    assert text_local == text_remote
    assert len(json.loads(text_remote)["records"]) == local.n_layers


def test_unreachable_host_one_line_error(ndif):
    _, dirs = ndif
    vlm = load_remote(dirs["tiny-llava"], host="127.0.0.1:9")
    inputs = vlm.prepare(text="What is this?", images=[_image()])
    with pytest.raises(RemoteError) as err:
        with vlm.trace(inputs, remote=True):
            vlm.lm_head.output.save()
    message = str(err.value)
    assert "\n" not in message
    assert "http://127.0.0.1:9" in message and "unreachable" in message
    assert dirs["tiny-llava"] in message


def test_undeployed_model_one_line_error(ndif, tmp_path):
    from vlminterp.remote.serve import save_tiny

    stack, _ = ndif
    missing = save_tiny("tiny-llava", str(tmp_path / "never-deployed"))
    vlm = load_remote(missing, host=stack.host)
    (tmp_path / "never-deployed" / "model.safetensors").unlink()  # the server cannot load it
    inputs = vlm.prepare(text="What is this?", images=[_image()])
    with pytest.raises(RemoteError) as err:
        with vlm.trace(inputs, remote=True):
            vlm.lm_head.output.save()
    message = str(err.value)
    assert "\n" not in message
    assert stack.host in message and missing in message and "not deployed" in message


def test_request_too_large_one_line_error(pairs, ndif):
    local, remote = pairs["tiny-qwen2-vl"]
    inputs = clean_and_counterfactual(local)
    with pytest.raises(RemoteError) as err:
        with vlm_trace(remote, inputs):
            remote.lm_head.output.save()
    message = str(err.value)
    assert "\n" not in message and "too large" in message and ndif[0].host in message


def vlm_trace(vlm, inputs):
    return vlm.trace(inputs, remote=True)


def test_local_trace_on_remote_model_refused(pairs):
    _, remote = pairs["tiny-llava"]
    with pytest.raises(ValueError, match="remote=True"):
        remote.trace(remote.prepare(text="What is this?", images=[_image()]), remote=False)


def _image(seed=0):
    return np.random.RandomState(seed).randint(0, 255, (60, 80, 3), dtype=np.uint8)


def _video(seed):
    return np.random.RandomState(seed).randint(0, 255, (8, 112, 112, 3), dtype=np.uint8)


def clean_and_counterfactual(vlm, seed=0):
    """One batch: row 0 clean, row 1 counterfactual (video for Qwen, image for LLaVA)."""
    if vlm.family.name.startswith("qwen"):
        return vlm.prepare(text="Which direction does it move?",
                           video=[_video(seed), _video(seed + 1)])
    return vlm.prepare(text="What is this?", images=[_image(seed), _image(seed + 1)])
