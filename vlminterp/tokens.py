"""Which sequence positions are text, image patches, and which video frame.

`TokenLayout` is built from a prepared batch (``vlm.layout(inputs)``). `TokenSlice` parses
the position specs recipes take on the command line::

    all | text | markers | visual | last | visual_frames:a:b | positions:i,j,k

Layout v2, per batch row: images are `ImageSpan`s made of `View`s (a base/thumbnail view plus
tiles, each with its grid and pixel geometry, so a box maps through the real processor into
every view); videos are `VideoSpan`s made of temporal `Group`s, each with the real range of
input frames the processor put into it (Qwen-style families merge 2 frames per group,
LLaVA-NeXT-Video one frame per group, ...). Separators and markers (row newlines, ``<img>``,
timestamps) are kept apart from patch tokens (``row.markers``, a subset of ``row.text``).

``visual_frames:a:b`` is half-open over *input* frames; a span that cuts a group selects the
whole group and says so (`FrameSpan.exact` is False and `FrameSpan.frames` names the frames
really covered) rather than silently rounding or skipping.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

Size = int | float
_SLICE_HELP = ("allowed: 'all', 'text', 'markers', 'visual', 'last', 'visual_frames:a:b' "
               "(half-open input frames, a < b), 'positions:i,j,k'")


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
        if s in ("all", "text", "markers", "visual", "last"):
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
    cells of ``cell`` pixels, ``grid`` = (rows, cols) of tokens. Sizes may be fractional: a
    crop of the original resized to a square input (Gemma 3 pan-and-scan) is the whole image
    resized by the crop's scale, then the crop's window; where a model resamples its token grid
    (LLaVA-OneVision's interpolated anyres grid) the cells are the tokens' nominal footprints."""

    original: tuple[int, int]
    resized: tuple[Size, Size]
    crop_box: tuple[Size, Size, Size, Size]
    cell: Size
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


_EMPTY = torch.zeros(0, dtype=torch.long)


def _empty() -> torch.Tensor:
    return _EMPTY.clone()


@dataclass
class View:
    """One grid of patch tokens of an image: the base view, a tile/crop/slice, a thumbnail or
    global view. ``positions[k]`` is the token of grid cell k in row-major order; ``separators``
    are this view's non-patch tokens (row newlines, column markers). ``geometry`` maps original
    pixels to the view's cells (None where a view's pixels do not come from a simple resize/crop
    of the original); ``source`` is the index of the view's pixel crop among the image's crops
    in the processor's pixel tensor (None: the image has one)."""

    positions: torch.Tensor
    grid: tuple[int, int]
    geometry: ImageGeometry | None = None
    kind: str = "base"
    separators: torch.Tensor = field(default_factory=_empty)
    source: int | None = None

    def __post_init__(self):
        rows, cols = self.grid
        if len(self.positions) != rows * cols:
            raise ValueError(f"{self.kind} view: {len(self.positions)} positions for a "
                             f"{rows}x{cols} grid")

    def cell_positions(self, cells) -> torch.Tensor:
        cols = self.grid[1]
        idx = torch.tensor([r * cols + c for r, c in cells], dtype=torch.long)
        return self.positions[idx] if len(idx) else _empty()

    def box_positions(self, box, buffer: int = 0) -> torch.Tensor:
        if self.geometry is None:
            return _empty()
        return self.cell_positions(self.geometry.box_cells(box, buffer))


@dataclass
class ImageSpan:
    """One image's tokens as one or more `View`s (LLaVA-1.5: one; anyres/tiling families: a base
    or thumbnail view plus tiles) and its ``markers`` (``<img>``, ``</img>``, vision start/end)."""

    views: list[View]
    markers: torch.Tensor = field(default_factory=_empty)

    @classmethod
    def single(cls, positions: torch.Tensor, geometry: ImageGeometry) -> "ImageSpan":
        return cls([View(positions, geometry.grid, geometry)])

    @property
    def positions(self) -> torch.Tensor:
        """Every patch token of the image (all views, separators and markers excluded)."""
        return torch.cat([v.positions for v in self.views])

    @property
    def separators(self) -> torch.Tensor:
        return torch.cat([_empty()] + [v.separators for v in self.views])

    @property
    def grid(self) -> tuple[int, int]:
        return self.views[0].grid

    @property
    def geometry(self) -> ImageGeometry | None:
        return self.views[0].geometry

    def cell_positions(self, cells) -> torch.Tensor:
        """Positions of grid cells of the first (base) view."""
        return self.views[0].cell_positions(cells)

    def box_positions(self, box, buffer: int = 0) -> torch.Tensor:
        """Sorted token positions, over every view with a pixel geometry, of the cells a pixel
        box of the original image overlaps (see `ImageGeometry.box_cells`)."""
        found = torch.cat([_empty()] + [v.box_positions(box, buffer) for v in self.views])
        return torch.unique(found)


