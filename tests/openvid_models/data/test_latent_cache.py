"""The latent cache on a tiny random VAE and T5: what LatentCacheDataset returns is what the encoders give for
the same samples, an interrupted build resumes without redoing its completed shards, a half-written shard is
never read, bad samples are skipped and reported.

The VAE encodes deterministically (the posterior mean, as the cache stores), so a sample's latents can be
recomputed here on its own and compared."""

import json

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from openvid_models.data.latent_cache import (
    MANIFEST_NAME,
    LatentCacheDataset,
    build_latent_cache,
    main,
    read_manifest,
    shard_name,
)
from openvid_models.text_encoder import T5TextEncoder
from openvid_models.vae import SCALING_FACTOR, VideoAutoencoder
from tests.openvid_models.utils import save_tiny_t5, tiny_vae

for module in ("diffusers", "transformers", "tokenizers", "ftfy", "bs4"):
    pytest.importorskip(module)

CAPTIONS = ["a dog runs", "the dog runs on the beach", "a dog", "the beach .", "dog runs on a beach",
            "a dog runs on the beach .", "the dog"]  # in the tiny tokenizer's words, of different lengths
MAX_LENGTH = 6


class Clips(Dataset):
    """``n`` random clips ``[3, 3, 16, 16]`` with captions; records the indices read. ``fail``: indices whose
    reading raises (a corrupt clip); ``interrupt``: indices whose reading stops the build (Ctrl-C)."""

    def __init__(self, n=7, fail=(), interrupt=()):
        self.videos = torch.rand(n, 3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
        self.fail, self.interrupt, self.read = set(fail), set(interrupt), []

    def __len__(self):
        return len(self.videos)

    def __getitem__(self, index):
        self.read.append(index)
        if index in self.interrupt:
            raise KeyboardInterrupt
        if index in self.fail:
            raise RuntimeError(f"cannot decode clip {index}")
        return {"video": self.videos[index], "text": CAPTIONS[index % len(CAPTIONS)], "index": index}


class StreamOfClips(IterableDataset):
    def __init__(self, clips):
        self.clips = clips

    def __len__(self):
        return len(self.clips)

    def __iter__(self):
        return (self.clips[i] for i in range(len(self.clips)))


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    vae = VideoAutoencoder(tiny_vae(), micro_batch_size=4).eval()
    t5 = T5TextEncoder.from_pretrained(save_tiny_t5(tmp_path_factory.mktemp("t5")), device="cpu",
                                       dtype=torch.float32, model_max_length=MAX_LENGTH)
    return vae, t5


def build(encoders, dataset, out_dir, **kwargs):
    vae, t5 = encoders
    return build_latent_cache(dataset, vae, t5, out_dir, **{"batch_size": 2, "shard_size": 3, "progress": False,
                                                            **kwargs})


def expected(encoders, clips, index):
    """The encoders' output for one sample alone: latents [4, 3, 8, 8], y [1, L, C], mask [L]."""
    vae, t5 = encoders
    with torch.no_grad():
        latents = vae.encode(clips.videos[index][None], sample=False)[0]
        text = t5.encode([CAPTIONS[index % len(CAPTIONS)]])
    return latents, text["y"][0], text["mask"][0]


def cached_tensors(cache_dir):
    data = LatentCacheDataset(cache_dir, allow_partial=True)
    return [data[i] for i in range(len(data))]


def assert_same_cache(a, b):
    items_a, items_b = cached_tensors(a), cached_tensors(b)
    assert len(items_a) == len(items_b)
    for x, y in zip(items_a, items_b, strict=True):
        assert x["index"] == y["index"] and x["text"] == y["text"]
        for key in ("latents", "y", "mask"):
            assert torch.equal(x[key], y[key]), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cache_returns_what_the_encoders_give(encoders, tmp_path, dtype):
    clips = Clips()
    summary = build(encoders, clips, tmp_path, dtype=dtype)
    assert (summary.num_samples, summary.num_shards, summary.shards_written, summary.shards_reused) == (7, 3, 3, 0)
    assert summary.skipped == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST_NAME, *(shard_name(k) for k in range(3))]

    manifest = read_manifest(tmp_path)
    assert manifest["complete"] and manifest["num_samples"] == 7
    assert manifest["shapes"] == {"latents": [4, 3, 8, 8], "y": [MAX_LENGTH, 24], "mask": [MAX_LENGTH], "index": []}
    assert manifest["config"] == {"vae_scaling_factor": SCALING_FACTOR, "latent": "posterior mean",
                                  "model_max_length": MAX_LENGTH, "dtype": str(dtype).removeprefix("torch.")}
    assert [(s["start"], s["stop"], s["num_samples"]) for s in manifest["shards"]] == [(0, 3, 3), (3, 6, 3), (6, 7, 1)]

    data = LatentCacheDataset(tmp_path)
    assert len(data) == 7
    tolerance = {} if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-3)  # one bf16 rounding step
    for i in range(7):
        item = data[i]
        latents, y, mask = expected(encoders, clips, i)
        assert item["index"] == i and item["text"] == CAPTIONS[i]
        assert item["latents"].dtype == item["y"].dtype == dtype and item["mask"].dtype == torch.int64
        torch.testing.assert_close(item["latents"].float(), latents.to(dtype).float(), **tolerance)
        torch.testing.assert_close(item["y"].float(), y.to(dtype).float(), **tolerance)
        assert torch.equal(item["mask"], mask)
    assert data[-1]["index"] == 6
    with pytest.raises(IndexError, match="out of range"):
        data[7]

    # Batched by the default collate: what STDiT takes.
    batch = next(iter(DataLoader(data, batch_size=4, shuffle=True, num_workers=0)))
    assert batch["latents"].shape == (4, 4, 3, 8, 8) and batch["y"].shape == (4, 1, MAX_LENGTH, 24)
    assert batch["mask"].shape == (4, MAX_LENGTH) and len(batch["text"]) == 4


