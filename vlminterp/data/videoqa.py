"""Video question-answering annotations: validated up front, read as frozen samples.

The file is a JSON list of entries such as (STAR's shape)::

    {"video_name": "6H78U.mp4", "question": "Which object was tidied up by the person?",
     "candidates": ["The closet/cabinet.", "The blanket.", "The clothes.", "The table."],
     "answer": "clothes", "answer_number": 2, "question_id": "Interaction_T1_13",
     "task_name": "Interaction", "start": 11.1, "end": 19.6,
     "frames_with_answer_object": ["000206", "000212"], "situations": {...}}

Only ``video_name`` and ``question`` are required. The correct option: ``answer_number`` (a
0-based index into ``candidates``) when present and in range; ``answer`` is matched to a
candidate exactly, else case-insensitively, else as a whole word or phrase inside it ("clothes"
-> "The clothes."). An entry is rejected only when the two disagree or nothing identifies an
option. ``frames_with_answer_object`` holds frame indices or frame ids (strings such as
"000206"). Other fields (``situations``, ...) are kept in ``VideoQASample.extra``. An entry that
repeats an earlier one exactly is dropped with a warning; a ``question_id`` repeated with other
content is an error. Every problem in the file is reported at once, one line each, so a user
fixes the file in one pass instead of one KeyError at a time.
"""

import json
import math
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import UInt8

from vlminterp.data.video import read_frames

KNOWN_FIELDS = (
    "video_name", "question", "candidates", "answer", "answer_number",
    "question_id", "task_name", "start", "end", "frames_with_answer_object",
)  # fmt: skip


class AnnotationError(ValueError):
    """An annotation file that cannot be used; ``problems`` holds one line per problem found."""

    def __init__(self, path: str | os.PathLike, problems: list[str]):
        self.path = str(path)
        self.problems = problems
        header = f"{self.path}: {len(problems)} problem(s) in the annotations"
        super().__init__("\n".join([header, *problems]))


@dataclass(frozen=True)
class VideoQASample:
    video_name: str
    question: str
    question_id: str
    candidates: list[str] | None = None
    answer: str | None = None  # the correct candidate's text when one is resolved, else as given
    answer_index: int | None = None  # resolved from answer / answer_number; None when open-ended
    task_name: str | None = None
    start: float | None = None
    end: float | None = None
    frames_with_answer_object: list[int | str] | None = None  # frame indices, or frame ids ("000206")
    extra: dict[str, Any] = field(default_factory=dict)  # every other field of the entry, as given

    def scalar_extra(self) -> dict[str, str | int | float | bool | None]:
        """The extra fields that are single values (strings, numbers, booleans, null): small
        enough to label each stored record with; nested ones (STAR's ``situations``) stay on the
        sample only."""
        return {k: v for k, v in self.extra.items() if v is None or isinstance(v, (str, int, float, bool))}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _field_problems(entry: dict) -> list[str]:
    """Problems with one entry's fields, each phrased for the user; empty when the entry is valid."""
    problems = []
    for name in ("video_name", "question"):
        if name not in entry:
            problems.append(f"missing required field {name!r}")
        elif not isinstance(entry[name], str) or not entry[name].strip():
            problems.append(f"{name}: expected a non-empty string, got {_shown(entry[name])}")
    for name in ("answer", "task_name"):
        if entry.get(name) is not None and not isinstance(entry[name], str):
            problems.append(f"{name}: expected a string, got {_shown(entry[name])}")
    qid = entry.get("question_id")
    if qid is not None and not (isinstance(qid, str) or _is_int(qid)):
        problems.append(f"question_id: expected a string or integer, got {_shown(qid)}")
    candidates = entry.get("candidates")
    if candidates is not None:
        if not isinstance(candidates, list) or not candidates or not all(isinstance(c, str) for c in candidates):
            problems.append(f"candidates: expected a list of strings, got {_shown(candidates)}")
        elif len(set(candidates)) != len(candidates):
            problems.append(f"candidates: repeated candidate in {_shown(candidates)}")
    for name in ("start", "end"):
        value = entry.get(name)
        if value is not None and (not _is_number(value) or value < 0):
            problems.append(f"{name}: expected a number of seconds >= 0, got {_shown(value)}")
    start, end = entry.get("start"), entry.get("end")
    if _is_number(start) and _is_number(end) and end <= start:
        problems.append(f"end {end} is not after start {start}")
    frames = entry.get("frames_with_answer_object")
    if frames is not None and not (isinstance(frames, list) and all(_is_frame(f) for f in frames)):
        problems.append(f"frames_with_answer_object: expected a list of frame indices >= 0 or frame id "
                        f"strings, got {_shown(frames)}")
    number = entry.get("answer_number")
    if number is not None and not _is_int(number):
        problems.append(f"answer_number: expected an integer, got {_shown(number)}")
    return problems