@dataclass(frozen=True)
class FrameSpan:
    positions: torch.Tensor
    groups: tuple[int, ...]
    frames: tuple[int, int]  # the input frames the selected groups really hold (lowest, highest+1)
    exact: bool              # the selected groups hold exactly the requested frames


@dataclass
class Group:
    """One temporal group of a video's tokens: ``frames`` is the half-open range of *input*
    frames (as given to `VLM.prepare`) whose pixels reach these positions, taken from the
    processor's outputs; ``grid`` its spatial token grid; ``cls`` per-frame class tokens."""

    positions: torch.Tensor
    frames: tuple[int, int]
    grid: tuple[int, int] | None = None
    cls: torch.Tensor = field(default_factory=_empty)

    @property
    def all_positions(self) -> torch.Tensor:
        return torch.cat([self.positions, self.cls]) if len(self.cls) else self.positions


@dataclass
class VideoSpan:
    """One video's tokens: ``groups[g]`` is temporal group g; ``markers`` the video's non-patch
    tokens (timestamps, frame labels, separators, trailing newlines)."""

    groups: list[Group]
    num_frames: int
    markers: torch.Tensor = field(default_factory=_empty)

    @classmethod
    def uniform(cls, groups: list[torch.Tensor], num_frames: int, temporal_patch: int,
                grid: tuple[int, int] | None = None) -> "VideoSpan":
        """Groups of ``temporal_patch`` consecutive frames each (the last may hold padding)."""
        return cls([Group(p, (g * temporal_patch, min((g + 1) * temporal_patch, num_frames)),
                          grid) for g, p in enumerate(groups)], num_frames)

    @property
    def positions(self) -> torch.Tensor:
        return torch.cat([g.all_positions for g in self.groups])

    def group_of(self, frame: int) -> int:
        for g, group in enumerate(self.groups):
            if group.frames[0] <= frame < group.frames[1]:
                return g
        raise ValueError(f"frame {frame} reaches no token group of this video")

    def frame_span(self, a: int, b: int) -> FrameSpan:
        """Positions of input frames [a, b); groups cut by the span are taken whole."""
        if not (0 <= a < b <= self.num_frames):
            raise ValueError(f"visual_frames:{a}:{b} is beyond the video's {self.num_frames} "
                             f"frames (allowed: 0 <= a < b <= {self.num_frames})")
        chosen = [g for g, group in enumerate(self.groups)
                  if group.frames[0] < b and group.frames[1] > a]
        if not chosen:
            raise ValueError(f"visual_frames:{a}:{b}: no token group holds these frames")
        held = set().union(*(range(*self.groups[g].frames) for g in chosen))
        covered = (min(held), max(held) + 1)
        return FrameSpan(torch.cat([self.groups[g].all_positions for g in chosen]),
                         tuple(chosen), covered, held == set(range(a, b)))


@dataclass
class RowLayout:
    """One batch row: ``text`` = every real non-patch position (prompt text *and* markers),
    ``markers`` = the separator/marker/timestamp positions among them, ``visual`` = every
    patch token (and per-frame class token), ``last`` = the last real position."""

    seq_len: int
    text: torch.Tensor
    visual: torch.Tensor
    last: int
    images: list[ImageSpan] = field(default_factory=list)
    videos: list[VideoSpan] = field(default_factory=list)
    cls: int | None = None  # CLIP's class token
    markers: torch.Tensor = field(default_factory=_empty)


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
        if sl.kind == "markers":
            return r.markers
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
