"""A latent cache: the VAE and T5 run once over a dataset, training then reads latents and caption embeddings from
disk instead of decoding video and running both encoders every step.

:func:`build_latent_cache` writes, under ``out_dir``::

    shard-00000.safetensors   latents [n, 4, T, h, w], y [n, L, C], mask uint8 [n, L], index int64 [n]
                              (the source dataset's indices) and, in its metadata, the captions as a JSON list
    shard-00001.safetensors   ...
    index.json                the manifest: format, config, shapes, dtypes, the completed shards and which source
                              indices each holds, the samples skipped and why

Shard ``k`` holds source indices ``[k * shard_size, (k + 1) * shard_size)`` less the skipped ones. A shard file is
written under a temporary name and moved into place, and only then entered in the manifest (itself replaced
atomically), so an interrupted build resumes from its last completed shard and a half-written file is never read.

:class:`LatentCacheDataset` reads the cache back, memory-mapped, one sample at a time.

Command line: ``python -m openvid_models.data.latent_cache --csv ... --video-root ... --vae PATH --t5 PATH --out DIR``.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset, IterableDataset

FORMAT = "openvid-latent-cache"
VERSION = 1
MANIFEST_NAME = "index.json"
# The encoders' outputs are stored as their posterior mean (see build_latent_cache); recorded in the manifest.
LATENT_KIND = "posterior mean"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.safetensors"


# ---------------------------------------------------------------------------------------------------------
# Atomic files
# ---------------------------------------------------------------------------------------------------------

def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_json_atomically(path: Path, data: dict) -> None:
    tmp = _tmp_name(path)
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(cache_dir: str | os.PathLike) -> dict:
    """The cache's ``index.json`` (FileNotFoundError / ValueError when ``cache_dir`` holds no cache of ours)."""
    path = Path(cache_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no latent cache in {cache_dir}: {MANIFEST_NAME} is missing")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{path} is not a version-{VERSION} {FORMAT} manifest (format {manifest.get('format')!r}, "
                         f"version {manifest.get('version')!r})")
    return manifest


# ---------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------

@dataclass
class CacheSummary:
    """What a :func:`build_latent_cache` call did. ``skipped`` maps source index -> reason, over the whole cache."""

    out_dir: Path
    num_samples: int  # cached samples, over the whole cache
    num_shards: int
    shards_written: int  # by this call
    shards_reused: int  # completed by an earlier call
    skipped: dict[int, str] = field(default_factory=dict)


class _Guarded(Dataset):
    """The dataset's item at an index as ``(index, item, None)``, or ``(index, None, reason)`` where reading it
    failed: runs in the DataLoader's workers, so that one bad clip does not end the build."""

    def __init__(self, dataset, skip_errors: bool):
        self.dataset, self.skip_errors = dataset, skip_errors

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            item = self.dataset[index]
        except Exception as error:  # noqa: BLE001  (any failure to read one sample is that sample's)
            if not self.skip_errors:
                raise
            return index, None, f"{type(error).__name__}: {error}"
        return index, item, _substitution(index, item)


def _substitution(index: int, item) -> str | None:
    """Why ``item`` cannot be cached as sample ``index``: None, or another row standing in for an unreadable
    clip (OpenVidDataset's items carry the row they were read from as ``"index"``): caching it would
    duplicate that row."""
    if item is None:
        return "the dataset returned None"
    if isinstance(item, dict) and "index" in item and int(item["index"]) != index:
        return f"unreadable: the dataset gave row {int(item['index'])} in its place"
    return None


def _as_list(batch):
    return batch


def _map_style_batches(dataset, pending: list[tuple[int, int, int]], batch_size: int, num_workers: int,
                       skip_errors: bool) -> Iterator[list]:
    """Batches of ``(index, item, reason)`` over the pending shards' index ranges, in order, none crossing a shard
    boundary (so that each shard completes after its last batch)."""
    batches = [list(range(start, stop))[i:i + batch_size]
               for _, start, stop in pending for i in range(0, stop - start, batch_size)]
    if not batches:
        return iter(())
    loader = DataLoader(_Guarded(dataset, skip_errors), batch_sampler=batches, num_workers=num_workers,
                        collate_fn=_as_list, persistent_workers=False)
    return iter(loader)