def _is_frame(value: Any) -> bool:
    return (_is_int(value) and value >= 0) or (isinstance(value, str) and bool(value.strip()))


def _answer_matches(answer: str, candidates: list[str]) -> tuple[list[int], str]:
    """Candidates ``answer`` names, at the first rule that finds any: exact, case-insensitive,
    or a whole word/phrase inside the candidate (case-insensitive); and that rule's name."""
    if answer in candidates:
        return [candidates.index(answer)], "exact"
    folded = answer.strip().casefold()
    same = [i for i, c in enumerate(candidates) if c.strip().casefold() == folded]
    if same or not folded:
        return same, "case-insensitive"
    word = re.compile(rf"(?<!\w){re.escape(folded)}(?!\w)")
    return [i for i, c in enumerate(candidates) if word.search(c.casefold())], "word"


def _answer_index(entry: dict) -> tuple[int | None, list[str], str | None]:
    """Index of the correct option (entry already field-valid), any problems, and a note when
    an out-of-range answer_number was ignored because the answer identifies the option."""
    candidates, answer, number = entry.get("candidates"), entry.get("answer"), entry.get("answer_number")
    if candidates is None:
        if number is not None:
            return None, [f"answer_number {number} given but there are no candidates"], None
        return None, [], None
    in_range = number is not None and 0 <= number < len(candidates)
    out_of_range = f"answer_number {number} out of range for {len(candidates)} candidates"
    if answer is None:
        return (number, [], None) if in_range else (None, [out_of_range] if number is not None else [], None)
    matches, rule = _answer_matches(answer, candidates)
    if in_range:
        if number in matches:
            return number, [], None
        if not matches:
            return None, [f"answer {answer!r} matches no candidate, but answer_number {number} is "
                          f"{candidates[number]!r}"], None
        return None, [f"answer {answer!r} is candidate {_listed(matches)} but answer_number is "
                      f"{number}"], None
    if len(matches) == 1:
        return matches[0], [], out_of_range if number is not None else None
    if matches:
        return None, [f"answer {answer!r} matches candidates {_listed(matches)} ({rule} match); add "
                      f"answer_number to choose"], None
    unmatched = [f"answer {answer!r} is not among candidates"]
    return None, unmatched + ([out_of_range] if number is not None else []), None


def _listed(indices: list[int]) -> str:
    return " and ".join(str(i) for i in indices)


def _answer_fields_valid(field_problems: list[str]) -> bool:
    """Whether candidates/answer/answer_number passed their type checks, so they can be compared."""
    return not any(p.startswith(("candidates:", "answer:", "answer_number:")) for p in field_problems)


def _entry_label(index: int, entry: Any) -> str:
    qid = entry.get("question_id") if isinstance(entry, dict) else None
    return f"entry {index} (question_id {qid})" if isinstance(qid, (str, int)) else f"entry {index}"


