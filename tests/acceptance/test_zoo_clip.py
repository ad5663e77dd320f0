"""Recovery on ``tiny-clip-shapes``: the CLIP circuit recipes find the object the model was trained on.

The recipes run end to end (`recipes.clip_*`, in-process) on zoo images written to a folder:

* the planted mechanism is in the weights (plain open_clip forward with hand-registered hooks):
  the planted FFN units switch with the object, and head 1 of block 2 reads the object;
* clusters: k-means on block l's FFN gates groups the object's tokens apart from the texture's.
  A patch token is an object token when the object covers >= 50% of its cell and background
  when it covers none (partial cells are left out); "object clusters" are those whose tokens are
  mostly object tokens. They must hold >= 80% of the object tokens, while holding <= 5% of the
  background tokens;
* target-causal: on images with the object at the centre (so token positions mean the same in
  every image, as the pipeline's prototypes assume), at least one top path into an object token
  is significant (edge p-value < 0.01).
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from recipes import clip_circuit, clip_cluster, clip_fit, clip_target_causal, clip_trace
from vlminterp.circuits import load_artifact
from vlminterp.zoo import image_task

pytestmark = pytest.mark.slow
LAYER, NEXT = 1, 2
N_IMAGES = 64


def _write(folder, items):
    folder.mkdir(parents=True)
    for i, it in enumerate(items):
        it.image.save(folder / f"{i:04d}.png")  # the recipe reads the folder sorted by path


def _pipeline(d, folder, k):
    clip_trace.main(["--model", "tiny-clip-shapes", "--image-folder", str(folder), "--max-images",
                     str(N_IMAGES), "--batch-size", "32", "--target-layer", str(LAYER),
                     "--next-attn-layer", str(NEXT), "--out", str(d / "trace")])
    clip_cluster.main(["--trace", str(d / "trace"), "--num-clusters", str(k), "--sample-tokens",
                       "5000", "--seed", "0", "--out", str(d / "features")])
    clip_fit.main(["--trace", str(d / "trace"), "--features", str(d / "features"), "--out", str(d / "fit")])
    return load_artifact(d / "features", "features")["labels"].numpy()


def test_the_planted_units_and_head_are_in_the_shipped_weights():
    """Ground truth for the two recovery tests below, read without the library's tracing."""
    from vlminterp import zoo

    model, preprocess, _ = zoo.build("tiny-clip-shapes")
    items = image_task.heldout_items(31, 4)  # 32 fresh images, 4 per class
    blocks = model.visual.transformer.resblocks
    seen = {}
    hooks = [blocks[1].mlp.c_fc.register_forward_hook(lambda m, i, o: seen.__setitem__("fc", o)),
             blocks[2].ln_1.register_forward_hook(lambda m, i, o: seen.__setitem__("ln", o))]
    with torch.no_grad():
        model.encode_image(torch.stack([preprocess(it.image) for it in items]))
        for h in hooks:
            h.remove()
        attn = blocks[2].attn  # q k^T / sqrt(d) from nn.MultiheadAttention's packed projection
        q, k, _ = torch.nn.functional.linear(seen["ln"], attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1)
        d = q.shape[-1] // attn.num_heads
        q, k = (t.unflatten(-1, (attn.num_heads, d))[:, :, 1] for t in (q, k))  # head 1
        logits = q @ k.transpose(1, 2) / d**0.5
    cover = np.stack([np.r_[np.nan, it.coverage().reshape(-1)] for it in items])  # CLS first
    obj, bg = cover >= 0.5, cover == 0
    units_on = (seen["fc"][..., :32] > 0).float().mean(-1).numpy()  # planted units 0-31
    print(f"planted units on: object tokens {units_on[obj].mean():.3f}, untouched "
          f"{units_on[bg].mean():.3f}; other units on: object "
          f"{(seen['fc'][..., 32:] > 0).float().mean(-1).numpy()[obj].mean():.3f}")
    assert units_on[obj].mean() >= 0.95 and units_on[bg].mean() <= 0.05
    to_object = torch.from_numpy(obj)[:, None, :] & torch.from_numpy(obj | (np.arange(65) == 0))[:, :, None]
    to_bg = torch.from_numpy(obj | (np.arange(65) == 0))[:, :, None] & torch.from_numpy(bg)[:, None, :]
    print(f"head 1 of block 2: object/CLS -> object logits {logits[to_object].mean():.1f}, "
          f"-> untouched {logits[to_bg].mean():.1f}")
    assert logits[to_object].mean() >= 10 and logits[to_object].mean() - logits[to_bg].mean() >= 10


def test_gate_clusters_separate_object_from_background_tokens(tmp_path):
    rng = np.random.default_rng([21, 1])
    items = [image_task.sample_item(rng, c) for c in image_task.CLASSES for _ in range(N_IMAGES // 8)]
    _write(tmp_path / "images", items)
    labels = _pipeline(tmp_path, tmp_path / "images", k=8)[:, 1:]  # drop CLS: [B, 64] patches
    cover = np.stack([it.coverage().reshape(-1) for it in items])
    obj, bg = cover >= 0.5, cover == 0
    object_clusters = [c for c in range(8) if obj[labels == c].sum() > bg[labels == c].sum()]
    in_obj = np.isin(labels, object_clusters)
    recall = in_obj[obj].mean()
    leak = in_obj[bg].mean()
    print(f"gate clusters: object recall {recall:.3f}, background leak {leak:.3f}, "
          f"object clusters {object_clusters}")
    assert recall >= 0.8 and leak <= 0.05, (recall, leak, object_clusters)


def test_target_causal_finds_a_significant_edge_into_the_object(tmp_path):
    rng = np.random.RandomState(22)
    from vlminterp.data.synthetic_images import zoo_image

    items = []
    for i in range(N_IMAGES):
        c = image_task.CLASSES[i % 8]
        image, polygon = zoo_image(rng, c, center=(112.0, 112.0))
        items.append(image_task.ImageItem(image, c, polygon))
    _write(tmp_path / "images", items)
    _pipeline(tmp_path, tmp_path / "images", k=8)
    clip_circuit.main(["--fit", str(tmp_path / "fit"), "--top-k", "50", "--out", str(tmp_path / "circuit.json")])
    clip_target_causal.main(["--trace", str(tmp_path / "trace"), "--features", str(tmp_path / "features"),
                             "--fit", str(tmp_path / "fit"), "--circuit", str(tmp_path / "circuit.json"),
                             "--top-n", "50", "--num-permutations", "200", "--seed", "0",
                             "--out", str(tmp_path / "target.json")])
    cover = np.mean([it.coverage().reshape(-1) for it in items], axis=0)
    object_tokens = {1 + int(i) for i in np.nonzero(cover >= 0.5)[0]}  # +1: CLS is token 0
    assert object_tokens, "the centred object covers at least one cell in every image"
    effects = json.loads((tmp_path / "target.json").read_text())["effects"]
    into_object = [e for e in effects if e["dst_token"] in object_tokens]
    print(f"target-causal: {len(into_object)} of {len(effects)} top paths end on object tokens "
          f"{sorted(object_tokens)}; p-values {[e['edge_pvalue'] for e in into_object][:8]}")
    assert any(e["edge_pvalue"] < 0.01 for e in into_object), into_object
