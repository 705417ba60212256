"""OpenVidWebDataset: tar shards of <key>.mp4 + <key>.json, split over workers and ranks, bad samples counted."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from openvid_models.data import OpenVidWebDataset, summarize_skipped
from openvid_models.data.video import SKIP_REASONS
from tests.openvid_models.data.utils import clip_bytes, frame_index, openvid_row, write_shard

KW = dict(num_frames=8, frame_interval=3, image_size=32)


def sample(key, mp4, **row):
    return key, mp4, openvid_row(f"{key}.mp4", caption=f"caption of {key}", **row)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    good = clip_bytes(num_frames=48, gop=12)
    short = clip_bytes(num_frames=20, gop=12)
    shard_0 = [sample("a0", good), sample("a1", good), ("a2", b"not a video at all" * 50, openvid_row("a2.mp4")),
               sample("a3", good, aesthetic=1.0), ("a4", good, None), ("a5", good, "{not json"), sample("a6", good)]
    shard_1 = [sample("b0", good), ("b1", None, openvid_row("b1.mp4")), sample("b2", short), sample("b3", good),
               ("b4", good, {"video": "b4.mp4", "caption": "no scores"}), sample("b5", b""), sample("b6", good)]
    return [write_shard(root / "shard-000000.tar", shard_0), write_shard(root / "shard-000001.tar", shard_1)]


GOOD_KEYS = {"a0", "a1", "a6", "b0", "b3", "b6"}
# a2 corrupt; a3 filtered (aesthetic); a4 no JSON, a5 bad JSON, b4 JSON without the columns; b1 no mp4;
# b2 too short; b5 empty
EXPECTED_SKIPS = {"missing": 1, "empty": 1, "corrupt": 1, "too_short": 1, "truncated": 0, "bad_metadata": 3,
                  "bad_shard": 0}


def collect(items):
    keys, skipped = [], torch.zeros(len(SKIP_REASONS), dtype=torch.int64)
    for item in items:
        keys += item["key"] if isinstance(item["key"], list) else [item["key"]]
        skipped += item["skipped"].reshape(-1, len(SKIP_REASONS)).sum(0)
    return keys, summarize_skipped(skipped)


def test_items_and_skips(shards):
    dataset = OpenVidWebDataset(shards, min_aesthetic=3.0, shuffle_shards=False, **KW)
    items = list(dataset)
    keys, skipped = collect(items)
    assert keys == ["a0", "a1", "a6", "b0", "b3", "b6"]
    assert skipped == EXPECTED_SKIPS
    assert dict(dataset.skip_counts) == {k: v for k, v in EXPECTED_SKIPS.items() if v}
    assert dict(dataset.excluded) == {"aesthetic score": 1}
    for item in items:
        assert set(item) == {"video", "text", "key", "skipped"} and item["text"] == f"caption of {item['key']}"
        assert item["video"].shape == (3, 8, 32, 32) and item["video"].dtype == torch.float32
        frames = ((item["video"].permute(1, 2, 3, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
        decoded = [frame_index(f) for f in frames]
        begin = decoded[0]
        assert decoded == np.linspace(begin, begin + 23, 8, dtype=int).tolist()
    again = list(OpenVidWebDataset(shards, min_aesthetic=3.0, shuffle_shards=False, **KW))
    for first, second in zip(items, again):  # windows and flips are functions of (seed, epoch, shard, key)
        torch.testing.assert_close(first["video"], second["video"])


def test_two_workers_two_shards(shards):
    dataset = OpenVidWebDataset(shards, min_aesthetic=3.0, seed=1, **KW)
    loader = DataLoader(dataset, batch_size=2, num_workers=2)
    keys, skipped = collect(loader)
    assert sorted(keys) == sorted(GOOD_KEYS)  # each sample exactly once
    assert skipped == EXPECTED_SKIPS
    # one worker per shard: a batch never mixes shards
    for batch in loader:
        assert len({key[0] for key in batch["key"]}) == 1


def test_ranks_are_disjoint(shards):
    per_rank = []
    for rank in range(2):
        dataset = OpenVidWebDataset(shards, min_aesthetic=3.0, rank=rank, world_size=2, seed=5, **KW)
        per_rank.append(collect(DataLoader(dataset, batch_size=None, num_workers=0))[0])
    assert not set(per_rank[0]) & set(per_rank[1])
    assert set(per_rank[0]) | set(per_rank[1]) == GOOD_KEYS


def test_fewer_shards_than_workers_split_by_sample(shards):
    keys = []
    for rank in range(2):
        dataset = OpenVidWebDataset(shards[:1], rank=rank, world_size=2, **KW)
        keys.append(collect(DataLoader(dataset, batch_size=None, num_workers=2))[0])
    assert not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == ["a0", "a1", "a3", "a6"]  # no aesthetic filter here


def test_shard_order_per_epoch(shards):
    many = [f"shard-{i}.tar" for i in range(10)]
    dataset = OpenVidWebDataset(many, seed=3, **KW)
    orders = []
    for epoch in range(3):
        dataset.set_epoch(epoch)
        orders.append(dataset.shard_order())
        assert dataset.shard_order() == orders[-1] and sorted(orders[-1]) == many
    assert orders[0] != orders[1] != orders[2]
    assert OpenVidWebDataset(many, shuffle_shards=False, **KW).shard_order() == many


def test_bad_shards_counted(tmp_path, shards):
    cut = tmp_path / "cut.tar"
    data = shards[0].read_bytes()
    cut.write_bytes(data[: len(data) // 2])  # the first samples remain, the last ones are lost
    dataset = OpenVidWebDataset([tmp_path / "missing.tar", cut, shards[1]], shuffle_shards=False, **KW)
    keys, skipped = collect(dataset)
    assert keys[:2] == ["a0", "a1"] and "a6" not in keys and keys[-3:] == ["b0", "b3", "b6"]
    assert skipped["bad_shard"] == 2


def test_shard_arguments(tmp_path, shards):
    folder = shards[0].parent
    assert OpenVidWebDataset(folder, **KW).shards == [str(s) for s in shards]
    assert OpenVidWebDataset(str(folder / "shard-*.tar"), **KW).shards == [str(s) for s in shards]
    with pytest.raises(ValueError, match="no .tar files"):
        OpenVidWebDataset(str(tmp_path / "none-*.tar"), **KW)
    with pytest.raises(ValueError, match="rank"):
        OpenVidWebDataset(shards, rank=2, world_size=2, **KW)
    with pytest.raises(ValueError, match="both rank and world_size"):
        OpenVidWebDataset(shards, rank=0, **KW)
