"""Video QA annotations: every bad input reported at once, valid files round-trip, frames load."""

import dataclasses
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlminterp.data.video import write_video
from vlminterp.data.videoqa import KNOWN_FIELDS, AnnotationError, VideoQADataset, VideoQASample, parse_annotations


def write_json(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def entry(**fields):
    return {"video_name": "a.mp4", "question": "What happens?", **fields}


def test_malformed_json_names_the_file_line_and_column(tmp_path):
    path = tmp_path / "ann.json"
    path.write_text('[{"video_name": "a.mp4",\n  "question": }]', encoding="utf-8")
    with pytest.raises(AnnotationError) as info:
        VideoQADataset(path, tmp_path)
    assert str(path) in str(info.value)
    assert "invalid JSON at line 2, column 15" in str(info.value)


@pytest.mark.parametrize(("data", "got"), [({"annotations": []}, "object (dict)"), ("a.mp4", "str"), (3, "int")])
def test_top_level_must_be_a_list(tmp_path, data, got):
    path = write_json(tmp_path / "ann.json", data)
    with pytest.raises(AnnotationError) as info:
        VideoQADataset(path, tmp_path)
    assert f"expected a JSON list of annotation entries at the top level, got {got}" in str(info.value)


def test_empty_list_is_rejected(tmp_path):
    with pytest.raises(AnnotationError, match="empty"):
        VideoQADataset(write_json(tmp_path / "ann.json", []), tmp_path)


def test_every_bad_entry_is_reported_at_once(tmp_path):
    entries = [
        entry(candidates=["Run", "Walk"], answer="Run"),  # valid
        {"video_name": "b.mp4"},
        entry(question_id="0013", candidates=["Run", "Walk"], answer="Jog"),
        entry(question_id="q4", candidates="A"),
        entry(question_id="q5", candidates=["a", "b", "c"], answer_number=5),
        "just a string",
        entry(question_id="q7", candidates=["a", "b"], answer="a", answer_number=1),
        entry(question_id="0013"),
        entry(frames_with_answer_object=[-1], start=2.0, end=1.0),
        {"video_name": 7, "question": "", "answer_number": True},
        entry(answer_number=0),
    ]
    path = write_json(tmp_path / "ann.json", entries)
    with pytest.raises(AnnotationError) as info:
        VideoQADataset(path, tmp_path)
    expected = [
        "entry 1: missing required field 'question'",
        "entry 2 (question_id 0013): answer 'Jog' is not among candidates",
        "entry 3 (question_id q4): candidates: expected a list of strings, got 'A'",
        "entry 4 (question_id q5): answer_number 5 out of range for 3 candidates",
        "entry 5: expected an object with 'video_name' and 'question', got 'just a string'",
        "entry 6 (question_id q7): answer 'a' is candidate 0 but answer_number is 1",
        "entry 7 (question_id 0013): question_id '0013' repeats entry 2 with different content",
        "entry 8: end 1.0 is not after start 2.0",
        "entry 8: frames_with_answer_object: expected a list of frame indices >= 0 or frame id strings, got [-1]",
        "entry 9: video_name: expected a non-empty string, got 7",
        "entry 9: question: expected a non-empty string, got ''",
        "entry 9: answer_number: expected an integer, got True",
        "entry 10: answer_number 0 given but there are no candidates",
    ]
    assert sorted(info.value.problems) == sorted(expected)
    lines = str(info.value).splitlines()
    assert lines[0] == f"{path}: {len(expected)} problem(s) in the annotations"
    assert sorted(lines[1:]) == sorted(expected)
    assert isinstance(info.value, ValueError)


json_scalars = st.none() | st.booleans() | st.integers(-3, 10) | st.floats(-2, 5) | st.sampled_from(["", "a", "x.mp4"])
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=6)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from([*KNOWN_FIELDS, "other"]), json_values), min_size=1, max_size=4))
def test_arbitrary_entries_give_samples_or_an_annotation_error_never_another_exception(entries):
    try:
        samples = parse_annotations(entries)
    except AnnotationError as error:
        assert error.problems and all(line.startswith("entry ") for line in error.problems)
        return
    for sample in samples:
        assert sample.answer_index is None or sample.candidates[sample.answer_index] == sample.answer


