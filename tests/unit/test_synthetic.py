"""The synthetic moving-square dataset: the command's output loads, and its answers are true of the pixels."""

import json
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest

from vlminterp.data.synthetic import main, make_video, write_dataset
from vlminterp.data.videoqa import VideoQADataset

NUM_FRAMES, SIZE, N = 8, 64, 6
# Which RGB channels are high for each colour name: a reference independent of the generator's values.
HIGH_CHANNELS = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0)}
PRESENCE_FRAMES = {"first half": range(0, 4), "second half": range(4, 8), "throughout": range(0, 8)}


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    # main() in-process: a subprocess pays for `import vlminterp` (torch) again; --help covers `python -m`.
    out = tmp_path_factory.mktemp("synthetic")
    main(["--out", str(out), "--n", str(N), "--num_frames", str(NUM_FRAMES), "--size", str(SIZE), "--seed", "3"])
    return out


def square_mask(frames):
    """Pixels far from the frame's median colour (the plain background): where the square is."""
    background = np.median(frames.reshape(len(frames), -1, 3), axis=1)
    return np.abs(frames.astype(np.int16) - background[:, None, None, :]).max(axis=-1) > 50


def test_command_writes_n_videos_and_loadable_annotations(dataset_dir):
    videos = sorted(p.name for p in (dataset_dir / "videos").iterdir())
    assert videos == [f"video_{i:04d}.mp4" for i in range(N)]
    assert sorted(p.name for p in dataset_dir.iterdir()) == ["annotations.json", "videos"]  # no temporary files
    dataset = VideoQADataset(dataset_dir / "annotations.json", dataset_dir / "videos")
    assert len(dataset) == 3 * N
    assert {sample.task_name for sample in dataset} == {"direction", "colour", "presence"}
    for sample in dataset:
        assert sample.candidates[sample.answer_index] == sample.answer
        assert dataset.load_frames(sample).shape == (NUM_FRAMES, SIZE, SIZE, 3)


def test_answers_are_true_of_the_decoded_pixels(dataset_dir):
    dataset = VideoQADataset(dataset_dir / "annotations.json", dataset_dir / "videos")
    answers = defaultdict(dict)
    for sample in dataset:
        answers[sample.video_name][sample.task_name] = sample.answer
        answers[sample.video_name]["frames"] = sample.frames_with_answer_object
    for video_name, truth in answers.items():
        frames = dataset.load_frames(next(s for s in dataset if s.video_name == video_name))
        mask = square_mask(frames)
        visible = [t for t in range(NUM_FRAMES) if mask[t].sum() > 20]
        assert visible == truth["frames"] == list(PRESENCE_FRAMES[truth["presence"]]), video_name
        centroids = [np.nonzero(mask[t])[1].mean() for t in visible]
        steps = np.diff(centroids)
        assert (steps > 0).all() if truth["direction"] == "right" else (steps < 0).all(), (video_name, centroids)
        mean_colour = np.concatenate([frames[t][mask[t]] for t in visible]).mean(axis=0)
        assert tuple(int(v > 128) for v in mean_colour) == HIGH_CHANNELS[truth["colour"]], (video_name, mean_colour)


def test_help_explains_every_flag():
    result = subprocess.run(
        [sys.executable, "-m", "vlminterp.data.synthetic", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for flag, words in [("--out", "directory"), ("--n", "number of videos"), ("--num_frames", "frames per video"),
                        ("--size", "pixels"), ("--seed", "seed")]:  # fmt: skip
        assert flag in result.stdout and words in result.stdout


def test_command_reports_what_it_wrote(tmp_path, capsys):
    main(["--out", str(tmp_path), "--n", "2", "--size", "32"])
    assert capsys.readouterr().out.strip() == f"wrote 2 videos and 6 questions to {tmp_path / 'annotations.json'}"


def test_bad_flag_value_is_a_one_line_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--out", str(tmp_path / "x"), "--n", "1", "--size", "15"])
    assert info.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.endswith("need num_frames >= 2 and an even size >= 16, got 8 frames of 15px")
    assert not (tmp_path / "x").exists()


def test_make_video_draws_one_square_only_in_present_frames():
    frames = make_video("right", "blue", num_frames=6, size=32, present=(2, 5), seed=1)
    assert frames.shape == (6, 32, 32, 3) and frames.dtype == np.uint8
    mask = square_mask(frames)
    assert mask.sum(axis=(1, 2)).tolist() == [0, 0, 16, 16, 16, 0]  # a 4x4 square (size // 8)
    xs = [np.nonzero(mask[t])[1].min() for t in (2, 3, 4)]
    assert xs[0] < xs[1] < xs[2]
    left = make_video("left", "blue", num_frames=6, size=32, seed=1)
    right = make_video("right", "blue", num_frames=6, size=32, seed=1)
    np.testing.assert_array_equal(left, right[::-1])  # same path, travelled the other way


def test_make_video_rejects_unknown_names():
    with pytest.raises(ValueError, match="direction 'up' is not one of left, right"):
        make_video("up", "red")
    with pytest.raises(ValueError, match="colour 'pink' is not one of red, green, blue, yellow"):
        make_video("left", "pink")
    with pytest.raises(ValueError, match="beyond the video's 8 frames"):
        make_video("left", "red", present=(4, 9))


def test_write_dataset_is_deterministic_for_a_seed(tmp_path):
    first = write_dataset(tmp_path / "a", n=4, num_frames=4, size=32, seed=5)
    second = write_dataset(tmp_path / "b", n=4, num_frames=4, size=32, seed=5)
    other = write_dataset(tmp_path / "c", n=4, num_frames=4, size=32, seed=6)
    assert json.loads(first.read_text()) == json.loads(second.read_text())
    assert json.loads(first.read_text()) != json.loads(other.read_text())
    for name in ("video_0000.mp4", "video_0003.mp4"):
        assert (tmp_path / "a" / "videos" / name).read_bytes() == (tmp_path / "b" / "videos" / name).read_bytes()


def test_answers_are_balanced_over_a_full_cycle(tmp_path):
    annotations = json.loads(write_dataset(tmp_path, n=24, num_frames=4, size=16, seed=0).read_text())
    counts = defaultdict(lambda: defaultdict(int))
    for entry in annotations:
        counts[entry["task_name"]][entry["answer"]] += 1
    assert dict(counts["direction"]) == {"left": 12, "right": 12}
    assert dict(counts["colour"]) == {"red": 6, "green": 6, "blue": 6, "yellow": 6}
    assert dict(counts["presence"]) == {"first half": 8, "second half": 8, "throughout": 8}
