"""Neo 2024 object ablation, batched (task x subset rows, baselines riding along, IG steps in
one forward+backward): every record equals one plain single-row forward with a hand-written
hook, and the batching choices do not change the records."""

import pytest
import torch
from support import tiny

from vlminterp import neo2024 as neo
from vlminterp.data.coco import read_coco
from vlminterp.data.synthetic_images import write_dataset


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("objects")
    coco, samples = read_coco(write_dataset(root, 2, seed=3), root)
    llava = tiny("tiny-llava")
    mean = neo.dataset_mean(llava, coco, samples, tmp_path_factory.mktemp("mean"), progress=False)
    return llava, coco, samples[0], mean


def _hooked_probs(vlm, inputs, positions, mean):
    """Plain PyTorch: one row, LM input edited by a pre-hook on decoder layer 0."""
    def hook(module, args, kwargs):
        h = (args[0] if args else kwargs["hidden_states"]).clone()
        if positions is not None:
            h[0, positions] = mean
        if args:
            return (h, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}
    layer0 = vlm.torch_model.model.language_model.layers[0]
    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        return torch.softmax(vlm.forward(inputs)[0, -1].float(), -1)
    finally:
        handle.remove()


def test_batched_records_equal_single_row_hooked_forwards(setup):
    llava, coco, sample, mean = setup
    image = coco.load_image(sample)
    records = neo.object_ablation(llava, image, sample, mean, tasks=("vqa", "polling"),
                                  sizes=(2, 4), ig_steps=4, keep_all=True, batch_size=5)
    assert len(records) == 2 * 11
    for r in records:
        inputs, _, answer = neo.task_inputs(llava, image, neo.TASKS[r["task"]], sample.category)
        visual = llava.layout(inputs)[0].visual
        pos = None if r["condition"] == "baseline" else visual[torch.tensor(r["indices"])]
        probs = _hooked_probs(llava, inputs, pos, mean)
        assert r["p_correct"] == pytest.approx(float(probs[answer]), abs=1e-5), r["condition"]
        assert r["p_generated"] == pytest.approx(float(probs.max()), abs=1e-5)


def test_batching_choices_do_not_change_the_records(setup):
    llava, coco, sample, mean = setup
    image = coco.load_image(sample)
    kw = dict(tasks=("vqa", "polling", "generative"), sizes=(2, 4), ig_steps=6,
              max_new_tokens=3, keep_all=True)
    a = neo.object_ablation(llava, image, sample, mean, batch_size=64, ig_batch_size=None, **kw)
    b = neo.object_ablation(llava, image, sample, mean, batch_size=3, ig_batch_size=1, **kw)
    assert [(r["task"], r["condition"]) for r in a] == [(r["task"], r["condition"]) for r in b]
    for x, y in zip(a, b):
        assert x.get("indices") == y.get("indices")  # same IG ranking in one or six passes
        assert x.get("token") == y.get("token") and x.get("text") == y.get("text")
        if "p_correct" in x:
            assert x["p_correct"] == pytest.approx(y["p_correct"], abs=1e-5)
    # without keep_all the baselines run first; kept tasks' records are the same
    c = neo.object_ablation(llava, image, sample, mean, batch_size=64,
                            **{**kw, "keep_all": False})
    kept = {r["task"] for r in c if r["condition"] != "baseline"}
    assert kept == {r["task"] for r in c if r["condition"] == "baseline" and r["correct"]} or \
        c[0].get("skipped")
    for r in c:
        if r["task"] in kept:
            twin = next(x for x in a if (x["task"], x["condition"]) == (r["task"], r["condition"]))
            assert r.get("token", r.get("text")) == twin.get("token", twin.get("text"))