def test_an_interrupted_build_resumes_from_its_last_shard(encoders, tmp_path):
    # Ctrl-C while reading sample 4 (shard 1): shard 0 is complete, nothing of shard 1 is kept.
    with pytest.raises(KeyboardInterrupt):
        build(encoders, Clips(interrupt={4}), tmp_path / "cache")
    manifest = read_manifest(tmp_path / "cache")
    assert not manifest["complete"] and [s["shard"] for s in manifest["shards"]] == [0]
    with pytest.raises(ValueError, match="incomplete"):
        LatentCacheDataset(tmp_path / "cache")
    assert len(LatentCacheDataset(tmp_path / "cache", allow_partial=True)) == 3
    first = tmp_path / "cache" / shard_name(0)
    first_bytes, first_stamp = first.read_bytes(), first.stat().st_mtime_ns

    clips = Clips()
    summary = build(encoders, clips, tmp_path / "cache")
    assert sorted(set(clips.read)) == [3, 4, 5, 6]  # shard 0 neither read nor encoded again
    assert (summary.shards_written, summary.shards_reused, summary.num_samples) == (2, 1, 7)
    assert first.read_bytes() == first_bytes and first.stat().st_mtime_ns == first_stamp
    build(encoders, Clips(), tmp_path / "fresh")
    assert_same_cache(tmp_path / "cache", tmp_path / "fresh")

    clips = Clips()  # a complete cache: nothing to do
    assert build(encoders, clips, tmp_path / "cache").shards_written == 0 and clips.read == []


