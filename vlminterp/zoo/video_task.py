"""The motion task of ``tiny-qwen2-vl-motion`` and ``tiny-qwen3-vl-motion``: clips of a moving
square, five questions.

A clip has 8 frames of 112x112, i.e. 4 temporal groups of 2 frames (Qwen2-VL's and Qwen3-VL's
temporal patch). The square is drawn in whole groups only, so every question's answer lives in
known groups:

- ``direction`` "Which direction does the square move?" (left / right): asked when two or more
  groups show the square. Half the clips hold the square still within a group (``hold=2``); in
  those no single group shows motion, so the answer needs two groups.
- ``colour`` "What colour is the square?" (red / green / blue / yellow): any visible frame.
- ``presence`` "When is the square visible?" (first half / second half / throughout): asked on
  clips visible in exactly those frames (the `vlminterp.data.synthetic` set's question).
- ``first_half`` / ``second_half`` "Is the square visible in the first half?" (yes / no): that
  half's two groups only. Half visibility is drawn so that the answer for one half is independent
  of everything in the other half (see `_groups`), so no shortcut through the other half exists.

Every question is asked in the study's prompt (`vlminterp.video.multiple_choice.mc_prompt`) and
answered by the option letter at the last position. The clips of `vlminterp.data.synthetic` (the
demo's ``--synthetic`` set: whole-width path, ``hold=1``, first half / second half / throughout)
are a part of this distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vlminterp.data import synthetic
from vlminterp.video.multiple_choice import mc_prompt

COLOURS = tuple(synthetic.COLOURS)

NUM_FRAMES, SIZE, GROUP = 8, 112, 2  # GROUP: frames per temporal group (temporal_patch_size)
N_GROUPS = NUM_FRAMES // GROUP
QUESTIONS = {
    **synthetic.QUESTIONS,
    "first_half": ("Is the square visible in the first half?", ["yes", "no"]),
    "second_half": ("Is the square visible in the second half?", ["yes", "no"]),
}
KINDS = tuple(QUESTIONS)
HALVES = {"first_half": (0, 1), "second_half": (2, 3)}  # groups of each half
# Per-group visibility in the "independent groups" half of the draws: P(a half shows the square)
# = 1 - (1 - p)^2 = 1/2, the same as in the "whole halves" draws, so the two kinds of draw agree
# on every half's marginal and the answer for one half stays independent of the other half.
P_GROUP = 1 - 1 / math.sqrt(2)
# direction (comparing groups) is the slowest to learn: it gets twice the share of the others
TRAIN_SHARE = {"direction": 2, "colour": 1, "presence": 1, "first_half": 1, "second_half": 1}
SIDES = (14, 20, 28)
MAX_SIDE = 42  # the curriculum's biggest square
CURRICULUM_END = 0.5
MIN_TRAVEL = 42  # px: the square moves >= 14 px per group
_PRESENCE = {(1, 1, 0, 0): "first half", (0, 0, 1, 1): "second half", (1, 1, 1, 1): "throughout"}


@dataclass(frozen=True)
class Clip:
    direction: str
    colour: str
    groups: tuple[int, ...]  # 1 where the square is drawn, per temporal group
    hold: int  # frames per x position: 1 (moves every frame) or 2 (moves between groups only)
    path: tuple[int, int]  # leftmost, rightmost x of the square's left edge
    row: int
    side: int = 14

    def frames(self, jitter=None) -> np.ndarray:
        """[8, 112, 112, 3] uint8. ``jitter`` (3 ints) shifts the square's RGB colour, a training
        augmentation: mp4 coding shifts saturated colours by up to ~25 levels."""
        visible = [f for g, on in enumerate(self.groups) if on for f in range(g * GROUP, (g + 1) * GROUP)]
        frames = synthetic.make_video(self.direction, self.colour, NUM_FRAMES, SIZE, visible=visible,
                                      hold=self.hold, path=self.path, row=self.row,
                                      side=self.side)
        if jitter is not None:
            square = (frames != np.array(synthetic.BACKGROUND, np.uint8)).any(-1)
            shifted = frames[square].astype(np.int16) + np.asarray(jitter, np.int16)
            frames[square] = np.clip(shifted, 0, 255).astype(np.uint8)
        return frames

    def answer(self, kind: str) -> int | None:
        """Index of the correct option of ``kind``, or None where the question does not apply."""
        candidates = QUESTIONS[kind][1]
        shown = sum(self.groups)
        if kind == "direction":  # asked when >= 2 groups show the square
            return candidates.index(self.direction) if shown >= 2 else None
        if kind == "colour":
            return candidates.index(self.colour) if shown else None
        if kind == "presence":
            name = _PRESENCE.get(self.groups)
            return None if name is None else candidates.index(name)
        return 0 if any(self.groups[g] for g in HALVES[kind]) else 1

    def answer_groups(self, kind: str) -> tuple[int, ...]:
        """The temporal groups whose frames decide ``kind``'s answer."""
        if kind in HALVES:
            return HALVES[kind]
        return tuple(g for g, on in enumerate(self.groups) if on) if kind != "presence" \
            else tuple(range(N_GROUPS))


