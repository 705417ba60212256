"""The shapes sample set: deterministic bytes, the nine OpenVid columns true to the clips, and clips that show
what their captions say (checked on frames decoded with PyAV directly)."""

import csv
import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from openvid_models.data.sample_set import (
    CLIPS_DIR,
    COLOURS,
    CSV_COLUMNS,
    DIRECTIONS,
    SHAPES,
    all_captions,
    caption_for,
    describe_clip,
    main,
    parse_caption,
    write_sample_set,
)

SMALL = dict(num_clips=12, frames=10, size=32, fps=5)


def decode(path) -> tuple[np.ndarray, av.video.stream.VideoStream]:
    """uint8 ``[T, H, W, 3]`` of every frame, and facts of the stream."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        facts = dict(rate=stream.average_rate, codec=stream.codec_context.name, pix_fmt=stream.codec_context.pix_fmt,
                     duration=float(stream.duration * stream.time_base))
    return frames, facts


def as_model_video(frames: np.ndarray) -> torch.Tensor:
    """``[3, T, H, W]`` in [-1, 1], as the datasets give clips."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1


def read_rows(csv_path):
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def sample_set(tmp_path_factory):
    return write_sample_set(tmp_path_factory.mktemp("set"), **SMALL)


def test_same_seed_same_bytes_other_seed_other_set(sample_set, tmp_path):
    # In another process too: x264 was seen to vary between processes in some settings.
    args = [f"--{name.replace('_', '-')}={value}" for name, value in SMALL.items()]
    subprocess.run([sys.executable, "-m", "openvid_models.data.sample_set", "--out", str(tmp_path / "again"), *args],
                   check=True, cwd=Path(__file__).parents[3], capture_output=True)
    again = tmp_path / "again" / "sample_set.csv"
    assert again.read_bytes() == sample_set.read_bytes()
    names = [row["video"] for row in read_rows(sample_set)]
    assert len(names) == SMALL["num_clips"] == len(set(names))
    for name in names:
        assert (again.parent / CLIPS_DIR / name).read_bytes() == (sample_set.parent / CLIPS_DIR / name).read_bytes()
    other = write_sample_set(tmp_path / "other", **{**SMALL, "seed": 1})
    assert other.read_bytes() != sample_set.read_bytes()


def test_csv_has_the_nine_columns_true_to_the_clips(sample_set):
    with open(sample_set, newline="") as f:
        assert tuple(next(csv.reader(f))) == CSV_COLUMNS == ("video", "caption", "aesthetic score", "motion score",
                                                            "temporal consistency score", "camera motion", "frame",
                                                            "fps", "seconds")
    for row in read_rows(sample_set):
        frames, facts = decode(sample_set.parent / CLIPS_DIR / row["video"])
        assert frames.shape == (SMALL["frames"], SMALL["size"], SMALL["size"], 3)
        assert int(row["frame"]) == len(frames)
        assert float(row["fps"]) == facts["rate"] == SMALL["fps"]
        assert float(row["seconds"]) == pytest.approx(facts["duration"]) == SMALL["frames"] / SMALL["fps"]
        assert facts["pix_fmt"] == "yuv420p" and facts["codec"] in ("h264", "mpeg4")
        assert 4 < float(row["aesthetic score"]) < 6 and float(row["motion score"]) > 0
        assert 0.5 < float(row["temporal consistency score"]) <= 1 and row["camera motion"] == "static"
        parse_caption(row["caption"])  # one of the vocabulary's captions


def centroid_and_colour(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) centroid and mean RGB in [0, 255] of a decoded frame's bright pixels."""
    bright = frame.max(-1) > 127
    rows, cols = np.nonzero(bright)
    return np.array([cols.mean(), rows.mean()]), frame[bright].mean(0)


def test_first_and_last_frames_show_the_caption(sample_set):
    step = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
    size = SMALL["size"]
    for row in read_rows(sample_set):
        # Read the caption's words here rather than through parse_caption, which shares the writer's vocabulary.
        colour, _, direction = re.fullmatch(r"a (\w+) (\w+) moving (?:to the )?(\w+) on a black background",
                                            row["caption"]).groups()
        frames, _ = decode(sample_set.parent / CLIPS_DIR / row["video"])
        (first, first_rgb), (last, last_rgb) = centroid_and_colour(frames[0]), centroid_and_colour(frames[-1])
        for rgb in (first_rgb, last_rgb):  # the stated colour, nearer it than any other
            distances = {name: np.abs(rgb - np.array(value)).max() for name, value in COLOURS.items()}
            assert min(distances, key=distances.get) == colour and distances[colour] < 40, (row, distances)
        # Starts in the half it moves away from, ends in the other half, with little motion across.
        along = np.dot(last - first, step[direction])
        across = abs(np.dot(last - first, step[direction][::-1]))
        assert along > size / 2 and across < 1, (row, first, last)
        assert np.dot(first - size / 2, step[direction]) < 0 < np.dot(last - size / 2, step[direction])
        # In its lane: right along the top, down the right side, left along the bottom, up the left side.
        across_position = np.dot(first, np.abs(step[direction][::-1]))
        if direction in ("right", "up"):
            assert across_position < 0.45 * size, (row, first)
        else:
            assert across_position > 0.55 * size, (row, first)


