"""OpenVidDataset: the release CSV header, filters, items, and bad clips skipped and counted."""

import logging

import numpy as np
import pytest
import torch

from openvid_models.data import csv_dataset as C
from openvid_models.data.video import SKIP_REASONS, sample_frame_indices
from tests.openvid_models.data.utils import (encode_clip, frame_index, openvid_row, truncate_file,
                                             truncate_media_data, write_openvid_csv)

REAL_HEADER = ("video,caption,aesthetic score,motion score,temporal consistency score,camera motion,frame,fps,"
               "seconds")
KW = dict(num_frames=8, frame_interval=3, image_size=32)  # window of 24 frames


def test_columns_are_the_release_header():
    assert ",".join(C.OPENVID_COLUMNS) == REAL_HEADER


def test_read_csv_with_real_header(tmp_path):
    path = tmp_path / "OpenVid-1M.csv"
    path.write_text(
        REAL_HEADER + "\n"
        '--_-6ct5Zfs_0_0to121.mp4,"A man, in a red coat, says ""hi"".",5.21,3.4,0.9987,pan_right,121,29.97,4.04\n'
        'b.mp4,plain caption,4.5,0.8,0.97,static,60.0,30,2\n', encoding="utf-8")
    records, bad = C.read_openvid_csv(path)
    assert bad == {}
    assert records[0] == C.ClipRecord(video="--_-6ct5Zfs_0_0to121.mp4", caption='A man, in a red coat, says "hi".',
                                      aesthetic_score=5.21, motion_score=3.4, temporal_consistency_score=0.9987,
                                      camera_motion="pan_right", frame=121, fps=29.97, seconds=4.04)
    assert records[1].frame == 60 and records[1].caption == "plain caption"


def test_read_csv_other_order_extra_columns_bom(tmp_path):
    columns = list(reversed(C.OPENVID_COLUMNS)) + ["extra"]
    path = write_openvid_csv(tmp_path / "x.csv", [openvid_row("a.mp4", caption="x, y")], columns=columns)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    records, bad = C.read_openvid_csv(path)
    assert bad == {} and records[0].video == "a.mp4" and records[0].caption == "x, y"


