"""Neo et al. 2024 library on tiny models, each core number against hand-written PyTorch."""

import pytest
import torch
from support import random_image, tiny

from vlminterp import neo2024 as neo
from vlminterp.data.coco import read_coco
from vlminterp.data.synthetic_images import write_dataset
from vlminterp.interventions import knockout_attention_rows


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("objects")
    coco, samples = read_coco(write_dataset(root, 3, seed=1), root)
    return coco, samples


@pytest.fixture(scope="module")
def llava():
    return tiny("tiny-llava")


def _hf_layers(vlm):
    return vlm.torch_model.model.language_model.layers


def _replace_lm_input(vlm, fn):
    """Plain PyTorch: a pre-hook on decoder layer 0 that edits its hidden_states."""
    def hook(module, args, kwargs):
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
    return _hf_layers(vlm)[0].register_forward_pre_hook(hook, with_kwargs=True)


@pytest.fixture(scope="module")
def mean(llava, data, tmp_path_factory):
    coco, samples = data
    return neo.dataset_mean(llava, coco, samples, tmp_path_factory.mktemp("mean"), progress=False)


# -- prompts ----------------------------------------------------------------------------------

def _prompt_text(vlm, inputs, row=0):
    ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()]
    return vlm.tokenizer.decode(ids)


def test_prompts_are_family_aware(llava):
    image = random_image(0)
    inputs = neo.prompt_inputs(llava, [image], "What is it?", "It is a")
    # LLaVA-1.5's chat template ends in "ASSISTANT:": the original's prompt, a space before the reply
    assert _prompt_text(llava, inputs).replace("<image>", "") == \
        "USER: \nWhat is it? ASSISTANT: It is a"
    assert neo.token_text(llava, neo.answer_id(llava, image, neo.Prompt("What is it?", "It is a"),
                                               "cat")) == " cat"
    qwen = tiny("tiny-qwen2-vl")
    inputs = neo.prompt_inputs(qwen, [image], "What is it?", "It is a")
    text = _prompt_text(qwen, inputs)
    assert "<|vision_start|><|image_pad|>" in text and text.endswith("assistant\nIt is a")
    assert len(qwen.layout(inputs)[0].images) == 1
    poll = neo.Prompt("Is there a cat in this image?")
    assert neo.token_text(qwen, neo.answer_id(qwen, image, poll, "Yes")) == "Yes"


def test_per_image_questions(tmp_path, data):
    _, samples = data
    path = tmp_path / "q.json"
    path.write_text('{"1": ["What animal is this?", "x"], "images/00001.png": "Which vehicle?"}')
    questions = neo.load_questions(path)
    assert [neo.question_for(questions, s) for s in samples] == ["What animal is this?", "Which vehicle?", None]
    assert neo.vqa_task("Q?").question == "Q?" and neo.vqa_task(None) is neo.TASKS["vqa"]
    path.write_text('{"1": 3}')
    with pytest.raises(SystemExit, match=r"q.json: \['1'\]: expected a question string"):
        neo.load_questions(path)
    # the original's clean_questions.json: every image id -> a list of 0 or 1 questions
    path.write_text('{"1": [], "2": ["What is the person holding?"], "3": []}')
    questions = neo.load_questions(path)
    assert questions == {"2": "What is the person holding?"}
    assert [neo.question_for(questions, s) for s in samples] == [None, "What is the person holding?", None]


def test_first_token_rule(llava):
    cat = neo.answer_id(llava, random_image(0), neo.Prompt("What is it?", "It is a"), "cat")
    assert neo.first_token_match(llava, cat, cat)
    c = llava.token_id(" c")
    assert neo.first_token_match(llava, c, cat)  # "cat" starts with "c", as in the original
    assert not neo.first_token_match(llava, llava.token_id(" dog"), cat)
    assert not neo.first_token_match(llava, llava.token_id(" "), cat)  # empty is never right
    assert neo.names_object("A black Cat sits.", "cat") and not neo.names_object("concatenate", "cat")


# -- mean ablation at the LM input ------------------------------------------------------------

