"""Recovery on the motion models (``tiny-qwen2-vl-motion``, ``tiny-qwen3-vl-motion``): causal
tracing finds the mechanism planted in the data.

Each model was trained on clips whose answers live in known temporal groups (see
`vlminterp.zoo.video_task`). Each test runs the library's tracing (`causal_tracing.trace_sample`,
the code the recipe runs) and checks that the effect lands where the answer is.

The *visual entry* of a token slice is everything the vision side hands the LM there: the LM
input and, on Qwen3-VL, the deepstack features added to the same positions after layers 0 and 1
(outside the layer modules). `_entry_effects` patches it by hand (`patch` of the LM input with
`expand_rows(carry=)`, a no-op on Qwen2-VL); the tracing's ``embed`` must equal it on both models
(it carries the later inputs by default, ``late_inputs="carry"``). With
``late_inputs="counterfactual"`` the tracing patches the LM input alone; on tiny-qwen3-vl-motion
that is not the entry: for a square in frames 0-1 it restores -0.005 of the answer, the deepstack
features alone 0.07, both together 1.0 (the layers need the two together).

* presence in the first half: with ``local_swap`` and ``reverse`` counterfactuals that move the
  square out of the first half, >= 90% of the summed |effect| over the four frame spans at the
  visual entry (where a span's tokens hold only its frames) falls on the span that held the
  square; at every layer the spans before it carry nothing (causal attention), and at the last
  layer no frame span does (the answer has moved to the text). Over all layers the share is
  lower on Qwen2-VL: from layer 1 on, the tokens of the frames after the square read it (up to
  0.41 of the effect on frames 4-5 at layer 2 for a square in frames 2-3), a real step of the
  model's computation;
* colour: a reversed clip has the same answer and a total effect below the tracing's default
  threshold (0.05 logits), so its records are marked unstable;
* direction: the clean visual entry of all frames restores >= 90% of the clean margin in the
  reversed run, the text tokens at ``embed`` <= 10%. The tracing's ``embed`` number for the
  visual tokens is printed; on Qwen3-VL it is 0.05-0.31 (most of the direction signal reaches
  the LM through the deepstack features).
"""

import numpy as np
import pytest
import torch
from support import tiny

from vlminterp.interventions import expand_rows, patch
from vlminterp.metrics import option_margin
from vlminterp.video import causal_tracing as ct
from vlminterp.video.counterfactuals import local_swap, reverse
from vlminterp.video.multiple_choice import option_ids
from vlminterp.zoo import video_task
from vlminterp.zoo.video_task import Clip, Item

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
SPANS = ["visual_frames:0:2", "visual_frames:2:4", "visual_frames:4:6", "visual_frames:6:8"]


VIDEO_ZOO = ["tiny-qwen2-vl-motion", "tiny-qwen3-vl-motion"]


@pytest.fixture(scope="module", params=VIDEO_ZOO)
def vlm(request):
    return tiny(request.param)


def _clip(groups, direction="right", colour="red", hold=2, row=42):  # a held-out row
    return Clip(direction, colour, tuple(groups), hold, (6, 92), row)


def _trace(vlm, item, counterfactuals, spans_of_slices, layers, swap_spans=None):
    """Records of every (counterfactual, layer, slice) for one item."""
    clean = item.clip.frames()
    records = []
    for spec in spans_of_slices:
        recs, _ = ct.trace_sample(vlm, clean, counterfactuals(clean), item.prompt,
                                  option_ids(vlm, len(item.candidates)), item.answer_index,
                                  token_slice=spec, layers=layers, swap_spans=swap_spans)
        records += [r for r in recs if r["role"] == "main"]
    return records


def _entry_effects(vlm, item, cf, specs) -> list[float]:
    """Denoising effect of the clean run's visual entry at each token slice of ``specs`` in the
    run on ``cf``: the LM input there and, carried with it, what enters there later (Qwen3-VL's
    deepstack features; nothing on Qwen2-VL). One patched row per slice, one forward."""
    clean = item.clip.frames()
    pair = vlm.prepare(text=item.prompt, video=[clean, cf])
    lay = vlm.layout(pair)
    positions = [lay.positions(spec, 0) for spec in specs]
    rows = range(2, 2 + len(specs))
    with torch.no_grad(), vlm.trace(pair):
        expand_rows(vlm, [0, 1] + [1] * len(specs),
                    carry=[(0, [r], p, "embed") for r, p in zip(rows, positions)])
        for r, p in zip(rows, positions):
            patch(vlm.residual("embed"), p, src_row=0, dst_rows=[r])
        logits = vlm.lm_head.output[:, lay[0].last].save()
    clean_s, cf_s, *patched = option_margin(logits.float(), option_ids(vlm, len(item.candidates)),
                                            item.answer_index).tolist()
    return [(s - cf_s) / (clean_s - cf_s) for s in patched]


# (groups holding the square, local_swap spans moving it to the second half, the answer span)
PRESENCE_CASES = [((0, 1, 0, 0), ((2, 4), (4, 6)), "visual_frames:2:4"),
                  ((1, 0, 0, 0), ((0, 2), (6, 8)), "visual_frames:0:2")]


