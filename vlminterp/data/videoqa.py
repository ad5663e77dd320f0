"""Video question-answering annotations: validated up front, read as frozen samples.

The file is a JSON list of entries such as::

    {"video_name": "video_0001.mp4", "question": "What is the person doing?",
     "candidates": ["Walking", "Running"], "answer": "Running", "answer_number": 1,
     "question_id": "0001", "task_name": "action", "start": 0.0, "end": 2.5,
     "frames_with_answer_object": [3, 4, 5]}

Only ``video_name`` and ``question`` are required; ``answer_number`` is a 0-based index into
``candidates``. Every problem in the file is reported at once, one line each, so a user fixes the
file in one pass instead of one KeyError at a time.
"""

import json
import math
import os
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
    answer: str | None = None  # filled from candidates[answer_number] when only the number is given
    answer_index: int | None = None  # resolved from answer / answer_number; None when open-ended
    task_name: str | None = None
    start: float | None = None
    end: float | None = None
    frames_with_answer_object: list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


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
    if frames is not None and not (isinstance(frames, list) and all(_is_int(f) and f >= 0 for f in frames)):
        problems.append(f"frames_with_answer_object: expected a list of frame indices >= 0, got {_shown(frames)}")
    number = entry.get("answer_number")
    if number is not None and not _is_int(number):
        problems.append(f"answer_number: expected an integer, got {_shown(number)}")
    return problems


def _answer_index(entry: dict) -> tuple[int | None, list[str]]:
    """Index of the answer among the candidates (entry already field-valid), and any problems."""
    candidates, answer, number = entry.get("candidates"), entry.get("answer"), entry.get("answer_number")
    if candidates is None:
        if number is not None:
            return None, [f"answer_number {number} given but there are no candidates"]
        return None, []
    from_answer = candidates.index(answer) if answer in candidates else None
    if answer is not None and from_answer is None:
        return None, [f"answer {answer!r} is not among candidates"]
    if number is not None and not 0 <= number < len(candidates):
        return None, [f"answer_number {number} out of range for {len(candidates)} candidates"]
    if number is not None and from_answer is not None and number != from_answer:
        return None, [f"answer {answer!r} is candidate {from_answer} but answer_number is {number}"]
    return (from_answer if from_answer is not None else number), []


def _answer_fields_valid(field_problems: list[str]) -> bool:
    """Whether candidates/answer/answer_number passed their type checks, so they can be compared."""
    return not any(p.startswith(("candidates:", "answer:", "answer_number:")) for p in field_problems)


def _entry_label(index: int, entry: Any) -> str:
    qid = entry.get("question_id") if isinstance(entry, dict) else None
    return f"entry {index} (question_id {qid})" if isinstance(qid, (str, int)) else f"entry {index}"


def parse_annotations(entries: list, path: str | os.PathLike = "annotations") -> list[VideoQASample]:
    """Validate every entry and build samples; raise one ``AnnotationError`` listing all problems."""
    problems, samples, seen_ids = [], [], {}
    for index, entry in enumerate(entries):
        label = _entry_label(index, entry)
        if not isinstance(entry, dict):
            problems.append(f"{label}: expected an object with 'video_name' and 'question', got {_shown(entry)}")
            continue
        entry_problems = _field_problems(entry)
        answer_index, answer_problems = _answer_index(entry) if _answer_fields_valid(entry_problems) else (None, [])
        question_id = str(index) if entry.get("question_id") is None else str(entry["question_id"])
        if question_id in seen_ids:
            entry_problems.append(f"question_id {question_id!r} repeats entry {seen_ids[question_id]}")
        seen_ids.setdefault(question_id, index)
        problems += [f"{label}: {problem}" for problem in entry_problems + answer_problems]
        if entry_problems or answer_problems:
            continue
        samples.append(_make_sample(entry, question_id, answer_index))
    if problems:
        raise AnnotationError(path, problems)
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
