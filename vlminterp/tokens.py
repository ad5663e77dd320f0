"""Which sequence positions are text, image patches, and which video frame.

`TokenLayout` is built from a prepared batch (``vlm.layout(inputs)``). `TokenSlice` parses
the position specs recipes take on the command line::

    all | text | visual | last | visual_frames:a:b | positions:i,j,k

``visual_frames:a:b`` is half-open over *input* frames. Qwen2-VL merges
``temporal_patch`` consecutive frames into one token group, so frame f lives in group
``f // temporal_patch``; a span that cuts a group selects the whole group and says so
(`FrameSpan.exact` is False and `FrameSpan.frames` names the frames really covered).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

_SLICE_HELP = ("allowed: 'all', 'text', 'visual', 'last', 'visual_frames:a:b' (half-open input "
               "frames, a < b), 'positions:i,j,k'")


@dataclass(frozen=True)
class TokenSlice:
    """A parsed position spec; ``str(TokenSlice.parse(s)) == s`` for canonical specs."""

    kind: str
    start: int | None = None
    stop: int | None = None
    positions: tuple[int, ...] = ()

    @classmethod
    def parse(cls, spec: str) -> "TokenSlice":
        if not isinstance(spec, str):
            raise ValueError(f"token slice {spec!r}: expected a string; {_SLICE_HELP}")
        s = spec.strip()
        if s in ("all", "text", "visual", "last"):
            return cls(s)
        m = re.fullmatch(r"visual_frames:(\d+):(\d+)", s)
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            if a >= b:
                raise ValueError(f"token slice {spec!r}: empty frame range {a}:{b}; {_SLICE_HELP}")
            return cls("visual_frames", a, b)
        m = re.fullmatch(r"positions:(\d+(?:,\d+)*)", s)
        if m:
            return cls("positions", positions=tuple(int(x) for x in m.group(1).split(",")))
        raise ValueError(f"token slice {spec!r} is not understood; {_SLICE_HELP}")

    def __str__(self) -> str:
        if self.kind == "visual_frames":
            return f"visual_frames:{self.start}:{self.stop}"
        if self.kind == "positions":
            return "positions:" + ",".join(map(str, self.positions))
        return self.kind


@dataclass
class ImageGeometry:
    """How original pixels reach the patch grid: resize to ``resized`` (w, h), crop the
    window at ``crop_box`` (left, top, right, bottom) of the resized image, cut in square
    cells of ``cell`` pixels, ``grid`` = (rows, cols) of tokens."""

    original: tuple[int, int]
    resized: tuple[int, int]
    crop_box: tuple[int, int, int, int]
    cell: int
    grid: tuple[int, int]

    def box_cells(self, box, buffer: int = 0) -> list[tuple[int, int]]:
        """Grid cells (row, col) a pixel box ``(x0, y0, x1, y1)`` of the original image
        overlaps with positive area after resize and crop, grown by ``buffer`` rings of
        8-neighbours. Pixel i spans [i, i+1); the box is half-open."""
        x0, y0, x1, y1 = [float(v) for v in box]
        if not (x1 > x0 and y1 > y0):
            raise ValueError(f"box {tuple(box)}: expected x0 < x1 and y0 < y1")
        sx = self.resized[0] / self.original[0]
        sy = self.resized[1] / self.original[1]
        left, top = self.crop_box[0], self.crop_box[1]
        rows, cols = self.grid
        # Box in crop coordinates, clipped to the crop window.
        cx0 = max(x0 * sx - left, 0.0)
        cy0 = max(y0 * sy - top, 0.0)
        cx1 = min(x1 * sx - left, cols * self.cell)
        cy1 = min(y1 * sy - top, rows * self.cell)
        if cx1 <= cx0 or cy1 <= cy0:
            return []
        c0, c1 = int(cx0 // self.cell), int(math.ceil(cx1 / self.cell))
        r0, r1 = int(cy0 // self.cell), int(math.ceil(cy1 / self.cell))
        r0, c0 = max(r0 - buffer, 0), max(c0 - buffer, 0)
        r1, c1 = min(r1 + buffer, rows), min(c1 + buffer, cols)
        return [(r, c) for r in range(r0, r1) for c in range(c0, c1)]


@dataclass
class ImageSpan:
    """One image's tokens: ``positions[k]`` is the token of grid cell ``cells[k]``."""

    positions: torch.Tensor
    geometry: ImageGeometry

    @property
    def grid(self) -> tuple[int, int]:
        return self.geometry.grid

    def cell_positions(self, cells) -> torch.Tensor:
        cols = self.grid[1]
        idx = torch.tensor([r * cols + c for r, c in cells], dtype=torch.long)
        return self.positions[idx] if len(idx) else idx

    def box_positions(self, box, buffer: int = 0) -> torch.Tensor:
        """Token positions of the cells a pixel box overlaps (see `ImageGeometry.box_cells`)."""
        return self.cell_positions(self.geometry.box_cells(box, buffer))


