"""Frame-level counterfactual videos: transforms of a ``[T, H, W, C]`` uint8 clip.

Each transform is pure (the input array is never written to) and returns a new array of the same
shape and dtype, so a clean clip and its counterfactual can go through the processor as one batch.
Random transforms take an explicit seed. Spans are half-open ``(start, end)`` input-frame ranges;
the command-line form is ``"start:end"`` (one span) or ``"0:2,2:4"`` (a pair for ``local_swap``).
"""

from collections.abc import Callable

import numpy as np
from jaxtyping import Int64, UInt8

Frames = UInt8[np.ndarray, "t h w c"]
Span = tuple[int, int]

SWAP_SPANS_HELP = "expected two disjoint equal-length spans like '0:2,2:4'"
SPAN_HELP = "expected 'start:end' with integers 0 <= start < end, like '0:2'"


def format_span(span: Span) -> str:
    return f"{span[0]}:{span[1]}"


def format_swap_spans(span_a: Span, span_b: Span) -> str:
    return f"{format_span(span_a)},{format_span(span_b)}"


def _parse_one_span(text: str, context: str, allowed: str) -> Span:
    parts = text.strip().split(":")
    if len(parts) != 2:
        raise ValueError(f"{context}: {text.strip()!r} is not a span; {allowed}")
    try:
        start, end = int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(f"{context}: {text.strip()!r} has a non-integer bound; {allowed}") from None
    if start < 0 or start >= end:
        raise ValueError(f"{context}: span {start}:{end} is empty, reversed or negative; {allowed}")
    return start, end


def parse_span(spec: str) -> Span:
    """``"2:5"`` -> ``(2, 5)``: frames 2, 3 and 4."""
    return _parse_one_span(spec, f"span {spec!r}", SPAN_HELP)


def _check_swap_pair(span_a: Span, span_b: Span, context: str) -> None:
    (a0, a1), (b0, b1) = span_a, span_b
    if a1 - a0 != b1 - b0:
        raise ValueError(f"{context}: spans have different lengths ({a1 - a0} and {b1 - b0}); {SWAP_SPANS_HELP}")
    if a0 < b1 and b0 < a1:
        raise ValueError(f"{context}: spans overlap; {SWAP_SPANS_HELP}")


def parse_swap_spans(spec: str) -> tuple[Span, Span]:
    """``"0:2,2:4"`` -> ``((0, 2), (2, 4))``; spans must be disjoint and of equal length."""
    context = f"swap_spans {spec!r}"
    pieces = spec.split(",")
    if not spec.strip():
        raise ValueError(f"{context}: the spec is empty; {SWAP_SPANS_HELP}")
    if len(pieces) != 2:
        raise ValueError(f"{context}: found {len(pieces)} comma-separated spans; {SWAP_SPANS_HELP}")
    span_a, span_b = (_parse_one_span(piece, context, SWAP_SPANS_HELP) for piece in pieces)
    _check_swap_pair(span_a, span_b, context)
    return span_a, span_b


def check_span(span: Span, num_frames: int, name: str) -> None:
    """Raise if ``span`` is not a non-empty range inside a video of ``num_frames`` frames.

    ``name`` prefixes the message and should quote the user's input, e.g. ``"swap_spans '0:2,6:10'"``.
    """
    start, end = span
    if start < 0 or start >= end:
        raise ValueError(f"{name}: span {start}:{end} is empty, reversed or negative; {SPAN_HELP}")
    if end > num_frames:
        raise ValueError(f"{name}: span {start}:{end} is beyond the video's {num_frames} frames")


def local_swap(frames: Frames, span_a: Span, span_b: Span) -> Frames:
    """Swap two equal-length blocks of frames: ``(0, 2), (2, 4)`` turns 0 1 2 3 into 2 3 0 1."""
    context = f"swap_spans '{format_swap_spans(span_a, span_b)}'"
    _check_swap_pair(span_a, span_b, context)
    check_span(span_a, len(frames), context)
    check_span(span_b, len(frames), context)
    out = frames.copy()
    out[span_a[0] : span_a[1]] = frames[span_b[0] : span_b[1]]
    out[span_b[0] : span_b[1]] = frames[span_a[0] : span_a[1]]
    return out


