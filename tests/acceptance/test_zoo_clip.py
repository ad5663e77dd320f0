"""Recovery on ``tiny-clip-shapes``: the CLIP circuit recipes find the object the model was trained on.

The recipes run end to end (`recipes.clip_*`, in-process) on zoo images written to a folder:

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


# Not what the shipped model learned (measured 2026-12-02, seed 0 weights): the tokens >= 50%
# covered by the object (102 of 4096) spread over 4-5 of the 8 gate clusters, none of them mostly
# object (recall 0.0 at blocks 0, 1 and 2; with k=16 one cluster of 37 object / 5 background
# tokens, recall 0.51). The assertion stays; the task needs changing (e.g. bigger objects or a
# per-token objective) before it holds. strict: a retrained model that passes turns this red.
@pytest.mark.xfail(strict=True, reason="tiny-clip-shapes' FFN gate clusters do not separate object "
                   "tokens (object recall 0.0 at k=8): the planted mechanism is not learned")
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