def parse_annotations(entries: list, path: str | os.PathLike = "annotations") -> list[VideoQASample]:
    """Validate every entry and build samples; raise one ``AnnotationError`` listing all problems.

    Exact repeats of an earlier entry are dropped (one warning lists them); an out-of-range
    ``answer_number`` that the ``answer`` overrides is reported in a warning too."""
    problems, samples, seen_ids, kept, repeats, ignored = [], [], {}, {}, [], []
    for index, entry in enumerate(entries):
        label = _entry_label(index, entry)
        if not isinstance(entry, dict):
            problems.append(f"{label}: expected an object with 'video_name' and 'question', got {_shown(entry)}")
            continue
        canonical = json.dumps(entry, sort_keys=True, default=repr)
        if canonical in kept:
            repeats.append(f"{index} (= entry {kept[canonical]})")
            continue
        kept[canonical] = index
        entry_problems = _field_problems(entry)
        answer_index, answer_problems, note = (_answer_index(entry) if _answer_fields_valid(entry_problems)
                                               else (None, [], None))
        question_id = str(index) if entry.get("question_id") is None else str(entry["question_id"])
        if question_id in seen_ids:
            entry_problems.append(f"question_id {question_id!r} repeats entry {seen_ids[question_id]} "
                                  f"with different content")
        seen_ids.setdefault(question_id, index)
        problems += [f"{label}: {problem}" for problem in entry_problems + answer_problems]
        if entry_problems or answer_problems:
            continue
        if note:
            ignored.append(f"{label}: {note}")
        samples.append(_make_sample(entry, question_id, answer_index))
    if problems:
        raise AnnotationError(path, problems)
    if repeats:
        warnings.warn(f"{path}: {len(repeats)} entr{'y' if len(repeats) == 1 else 'ies'} exactly "
                      f"repeat an earlier one and are used once: entries {', '.join(repeats)}", stacklevel=2)
    if ignored:
        warnings.warn(f"{path}: answer_number ignored where out of range, the answer names the "
                      f"option: {'; '.join(ignored)}", stacklevel=2)
    return samples


def _make_sample(entry: dict, question_id: str, answer_index: int | None) -> VideoQASample:
    start, end = entry.get("start"), entry.get("end")
    return VideoQASample(
        video_name=entry["video_name"],
        question=entry["question"],
        question_id=question_id,
        candidates=entry.get("candidates"),
        answer=entry.get("answer") if answer_index is None else entry["candidates"][answer_index],
        answer_index=answer_index,
        task_name=entry.get("task_name"),
        start=None if start is None else float(start),
        end=None if end is None else float(end),
        frames_with_answer_object=entry.get("frames_with_answer_object"),
        extra={key: value for key, value in entry.items() if key not in KNOWN_FIELDS},
    )


def load_annotations(path: str | os.PathLike) -> list[VideoQASample]:
    """Read and validate a JSON annotation file (a list of entries)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        problem = f"invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        raise AnnotationError(path, [problem]) from None
    if not isinstance(data, list):
        got = type(data).__name__.replace("dict", "object (dict)")
        raise AnnotationError(path, [f"expected a JSON list of annotation entries at the top level, got {got}"])
    if not data:
        raise AnnotationError(path, ["the annotation list is empty"])
    return parse_annotations(data, path)


class VideoQADataset:
    """Annotated questions over a folder of videos; ``dataset[i]`` is a ``VideoQASample``.

    Frames are read on demand with ``load_frames`` so that one missing or corrupt video raises for
    that sample only (``FileNotFoundError`` / ``VideoReadError``) and a recipe can record it and go on.
    """

    def __init__(
        self,
        annotations_json: str | os.PathLike,
        video_root: str | os.PathLike,
        num_frames: int | None = None,
        backend: str = "auto",
    ):
        self.annotations_json = Path(annotations_json)
        self.video_root = Path(video_root)
        self.num_frames = num_frames
        self.backend = backend
        self.samples = load_annotations(self.annotations_json)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> VideoQASample:
        return self.samples[index]

    def __iter__(self) -> Iterator[VideoQASample]:
        return iter(self.samples)

    def video_path(self, sample: VideoQASample) -> Path:
        return self.video_root / sample.video_name

    def load_frames(self, sample: VideoQASample) -> UInt8[np.ndarray, "t h w 3"]:
        """The sample's frames: ``num_frames`` sampled within its [start, end] window (all if None)."""
        path = self.video_path(sample)
        return read_frames(path, num_frames=self.num_frames, start=sample.start, end=sample.end, backend=self.backend)