def test_bad_header_lists_missing_columns(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("video,caption,aesthetic_score,motion score\na.mp4,c,1,2\n")
    with pytest.raises(ValueError) as info:
        C.read_openvid_csv(path)
    message = str(info.value)
    for column in ("aesthetic score", "temporal consistency score", "camera motion", "frame", "fps", "seconds"):
        assert repr(column) in message
    assert "aesthetic_score" in message  # what was found
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty file"):
        C.read_openvid_csv(tmp_path / "empty.csv")


def test_unreadable_rows_reported(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text(REAL_HEADER + "\n"
                    "a.mp4,ok,5,3,0.99,static,48,30,1.6\n"
                    "b.mp4,bad score,high,3,0.99,static,48,30,1.6\n"
                    "c.mp4,unquoted, comma,5,3,0.99,static,48,30,1.6\n")
    records, bad = C.read_openvid_csv(path)
    assert [r.video for r in records] == ["a.mp4"]
    assert set(bad) == {3, 4}
    assert "aesthetic score" in bad[3] and "10 fields" in bad[4]


@pytest.fixture
def dataset_dir(tmp_path):
    """Clips good_0 ... good_5 (48 frames, keyframe every 12), one row each with varied scores."""
    root = tmp_path / "videos"
    root.mkdir()
    rows = []
    for i in range(6):
        encode_clip(root / f"good_{i}.mp4", num_frames=48, gop=12)
        rows.append(openvid_row(f"good_{i}.mp4", caption=f"clip {i}, number {i}", aesthetic=4.0 + i,
                                motion=float(i), temporal=0.9 + i / 100, camera=["static", "pan_left"][i % 2]))
    return root, rows


def test_filters(tmp_path, dataset_dir):
    root, rows = dataset_dir
    rows = rows + [openvid_row("short.mp4", frames=20)]  # fewer frames than the window by the CSV
    csv_path = write_openvid_csv(tmp_path / "OpenVid-1M.csv", rows)
    write_openvid_csv(tmp_path / "OpenVidHD.csv", [rows[1], rows[2], rows[4]])

    def names(**filters):
        dataset = C.OpenVidDataset(csv_path, root, **KW, **filters)
        return list(dataset.video_names), dict(dataset.excluded)

    assert names() == ([f"good_{i}.mp4" for i in range(6)], {"too few frames (csv)": 1})
    assert names(min_aesthetic=6.5)[0] == ["good_3.mp4", "good_4.mp4", "good_5.mp4"]
    assert names(min_motion=1, max_motion=3) == (["good_1.mp4", "good_2.mp4", "good_3.mp4"],
                                                 {"too few frames (csv)": 1, "motion score low": 1,
                                                  "motion score high": 2})
    assert names(min_temporal_consistency=0.935)[0] == ["good_4.mp4", "good_5.mp4"]
    assert names(camera_motions={"pan_left"})[0] == ["good_1.mp4", "good_3.mp4", "good_5.mp4"]
    assert names(hd_subset_csv=tmp_path / "OpenVidHD.csv")[0] == ["good_1.mp4", "good_2.mp4", "good_4.mp4"]
    assert names(predicate=lambda r: "2" in r.caption)[0] == ["good_2.mp4"]
    assert names(min_aesthetic=5, camera_motions=["static"])[0] == ["good_2.mp4", "good_4.mp4"]
    with pytest.raises(ValueError, match="no clips left"):
        names(min_aesthetic=100)
    with pytest.raises(TypeError, match="camera_motions"):
        names(camera_motions="static")
    with pytest.raises(ValueError, match="video_root"):
        C.OpenVidDataset(csv_path, tmp_path / "nowhere", **KW)


def test_items(tmp_path, dataset_dir):
    root, rows = dataset_dir
    dataset = C.OpenVidDataset(write_openvid_csv(tmp_path / "a.csv", rows), root, seed=7, flip_prob=0.0, **KW)
    assert len(dataset) == 6
    for index in range(6):
        item = dataset[index]
        assert set(item) == {"video", "text", "index", "skipped"}
        assert item["video"].shape == (3, 8, 32, 32) and item["video"].dtype == torch.float32
        assert -1 <= item["video"].min() and item["video"].max() <= 1
        assert item["text"] == f"clip {index}, number {index}" and item["index"] == index
        assert item["skipped"].tolist() == [0] * len(SKIP_REASONS)
        # the frames are those of the window drawn from (seed, epoch, index)
        expected = sample_frame_indices(48, 8, 3, C.item_rng(7, 0, index))
        frames = ((item["video"].permute(1, 2, 3, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
        assert [frame_index(f) for f in frames] == expected.tolist()
    torch.testing.assert_close(dataset[-1]["video"], dataset[5]["video"])
    torch.testing.assert_close(dataset[2]["video"], dataset[2]["video"])  # seeded: the same window and flip
    dataset.set_epoch(1)
    windows = {tuple(sample_frame_indices(48, 8, 3, C.item_rng(7, epoch, 2))) for epoch in (0, 1)}
    assert len(windows) == 2  # another epoch, another window (for this seed)
    with pytest.raises(IndexError):
        dataset[6]


def test_flip_probability(tmp_path, dataset_dir):
    root, rows = dataset_dir
    csv_path = write_openvid_csv(tmp_path / "a.csv", rows)
    plain = C.OpenVidDataset(csv_path, root, seed=3, flip_prob=0.0, **KW)[0]["video"]
    flipped = C.OpenVidDataset(csv_path, root, seed=3, flip_prob=1.0, **KW)[0]["video"]
    torch.testing.assert_close(flipped, plain.flip(-1))


@pytest.fixture
def broken_dataset(tmp_path, dataset_dir):
    """Rows: good_0, missing, empty, corrupt bytes, truncated, too short (the CSV says otherwise), good_1."""
    root, rows = dataset_dir
    (root / "empty.mp4").write_bytes(b"")
    (root / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    encode_clip(root / "truncated.mp4", num_frames=48, gop=12, faststart=True)
    truncate_media_data(root / "truncated.mp4", keep=0.3)
    encode_clip(root / "cut.mp4", num_frames=48, gop=12)  # index at the end: cut off, so unreadable
    truncate_file(root / "cut.mp4", 0.5)
    encode_clip(root / "short.mp4", num_frames=20, gop=12)
    bad = ["missing.mp4", "empty.mp4", "corrupt.mp4", "truncated.mp4", "cut.mp4", "short.mp4"]
    table = [rows[0]] + [openvid_row(name) for name in bad] + [rows[1]]
    csv_path = write_openvid_csv(tmp_path / "broken.csv", table)
    return csv_path, root


def counts(**by_reason):
    return [by_reason.get(reason, 0) for reason in SKIP_REASONS]


def test_bad_clips_skipped_and_counted(broken_dataset, caplog):
    csv_path, root = broken_dataset
    dataset = C.OpenVidDataset(csv_path, root, seed=0, **KW)
    # seeded: the truncated clip's window is drawn from (0, 0, 4); it must reach past the 30% kept
    assert sample_frame_indices(48, 8, 3, C.item_rng(0, 0, 4))[-1] > 20
    assert len(dataset) == 8
    with caplog.at_level(logging.WARNING, logger="openvid_models.data.csv_dataset"):
        item = dataset[1]
    assert item["index"] == 7 and item["text"] == "clip 1, number 1"
    assert item["skipped"].tolist() == counts(missing=1, empty=1, corrupt=2, truncated=1, too_short=1)
    assert dict(dataset.skip_counts) == {"missing": 1, "empty": 1, "corrupt": 2, "truncated": 1, "too_short": 1}
    for name in ["missing.mp4", "empty.mp4", "corrupt.mp4", "truncated.mp4", "cut.mp4", "short.mp4"]:
        assert any(name in record.getMessage() for record in caplog.records), name
    assert dataset[0]["skipped"].sum() == 0
    item = dataset[6]  # short.mp4 only
    assert item["index"] == 7 and item["skipped"].tolist() == counts(too_short=1)
    assert C.summarize_skipped(torch.stack([dataset[1]["skipped"], dataset[6]["skipped"]])) == \
        dict(zip(SKIP_REASONS, counts(missing=1, empty=1, corrupt=2, truncated=1, too_short=2)))


def test_skip_wraps_around_and_gives_up(tmp_path, dataset_dir):
    root, rows = dataset_dir
    table = [rows[0], openvid_row("gone_1.mp4"), openvid_row("gone_2.mp4")]
    dataset = C.OpenVidDataset(write_openvid_csv(tmp_path / "a.csv", table), root, **KW)
    item = dataset[2]
    assert item["index"] == 0 and item["skipped"].tolist() == counts(missing=1)
    dataset = C.OpenVidDataset(write_openvid_csv(tmp_path / "b.csv", table[1:]), root, max_consecutive_skips=5,
                               **KW)
    with pytest.raises(RuntimeError, match="5 unusable clips in a row.*gone_"):
        dataset[0]


def test_skips_reach_the_trainer_through_workers(broken_dataset):
    from torch.utils.data import DataLoader

    csv_path, root = broken_dataset
    dataset = C.OpenVidDataset(csv_path, root, seed=0, **KW)
    loader = DataLoader(dataset, batch_size=2, num_workers=2, shuffle=False)
    total = torch.zeros(len(SKIP_REASONS), dtype=torch.int64)
    indices = []
    for batch in loader:
        assert batch["video"].shape == (2, 3, 8, 32, 32) and batch["skipped"].shape == (2, len(SKIP_REASONS))
        total += batch["skipped"].sum(0)
        indices += batch["index"].tolist()
    # dataset[i] for bad row i skips rows i .. 6: missing once, empty twice, ... short six times
    assert total.tolist() == counts(missing=1, empty=2, corrupt=3 + 5, truncated=4, too_short=6)
    assert indices == [0, 7, 7, 7, 7, 7, 7, 7]
    assert dict(dataset.skip_counts) == {}  # the workers counted in their own copies


def test_string_table():
    strings = ["", "plain", "naïve café, 字幕", "", "last"]
    table = C.StringTable(strings)
    assert len(table) == 5 and list(table) == strings and table[-1] == "last"
    assert len(C.StringTable([])) == 0
    with pytest.raises(IndexError):
        table[5]