@pytest.mark.parametrize("groups,swap,answer_span", PRESENCE_CASES)
def test_presence_in_first_half_effect_sits_on_the_frames_that_hold_the_square(vlm, groups, swap,
                                                                             answer_span):
    share, n = {s: 0.0 for s in SPANS}, 0  # at the visual entry (deepstack carried)
    every_layer = {s: 0.0 for s in SPANS}
    before = SPANS[:SPANS.index(answer_span)]
    for direction, colour in (("right", "red"), ("left", "blue")):
        item = Item("first_half", _clip(groups, direction, colour))
        assert item.candidates[item.answer_index] == "yes"
        cfs = {"local_swap": lambda c: local_swap(c, *swap), "reverse": reverse}
        for name, make in cfs.items():
            records = _trace(vlm, item, lambda c: {name: make(c)}, SPANS, ["embed", 0, 1, 2, 3],
                             swap_spans=swap)
            te = records[0]["clean_score"] - records[0]["counterfactual_score"]
            assert records[0]["clean_score"] > 0 and te > 1.0, (name, records[0])  # answer flips
            for r in records:
                every_layer[r["token_slice"]] += abs(r["effect"])
                if r["token_slice"] in before:  # causal attention: earlier frames never see it
                    assert abs(r["effect"]) < 0.01, r
                if r["layer"] == vlm.n_layers - 1:  # by the last layer it left the visual tokens
                    assert abs(r["effect"]) < 0.01, r
            # a span's tokens hold only its own frames at the entry (vision attention is per group)
            entry = _entry_effects(vlm, item, make(item.clip.frames()), SPANS)
            for spec, effect in zip(SPANS, entry):
                share[spec] += abs(effect)
                n += 1
            embed = [r["effect"] for r in records if r["layer"] == "embed"]
            assert np.allclose(embed, entry, atol=1e-4), (embed, entry)  # tracing = by hand
    total = sum(share.values())
    print(f"{vlm.model_id} presence {groups}: share of summed |effect| on {answer_span}: at the "
          f"visual entry {share[answer_span] / total:.3f} ({share}); over all layers {every_layer[answer_span] / sum(every_layer.values()):.3f} "
          f"({every_layer})")
    assert n == 2 * 2 * 4 and share[answer_span] >= 0.9 * total, share


def test_colour_of_a_reversed_clip_has_no_total_effect_and_is_marked_unstable(vlm):
    items = [Item("colour", _clip(groups, d, c, hold))
             for groups, d, c, hold in [((1, 1, 1, 1), "right", "green", 1),
                                        ((1, 1, 0, 0), "left", "yellow", 2),
                                        ((0, 1, 1, 0), "right", "blue", 2),
                                        ((0, 0, 1, 0), "left", "red", 1)]]
    for item in items:
        records, _ = ct.trace_sample(vlm, item.clip.frames(), {"reverse": reverse(item.clip.frames())},
                                     item.prompt, option_ids(vlm, 4), item.answer_index,
                                     token_slice="visual", layers=["embed", 2])
        print(f"{vlm.model_id} colour {item.clip.groups}: clean {records[0]['clean_score']:.2f}, TE "
              f"{records[0]['clean_score'] - records[0]['counterfactual_score']:+.4f}")
        assert ct.mark_unstable(records) == len(records), records  # default: |TE| < 0.05 logits
        for rec in records:
            assert rec["clean_score"] > 2.0 and rec["counterfactual_score"] > 2.0  # both right
            assert abs(rec["total_effect"]) < ct.MIN_TOTAL_EFFECT and rec["unstable"]


def test_direction_enters_through_the_visual_tokens(vlm):
    effects = {"visual": [], "text": []}
    entry, lm_input = [], []
    for groups, d, hold in [((1, 1, 1, 1), "right", 2), ((0, 1, 1, 0), "left", 2),
                            ((1, 1, 1, 1), "left", 1)]:
        item = Item("direction", _clip(groups, d, "red", hold))
        clean, cf = item.clip.frames(), {"reverse": reverse(item.clip.frames())}
        for spec in effects:
            (rec,), _ = ct.trace_sample(vlm, clean, cf, item.prompt, option_ids(vlm, 2),
                                        item.answer_index, token_slice=spec, layers=["embed"])
            assert rec["clean_score"] - rec["counterfactual_score"] > 1.0  # reversal flips it
            effects[spec].append(rec["effect"])
        entry += _entry_effects(vlm, item, reverse(clean), ["visual"])
        (rec,), _ = ct.trace_sample(vlm, clean, cf, item.prompt, option_ids(vlm, 2),
                                    item.answer_index, layers=["embed"], late_inputs="counterfactual")
        lm_input.append(rec["effect"])
    print(f"{vlm.model_id} direction at embed (tracing): visual {effects['visual']}, text "
          f"{effects['text']}; by hand {entry}; the LM input alone (late_inputs='counterfactual') "
          f"{lm_input}")
    assert min(effects["visual"]) >= 0.9 and max(np.abs(effects["text"])) <= 0.1, effects
    assert np.allclose(effects["visual"], entry, atol=1e-4), (effects, entry)
    if vlm.family.visual_entry == "deepstack":  # the control: most of it comes through deepstack
        assert max(lm_input) <= 0.5, lm_input
    else:
        assert np.allclose(lm_input, entry, atol=1e-4), (lm_input, entry)


def test_heldout_items_are_balanced_and_never_training_clips():
    items = video_task.heldout_items(1, 20)
    assert [it.kind for it in items] == [k for k in video_task.KINDS for _ in range(20)]
    for kind in ("direction", "first_half"):
        answers = [it.answer_index for it in items if it.kind == kind]
        assert 5 <= sum(answers) <= 15  # both options present
    train = video_task.train_items(np.random.default_rng([0, 0]), 500)
    assert {it.clip.row % 4 for it in items} == {2} and {it.clip.row % 4 for it in train} == {0}
