"""Cached-latent loading rate: samples/s and MB/s that LatentCacheDataset feeds through a shuffling DataLoader, for
STDiT-XL/2 16x256x256 shapes (latents [4, 16, 32, 32] bf16, y [120, 4096] bf16, mask [120]).

The cache is written by build_latent_cache itself, with stand-in encoders that return random tensors of those
shapes (the VAE and T5 are not what is measured). Reads come from the page cache (the files were just written):
the rate of the loader, not of a cold disk.

    python benchmarks/latent_cache_throughput.py [--samples 512] [--batch-size 8] [--workers 0 2] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from openvid_models.data.latent_cache import LatentCacheDataset, build_latent_cache

LATENT_SHAPE = (4, 16, 32, 32)  # 16 frames of 256 x 256 through the 8x VAE
TEXT_LENGTH, TEXT_CHANNELS = 120, 4096


class Placeholders(torch.utils.data.Dataset):
    """Items with a token video (the stand-in VAE ignores it) and a caption."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return {"video": torch.zeros(3, 1, 8, 8), "text": f"caption {index}"}


class RandomVAE:
    """Random latents of ``latent_shape`` [C, T, H, W] for any video."""

    scaling_factor = 0.18215

    def __init__(self, latent_shape=LATENT_SHAPE):
        self.latent_shape = tuple(latent_shape)

    def parameters(self):
        return iter(())

    def encode(self, video, sample=False):
        return torch.randn(video.shape[0], *self.latent_shape)


class RandomT5:
    """Random T5-XXL-shaped features with random caption lengths."""

    model_max_length = TEXT_LENGTH

    def encode(self, captions):
        lengths = torch.randint(5, TEXT_LENGTH, (len(captions),))
        mask = (torch.arange(TEXT_LENGTH)[None] < lengths[:, None]).long()
        return {"y": torch.randn(len(captions), 1, TEXT_LENGTH, TEXT_CHANNELS), "mask": mask}


def sample_bytes(item) -> int:
    return sum(item[k].numel() * item[k].element_size() for k in ("latents", "y", "mask"))


def measure(dataset, batch_size: int, workers: int, seconds: float = 10.0) -> tuple[float, float]:
    """(samples/s, MB/s) over whole shuffled epochs, at least ``seconds`` long after one warm-up batch."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))
    per_sample = sample_bytes(dataset[0])
    iterator = iter(loader)
    next(iterator)  # workers started, first shards opened
    count, start = 0, time.perf_counter()
    while True:
        for batch in iterator:
            count += batch["latents"].shape[0]
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
        iterator = iter(loader)
    return count / elapsed, count * per_sample / elapsed / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--shard-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--dir", help="where to write the cache (default: a temporary folder, removed after)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        cache = Path(tmp) / "cache"
        torch.manual_seed(0)
        start = time.perf_counter()
        build_latent_cache(Placeholders(args.samples), RandomVAE(), RandomT5(), cache, batch_size=16,
                           shard_size=args.shard_size, device="cpu", dtype=torch.bfloat16, progress=False)
        size = sum(f.stat().st_size for f in cache.iterdir())
        print(f"cache: {args.samples} samples, {size / 1e6:.0f} MB in shards of {args.shard_size} "
              f"(written in {time.perf_counter() - start:.1f} s, random stand-in encoders)")
        dataset = LatentCacheDataset(cache)
        print(f"per sample: latents {list(dataset[0]['latents'].shape)} {dataset[0]['latents'].dtype}, "
              f"y {list(dataset[0]['y'].shape)}, mask {list(dataset[0]['mask'].shape)}: "
              f"{sample_bytes(dataset[0]) / 1e6:.2f} MB")
        print(f"CPU: {os.cpu_count()} cores; torch {torch.__version__}; threads {torch.get_num_threads()}")
        for workers in args.workers:
            rate, mb = measure(dataset, args.batch_size, workers, args.seconds)
            print(f"DataLoader(batch_size={args.batch_size}, shuffle=True, num_workers={workers}): "
                  f"{rate:,.0f} samples/s, {mb:,.0f} MB/s")


if __name__ == "__main__":
    main()
