"""A small real mp4 video-QA dataset whose answers are known by construction.

Each video shows a coloured square on a plain grey background moving left->right ("right") or
right->left ("left"); the square may be visible in only the first or second half of the frames.
Every video gets three questions: direction, colour and presence (when the square is visible), so a
recipe can be run end to end offline and its counterfactual effects checked against ground truth
(e.g. ``reverse`` must flip the direction answer and leave the colour answer alone).

    python -m vlminterp.data.synthetic --out /tmp/squares --n 24
"""

import argparse
import itertools
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from jaxtyping import UInt8

from vlminterp.video.counterfactuals import check_span, format_span
from vlminterp.data.video import write_video

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 200, 30),
    "blue": (30, 30, 220),
    "yellow": (230, 220, 30),
}
BACKGROUND = (128, 128, 128)
DIRECTIONS = ("left", "right")
PRESENCE = ("first half", "second half", "throughout")
QUESTIONS = {
    "direction": ("Which direction does the square move?", list(DIRECTIONS)),
    "colour": ("What colour is the square?", list(COLOURS)),
    "presence": ("When is the square visible?", list(PRESENCE)),
}


def square_side(size: int) -> int:
    """Side of the square in pixels: even, so it sits on yuv420p's 2x2 chroma blocks."""
    return max(4, (size // 8) // 2 * 2)


def presence_span(presence: str, num_frames: int) -> tuple[int, int]:
    """Half-open frame span in which the square is visible for a presence answer."""
    half = num_frames // 2
    return {"first half": (0, half), "second half": (half, num_frames), "throughout": (0, num_frames)}[presence]


def make_video(
    direction: str,
    colour: str,
    num_frames: int = 8,
    size: int = 112,
    present: tuple[int, int] | None = None,
    seed: int = 0,
    *,
    visible: Sequence[int] | None = None,
    hold: int = 1,
    path: tuple[int, int] | None = None,
    row: int | None = None,
    side: int | None = None,
) -> UInt8[np.ndarray, "t h w 3"]:
    """Frames of a square of ``colour`` moving toward ``direction``; visible only in ``present`` if given.

    The square's horizontal position depends on the frame index alone (it keeps moving while
    hidden); ``seed`` picks its row. Optional, for the model zoo's task: ``visible`` (frame
    indices; replaces ``present``), ``hold`` (the square moves every ``hold`` frames, so with
    ``hold=2`` the two frames of a Qwen2-VL temporal group are identical), ``path`` (the leftmost
    and rightmost x of the square's left edge, even; default: the frame's width less a margin),
    ``row`` (the square's top y, even; default: drawn from ``seed``) and ``side`` (even;
    default: `square_side`).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction {direction!r} is not one of {', '.join(DIRECTIONS)}")
    if colour not in COLOURS:
        raise ValueError(f"colour {colour!r} is not one of {', '.join(COLOURS)}")
    if num_frames < 2 or size < 16 or size % 2:
        raise ValueError(f"need num_frames >= 2 and an even size >= 16, got {num_frames} frames of {size}px")
    present = (0, num_frames) if present is None else present
    check_span(present, num_frames, f"present '{format_span(present)}'")
    frames_shown = range(*present) if visible is None else sorted(set(int(t) for t in visible))
    if any(not 0 <= t < num_frames for t in frames_shown):
        raise ValueError(f"visible {list(visible)}: frame indices must be in 0..{num_frames - 1}")
    if hold < 1 or num_frames % hold:
        raise ValueError(f"hold {hold}: expected a positive divisor of num_frames={num_frames}")
    side = square_side(size) if side is None else side
    margin = side // 2
    if row is None:
        row = int(np.random.default_rng(seed).integers(margin, size - side - margin + 1)) // 2 * 2
    lo, hi = (margin, size - side - margin) if path is None else path
    if not (0 <= lo <= hi <= size - side and 0 <= row <= size - side):
        raise ValueError(f"path {path} / row {row}: the square (side {side}) must stay inside "
                         f"the {size}px frame")
    xs = np.repeat(np.linspace(lo, hi, num_frames // hold) // 2 * 2, hold)
    if direction == "left":
        xs = xs[::-1]
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    frames[:] = BACKGROUND
    for t in frames_shown:
        x = int(xs[t])
        frames[t, row : row + side, x : x + side] = COLOURS[colour]
    return frames


def _entries_for_video(index: int, video_name: str, direction: str, colour: str, presence: str, span) -> list[dict]:
    answers = {"direction": direction, "colour": colour, "presence": presence}
    entries = []
    for task, (question, candidates) in QUESTIONS.items():
        entries.append(
            {
                "video_name": video_name,
                "question": question,
                "candidates": candidates,
                "answer": answers[task],
                "answer_number": candidates.index(answers[task]),
                "question_id": f"{index:04d}-{task}",
                "task_name": task,
                "frames_with_answer_object": list(range(*span)),
            }
        )
    return entries


def write_dataset(out_dir: str | os.PathLike, n: int, num_frames: int = 8, size: int = 112, seed: int = 0) -> Path:
    """Write ``n`` videos to ``out_dir/videos`` and their questions to ``out_dir/annotations.json``.

    Videos cycle through a seeded shuffle of every (direction, colour, presence) combination, so
    answers are balanced. The annotations are written last and atomically: if the file exists, every
    video it names does too. Returns the annotations path.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if num_frames < 4:
        raise ValueError(f"num_frames must be at least 4 (two per half for direction), got {num_frames}")
    out_dir = Path(out_dir)
    combos = list(itertools.product(DIRECTIONS, COLOURS, PRESENCE))
    order = np.random.default_rng(seed).permutation(len(combos))
    entries = []
    for index in range(n):
        direction, colour, presence = combos[order[index % len(combos)]]
        span = presence_span(presence, num_frames)
        frames = make_video(direction, colour, num_frames, size, present=span, seed=seed * 100_003 + index)
        video_name = f"video_{index:04d}.mp4"
        write_video(out_dir / "videos" / video_name, frames)
        entries += _entries_for_video(index, video_name, direction, colour, presence, span)
    annotations = out_dir / "annotations.json"
    tmp_path = annotations.with_name(f".{annotations.name}.{os.getpid()}.tmp")
    tmp_path.write_text(json.dumps(entries, indent=1), encoding="utf-8")
    os.replace(tmp_path, annotations)
    return annotations


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vlminterp.data.synthetic",
        description="Write a synthetic video-QA dataset (moving coloured squares) with known answers: "
        "OUT/videos/video_NNNN.mp4 and OUT/annotations.json (3 questions per video: direction, colour, presence).",
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory (created if missing)")
    parser.add_argument("--n", required=True, type=int, help="number of videos to write")
    parser.add_argument("--num_frames", type=int, default=8, help="frames per video, at least 4 (default: 8)")
    parser.add_argument("--size", type=int, default=112, help="frame height and width in pixels, even (default: 112)")
    parser.add_argument("--seed", type=int, default=0, help="seed for answer order and square rows (default: 0)")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        path = write_dataset(args.out, args.n, num_frames=args.num_frames, size=args.size, seed=args.seed)
    except ValueError as error:
        parser.error(str(error))  # a bad flag value: usage + one line, not a traceback
    print(f"wrote {args.n} videos and {3 * args.n} questions to {path}")


if __name__ == "__main__":
    main()