@dataclass(frozen=True)
class Item:
    """One question about one clip."""

    kind: str
    clip: Clip

    @property
    def question(self) -> str:
        return QUESTIONS[self.kind][0]

    @property
    def candidates(self) -> list[str]:
        return list(QUESTIONS[self.kind][1])

    @property
    def prompt(self) -> str:
        return mc_prompt(self.question, self.candidates)

    @property
    def answer_index(self) -> int:
        return self.clip.answer(self.kind)


def _groups(rng: np.random.Generator) -> tuple[int, ...]:
    """Half the draws show or hide whole halves (each half with p = 1/2, independently); the
    other half draw each group independently with `P_GROUP`."""
    if rng.random() < 0.5:
        first, second = (int(v) for v in rng.random(2) < 0.5)
        return (first, first, second, second)
    return tuple(int(v) for v in rng.random(N_GROUPS) < P_GROUP)


def sample_clip(rng: np.random.Generator, progress: float = 1.0, heldout: bool = False) -> Clip:
    """A clip of the task's distribution: half are drawn like the demo set's (a 14 px square
    over the whole width), the others have a square of 14, 20 or 28 px over a random stretch of
    at least 42 px. ``progress`` < `CURRICULUM_END` (training's first part) draws bigger squares
    and fewer demo clips: a 14 px square is 1.6% of a frame, and a model from random weights
    first learns where to look on big ones (on 14 px squares alone the loss did not move).
    The square's top row is a multiple of 4 in training and 2 more than one in held-out clips
    (``heldout``), so no held-out clip is a training clip."""
    early = max(0.0, 1 - progress / CURRICULUM_END)
    if rng.random() < 0.5 * (1 - early):
        side = synthetic.square_side(SIZE)
        path = (side // 2, SIZE - side - side // 2)
    else:
        biggest = int(round(SIDES[-1] + early * (MAX_SIDE - SIDES[-1]))) // 2 * 2
        side = int(rng.integers(SIDES[0] // 2, biggest // 2 + 1)) * 2 if early else int(rng.choice(SIDES))
        lo = int(rng.integers(0, SIZE - side - MIN_TRAVEL + 1)) // 2 * 2
        path = (lo, int(rng.integers(lo + MIN_TRAVEL, SIZE - side + 1)) // 2 * 2)
    row = int(rng.integers(0, (SIZE - side - 2) // 4 + 1)) * 4 + (2 if heldout else 0)
    return Clip(direction=str(rng.choice(synthetic.DIRECTIONS)),
                colour=str(rng.choice(list(synthetic.COLOURS))), groups=_groups(rng),
                hold=int(rng.choice([1, 2])), path=path, row=row, side=side)


def sample_item(rng: np.random.Generator, kind: str, progress: float = 1.0,
                heldout: bool = False) -> Item:
    """A clip on which ``kind`` applies (rejection sampling)."""
    while True:
        clip = sample_clip(rng, progress, heldout)
        if clip.answer(kind) is not None:
            return Item(kind, clip)


def heldout_items(seed: int, n_per_kind: int, kinds=KINDS) -> list[Item]:
    """``n_per_kind`` items of each kind from the stream of ``seed``, with held-out rows (no
    training clip has one)."""
    rng = np.random.default_rng([seed, 1])
    return [sample_item(rng, kind, heldout=True) for kind in kinds for _ in range(n_per_kind)]


def train_items(rng: np.random.Generator, n: int, progress: float = 1.0) -> list[Item]:
    """``n`` items with kinds drawn by `TRAIN_SHARE`, at ``progress`` (0-1) through training."""
    share = np.array([TRAIN_SHARE[k] for k in KINDS])
    return [sample_item(rng, str(rng.choice(KINDS, p=share / share.sum())), progress) for _ in range(n)]


def write_dataset(out_dir, n: int, seed: int = 1) -> "Path":
    """``n`` held-out items of every kind as a recipe-ready set: ``out_dir/videos/*.mp4`` and
    ``out_dir/annotations.json`` (one entry per item; ``task_name`` = the kind,
    ``frames_with_answer_object`` = the frames of the groups that decide the answer)."""
    import json
    import os
    from pathlib import Path

    from vlminterp.data.video import write_video

    out = Path(out_dir)
    entries = []
    for index, item in enumerate(heldout_items(seed, n)):
        name = f"video_{index:04d}.mp4"
        write_video(out / "videos" / name, item.clip.frames())
        frames = [f for g in item.clip.answer_groups(item.kind) for f in range(g * GROUP, (g + 1) * GROUP)]
        entries.append({"video_name": name, "question": item.question, "candidates": item.candidates,
                        "answer": item.candidates[item.answer_index], "answer_number": item.answer_index,
                        "question_id": f"{index:04d}-{item.kind}", "task_name": item.kind,
                        "frames_with_answer_object": frames})
    path = out / "annotations.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(entries, indent=1), encoding="utf-8")
    os.replace(tmp, path)
    return path
