"""Counterfactual causal tracing on tiny Qwen2-VL against independent computations.

* the recipe's patched_score equals two plain forwards with a hand-written forward hook;
* a model whose answer depends only on frames a:b (by construction: a hook on the projector
  zeroes every visual token outside a:b's temporal groups) concentrates the effect there;
* frame spans map to temporal token groups; batching does not change scores; dumped
  representations equal hand-computed means.
"""

import json

import numpy as np
import pytest
import torch
from support import random_video, tiny

import recipes.counterfactual_causal_tracing as tracing_recipe
from vlminterp.video import causal_tracing as ct
from vlminterp.video.counterfactuals import reverse
from vlminterp.data.synthetic import make_video, write_dataset
from vlminterp.data.video import read_frames
from vlminterp.video.multiple_choice import mc_prompt, option_ids

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = mc_prompt("Which direction does the square move?", ["left", "right"])


@pytest.fixture(scope="module")
def vlm():
    return tiny("tiny-qwen2-vl")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("syn") / "data", 1)


# -- (1) the recipe against a plain PyTorch forward hook ---------------------------------------
def _hook_patched_score(vlm, clean, cf, layer, group, direction, correct):
    """Two plain forwards, no nnsight: record the source run's layer activations at the video
    tokens of temporal ``group``, then write them into the destination run."""
    lm = vlm.torch_model.model.language_model
    src, dst = (clean, cf) if direction == "denoise" else (cf, clean)
    ins = [vlm.prepare(text=PROMPT, video=[v]) for v in (src, dst)]
    ids = ins[0]["input_ids"][0]
    video = torch.nonzero(ids == vlm.torch_model.config.video_token_id).flatten()
    pos = video.view(4, -1)[group]  # 8 frames -> 4 groups of 16 tokens, group-major
    saved = {}
    if layer == "embed":  # the LM input: hidden_states entering layers[0]
        def grab(mod, args, kwargs):
            saved["h"] = args[0].clone()

        def put(mod, args, kwargs):
            h = args[0].clone()
            h[0, pos] = saved["h"][0, pos]
            return (h, *args[1:]), kwargs
        hooks = (lambda f: lm.layers[0].register_forward_pre_hook(f, with_kwargs=True))
    else:
        def grab(mod, args, out):
            saved["h"] = out.clone()

        def put(mod, args, out):
            out = out.clone()
            out[0, pos] = saved["h"][0, pos]
            return out
        hooks = lm.layers[layer].register_forward_hook
    handle = hooks(grab)
    vlm.torch_model(**ins[0])
    handle.remove()
    handle = hooks(put)
    try:
        logits = vlm.torch_model(**ins[1]).logits[0, -1]
    finally:
        handle.remove()
    letters = [vlm.tokenizer.convert_tokens_to_ids(t) for t in "AB"]  # line-initial letters
    return float(logits[letters[correct]] - logits[letters[1 - correct]])


@pytest.mark.parametrize("layer,direction", [(2, "denoise"), ("embed", "noise")])
def test_recipe_patched_score_equals_forward_hook(vlm, dataset, tmp_path, layer, direction):
    out = tmp_path / "t.json"
    tracing_recipe.main(["--annotations", str(dataset), "--output", str(out), "--layers",
                         str(layer), "--token_slice", "visual_frames:2:4", "--swap_spans", "none",
                         "--direction", direction])
    rec = next(r for r in json.loads(out.read_text())["records"]
               if r["question_id"] == "0000-direction" and r["counterfactual"] == "reverse")
    entry = json.loads(dataset.read_text())[0]
    assert entry["task_name"] == "direction" and rec["groups"] == [1] and rec["frames"] == [[2, 4]]
    clean = read_frames(dataset.parent / "videos" / entry["video_name"], num_frames=8)
    with torch.no_grad():
        expected = _hook_patched_score(vlm, clean, reverse(clean), layer, 1, direction,
                                       entry["answer_number"])
    assert rec["patched_score"] == pytest.approx(expected, abs=1e-6)  # effects here are ~1e-3
    te = rec["clean_score"] - rec["counterfactual_score"]
    assert te != 0
    effect = ((expected - rec["counterfactual_score"]) if direction == "denoise"
              else (rec["clean_score"] - expected)) / te
    assert rec["effect"] == pytest.approx(effect, rel=1e-4, abs=1e-6)