def test_valid_file_round_trips(tmp_path):
    entries = [
        entry(
            video_name="v1.mp4", candidates=["Walking", "Running", "Cooking"], answer="Running", answer_number=1,
            question_id="0001", task_name="action", start=0, end=2.5, frames_with_answer_object=[3, 4, 5],
            source="kinetics",
        ),
        entry(video_name="v2.mp4", candidates=["left", "right"], answer_number=0, question_id=7),
        entry(video_name="v3.mp4", answer="open-ended", question_id=None),
    ]  # fmt: skip
    dataset = VideoQADataset(write_json(tmp_path / "ann.json", entries), tmp_path / "videos")
    assert len(dataset) == 3
    assert [sample.video_name for sample in dataset] == ["v1.mp4", "v2.mp4", "v3.mp4"]
    assert dataset[0] == VideoQASample(
        video_name="v1.mp4", question="What happens?", question_id="0001",
        candidates=["Walking", "Running", "Cooking"], answer="Running", answer_index=1, task_name="action",
        start=0.0, end=2.5, frames_with_answer_object=[3, 4, 5], extra={"source": "kinetics"},
    )  # fmt: skip
    assert (dataset[1].question_id, dataset[1].answer, dataset[1].answer_index) == ("7", "left", 0)
    assert (dataset[2].question_id, dataset[2].answer, dataset[2].answer_index) == ("2", "open-ended", None)
    assert isinstance(dataset[0].start, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        dataset[0].answer = "Walking"


def test_load_frames_samples_within_the_time_window(tmp_path):
    clip = np.broadcast_to((np.arange(16, dtype=np.uint8) * 15)[:, None, None, None], (16, 16, 16, 3)).copy()
    write_video(tmp_path / "videos" / "clip.mp4", clip, fps=8)
    entries = [entry(video_name="clip.mp4", start=1.0, end=1.5), entry(video_name="clip.mp4"), entry(video_name="no.mp4")]
    dataset = VideoQADataset(write_json(tmp_path / "ann.json", entries), tmp_path / "videos", num_frames=3)
    windowed = dataset.load_frames(dataset[0])
    assert windowed.shape == (3, 16, 16, 3)
    np.testing.assert_allclose(windowed.mean(axis=(1, 2, 3)), [120, 150, 180], atol=3)  # frames 8, 10, 12
    whole = dataset.load_frames(dataset[1])
    np.testing.assert_allclose(whole.mean(axis=(1, 2, 3)), [0, 105, 225], atol=3)  # frames 0, 7 (7.5 truncates), 15
    with pytest.raises(FileNotFoundError, match="no.mp4"):
        dataset.load_frames(dataset[2])


def star_entry(qid, video, answer, number, candidates, frames, **fields):
    """An entry with STAR's exact keys, key order and value types (content made up here)."""
    return {
        "task_name": "Interaction", "video_name": video, "question_id": qid,
        "question": "Which object was picked up by the person?", "answer_number": number,
        "candidates": candidates, "answer": answer,
        "situations": {frames[0]: {"rel_pairs": [["person", answer], ["person", "floor"]],
                                   "rel_labels": ["holding", "on"], "actions": [f"take a {answer}"],
                                   "bbox": [[10.5, 20.25, 60.0, 80.75]], "bbox_labels": [answer]}},
        "start": 1.5, "end": 6.25, "frames_with_answer_object": frames, **fields,
    }  # fmt: skip


STAR_LIKE = [
    star_entry("Interaction_T1_1", "AB12C.mp4", "cup", 1, ["The towel.", "The cup/glass/bottle.", "The bag.", "The box."],
               ["000031", "000045"]),
    star_entry("Interaction_T1_2", "AB12C.mp4", "paper/notebook", 0,
               ["The paper/notebook.", "The pillow.", "The shoe.", "The food."], ["000050"]),
    star_entry("Interaction_T1_3", "ZZ9PL.mp4", "Pillow", 3, ["The shoe.", "The bag.", "The food.", "The pillow."],
               ["000102", "000099", "000120"]),
]  # fmt: skip


def test_star_shaped_file_loads_with_its_nested_fields_and_string_frame_ids(tmp_path):
    entries = STAR_LIKE + [dict(STAR_LIKE[1])]  # the real sample repeats entries verbatim
    with pytest.warns(UserWarning, match=r"1 entry exactly repeat an earlier one .* entries 3 \(= entry 1\)"):
        dataset = VideoQADataset(write_json(tmp_path / "star.json", entries), tmp_path)
    assert [s.question_id for s in dataset] == ["Interaction_T1_1", "Interaction_T1_2", "Interaction_T1_3"]
    assert [s.answer_index for s in dataset] == [1, 0, 3]
    assert [s.answer for s in dataset] == ["The cup/glass/bottle.", "The paper/notebook.", "The pillow."]
    assert dataset[0].frames_with_answer_object == ["000031", "000045"]
    assert dataset[0].extra == {"situations": STAR_LIKE[0]["situations"]}  # kept on the sample...
    assert dataset[0].scalar_extra() == {}  # ...but not among the fields that label stored records
    assert (dataset[2].start, dataset[2].end, dataset[2].task_name) == (1.5, 6.25, "Interaction")


@pytest.mark.parametrize(
    ("answer", "number", "expected"),
    [
        ("The clothes.", None, 2),  # exact
        ("the CLOTHES.", None, 2),  # case-insensitive
        ("clothes", None, 2),  # a word inside the candidate
        ("Clothes", 2, 2),  # the number decides; the answer agrees
        (None, 1, 1),
        ("table", 3, 3),  # "table" is a word of two candidates: the number picks one of them
        ("clothes", 7, 2),  # out-of-range number: the answer decides (with a warning)
    ],
)
def test_correct_option_from_answer_number_and_answer(answer, number, expected):
    candidates = ["The table.", "The blanket.", "The clothes.", "The table lamp."]
    fields = {k: v for k, v in {"answer": answer, "answer_number": number}.items() if v is not None}
    if number == 7:
        with pytest.warns(UserWarning, match="answer_number 7 out of range for 4 candidates"):
            (sample,) = parse_annotations([entry(candidates=candidates, **fields)])
    else:
        (sample,) = parse_annotations([entry(candidates=candidates, **fields)])
    assert sample.answer_index == expected and sample.answer == candidates[expected]


@pytest.mark.parametrize(
    ("answer", "number", "problem"),
    [
        ("clothes", 0, "answer 'clothes' is candidate 2 but answer_number is 0"),
        ("lamp shade", 1, "answer 'lamp shade' matches no candidate, but answer_number 1 is 'The blanket.'"),
        ("table", None, "answer 'table' matches candidates 0 and 3 (word match); add answer_number to choose"),
        ("cloth", None, "answer 'cloth' is not among candidates"),  # a word, not a prefix
        ("blank", 9, "answer 'blank' is not among candidates"),
    ],
)
def test_answer_and_number_that_disagree_or_match_nothing_are_rejected(answer, number, problem):
    candidates = ["The table.", "The blanket.", "The clothes.", "The table lamp."]
    fields = {"answer": answer} if number is None else {"answer": answer, "answer_number": number}
    with pytest.raises(AnnotationError) as info:
        parse_annotations([entry(question_id="q", candidates=candidates, **fields)])
    assert f"entry 0 (question_id q): {problem}" in info.value.problems


def test_conflicting_duplicate_question_ids_stay_an_error():
    first = star_entry("T_1", "v.mp4", "cup", 1, ["The bag.", "The cup."], ["000001"])
    other = {**first, "answer_number": 0, "answer": "bag"}
    with pytest.raises(AnnotationError, match=r"entry 1 \(question_id T_1\): question_id 'T_1' repeats entry 0 "
                                              r"with different content"):
        parse_annotations([first, other])