@pytest.mark.parametrize("model_id", ["tiny-llava", "tiny-qwen2-vl"])
def test_lm_input_holds_the_projected_image_features(model_id, data):
    """The ablation site: layer 0's input carries the projector's output at the visual
    positions (vlm.embed's output does not — the features are merged in after it)."""
    vlm = tiny(model_id)
    coco, samples = data
    inputs = neo.prompt_inputs(vlm, [coco.load_image(samples[0])], "Describe this image.")
    projector = getattr(vlm.torch_model.model, "multi_modal_projector", None)
    projector = projector if projector is not None else vlm.torch_model.model.visual.merger
    seen = {}
    handle = projector.register_forward_hook(
        lambda m, a, out: seen.setdefault("features", out.detach().clone()))
    try:
        visual = neo.lm_input_visual(vlm, inputs)
    finally:
        handle.remove()
    features = seen["features"].reshape(-1, visual.shape[-1])
    torch.testing.assert_close(visual, features, atol=1e-6, rtol=0)
    with torch.no_grad(), vlm.trace(inputs):
        embedded = vlm.embed.output[0].save()
    assert not torch.allclose(embedded[vlm.layout(inputs)[0].visual], visual)


def test_mean_ablation_equals_plain_pytorch(llava, data, mean):
    coco, samples = data
    sample = samples[0]
    inputs, _, answer = neo.task_inputs(llava, coco.load_image(sample), neo.TASKS["vqa"], sample.category)
    row = llava.layout(inputs)[0]
    obj = row.visual[neo.object_indices(row.images[0], sample, 1)]
    got = neo.ablated_logits(llava, inputs, [None, obj], mean)

    def put_mean(h):
        h = h.clone()
        h[:, obj] = mean
        return h

    handle = _replace_lm_input(llava, put_mean)
    try:
        ref = llava.forward(inputs)[0, -1]
    finally:
        handle.remove()
    torch.testing.assert_close(got[1], ref, atol=1e-5, rtol=0)
    p_ref = torch.softmax(ref, -1)[answer].item()
    assert neo.score(llava, got, answer)[1]["p_correct"] == pytest.approx(p_ref, rel=1e-5)
    assert (got[0] - got[1]).abs().max() > 1e-4  # the ablation did something
    torch.testing.assert_close(got[0], llava.forward(inputs)[0, -1], atol=1e-5, rtol=0)


def test_ablating_every_visual_token_removes_the_image(llava, data, mean):
    coco, samples = data
    logits = []
    for s in samples[:2]:
        inputs = neo.prompt_inputs(llava, [coco.load_image(s)], "What is it?", "It is a")
        logits.append(neo.ablated_logits(llava, inputs, [llava.layout(inputs)[0].visual], mean)[0])
    assert torch.equal(logits[0], logits[1])


def test_generation_under_ablation_equals_a_plain_greedy_loop(llava, data, mean):
    coco, samples = data
    inputs = neo.prompt_inputs(llava, [coco.load_image(samples[0])], "Describe this image.")
    pos = llava.layout(inputs)[0].visual[:6]
    texts = neo.ablated_generate(llava, inputs, [None, pos], mean, max_new_tokens=4)

    def put_mean(h):
        if h.shape[1] > pos.max():  # the prompt's forward (no KV cache here: full sequences)
            h = h.clone()
            h[:, pos] = mean
        return h

    handle = _replace_lm_input(llava, put_mean)
    try:
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        for _ in range(4):
            with torch.no_grad():
                out = llava.torch_model(input_ids=ids, attention_mask=mask,
                                        pixel_values=inputs["pixel_values"], use_cache=False)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    finally:
        handle.remove()
    ref = llava.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert texts[1] == ref and texts[0] != texts[1]


# -- token subsets ----------------------------------------------------------------------------

def test_token_subsets():
    visual = torch.ones(20, 8)
    visual[[3, 11]] *= 10
    assert neo.register_indices(visual).tolist() == [3, 11]
    a, b = neo.random_indices(20, 5, "1:2", 0), neo.random_indices(20, 5, "1:2", 0)
    assert torch.equal(a, b) and len(set(a.tolist())) == 5
    assert not torch.equal(a, neo.random_indices(20, 5, "1:3", 0))
    assert neo.top_indices(torch.tensor([0.1, 5.0, -1.0, 3.0]), 2).tolist() == [1, 3]
    assert neo.subset_sizes([5, 10, 40], 16, 7) == {"5": 5, "10": 10, "obj": 7}