def test_a_partly_written_shard_is_never_counted(encoders, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        build(encoders, Clips(interrupt={6}), cache)  # shards 0 and 1 complete
    # A crash after a shard reached its final name but before the manifest listed it, and one mid-write.
    (cache / shard_name(2)).write_bytes(b"\x00" * 100)
    (cache / f"{shard_name(2)}.tmp-12345").write_bytes(b"half a shard")
    data = LatentCacheDataset(cache, allow_partial=True)
    assert len(data) == 6 and [data[i]["index"] for i in range(6)] == [0, 1, 2, 3, 4, 5]

    clips = Clips()
    assert build(encoders, clips, cache).shards_written == 1 and sorted(set(clips.read)) == [6]
    assert not list(cache.glob("*.tmp-*"))
    build(encoders, Clips(), tmp_path / "fresh")
    assert_same_cache(cache, tmp_path / "fresh")


def test_bad_samples_are_skipped_counted_and_reported(encoders, tmp_path, capsys):
    clips = Clips(fail={1, 4})
    # One DataLoader worker: the failure happens in the worker and must come back as a skip.
    summary = build(encoders, clips, tmp_path, num_workers=1)
    assert summary.skipped == {1: "RuntimeError: cannot decode clip 1", 4: "RuntimeError: cannot decode clip 4"}
    assert summary.num_samples == 5 and "2 of 7 samples skipped" in capsys.readouterr().err
    manifest = read_manifest(tmp_path)
    assert [s["skipped"] for s in manifest["shards"]] == [{"1": "RuntimeError: cannot decode clip 1"},
                                                          {"4": "RuntimeError: cannot decode clip 4"}, {}]
    data = LatentCacheDataset(tmp_path)
    assert [data[i]["index"] for i in range(len(data))] == [0, 2, 3, 5, 6]
    latents, y, _ = expected(encoders, clips, 5)
    torch.testing.assert_close(data[3]["latents"].float(), latents.bfloat16().float(), rtol=2**-7, atol=1e-3)

    with pytest.raises(RuntimeError, match="cannot decode clip 1"):
        build(encoders, Clips(fail={1}), tmp_path / "strict", skip_errors=False)


def test_a_stand_in_row_is_skipped_not_cached_twice(encoders, tmp_path):
    class StandsIn(Clips):  # as OpenVidDataset: an unreadable clip's next row is returned in its place
        def __getitem__(self, index):
            return super().__getitem__(index + 1 if index == 2 else index)

    summary = build(encoders, StandsIn(), tmp_path)
    assert summary.skipped == {2: "unreadable: the dataset gave row 3 in its place"}
    data = LatentCacheDataset(tmp_path)
    assert [data[i]["index"] for i in range(len(data))] == [0, 1, 3, 4, 5, 6]


def test_an_iterable_dataset_gives_the_same_cache(encoders, tmp_path):
    build(encoders, Clips(), tmp_path / "map")
    build(encoders, StreamOfClips(Clips()), tmp_path / "stream")
    assert_same_cache(tmp_path / "map", tmp_path / "stream")
    with pytest.raises(ValueError, match="num_workers must be 0 for an iterable dataset"):
        build(encoders, StreamOfClips(Clips()), tmp_path / "workers", num_workers=2)


def test_other_settings_or_bad_items_are_refused(encoders, tmp_path):
    build(encoders, Clips(), tmp_path)
    manifest_before = (tmp_path / MANIFEST_NAME).read_bytes()
    with pytest.raises(ValueError, match=r"other settings.*shard_size.*\(3, 2\)"):
        build(encoders, Clips(), tmp_path, shard_size=2)
    with pytest.raises(ValueError, match=r"other settings.*num_source_samples"):
        build(encoders, Clips(n=5), tmp_path)
    assert (tmp_path / MANIFEST_NAME).read_bytes() == manifest_before

    with pytest.raises(KeyboardInterrupt):
        build(encoders, Clips(interrupt={3}), tmp_path / "resized")
    bigger = Clips()
    bigger.videos = torch.zeros(7, 3, 3, 32, 32)  # resumed with other clip sizes
    with pytest.raises(ValueError, match="would hold samples of shapes"):
        build(encoders, bigger, tmp_path / "resized")

    class NotDicts(Clips):
        def __getitem__(self, index):
            return self.videos[index]

    with pytest.raises(TypeError, match="dicts with 'video'"):
        build(encoders, NotDicts(), tmp_path / "bad")
    with pytest.raises(ValueError, match="shard_size must be a positive int"):
        build(encoders, Clips(), tmp_path / "bad", shard_size=0)
    with pytest.raises(FileNotFoundError, match="no latent cache"):
        LatentCacheDataset(tmp_path / "nothing")


def test_command_line_caches_an_openvid_csv(encoders, tmp_path):
    data = pytest.importorskip("openvid_models.data")
    if not hasattr(data, "OpenVidDataset"):
        pytest.skip("openvid_models.data does not export OpenVidDataset yet")
    from openvid_models.data.sample_set import CLIPS_DIR, write_sample_set

    csv_path = write_sample_set(tmp_path / "set", num_clips=4, frames=6, size=16, fps=4)
    vae, t5 = encoders
    vae.vae.save_pretrained(tmp_path / "vae")
    t5.encoder.save_pretrained(tmp_path / "t5")
    t5.tokenizer.save_pretrained(tmp_path / "t5")
    args = ["--csv", str(csv_path), "--video-root", str(csv_path.parent / CLIPS_DIR), "--vae", str(tmp_path / "vae"),
            "--t5", str(tmp_path / "t5"), "--out", str(tmp_path / "cache"), "--num-frames", "4",
            "--frame-interval", "1", "--image-size", "16", "--model-max-length", str(MAX_LENGTH),
            "--batch-size", "3", "--shard-size", "2", "--num-workers", "0", "--device", "cpu", "--dtype", "float32",
            "--no-progress"]
    assert main(args) == 0
    cache = LatentCacheDataset(tmp_path / "cache")
    source = data.OpenVidDataset(csv_path, csv_path.parent / CLIPS_DIR, num_frames=4, frame_interval=1,
                                 image_size=16, flip_prob=0.0, seed=0)
    assert len(cache) == len(source) == 4
    for i in range(4):
        item = source[i]
        with torch.no_grad():
            latents = vae.encode(item["video"][None], sample=False)[0]
        assert cache[i]["text"] == item["text"]
        torch.testing.assert_close(cache[i]["latents"], latents)
    assert json.loads((tmp_path / "cache" / MANIFEST_NAME).read_text())["complete"]