@dataclass(frozen=True)
class FrameSpan:
    positions: torch.Tensor
    groups: tuple[int, ...]
    frames: tuple[int, int]  # the input frames the selected groups really hold
    exact: bool


@dataclass
class VideoSpan:
    """One video's tokens: ``groups[g]`` holds the positions of temporal group g."""

    groups: list[torch.Tensor]
    num_frames: int
    temporal_patch: int

    @property
    def positions(self) -> torch.Tensor:
        return torch.cat(self.groups)

    def group_of(self, frame: int) -> int:
        return frame // self.temporal_patch

    def frame_span(self, a: int, b: int) -> FrameSpan:
        """Positions of input frames [a, b); groups cut by the span are taken whole."""
        if not (0 <= a < b <= self.num_frames):
            raise ValueError(f"visual_frames:{a}:{b} is beyond the video's {self.num_frames} "
                             f"frames (allowed: 0 <= a < b <= {self.num_frames})")
        g0, g1 = self.group_of(a), self.group_of(b - 1) + 1
        covered = (g0 * self.temporal_patch, min(g1 * self.temporal_patch, self.num_frames))
        return FrameSpan(torch.cat(self.groups[g0:g1]), tuple(range(g0, g1)), covered,
                         covered == (a, b))


@dataclass
class RowLayout:
    seq_len: int
    text: torch.Tensor
    visual: torch.Tensor
    last: int
    images: list[ImageSpan] = field(default_factory=list)
    videos: list[VideoSpan] = field(default_factory=list)
    cls: int | None = None  # CLIP's class token


@dataclass
class TokenLayout:
    """Per batch row, the index tensors of every kind of position."""

    rows: list[RowLayout]

    def __getitem__(self, row: int) -> RowLayout:
        return self.rows[row]

    def __len__(self) -> int:
        return len(self.rows)

    def positions(self, spec: str | TokenSlice, row: int = 0) -> torch.Tensor:
        """The positions a `TokenSlice` names in ``row``; errors name the spec."""
        sl = spec if isinstance(spec, TokenSlice) else TokenSlice.parse(spec)
        r = self.rows[row]
        if sl.kind == "all":
            return torch.arange(r.seq_len)
        if sl.kind == "text":
            return r.text
        if sl.kind == "visual":
            return r.visual
        if sl.kind == "last":
            return torch.tensor([r.last])
        if sl.kind == "positions":
            bad = [p for p in sl.positions if p >= r.seq_len]
            if bad:
                raise ValueError(f"token slice '{sl}': positions {bad} are outside the sequence "
                                 f"of length {r.seq_len}")
            return torch.tensor(sl.positions, dtype=torch.long)
        if not r.videos:
            raise ValueError(f"token slice '{sl}': row {row} holds no video")
        return r.videos[0].frame_span(sl.start, sl.stop).positions

    def frame_span(self, a: int, b: int, row: int = 0, video: int = 0) -> FrameSpan:
        return self.rows[row].videos[video].frame_span(a, b)