def _iterable_batches(dataset, pending: list[tuple[int, int, int]], batch_size: int) -> Iterator[list]:
    """As :func:`_map_style_batches` for an iterable dataset, read in the main process: positions in iteration
    order are the indices; samples of completed shards are read (an iterable cannot seek) but not encoded."""
    wanted = iter(pending)
    current = next(wanted, None)
    batch = []
    for position, item in enumerate(dataset):
        while current is not None and position >= current[2]:
            if batch:
                yield batch
                batch = []
            current = next(wanted, None)
        if current is None:
            return
        if position < current[1]:
            continue
        batch.append((position, item, _substitution(position, item)))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _check_item(index: int, item) -> None:
    if not isinstance(item, dict) or "video" not in item or "text" not in item:
        raise TypeError(f"dataset items must be dicts with 'video' (float [3, T, H, W] in [-1, 1]) and 'text' (the "
                        f"caption); item {index} is {type(item).__name__}"
                        + (f" with keys {sorted(item)}" if isinstance(item, dict) else ""))
    video = item["video"]
    if not isinstance(video, torch.Tensor) or video.ndim != 4 or video.shape[0] != 3:
        raise TypeError(f"item {index}: 'video' must be a float tensor [3, T, H, W], got "
                        f"{tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def build_latent_cache(dataset, vae, text_encoder, out_dir: str | os.PathLike, *, batch_size: int = 8,
                       shard_size: int = 256, device: str | torch.device | None = None,
                       dtype: torch.dtype = torch.bfloat16, num_workers: int = 0, progress: bool = True,
                       skip_errors: bool = True) -> CacheSummary:
    """Encode every sample of ``dataset`` once and write the cache to ``out_dir``; resume a cache left there.

    dataset: map-style (``len`` + indexing) or iterable, of dicts ``{"video": float [3, T, H, W] in [-1, 1],
    "text": str, ...}`` with the same T, H, W throughout (an iterable must yield the same order on every run, and
    is read in the main process: ``num_workers`` must be 0). vae: :class:`~openvid_models.vae.VideoAutoencoder`
    (or anything with its ``encode(video, sample=False)`` and ``scaling_factor``), already on its device;
    latents are the posterior mean (deterministic: a cache of posterior draws would freeze one draw for every
    epoch). text_encoder: :class:`~openvid_models.text_encoder.T5TextEncoder` (``encode(captions) -> {"y":
    [B, 1, L, C], "mask": [B, L]}``, ``model_max_length``). device: where videos go for the VAE (default: the
    VAE's). dtype: the stored dtype of latents and y. skip_errors: a sample whose reading raises an ``Exception``
    (or that is None) is skipped, counted and reported instead of ending the build (KeyboardInterrupt and the like
    still end it; rerun to resume). An item whose ``"index"`` is not the index asked for (a dataset standing in
    another row for an unreadable clip, as OpenVidDataset does) is skipped too, so no row is cached twice.

    Returns a :class:`CacheSummary`. Rerunning with the same arguments skips the completed shards; rerunning with
    a different dataset length, shard_size, dtype or text length raises ValueError (use another ``out_dir``).
    """
    from tqdm.auto import tqdm  # noqa: PLC0415  (only the build shows progress)

    for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
    if dtype not in _DTYPES.values():
        raise ValueError(f"dtype must be one of {list(_DTYPES.values())}, got {dtype!r}")
    iterable = isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__")
    if iterable and num_workers:
        raise ValueError("num_workers must be 0 for an iterable dataset: workers would each yield their own "
                         "order and the cache's indices would not be reproducible")
    try:
        num_source = len(dataset)
    except TypeError:
        raise ValueError("dataset must have a length (len(dataset)): the shards are laid out by index") from None
    vae_parameter = next(vae.parameters(), None) if hasattr(vae, "parameters") else None
    device = torch.device(device) if device is not None else (
        vae_parameter.device if vae_parameter is not None else torch.device("cpu"))
    vae_dtype = vae_parameter.dtype if vae_parameter is not None else torch.float32

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scaling = getattr(vae, "scaling_factor", None)
    config = dict(vae_scaling_factor=None if scaling is None else float(scaling), latent=LATENT_KIND,
                  model_max_length=int(text_encoder.model_max_length), dtype=_dtype_name(dtype))
    manifest_path = out_dir / MANIFEST_NAME
    if manifest_path.exists():
        manifest = read_manifest(out_dir)
        theirs = dict(num_source_samples=manifest["num_source_samples"], shard_size=manifest["shard_size"],
                      **manifest["config"])
        ours = dict(num_source_samples=num_source, shard_size=shard_size, **config)
        if theirs != ours:
            differences = {k: (theirs.get(k), ours[k]) for k in ours if theirs.get(k) != ours[k]}
            raise ValueError(f"out_dir {out_dir} holds a cache built with other settings (theirs, yours): "
                             f"{differences}; build into another out_dir (nothing was changed)")
        # A shard whose file went missing is rebuilt.
        manifest["shards"] = [s for s in manifest["shards"] if s["file"] is None or (out_dir / s["file"]).is_file()]
    else:
        manifest = dict(format=FORMAT, version=VERSION, complete=False, num_source_samples=num_source,
                        shard_size=shard_size, config=config, shapes=None,
                        dtypes=dict(latents=_dtype_name(dtype), y=_dtype_name(dtype), mask="uint8", index="int64"),
                        num_samples=0, shards=[])
    # Temporary files of an interrupted build: never entered in the manifest, so never part of the cache.
    for pattern in ("shard-*.safetensors.tmp-*", f"{MANIFEST_NAME}.tmp-*"):
        for leftover in out_dir.glob(pattern):
            leftover.unlink()

    num_shards = -(-num_source // shard_size)
    done = {s["shard"] for s in manifest["shards"]}
    pending = [(k, k * shard_size, min((k + 1) * shard_size, num_source)) for k in range(num_shards) if k not in done]
    pending_ends = {stop: k for k, _, stop in pending}
    reused = len(done)
    written = 0

    if iterable:
        batches = _iterable_batches(dataset, pending, batch_size)
    else:
        batches = _map_style_batches(dataset, pending, batch_size, num_workers, skip_errors)

    def save_shard(k: int, start: int, stop: int, parts: dict[str, list], skipped: dict[int, str]) -> None:
        nonlocal written
        entry = dict(shard=k, file=None, start=start, stop=stop, num_samples=sum(map(len, parts["index"])),
                     skipped={str(i): reason for i, reason in sorted(skipped.items())})
        if parts["index"]:
            tensors = {name: torch.cat(chunks).contiguous() for name, chunks in parts.items() if name != "text"}
            shapes = {name: list(t.shape[1:]) for name, t in tensors.items()}
            if manifest["shapes"] is not None and shapes != manifest["shapes"]:
                raise ValueError(f"shard {k} would hold samples of shapes {shapes}, the cache in {out_dir} holds "
                                 f"{manifest['shapes']} (other num_frames / image_size?); build into another "
                                 "out_dir")
            texts = [t for chunk in parts["text"] for t in chunk]
            path = out_dir / shard_name(k)
            tmp = _tmp_name(path)
            save_file(tensors, tmp, metadata={"texts": json.dumps(texts)})
            _fsync(tmp)
            os.replace(tmp, path)
            entry["file"] = path.name
            manifest["shapes"] = shapes
        manifest["shards"] = sorted([*manifest["shards"], entry], key=lambda s: s["shard"])
        manifest["num_samples"] = sum(s["num_samples"] for s in manifest["shards"])
        manifest["complete"] = len(manifest["shards"]) == num_shards
        _write_json_atomically(manifest_path, manifest)
        written += 1

    total = num_source
    already = sum(s["stop"] - s["start"] for s in manifest["shards"])
    bar = tqdm(total=total, initial=already, disable=not progress, unit="clip", desc=f"latent cache {out_dir.name}")
    parts = {name: [] for name in ("latents", "y", "mask", "index", "text")}
    skipped: dict[int, str] = {}
    expected_shape = None
    try:
        if not pending:
            manifest["complete"] = True
            _write_json_atomically(manifest_path, manifest)
        for batch in batches:
            good = []
            for index, item, reason in batch:
                if reason is not None:
                    skipped[index] = reason
                    tqdm.write(f"latent cache: skipping sample {index}: {reason}", file=sys.stderr)
                    continue
                _check_item(index, item)
                if expected_shape is None:
                    expected_shape = tuple(item["video"].shape)
                elif tuple(item["video"].shape) != expected_shape:
                    raise ValueError(f"dataset item {index}: video shape {tuple(item['video'].shape)} differs from "
                                     f"the first item's {expected_shape}; the cache needs one clip shape")
                good.append((index, item))
            if good:
                with torch.inference_mode():
                    video = torch.stack([item["video"] for _, item in good]).to(device, vae_dtype)
                    latents = vae.encode(video, sample=False)
                    text = text_encoder.encode([str(item["text"]) for _, item in good])
                parts["latents"].append(latents.to("cpu", dtype))
                parts["y"].append(text["y"][:, 0].to("cpu", dtype))
                parts["mask"].append(text["mask"].to("cpu", torch.uint8))
                parts["index"].append(torch.tensor([index for index, _ in good], dtype=torch.int64))
                parts["text"].append([str(item["text"]) for _, item in good])
            bar.update(len(batch))
            last = batch[-1][0] + 1
            if last in pending_ends:
                k = pending_ends[last]
                save_shard(k, k * shard_size, last, parts, skipped)
                parts = {name: [] for name in parts}
                skipped = {}
    finally:
        bar.close()

    all_skipped = {int(i): reason for s in manifest["shards"] for i, reason in s["skipped"].items()}
    if not manifest["complete"]:
        # An iterable dataset shorter than its len(): the missing tail cannot be cached.
        raise RuntimeError(f"the dataset yielded fewer samples than its length {num_source}; the cache in "
                           f"{out_dir} holds shards {sorted(s['shard'] for s in manifest['shards'])} of {num_shards}")
    if all_skipped:
        print(f"latent cache {out_dir}: {len(all_skipped)} of {num_source} samples skipped (listed in "
              f"{MANIFEST_NAME}); {manifest['num_samples']} cached", file=sys.stderr)
    return CacheSummary(out_dir, manifest["num_samples"], num_shards, written, reused, all_skipped)


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------

class LatentCacheDataset(Dataset):
    """The samples of a latent cache, read lazily (memory-mapped safetensors, one open handle per shard and
    process).

    Item ``i``: ``{"latents": [4, T, h, w], "y": [1, L, C]`` (the stored dtype, bf16 by default), ``"mask":
    int64 [L]`` (1 at real tokens, as T5TextEncoder returns it), ``"text": str, "index": int}`` (the source
    dataset's index); batched by the default collate these are what STDiT takes: ``x [B, 4, T, h, w], y
    [B, 1, L, C], mask [B, L]``. A cache whose build was interrupted raises ValueError unless ``allow_partial``.
    """

    def __init__(self, cache_dir: str | os.PathLike, allow_partial: bool = False):
        self.cache_dir = Path(cache_dir)
        self.manifest = read_manifest(self.cache_dir)
        if not self.manifest["complete"] and not allow_partial:
            raise ValueError(f"the latent cache in {cache_dir} is incomplete ({len(self.manifest['shards'])} shards "
                             "written): finish it by rerunning the build, or pass allow_partial=True")
        self._shards = [s for s in self.manifest["shards"] if s["num_samples"] > 0]
        self._starts, total = [], 0
        for shard in self._shards:
            self._starts.append(total)
            total += shard["num_samples"]
        self._len = total
        self._handles: dict[int, object] = {}
        self._texts: dict[int, list[str]] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self._len

    def __getstate__(self):
        # Open handles stay in the process that opened them; a worker opens its own.
        return {**self.__dict__, "_handles": {}, "_texts": {}}

    def _open(self, k: int):
        if self._pid != os.getpid():  # a forked worker: the parent's handles are not ours to share
            self._handles, self._texts, self._pid = {}, {}, os.getpid()
        handle = self._handles.get(k)
        if handle is None:
            handle = safe_open(str(self.cache_dir / self._shards[k]["file"]), framework="pt")
            self._handles[k] = handle
            self._texts[k] = json.loads(handle.metadata()["texts"])
        return handle

    def __getitem__(self, i: int) -> dict:
        if not -self._len <= i < self._len:
            raise IndexError(f"index {i} out of range for a latent cache of {self._len} samples")
        i %= self._len
        k = bisect.bisect_right(self._starts, i) - 1
        row = i - self._starts[k]
        f = self._open(k)
        return {"latents": f.get_slice("latents")[row:row + 1][0],
                "y": f.get_slice("y")[row:row + 1],
                "mask": f.get_slice("mask")[row:row + 1][0].long(),
                "text": self._texts[k][row],
                "index": int(f.get_slice("index")[row:row + 1][0])}


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m openvid_models.data.latent_cache",
                                     description="Encode an OpenVid-format dataset with the VAE and T5 once into "
                                                 "a sharded latent cache (resumable: rerun to continue).")
    parser.add_argument("--csv", required=True, help="OpenVid-format CSV")
    parser.add_argument("--video-root", required=True, help="folder of the clips named in the CSV's video column")
    parser.add_argument("--vae", required=True, help="local diffusers AutoencoderKL directory (sd-vae-ft-ema)")
    parser.add_argument("--t5", required=True, help="local T5 directory (tokenizer + encoder)")
    parser.add_argument("--out", required=True, help="cache directory (created; resumed if it holds a cache)")
    parser.add_argument("--num-frames", type=int, default=16)
    parser.add_argument("--frame-interval", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of each clip's frame window (a function of seed and row: a resumed build "
                             "takes the same windows)")
    parser.add_argument("--flip-prob", type=float, default=0.0,
                        help="horizontal flip probability (default 0: a cached flip would be the same every epoch)")
    parser.add_argument("--model-max-length", type=int, default=120, help="caption tokens")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=4, help="DataLoader workers decoding video")
    parser.add_argument("--vae-micro-batch", type=int, default=16, help="frames per VAE call")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16", help="stored dtype")
    parser.add_argument("--encoder-dtype", choices=sorted(_DTYPES), default=None,
                        help="dtype the VAE and T5 run in (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from openvid_models.data import OpenVidDataset  # noqa: PLC0415  (the reading side; only the CLI needs it)
    from openvid_models.text_encoder import T5TextEncoder  # noqa: PLC0415
    from openvid_models.vae import VideoAutoencoder  # noqa: PLC0415

    device = torch.device(args.device)
    encoder_dtype = _DTYPES[args.encoder_dtype] if args.encoder_dtype else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    dataset = OpenVidDataset(args.csv, args.video_root, num_frames=args.num_frames,
                             frame_interval=args.frame_interval, image_size=args.image_size,
                             flip_prob=args.flip_prob, seed=args.seed)
    vae = VideoAutoencoder.from_pretrained(args.vae, micro_batch_size=args.vae_micro_batch,
                                           torch_dtype=encoder_dtype).to(device).eval()
    text_encoder = T5TextEncoder.from_pretrained(args.t5, device=device, dtype=encoder_dtype,
                                                 model_max_length=args.model_max_length)
    summary = build_latent_cache(dataset, vae, text_encoder, args.out, batch_size=args.batch_size,
                                 shard_size=args.shard_size, device=device, dtype=_DTYPES[args.dtype],
                                 num_workers=args.num_workers, progress=not args.no_progress)
    print(f"{summary.out_dir}: {summary.num_samples} samples in {summary.num_shards} shards "
          f"({summary.shards_written} written now, {summary.shards_reused} before, {len(summary.skipped)} skipped)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
