"""Frame-level counterfactual transforms: properties, hand-computed references, span parsing."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from vlminterp.video.counterfactuals import (
    COUNTERFACTUALS,
    blank,
    check_span,
    format_swap_spans,
    local_swap,
    make_counterfactuals,
    motion_destroy,
    motion_only,
    parse_span,
    parse_swap_spans,
    reverse,
    shuffle,
    shuffle_order,
)

FAST = settings(max_examples=50, deadline=None)


@st.composite
def clips(draw, min_frames=1, max_frames=8):
    shape = (
        draw(st.integers(min_frames, max_frames)),
        draw(st.integers(1, 4)),
        draw(st.integers(1, 4)),
        draw(st.sampled_from([1, 3])),
    )
    return draw(arrays(np.uint8, shape))


@st.composite
def swap_pairs(draw, num_frames):
    """Two disjoint equal-length spans inside ``num_frames`` frames, in either order."""
    length = draw(st.integers(1, num_frames // 2))
    a0 = draw(st.integers(0, num_frames - 2 * length))
    b0 = draw(st.integers(a0 + length, num_frames - length))
    pair = ((a0, a0 + length), (b0, b0 + length))
    return pair if draw(st.booleans()) else pair[::-1]


@st.composite
def clips_with_swap(draw):
    frames = draw(clips(min_frames=2))
    return frames, draw(swap_pairs(len(frames)))


def labelled_clip(num_frames=8):
    """Frame t is filled with the value t, so a result's frame order can be read off directly."""
    return np.broadcast_to(np.arange(num_frames, dtype=np.uint8)[:, None, None, None], (num_frames, 2, 2, 3)).copy()


def order_of(frames):
    return frames[:, 0, 0, 0].tolist()


@FAST
@given(clips())
def test_reverse_is_its_own_inverse_and_flips_time(frames):
    reversed_frames = reverse(frames)
    np.testing.assert_array_equal(reverse(reversed_frames), frames)
    for t in range(len(frames)):
        np.testing.assert_array_equal(reversed_frames[t], frames[len(frames) - 1 - t])


@FAST
@given(clips_with_swap())
def test_local_swap_matches_index_permutation_and_is_an_involution(case):
    frames, (span_a, span_b) = case
    order = list(range(len(frames)))
    (a0, a1), (b0, b1) = span_a, span_b
    order[a0:a1], order[b0:b1] = order[b0:b1], order[a0:a1]
    swapped = local_swap(frames, span_a, span_b)
    np.testing.assert_array_equal(swapped, frames[order])
    np.testing.assert_array_equal(local_swap(swapped, span_a, span_b), frames)


def test_local_swap_cli_example_swaps_frames_0_1_with_2_3():
    swapped = local_swap(labelled_clip(), *parse_swap_spans("0:2,2:4"))
    assert order_of(swapped) == [2, 3, 0, 1, 4, 5, 6, 7]


@FAST
@given(clips())
def test_motion_only_is_first_frame_then_absolute_differences(frames):
    out = motion_only(frames)
    np.testing.assert_array_equal(out[0], frames[0])
    for t in range(1, len(frames)):
        by_hand = [abs(int(a) - int(b)) for a, b in zip(frames[t].ravel(), frames[t - 1].ravel())]
        assert out[t].ravel().tolist() == by_hand


def test_motion_only_does_not_wrap_around_in_uint8():
    frames = np.array([5, 3, 250], dtype=np.uint8).reshape(3, 1, 1, 1)
    assert motion_only(frames).ravel().tolist() == [5, 2, 247]  # uint8 3 - 5 would give 254


