"""Recovery on the objects models (``tiny-llava-objects``, ``tiny-llava-onevision-objects``):
Neo et al. 2024's three experiments find the planted object.

The images hold one object whose class is visible only in its cells (`vlminterp.zoo.image_task`);
the tests run the library's Neo 2024 functions (`vlminterp.neo2024`, the code the recipes run) on
zoo-style images written in COCO format and read back through the curation filter. The object's
tokens are its cells in every view with a pixel geometry (LLaVA-1.5's one grid; OneVision's base
view and its tiles), as `vlminterp.neo2024` selects them:

* object ablation: mean-ablating the object's tokens + 1 buffer ring at the LM input flips >= 70%
  of initially correct answers; the same number of random tokens flips <= 10%;
* logit lens: at the best layer the class word is in the top 5 at a larger fraction of object
  tokens than of background tokens;
* attention knockout over all layers: object -> last drops accuracy by >= 50 points, background
  -> last by <= 10 points.
"""

import numpy as np
import pytest
from support import tiny

from vlminterp import neo2024 as neo
from vlminterp.data.coco import CocoObjects
from vlminterp.data.synthetic_images import write_dataset

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
N_IMAGES = 48  # 6 per class


@pytest.fixture(scope="module", params=["tiny-llava-objects", "tiny-llava-onevision-objects"])
def vlm(request):
    return tiny(request.param)


@pytest.fixture(scope="module")
def data(vlm, tmp_path_factory):
    root = tmp_path_factory.mktemp("objects")
    coco = CocoObjects(write_dataset(root, N_IMAGES, seed=7, style="zoo"), root)
    samples = coco.samples(True)  # Neo et al.'s curation filter: every zoo image passes it
    assert len(samples) == N_IMAGES
    return coco, samples


@pytest.fixture(scope="module")
def mean(vlm, data, tmp_path_factory):
    coco, samples = data
    return neo.dataset_mean(vlm, coco, samples, tmp_path_factory.mktemp("mean"), progress=False)


def test_object_tokens_carry_the_answer_random_tokens_do_not(vlm, data, mean):
    coco, samples = data
    flips = {"object_b1": [], "random_obj": []}
    for s in samples:
        records = neo.object_ablation(vlm, coco.load_image(s), s, mean, tasks=("vqa",), sizes=(),
                                      ig_steps=2, ig_batch_size=2)
        by_cond = {r["condition"]: r for r in records}
        if not by_cond["baseline"]["correct"]:
            continue
        for cond in flips:
            flips[cond].append(not by_cond[cond]["correct"])
    rates = {c: float(np.mean(v)) for c, v in flips.items()}
    print(f"{vlm.model_id}: ablation flip rates over {len(flips['object_b1'])} initially "
          f"correct of {len(samples)}: {rates}")
    assert len(flips["object_b1"]) >= 0.95 * len(samples), "the model gets most images right"
    assert rates["object_b1"] >= 0.70 and rates["random_obj"] <= 0.10, rates


def test_logit_lens_reads_the_class_at_the_object(vlm, data):
    coco, samples = data
    obj, bg = [], []
    for s in samples:
        record, _, _ = neo.lens_image(vlm, coco.load_image(s), s, k=5)
        obj.append(record["object_fraction"])
        bg.append(record["background_fraction"])
    obj, bg = np.mean(obj, axis=0), np.mean(bg, axis=0)
    best = int(np.argmax(obj))
    print(f"{vlm.model_id}: logit lens top-5 hit fraction per layer (n={len(samples)}): "
          f"object {obj.round(3)}, background {bg.round(3)}")
    assert obj[best] > bg[best], (obj, bg)


def test_knockout_object_to_last_breaks_the_answer_background_does_not(vlm, data):
    coco, samples = data
    hits = {"baseline": [], "obj_b1": [], "image_minus_obj_b1": []}
    for s in samples:
        records = neo.attention_knockout(vlm, coco.load_image(s), s, groups=True, window=1,
                                         sources=list(hits)[1:], targets=["last"])
        if "skipped" in records[0]:
            continue
        hits["baseline"].append(records[0]["correct"])
        for r in records[1:]:
            if r["layers"] == "all":
                hits[r["source"]].append(r["correct"])
    acc = {k: float(np.mean(v)) for k, v in hits.items()}
    print(f"{vlm.model_id}: knockout -> last over all layers, accuracy: {acc} "
          f"(n={len(hits['baseline'])})")
    assert acc["baseline"] == 1.0 and len(hits["baseline"]) >= 0.95 * len(samples)
    assert acc["baseline"] - acc["obj_b1"] >= 0.5 and acc["baseline"] - acc["image_minus_obj_b1"] <= 0.1, acc