def test_describe_clip_reads_colour_shape_and_direction_back(tmp_path):
    path = write_sample_set(tmp_path, num_clips=48, frames=8, size=32, seed=3)
    rows = read_rows(path)
    assert sorted(row["caption"] for row in rows) == sorted(all_captions())  # 48 clips: each caption once
    for row in rows:
        description = describe_clip(as_model_video(decode(path.parent / CLIPS_DIR / row["video"])[0]))
        assert (description.colour, description.shape, description.direction) == parse_caption(row["caption"])
        assert description.matches(row["caption"], check_shape=True)


def test_describe_clip_says_none_without_foreground_or_motion():
    video = -torch.ones(3, 6, 16, 16)
    empty = describe_clip(video)
    assert (empty.colour, empty.shape, empty.direction, empty.foreground_fraction) == (None, None, None, 0.0)
    still = video.clone()
    still[:, :, 4:10, 4:10] = torch.tensor([-1.0, -1.0, 1.0])[:, None, None, None]  # a blue square, not moving
    description = describe_clip(still)
    assert (description.colour, description.shape, description.direction) == ("blue", "square", None)
    assert not description.matches("a blue square moving up on a black background")
    moving = video.clone()
    for t in range(6):  # a yellow square going down one pixel a frame
        moving[:2, t, 2 + t:8 + t, 5:11] = 1
    assert describe_clip(moving).direction == "down" and describe_clip(moving).colour == "yellow"
    with pytest.raises(ValueError, match=r"video must be \[3, T, H, W\]"):
        describe_clip(video[:, 0])


def test_vocabulary_and_captions():
    assert len(all_captions()) == len(COLOURS) * len(SHAPES) * len(DIRECTIONS) == 48
    for combo in itertools.product(COLOURS, SHAPES, DIRECTIONS):
        assert parse_caption(caption_for(*combo)) == combo
    assert caption_for("red", "circle", "left") == "a red circle moving to the left on a black background"
    with pytest.raises(ValueError, match="colour must be one of"):
        caption_for("purple", "circle", "left")
    with pytest.raises(ValueError, match="not one of the sample set's captions"):
        parse_caption("a dog runs on the beach")


def test_an_existing_set_is_reused_or_refused_never_mixed(sample_set, tmp_path):
    root = tmp_path / "set"
    csv_path = write_sample_set(root, **SMALL)
    stamp = csv_path.stat().st_mtime_ns
    assert write_sample_set(root, **SMALL) == csv_path and csv_path.stat().st_mtime_ns == stamp  # reused as is
    with pytest.raises(FileExistsError, match="other parameters"):
        write_sample_set(root, **{**SMALL, "num_clips": 5})
    assert csv_path.read_bytes() == sample_set.read_bytes()
    write_sample_set(root, **{**SMALL, "num_clips": 5}, overwrite=True)
    assert len(read_rows(csv_path)) == 5
    assert json.loads((root / "sample_set.json").read_text())["params"]["num_clips"] == 5
    assert not list(root.rglob("*.tmp-*"))


@pytest.mark.parametrize("argument,value,match", [("size", 34, "size must be a multiple of 4"),
                                                  ("frames", 1, "frames must be"), ("num_clips", 0, "num_clips must be")])
def test_bad_arguments_are_named(tmp_path, argument, value, match):
    with pytest.raises(ValueError, match=match):
        write_sample_set(tmp_path, **{**SMALL, argument: value})


def test_command_line(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--num-clips", "3", "--frames", "4", "--size", "16"]) == 0
    assert str(tmp_path / "sample_set.csv") in capsys.readouterr().out
    assert len(read_rows(tmp_path / "sample_set.csv")) == 3 and len(list((tmp_path / CLIPS_DIR).glob("*.mp4"))) == 3