def reverse(frames: Frames) -> Frames:
    """Play the clip backwards: same appearance, opposite motion."""
    return frames[::-1].copy()


def motion_destroy(frames: Frames) -> Frames:
    """Every frame replaced by the per-pixel temporal median of the clip (the original's
    definition): appearance kept, motion removed. With an even frame count the median of a
    pixel is the mean of its two middle values, truncated to uint8 (``np.median(...).astype``)."""
    median = np.median(frames, axis=0).astype(np.uint8)
    return np.repeat(median[None], len(frames), axis=0)


def motion_only(frames: Frames) -> Frames:
    """Frame 0, then ``|f_t - f_{t-1}|``: motion kept, static appearance removed.

    The difference is taken in int16 because uint8 subtraction wraps around (3 - 5 = 254).
    """
    signed = frames.astype(np.int16)
    out = np.empty_like(frames)
    out[0] = frames[0]
    out[1:] = np.abs(signed[1:] - signed[:-1]).astype(np.uint8)
    return out


def shuffle_order(num_frames: int, seed: int) -> Int64[np.ndarray, " t"]:
    """The permutation ``shuffle`` applies; output frame i is input frame ``order[i]``."""
    return np.random.default_rng(seed).permutation(num_frames).astype(np.int64)


def shuffle(frames: Frames, seed: int) -> Frames:
    """Frames in a seeded random order (numpy Generator): appearance kept, temporal order destroyed."""
    return frames[shuffle_order(len(frames), seed)]


def blank(frames: Frames, span: Span, value: int = 0) -> Frames:
    """Frames in ``span`` replaced by a constant ``value`` (0..255): removes the evidence there."""
    check_span(span, len(frames), f"blank span '{format_span(span)}'")
    if not 0 <= value <= 255:
        raise ValueError(f"blank value {value} is outside 0..255")
    out = frames.copy()
    out[span[0] : span[1]] = value
    return out


COUNTERFACTUALS: dict[str, Callable[..., np.ndarray]] = {
    "local_swap": local_swap,
    "reverse": reverse,
    "motion_destroy": motion_destroy,
    "motion_only": motion_only,
    "shuffle": shuffle,
    "blank": blank,
}


def _as_swap_spans(swap_spans: str | tuple[Span, Span] | None) -> tuple[Span, Span]:
    if swap_spans is None:
        raise ValueError(f"counterfactual 'local_swap' needs swap_spans; {SWAP_SPANS_HELP}")
    if isinstance(swap_spans, str):
        return parse_swap_spans(swap_spans)
    return swap_spans


def make_counterfactuals(
    frames: Frames,
    names: list[str],
    swap_spans: str | tuple[Span, Span] | None = None,
    seed: int = 0,
    blank_span: str | Span | None = None,
) -> dict[str, np.ndarray]:
    """Build the named counterfactuals of one clip, keyed by name, in the order given.

    ``swap_spans`` is needed by ``local_swap`` (``"0:2,2:4"`` or a pair of tuples); ``seed`` drives
    ``shuffle``; ``blank_span`` (``"a:b"`` or a tuple) is what ``blank`` blanks, the whole clip if None.
    """
    unknown = [name for name in names if name not in COUNTERFACTUALS]
    if unknown:
        raise ValueError(f"unknown counterfactual(s) {unknown}; allowed: {', '.join(COUNTERFACTUALS)}")
    built: dict[str, np.ndarray] = {}
    for name in names:
        if name == "local_swap":
            built[name] = local_swap(frames, *_as_swap_spans(swap_spans))
        elif name == "shuffle":
            built[name] = shuffle(frames, seed)
        elif name == "blank":
            span = parse_span(blank_span) if isinstance(blank_span, str) else blank_span
            built[name] = blank(frames, span if span is not None else (0, len(frames)))
        else:
            built[name] = COUNTERFACTUALS[name](frames)
    return built