# -- (2) planted answer ---------------------------------------------------------------------------
SPANS = ["visual_frames:0:2", "visual_frames:2:4", "visual_frames:4:6", "visual_frames:6:8"]


def _plant(vlm, a, b, groups=4):
    """Make the answer depend on frames a:b only: the projector's video tokens (group-major,
    ``groups`` per video) are zeroed outside a:b's temporal groups in every row."""
    keep = torch.zeros(groups, dtype=torch.bool)
    keep[a // 2:(b - 1) // 2 + 1] = True

    def hook(mod, args, out):
        o = out.clone().view(-1, groups, 16, out.shape[-1])  # [video, group, token, d]
        o[:, ~keep] = 0
        return o.view_as(out)
    return vlm.torch_model.model.visual.merger.register_forward_hook(hook)


@pytest.mark.parametrize("a,b,layers", [(0, 2, ["embed"]), (2, 4, ["embed"]), (4, 6, ["embed"]),
                                        (6, 8, ["embed", 0, 1, 2, 3])])
def test_planted_answer_concentrates_on_its_frames(vlm, a, b, layers):
    clean = make_video("right", "red")
    handle = _plant(vlm, a, b)
    try:
        pair = vlm.prepare(text=PROMPT, video=[clean, reverse(clean)])
        conds = ct.conditions_for(layers, [("main", s) for s in SPANS])
        scores, _, _ = ct.run_chunk(vlm, pair, conds, option_ids(vlm, 2), 1)
    finally:
        handle.remove()
    clean_s, cf_s = scores[:2]
    assert abs(clean_s - cf_s) > 1e-4
    share = {s: 0.0 for s in SPANS}
    for c, patched in zip(conds, scores[2:]):
        share[c.token_slice] += abs((patched - cf_s) / (clean_s - cf_s))
    total = sum(share.values())
    assert share[f"visual_frames:{a}:{b}"] >= 0.9 * total, share


# -- frame spans, batching, local_swap slices, representations --------------------------------
def test_frame_span_cutting_a_group_patches_the_whole_group(vlm):
    clean = random_video(0)
    recs = {}
    for spec in ("visual_frames:1:3", "visual_frames:0:4"):
        recs[spec], _ = ct.trace_sample(vlm, clean, {"reverse": reverse(clean)}, PROMPT,
                                        option_ids(vlm, 2), 1, spec, [1])
    cut, whole = recs["visual_frames:1:3"][0], recs["visual_frames:0:4"][0]
    assert (cut["groups"], cut["frames"], cut["exact"]) == ([0, 1], [[0, 4]], False)
    assert whole["exact"] and cut["positions"] == whole["positions"]
    assert cut["patched_score"] == whole["patched_score"]


def test_local_swap_reports_both_spans_their_union_and_text(vlm):
    clean = random_video(1)
    spans = ((0, 2), (4, 6))
    cfs = {"local_swap": clean[[4, 5, 2, 3, 0, 1, 6, 7]]}
    recs, _ = ct.trace_sample(vlm, clean, cfs, PROMPT, option_ids(vlm, 2), 1, "visual",
                              ["embed"], swap_spans=spans)
    by_role = {r["role"]: r for r in recs}
    assert set(by_role) == {"main", "spanA", "spanB", "union", "text"}
    assert by_role["union"]["token_slice"] == "visual_frames:0:2+visual_frames:4:6"
    assert by_role["union"]["groups"] == [0, 2]
    assert by_role["union"]["positions"] == by_role["spanA"]["positions"] + \
        by_role["spanB"]["positions"]
    assert by_role["text"]["effect"] == 0  # text embeddings are the same in both runs
    assert by_role["union"]["effect"] == pytest.approx(1.0)  # all the swapped frames restored


def test_batch_size_does_not_change_scores(vlm):
    clean = random_video(2)
    args = (vlm, clean, {"reverse": reverse(clean)}, PROMPT, option_ids(vlm, 2), 0,
            "visual_frames:2:6", ["embed", 0, 1, 2, 3])
    one, _ = ct.trace_sample(*args, batch_size=1)
    many, _ = ct.trace_sample(*args, batch_size=16)
    chosen = {}
    budget, _ = ct.trace_sample(*args, max_memory=1, info=chosen)  # 1 byte: one row per forward
    assert [r["layer"] for r in one] == [r["layer"] for r in many] == [r["layer"] for r in budget]
    np.testing.assert_allclose([r["patched_score"] for r in one],
                               [r["patched_score"] for r in many], atol=1e-5)
    np.testing.assert_allclose([r["patched_score"] for r in budget],
                               [r["patched_score"] for r in many], atol=1e-5)
    assert chosen["rows_per_forward"] == 1
    assert chosen["forwards"] == 1 + len(one)  # the recording pass, then one row per condition


def _bilinear_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Rows of weights resizing n_in samples to n_out, half-pixel centres (align_corners=False):
    output i reads input position (i + 0.5) * n_in / n_out - 0.5, clamped, linearly."""
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        x = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        x0 = min(int(np.floor(x)), n_in - 1)
        x1, frac = min(x0 + 1, n_in - 1), x - x0
        w[i, x0] += 1 - frac
        w[i, x1] += frac
    return w


def test_dumped_representations_are_the_originals_definitions(vlm):
    """inputs_mean / layers_mean pool over --token_slice (here frames 2-5, not all visual
    tokens), visual_mean over the visual tokens, vprime resizes both axes bilinearly."""
    clean = random_video(3)
    _, reps = ct.trace_sample(vlm, clean, {"reverse": reverse(clean)}, PROMPT, option_ids(vlm, 2),
                              0, "visual_frames:2:6", [0], dump=True, vprime_shape=(40, 24))
    inputs = vlm.prepare(text=PROMPT, video=[clean])
    vis = torch.nonzero(inputs["input_ids"][0] == vlm.torch_model.config.video_token_id).flatten()
    sl = vis[16:48]  # frames 2-5 = temporal groups 1 and 2, 16 tokens each
    lm = vlm.torch_model.model.language_model
    seen = {}
    hooks = [lm.layers[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0]))]
    hooks += [layer.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o))
              for i, layer in enumerate(lm.layers)]
    with torch.no_grad():
        vlm.torch_model(**inputs)
    for h in hooks:
        h.remove()
    r = reps["clean"]
    torch.testing.assert_close(r["visual_mean"], seen["in"][0, vis].mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(r["inputs_mean"], seen["in"][0, sl].mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(r["layers_mean"], torch.stack(
        [seen[i][0, sl].mean(0) for i in range(vlm.n_layers)]), atol=1e-5, rtol=0)
    v = seen["in"][0, vis].double().numpy()  # [64 tokens, 64 hidden]
    hand = _bilinear_matrix(40, v.shape[0]) @ v @ _bilinear_matrix(24, v.shape[1]).T
    assert r["vprime"].shape == (40, 24) and r["vprime"].dtype == torch.float16
    np.testing.assert_allclose(r["vprime"].float().numpy(), hand, atol=2e-3, rtol=1e-3)
    assert set(reps) == {"clean", "reverse"}
    _, default = ct.trace_sample(vlm, clean, {"reverse": reverse(clean)}, PROMPT,
                                 option_ids(vlm, 2), 0, "visual", [0], dump=True)
    assert default["reverse"]["vprime"].shape == (128, 1024)  # the original's --vprime_n/--vprime_d


def test_frame_spans_line_up_with_video_grid(vlm):
    """Token indexing check: perturbing frames 2:4 changes exactly the tokens of group 1."""
    clean = random_video(4)
    changed = clean.copy()
    changed[2:4] = 255 - changed[2:4]
    inputs = vlm.prepare(text="x", video=[clean, changed])
    t, h, w = inputs["video_grid_thw"][0].tolist()
    lay = vlm.layout(inputs)
    assert len(lay[0].videos[0].groups) == t and len(lay.positions("visual")) == t * h * w // 4
    with torch.no_grad(), vlm.trace(inputs):
        x = vlm.layers[0].input.save()
    diff = (x[0] - x[1]).abs().sum(-1) > 0
    expected = torch.zeros_like(diff)
    expected[lay.positions("visual_frames:2:4")] = True
    assert torch.equal(diff, expected)


def test_bad_layers_and_directions_name_the_input(vlm):
    with pytest.raises(ValueError, match="beyond the model's 4 decoder layers"):
        ct.parse_layers("embed,7", 4)
    with pytest.raises(ValueError, match="'x'"):
        ct.parse_layers("0,x", 4)
    assert ct.parse_layers("3,embed,0:2,-1", 4) == ["embed", 0, 1, 3]
    with pytest.raises(ValueError, match="direction 'sideways'"):
        pair = vlm.prepare(text=PROMPT, video=[random_video(0), random_video(1)])
        ct.run_chunk(vlm, pair, [], [0, 1], 0, direction="sideways")
