"""The model zoo: shipped weights load offline, their cards' held-out numbers are reproduced on
freshly generated data, and the training script is seeded.

CI never retrains: the card test regenerates the held-out items from the card's seed (a stream
training never draws from) and re-scores the shipped weights with the recipes' scoring.
"""

import json

import numpy as np
import pytest
import torch
from support import tiny

import vlminterp
from vlminterp import zoo
from vlminterp.zoo import train as zoo_train
from vlminterp.zoo.specs import SPECS

pytestmark = pytest.mark.usefixtures("one_thread")

VIDEO_ZOO = [z for z in zoo.ZOO_IDS if SPECS[z].task == "vlminterp.zoo.video_model:VideoMC"]
TOLERANCE = 0.01  # accuracy points: float differences across machines may flip a near-tie


def test_weights_fit_the_size_budget_and_match_their_cards():
    total = 0
    for zoo_id in zoo.ZOO_IDS:
        card = zoo.card(zoo_id)
        path = zoo.WEIGHTS_DIR / card["weights"]["file"]
        size = path.stat().st_size
        total += size
        assert size <= 5 * 2**20 and size == card["weights"]["bytes"], zoo_id
        import hashlib

        assert hashlib.sha256(path.read_bytes()).hexdigest() == card["weights"]["sha256"]
        assert card["architecture"]["base"] in ("tiny-qwen2-vl", "tiny-llava", "tiny-clip-vit",
                                                "tiny-qwen3-vl", "tiny-llava-onevision")
        assert card["training"]["seed"] == 0 and card["heldout"]["seed"] != card["training"]["seed"]
    assert total <= 20 * 2**20


@pytest.mark.parametrize("zoo_id", zoo.ZOO_IDS)
def test_zoo_model_loads_offline_and_traces_like_the_plain_forward(zoo_id):
    vlm = tiny(zoo_id)
    assert vlm.model_id == zoo_id and not vlm.torch_model.training
    ref, _, _ = zoo.build(zoo_id)  # the same weights, built again without nnsight
    for (name, a), b in zip(vlm.torch_model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), name
    if vlm.family.name == "clip":
        from vlminterp.zoo.image_task import heldout_items

        inputs = vlm.prepare(images=[heldout_items(5, 1)[0].image])
        with torch.no_grad(), vlm.trace(inputs):
            out = vlm.model.output.save()
        with torch.no_grad():  # open_clip's forward: (image features, text features, scale)
            plain = ref(inputs["image"])
        torch.testing.assert_close(out[0], plain[0])
        return
    if "image_task" in SPECS[zoo_id].data:
        from vlminterp.zoo.image_task import heldout_items

        inputs = vlm.prepare(text="What is the main object in this image?",
                             images=[heldout_items(5, 1)[0].image])
    else:
        from vlminterp.zoo.video_task import heldout_items

        item = heldout_items(5, 1)[0]
        inputs = vlm.prepare(text=item.prompt, video=[item.clip.frames()])
    with torch.no_grad(), vlm.trace(inputs):
        logits = vlm.lm_head.output.save()
    torch.testing.assert_close(logits, vlm.forward(inputs))


# Fresh held-out data: a seed neither training ([0, 0]) nor the cards ([1, 1]) draw from. With
# 20 items per kind (per class for the image models) a model at the 95% bar scores >= 0.9
# unless it is really worse: 0.9 is the bar less ~2 standard errors of a 20-item sample.
FRESH_SEED, FRESH_N, FRESH_BAR = 11, 20, 0.9


@pytest.mark.parametrize("zoo_id", zoo.ZOO_IDS)
def test_shipped_weights_clear_the_bar_on_fresh_heldout_data(zoo_id):
    card = zoo.card(zoo_id)
    model, processor, _ = zoo.build(zoo_id)
    n = FRESH_N if zoo_id in VIDEO_ZOO else FRESH_N // 4
    got = zoo.evaluate_model(SPECS[zoo_id], model, processor, seed=FRESH_SEED, n=n)["by_kind"]
    assert set(got) == set(card["heldout"]["by_kind"])
    low = {k: v["accuracy"] for k, v in got.items() if v["accuracy"] < FRESH_BAR}
    assert not low, (zoo_id, low, got)


@pytest.mark.slow
@pytest.mark.parametrize("zoo_id", zoo.ZOO_IDS)
def test_card_heldout_numbers_are_reproduced(zoo_id):
    card = zoo.card(zoo_id)
    model, processor, _ = zoo.build(zoo_id)
    got = zoo.evaluate_model(SPECS[zoo_id], model, processor, seed=card["heldout"]["seed"],
                             n=card["heldout"]["n_per_kind"])
    for kind, want in card["heldout"]["by_kind"].items():
        assert got["by_kind"][kind]["n"] == want["n"]
        assert abs(got["by_kind"][kind]["accuracy"] - want["accuracy"]) <= TOLERANCE, kind
        assert want["accuracy"] >= 0.95, (zoo_id, kind, want)  # the bar, per kind


def test_unknown_id_and_changed_tokenizer_are_one_line_errors(monkeypatch):
    with pytest.raises(ValueError, match="'tiny-nope' is not a zoo model"):
        zoo.card("tiny-nope")
    real = zoo.card
    monkeypatch.setattr(zoo, "card", lambda i: {**real(i), "architecture": {
        **real(i)["architecture"], "tokenizer_digest": "0000"}})
    with pytest.raises(ValueError, match="tiny tokenizer changed since the weights were trained"):
        zoo.build("tiny-llava-objects")