def test_object_indices_follow_the_layout(llava, data):
    coco, samples = data
    sample = samples[0]
    inputs = neo.prompt_inputs(llava, [coco.load_image(sample)], "What is it?")
    span = llava.layout(inputs)[0].images[0]
    idx = neo.object_indices(span, sample, 0)
    cells = [(int(i) // 4, int(i) % 4) for i in idx]
    box = set(span.geometry.box_cells(sample.box))
    assert cells and set(cells) <= box  # the polygon's cells lie within its box's cells
    assert set(neo.object_indices(span, sample, 0, use_polygons=False).tolist()) == \
        {r * 4 + c for r, c in box}
    assert set(idx.tolist()) <= set(neo.object_indices(span, sample, 1).tolist())


# -- integrated gradients ---------------------------------------------------------------------

def test_integrated_gradients_equals_hand_riemann_sum(llava, data, mean):
    coco, samples = data
    sample = samples[1]
    inputs, _, yes = neo.task_inputs(llava, coco.load_image(sample), neo.TASKS["polling"], sample.category)
    pos = llava.layout(inputs)[0].visual
    steps = 6
    got = neo.integrated_gradients(llava, inputs, yes, mean, steps=steps, batch_size=4)

    x = neo.lm_input_visual(llava, inputs)
    total = torch.zeros_like(x)
    for k in range(steps):
        alpha = (k + 0.5) / steps
        leaf = (mean + alpha * (x - mean)).requires_grad_(True)

        def put(h):
            h = h.clone()
            h[0, pos] = leaf
            return h

        handle = _replace_lm_input(llava, put)
        try:
            logit = llava.torch_model(**dict(inputs)).logits[0, -1, yes]
            total += torch.autograd.grad(logit, leaf)[0]
        finally:
            handle.remove()
    ref = (x - mean) * total / steps
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-4)
    # completeness: the attributions add up to f(x) - f(baseline)
    full = neo.ablated_logits(llava, inputs, [None, pos], mean)[:, yes]
    assert got.sum().item() == pytest.approx((full[0] - full[1]).item(), rel=0.05, abs=1e-4)


# -- attention knockout -----------------------------------------------------------------------

def _mask_hooks(vlm, blocked: dict[int, list[tuple[int, int]]], seq: int):
    """Plain PyTorch: each self_attn gets a hand-built additive causal mask with -inf-like
    entries at the blocked (query, key) pairs, via its attention_mask kwarg."""
    handles = []
    lowest = torch.finfo(torch.float32).min
    for i, layer in enumerate(_hf_layers(vlm)):
        mask = torch.zeros(1, 1, seq, seq)
        mask[0, 0][torch.ones(seq, seq, dtype=torch.bool).triu(1)] = lowest
        for q, k in blocked.get(i, []):
            mask[0, 0, q, k] = lowest

        def hook(module, args, kwargs, mask=mask):
            return args, {**kwargs, "attention_mask": mask}
        handles.append(layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


def test_knockout_equals_hand_built_mask(llava, data):
    coco, samples = data
    sample = samples[0]
    inputs, _, answer = neo.task_inputs(llava, coco.load_image(sample), neo.TASKS["vqa"], sample.category)
    row = llava.layout(inputs)[0]
    src = row.visual[neo.object_indices(row.images[0], sample, 1)]
    tgt = torch.tensor([row.last])
    layers = [1, 2]
    got = neo.knockout_logits(llava, inputs, [None, (src, tgt, layers)])
    handles = _mask_hooks(llava, {i: [(row.last, int(k)) for k in src] for i in layers}, row.seq_len)
    try:
        ref = llava.forward(inputs)[0, -1]
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(got[1], ref, atol=1e-5, rtol=0)
    p_ref = torch.softmax(ref, -1)[answer].item()
    assert neo.score(llava, got, answer)[1]["p_correct"] == pytest.approx(p_ref, rel=1e-5)
    assert (got[0] - got[1]).abs().max() > 1e-5


def _hand_knockout_p(vlm, inputs, pairs_by_layer, answer):
    handles = _mask_hooks(vlm, pairs_by_layer, vlm.layout(inputs)[0].seq_len)
    try:
        return torch.softmax(vlm.forward(inputs)[0, -1], -1)[answer].item()
    finally:
        for h in handles:
            h.remove()


def test_knockout_pairs_product_cuts_self_attention_where_sets_overlap(llava, data):
    """obj_b1 -> last_row, over all layers: the original's product cuts every (target,
    source) pair, a last-row object cell from itself included; no_self keeps the diagonal."""
    coco, samples = data
    found = 0
    for sample in samples:
        image = coco.load_image(sample)
        inputs, _, answer = neo.task_inputs(llava, image, neo.TASKS["vqa"], sample.category)
        row = llava.layout(inputs)[0]
        span = row.images[0]
        obj = {b: span.positions[neo.object_indices(span, sample, b)] for b in (0, 1, 2)}
        sources, targets = neo.knockout_sets(row, obj)
        src, tgt = sources["obj_b1"], targets["last_row"]
        if not len(obj[0]) or not torch.isin(tgt, src).any():
            continue
        found += 1
        layers = neo.layer_groups(llava.n_layers)["all"]
        recs = {r["pairs"]: r for pairs in neo.PAIRS for r in neo.attention_knockout(
            llava, image, sample, sources=["obj_b1"], targets=["last_row"], groups=True, keep_all=True,
            pairs=pairs) if r["layers"] == "all"}
        product = [(int(t), int(k)) for t in tgt for k in src]
        for pairs, edges in (("product", product), ("no_self", [(t, k) for t, k in product if t != k])):
            hand = _hand_knockout_p(llava, inputs, {i: edges for i in layers}, answer)
            assert recs[pairs]["p_correct"] == pytest.approx(hand, rel=1e-5, abs=1e-7)
            assert recs[pairs]["n_overlap"] == int(torch.isin(tgt, src).sum())
        assert recs["product"]["p_correct"] != pytest.approx(recs["no_self"]["p_correct"], rel=1e-6)
    assert found, "no sample whose buffered object reaches the image's last row"
    with pytest.raises(ValueError, match="knockout pairs 'all'"):
        neo.knockout_blocks(torch.tensor([1]), torch.tensor([1]), "all")


def test_knocked_out_weights_are_exactly_zero(llava, data):
    coco, samples = data
    inputs = neo.prompt_inputs(llava, [coco.load_image(samples[0])], "What is it?", "It is a")
    row = llava.layout(inputs)[0]
    src, tgt = row.visual[:5], row.text[row.text > row.visual.max()]
    probs = []
    with torch.no_grad(), llava.trace(inputs):
        for i in range(4):  # in execution order: edit layer i's mask, then read its weights
            knockout_attention_rows(llava, [(0, src, tgt, [i] if i in (0, 3) else [])])
            probs.append(llava.layers[i].self_attn.output[1].save())
    for i in (0, 3):
        assert probs[i][0][:, tgt[:, None], src[None, :]].abs().max().item() == 0.0
    assert probs[1][0][:, tgt[:, None], src[None, :]].min().item() > 0.0


@pytest.mark.parametrize("model_id, attn", [("tiny-llava", None), ("tiny-llava", "sdpa"),
                                            ("tiny-qwen2-vl", None)])
def test_knockout_of_all_visual_to_text_makes_the_answer_image_independent(model_id, attn):
    vlm = tiny(model_id, **({"attn_implementation": attn} if attn else {}))
    logits = []
    for seed in (0, 1):
        inputs = neo.prompt_inputs(vlm, [random_image(seed)], "What is it?", "It is a")
        row = vlm.layout(inputs)[0]
        text_after = row.text[row.text > row.visual.max()]
        everything = list(range(vlm.n_layers))
        out = neo.knockout_logits(vlm, inputs, [None, (row.visual, text_after, everything),
                                                (row.visual[:0], text_after, everything),
                                                (row.visual, text_after, [])])
        assert torch.equal(out[0], out[2]) and torch.equal(out[0], out[3])  # empty = no change
        logits.append(out)
    assert torch.equal(logits[0][1], logits[1][1])  # knocked out: identical for both images
    assert not torch.equal(logits[0][0], logits[1][0])  # not knocked out: the image matters


def test_layer_groups_and_windows():
    assert neo.layer_groups(32) == {"early": list(range(10)), "mid": list(range(11, 21)),
                                    "late": list(range(21, 32)), "early_mid": list(range(5, 15)),
                                    "mid_late": list(range(15, 25)), "all": list(range(32))}
    small = neo.layer_groups(4)
    assert all(g and set(g) <= set(range(4)) for g in small.values()) and small["all"] == [0, 1, 2, 3]
    assert neo.sliding_windows(4, 2) == {"window_0": [0, 1], "window_1": [1, 2], "window_2": [2, 3]}
    assert neo.sliding_windows(4, 9) == {"window_0": [0, 1, 2, 3]}


def test_knockout_sets(llava, data):
    coco, samples = data
    inputs = neo.prompt_inputs(llava, [coco.load_image(samples[0])], "What is it?", "It is a")
    row = llava.layout(inputs)[0]
    span = row.images[0]
    obj = {b: span.positions[neo.object_indices(span, samples[0], b)] for b in (0, 1, 2)}
    sources, targets = neo.knockout_sets(row, obj)
    assert set(sources["image_minus_obj_b1"].tolist()) == set(row.visual.tolist()) - set(obj[1].tolist())
    assert targets["last"].tolist() == [row.last]
    assert targets["last_row"].tolist() == row.visual[-4:].tolist()
    assert row.last not in targets["text"].tolist() and (targets["text"] > row.visual.max()).all()


# -- logit lens -------------------------------------------------------------------------------

def test_logit_lens_top5_equals_plain_hooks(llava, data):
    coco, samples = data
    inputs = neo.prompt_inputs(llava, [coco.load_image(samples[0])], "Describe the image.")
    ids, probs, tracked = neo.logit_lens_topk(llava, inputs, k=5, track=[7, 9])
    outs = {}
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o[0] if isinstance(o, tuple) else o))
               for i, layer in enumerate(_hf_layers(llava))]
    try:
        final = llava.forward(inputs)
    finally:
        for h in handles:
            h.remove()
    lm = llava.torch_model
    pos = int(llava.layout(inputs)[0].visual[5])
    for layer in (1, llava.n_layers - 1):
        with torch.no_grad():
            p = torch.softmax(lm.lm_head(lm.model.language_model.norm(outs[layer][0])), -1)
        top = p.topk(5, dim=-1)
        assert torch.equal(ids[layer, pos], top.indices[pos])
        torch.testing.assert_close(probs[layer, pos], top.values[pos], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(tracked[layer], p[:, [7, 9]].sum(-1), atol=1e-6, rtol=1e-5)
    # the last layer's lens is the model's own output (no double norm)
    assert torch.equal(ids[-1, -1], final[0, -1].topk(5).indices)


def test_lens_image_fractions(llava, data):
    coco, samples = data
    sample = samples[2]
    record, tensors, meta = neo.lens_image(llava, coco.load_image(sample), sample, k=5)
    n = llava.n_layers
    assert len(record["object_fraction"]) == n and tensors["ids"].shape[0] == n
    hits = torch.isin(tensors["ids"][:, meta["visual"]], torch.tensor(record["category_token_ids"])).any(-1)
    obj = meta["object_indices"]
    assert record["object_fraction"] == pytest.approx(hits[:, obj].float().mean(1).tolist())
    assert all(0.0 <= f <= 1.0 for f in record["object_fraction"])
    for t in record["category_token_ids"]:
        assert sample.category.startswith(neo.token_text(llava, t).strip().lower())


def test_object_ablation_records(llava, data, mean):
    coco, samples = data
    sample = samples[0]
    records = neo.object_ablation(llava, coco.load_image(sample), sample, mean, tasks=("vqa", "polling"),
                                  sizes=(2, 4), ig_steps=4, keep_all=True)
    conds = [r["condition"] for r in records if r["task"] == "vqa"]
    assert conds == ["baseline", "object_b0", "object_b1", "object_b2", "register", "random_2",
                     "random_4", "random_obj", "ig_2", "ig_4", "ig_obj"]
    by = {r["condition"]: r for r in records if r["task"] == "vqa"}
    assert by["random_obj"]["n_tokens"] == by["ig_obj"]["n_tokens"] == by["object_b1"]["n_tokens"]
    assert all(0 <= r["p_correct"] <= 1 and 0 <= r["p_generated"] <= 1 for r in records)
    skipped = neo.object_ablation(llava, coco.load_image(sample), sample, mean, tasks=("vqa",),
                                  sizes=(2,), ig_steps=2, keep_all=False)
    if not by["baseline"]["correct"]:
        assert len(skipped) == 1 and skipped[0]["skipped"] == "baseline incorrect"