@FAST
@given(clips())
def test_motion_destroy_repeats_the_per_pixel_temporal_median(frames):
    out = motion_destroy(frames)
    assert out.shape == frames.shape and out.dtype == np.uint8
    ordered = np.sort(frames.astype(np.int64), axis=0)  # each pixel's values over time, sorted
    t = len(frames)
    lo, hi = ordered[(t - 1) // 2], ordered[t // 2]  # the middle value(s)
    for k in range(t):
        np.testing.assert_array_equal(out[k], (lo + hi) // 2)


def test_motion_destroy_by_hand():
    # one pixel over 4 frames: sorted 10 30 40 200 -> median 35; another: 1 2 2 9 -> 2; 3 frames: 7 1 4 -> 4
    frames = np.array([[10, 1], [200, 2], [30, 9], [40, 2]], dtype=np.uint8).reshape(4, 1, 2, 1)
    assert motion_destroy(frames)[:, 0, :, 0].tolist() == [[35, 2]] * 4
    odd = np.array([7, 1, 4], dtype=np.uint8).reshape(3, 1, 1, 1)
    assert motion_destroy(odd).ravel().tolist() == [4, 4, 4]  # not the middle frame (1)


@FAST
@given(clips(), st.integers(0, 2**32 - 1))
def test_shuffle_is_a_seeded_permutation(frames, seed):
    order = shuffle_order(len(frames), seed)
    assert sorted(order.tolist()) == list(range(len(frames)))
    out = shuffle(frames, seed)
    np.testing.assert_array_equal(out, frames[order])
    np.testing.assert_array_equal(shuffle(frames, seed), out)


def test_shuffle_depends_on_the_seed():
    orders = {tuple(order_of(shuffle(labelled_clip(), seed))) for seed in range(5)}
    assert len(orders) > 1


@FAST
@given(clips(), st.data())
def test_blank_fills_only_the_span(frames, data):
    start = data.draw(st.integers(0, len(frames) - 1))
    end = data.draw(st.integers(start + 1, len(frames)))
    value = data.draw(st.integers(0, 255))
    out = blank(frames, (start, end), value)
    assert (out[start:end] == value).all()
    np.testing.assert_array_equal(out[:start], frames[:start])
    np.testing.assert_array_equal(out[end:], frames[end:])


@FAST
@given(clips_with_swap(), st.integers(0, 1000))
def test_every_counterfactual_keeps_shape_dtype_and_never_touches_its_input(case, seed):
    frames, spans = case
    original = frames.copy()
    frames.flags.writeable = False  # an in-place write anywhere would raise
    built = make_counterfactuals(frames, list(COUNTERFACTUALS), swap_spans=spans, seed=seed, blank_span=(0, 1))
    assert list(built) == list(COUNTERFACTUALS)
    for name, out in built.items():
        assert out.shape == frames.shape and out.dtype == np.uint8, name
        assert not np.shares_memory(out, frames), name
    np.testing.assert_array_equal(frames, original)


def test_make_counterfactuals_parses_string_specs():
    built = make_counterfactuals(labelled_clip(), ["local_swap", "blank"], swap_spans="0:2,2:4", blank_span="6:8")
    assert order_of(built["local_swap"]) == [2, 3, 0, 1, 4, 5, 6, 7]
    assert order_of(built["blank"]) == [0, 1, 2, 3, 4, 5, 0, 0]


def test_make_counterfactuals_rejects_unknown_names_listing_allowed_ones():
    with pytest.raises(ValueError, match="'rewind'") as info:
        make_counterfactuals(labelled_clip(), ["reverse", "rewind"])
    message = str(info.value)
    assert "\n" not in message
    assert all(name in message for name in COUNTERFACTUALS)


def test_local_swap_without_spans_says_what_to_pass():
    with pytest.raises(ValueError, match="needs swap_spans.*'0:2,2:4'"):
        make_counterfactuals(labelled_clip(), ["local_swap"])


@FAST
@given(st.integers(2, 40).flatmap(swap_pairs))
def test_parse_swap_spans_round_trips(pair):
    spec = format_swap_spans(*pair)
    assert parse_swap_spans(spec) == pair
    assert format_swap_spans(*parse_swap_spans(spec)) == spec


def test_parse_span_reads_start_and_end():
    assert parse_span("2:5") == (2, 5)
    assert parse_span(" 0:1 ") == (0, 1)


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("0:2,1:3", "spans overlap"),
        ("0:2,2:5", "different lengths"),
        ("0:2", "found 1 comma-separated"),
        ("0:2,2:4,4:6", "found 3 comma-separated"),
        ("0:2,a:4", "non-integer"),
        ("2:0,4:6", "empty, reversed"),
        ("-1:1,2:4", "empty, reversed or negative"),
        ("0-2,2-4", "not a span"),
        ("", "empty"),
    ],
)
def test_parse_swap_spans_rejects_bad_specs_quoting_them(spec, reason):
    with pytest.raises(ValueError) as info:
        parse_swap_spans(spec)
    message = str(info.value)
    assert f"swap_spans {spec!r}" in message and reason in message
    assert "'0:2,2:4'" in message  # says what is allowed


@pytest.mark.parametrize("spec", ["3", "3:3", "5:2", "x:2", "1:2:3"])
def test_parse_span_rejects_bad_specs_quoting_them(spec):
    with pytest.raises(ValueError, match=f"span '{spec}'.*expected 'start:end'"):
        parse_span(spec)


def test_check_span_names_the_input_and_the_video_length():
    with pytest.raises(ValueError) as info:
        check_span((6, 10), 8, "swap_spans '0:2,6:10'")
    assert str(info.value) == "swap_spans '0:2,6:10': span 6:10 is beyond the video's 8 frames"
    check_span((6, 8), 8, "ok")  # the last frames are inside


def test_local_swap_checks_spans_against_the_clip():
    with pytest.raises(ValueError, match="swap_spans '0:4,6:10': span 6:10 is beyond the video's 8 frames"):
        local_swap(labelled_clip(), (0, 4), (6, 10))
    with pytest.raises(ValueError, match="spans overlap"):
        local_swap(labelled_clip(), (0, 2), (1, 3))