def test_training_is_seeded_and_writes_weights_card_and_curve(tmp_path):
    runs = []
    for out in ("a", "b"):
        card = zoo_train.main(["tiny-clip-shapes", "--seed", "3", "--steps", "3", "--eval_n", "1",
                               "--out", str(tmp_path / out)])
        runs.append(card)
    assert runs[0]["weights"]["sha256"] == runs[1]["weights"]["sha256"]  # same seed, same weights
    other = zoo_train.main(["tiny-clip-shapes", "--seed", "4", "--steps", "3", "--eval_n", "1",
                            "--out", str(tmp_path / "c")])
    assert other["weights"]["sha256"] != runs[0]["weights"]["sha256"]
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["tiny-clip-shapes.json", "tiny-clip-shapes.safetensors", "tiny-clip-shapes_loss.png"]
    saved = json.loads((tmp_path / "a" / "tiny-clip-shapes.json").read_text())
    assert saved["training"]["steps"] == 3 and saved["heldout"]["n_per_kind"] == 1
    assert set(saved["heldout"]["by_kind"]) >= {"cat", "all"}


@pytest.mark.parametrize("zoo_id", VIDEO_ZOO)
def test_fast_training_batches_equal_the_processor_and_plain_attention(zoo_id):
    from vlminterp.zoo.video_model import VideoMC

    model, processor, _ = zoo.build(zoo_id)
    diff = VideoMC(model, processor).self_check(np.random.default_rng(0))
    assert diff < 1e-4
    assert vlminterp.load(zoo_id).torch_model.config._attn_implementation == "eager"


@pytest.mark.parametrize("zoo_id", zoo.ZOO_IDS)
def test_readme_zoo_table_quotes_the_cards_accuracy(zoo_id):
    """The README's model-zoo row of each id states the held-out accuracies its card holds."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    rows = [line for line in readme.splitlines() if line.startswith(f"| `{zoo_id}` (")]
    assert len(rows) == 1, f"README: expected one zoo table row for {zoo_id}, found {len(rows)}"
    accuracy_cell = rows[0].split(" | ")[3]
    quoted = {float(x) for x in re.findall(r"\b[01]\.\d{3}\b", accuracy_cell)}
    card = zoo.card(zoo_id)["heldout"]["by_kind"]
    assert quoted == {round(v["accuracy"], 3) for k, v in card.items() if k != "all"}, accuracy_cell


def test_readme_bring_your_own_method_example_finds_the_known_answer(tmp_path, capsys):
    import runpy
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Bring your own method", 1)[1]
    script = tmp_path / "byo_method.py"  # nnsight reads a trace's body back from its file
    script.write_text(section.split("```python\n", 1)[1].split("```", 1)[0], encoding="utf-8")
    effects = runpy.run_path(str(script))["effects"]
    assert list(effects) == ["frames 0-3", "frames 4-7"]
    assert effects["frames 0-3"] >= 0.9 and abs(effects["frames 4-7"]) <= 0.1, effects
    assert str(effects) in capsys.readouterr().out


@pytest.mark.parametrize("zoo_id", [z for z in zoo.ZOO_IDS
                                     if SPECS[z].task.startswith("vlminterp.zoo.llava_objects:")])
def test_objects_models_train_on_the_prompts_the_neo_recipes_send(zoo_id):
    """Training builds its rows from the prompt text and appends the answers as token ids;
    the recipes prepare prompts through the processor: both must give the model the same
    token ids, and the same answer token."""
    from vlminterp.data.synthetic_images import ZOO_CATEGORIES, zoo_image
    from vlminterp.neo2024.prompts import TASKS, Prompt, answer_id, prompt_inputs
    from vlminterp.zoo.llava_objects import continuation_id, prompt_text

    vlm = tiny(zoo_id)
    category = list(ZOO_CATEGORIES)[0]
    image, _ = zoo_image(np.random.RandomState(0), category)
    for task in ("vqa", "polling"):
        prompt = Prompt(TASKS[task].question.format(category=category), TASKS[task].answer_prefix)
        sent = prompt_inputs(vlm, [image], prompt.question, prompt.answer_prefix)
        trained = vlm.prepare(text=prompt_text(vlm, prompt), images=[image], chat=False)
        assert torch.equal(sent["input_ids"], trained["input_ids"])
        word = category if task == "vqa" else "Yes"
        assert answer_id(vlm, image, prompt, word, sent) == \
            continuation_id(vlm.tokenizer, prompt_text(vlm, prompt), word)


def test_background_swap_replaces_only_tokens_that_are_background_in_both_rows():
    """`LocalObjectsLM` (the OneVision objects model's training) swaps LM-input tokens between
    rows only where neither image's object nor its buffer ring is, in any view."""
    import contextlib

    from vlminterp.models.resolve import language_model
    from vlminterp.zoo import image_task
    from vlminterp.zoo.llava_objects import LocalObjectsLM

    model, processor, _ = zoo.build("tiny-llava-onevision-objects")
    task = LocalObjectsLM(model, processor)
    items = image_task.train_items(np.random.default_rng(0), 6)
    inputs, _, _, _, background = task.batch(items, np.random.default_rng(1))
    seen = []

    def lm_input(swap):
        with torch.no_grad(), swap:  # registered after the swap: it sees the swapped input
            hook = language_model(model).register_forward_pre_hook(
                lambda m, a, kw: seen.append(kw["inputs_embeds"].detach().clone()),
                with_kwargs=True)
            model(**inputs)
        hook.remove()

    lm_input(contextlib.nullcontext())
    lm_input(task.swap_background(np.random.default_rng(3), background))
    changed = (seen[0] - seen[1]).abs().sum(-1) > 0
    assert changed.any()
    for r in range(len(items)):
        moved = torch.nonzero(changed[r]).flatten()
        assert set(moved.tolist()) <= set(background[r]), r
        assert (inputs["input_ids"][r, moved] == model.config.image_token_id).all(), r
