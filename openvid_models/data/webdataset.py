"""OpenVid-1M repackaged as WebDataset tar shards: members ``<key>.mp4`` and ``<key>.json`` (the CSV's nine
columns as a JSON object), read with the standard library's ``tarfile`` and decoded from memory by PyAV.

Items, filters and skip reporting are those of :class:`~openvid_models.data.csv_dataset.OpenVidDataset`
(``"skipped"`` counts the bad samples passed over since the previous item of the same worker), with two more
reasons: ``bad_metadata`` (a sample without a readable JSON carrying the nine columns) and ``bad_shard`` (a
shard that is missing or stops being a readable tar: counted once; its earlier samples are kept). Bad
samples after a worker's last item can ride on no item: they are in that process's ``skip_counts`` and in the
warning logged when its pass ends.

Splitting: each epoch the shard list is shuffled with (seed, epoch), identically on every rank, and shard
``i`` goes to global worker ``i % (world_size * num_workers)`` (global worker = ``rank * num_workers +
worker id``). With fewer shards than global workers every worker reads every shard and keeps every
``world_size * num_workers``-th sample instead: no sample is lost or repeated either way, but ranks may get
different numbers of samples; end the epoch by a step count, not by exhaustion, in distributed training.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence

import numpy as np
import torch

from openvid_models.data.csv_dataset import ClipRecord, SkipTally, make_clip_filter, summarize_skipped
from openvid_models.data.loader import resolve_rank
from openvid_models.data.video import SKIP_REASONS, ClipError, load_training_clip

logger = logging.getLogger(__name__)


def list_shards(shards: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard paths from a list, a folder (its ``*.tar``), a glob pattern or a single path."""
    if isinstance(shards, (str, os.PathLike)):
        pattern = os.fspath(shards)
        if os.path.isdir(pattern):
            found = sorted(glob.glob(os.path.join(glob.escape(pattern), "*.tar")))
        elif glob.has_magic(pattern):
            found = sorted(glob.glob(pattern))
        else:
            found = [pattern]
        if not found:
            raise ValueError(f"shards: no .tar files match {pattern!r}")
        return found
    found = [os.fspath(s) for s in shards]
    if not found:
        raise ValueError("shards: the list is empty")
    return found


def _split_member_name(name: str) -> tuple[str, str]:
    """WebDataset's convention: the key is the path up to the first dot of the file name."""
    folder, base = os.path.split(name)
    stem, dot, extension = base.partition(".")
    return os.path.join(folder, stem), extension.lower() if dot else ""


def _iter_tar_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each run of consecutive members sharing a key. Raises OSError /
    tarfile.TarError when the shard is missing or unreadable (possibly after yielding its first samples)."""
    key, members = None, {}
    with tarfile.open(path, mode="r|*") as tar:  # streaming: shards are read once, front to back
        for member in tar:
            if not member.isfile():
                continue
            member_key, extension = _split_member_name(member.name)
            if member_key != key:
                if key is not None:
                    yield key, members
                key, members = member_key, {}
            members[extension] = tar.extractfile(member).read()
    if key is not None:
        yield key, members


class OpenVidWebDataset(torch.utils.data.IterableDataset):
    """OpenVid-1M samples from WebDataset tar shards, items as :class:`OpenVidDataset`'s with ``"key"``
    (the sample's key in its shard) in place of ``"index"``.

    Args:
        shards: a list of ``.tar`` paths, a folder of them, or a glob pattern.
        num_frames, frame_interval, image_size, filters (min_aesthetic ... predicate), flip_prob, antialias,
            decode_threads: as :class:`~openvid_models.data.csv_dataset.OpenVidDataset`; the filters read the
            sample's JSON, before its video is decoded.
        seed: shard order and each sample's window and flip are functions of (seed, epoch, shard, key).
        shuffle_shards: shuffle the shard order each epoch.
        rank, world_size: this process's place in distributed training; None: from ``torch.distributed``
            when it is initialised, else 0 and 1.

    Call :meth:`set_epoch` before each epoch (DataLoader workers copy the dataset when they start, so do not
    use persistent workers).
    """

    def __init__(self, shards: str | os.PathLike | Sequence[str | os.PathLike], num_frames: int = 16,
                 frame_interval: int = 3, image_size: int = 256, *, min_aesthetic: float | None = None,
                 min_motion: float | None = None, max_motion: float | None = None,
                 min_temporal_consistency: float | None = None, camera_motions: Collection[str] | None = None,
                 hd_subset_csv: str | os.PathLike | None = None,
                 predicate: Callable[[ClipRecord], bool] | None = None, flip_prob: float = 0.5,
                 antialias: bool = True, seed: int = 0, shuffle_shards: bool = True, rank: int | None = None,
                 world_size: int | None = None, decode_threads: int = 1):
        super().__init__()
        if num_frames < 1 or frame_interval < 1:
            raise ValueError(f"num_frames and frame_interval must be >= 1, got {num_frames} and {frame_interval}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.shards = list_shards(shards)
        self.num_frames, self.frame_interval, self.image_size = num_frames, frame_interval, image_size
        self.flip_prob, self.antialias, self.decode_threads = flip_prob, antialias, decode_threads
        self.seed, self.shuffle_shards, self.epoch = seed, shuffle_shards, 0
        self.filter = make_clip_filter(num_frames=num_frames, frame_interval=frame_interval,
                                       min_aesthetic=min_aesthetic, min_motion=min_motion, max_motion=max_motion,
                                       min_temporal_consistency=min_temporal_consistency,
                                       camera_motions=camera_motions, hd_subset_csv=hd_subset_csv,
                                       predicate=predicate)
        rank, world_size = resolve_rank(rank, world_size)
        self.rank, self.world_size = rank, world_size
        self.skips = SkipTally("OpenVidWebDataset")
        self.excluded: Counter[str] = Counter()  # filtered out, in this process, so far

    @property
    def skip_counts(self) -> Counter[str]:
        """Bad samples and shards skipped so far in this process, by reason."""
        return self.skips.counts

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shard_order(self) -> list[str]:
        """This epoch's shard order (the same on every rank)."""
        order = list(self.shards)
        if self.shuffle_shards:
            np.random.default_rng([self.seed, self.epoch]).shuffle(order)
        return order

    def _assignment(self) -> tuple[list[str], int, int]:
        """(shards to read, sample stride, sample offset) of this process's worker."""
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        total = self.world_size * num_workers
        me = self.rank * num_workers + worker
        order = self.shard_order()
        if len(order) >= total:
            return order[me::total], 1, 0
        if me == 0:
            logger.info("OpenVidWebDataset: %d shards for %d workers in all: every worker reads every shard "
                        "and keeps every %d-th sample", len(order), total, total)
        return order, total, me

    def _load(self, shard: str, key: str, members: dict[str, bytes]) -> dict | str | ClipError:
        """An item, the reason the sample is filtered out (str), or the ClipError that makes it a skip."""
        source = f"{shard}:{key}"
        if "json" not in members:
            return ClipError("bad_metadata", source, "no .json member")
        try:
            meta = json.loads(members["json"])
            if not isinstance(meta, dict):
                raise ValueError(f"expected a JSON object, got {type(meta).__name__}")
            record = ClipRecord.from_row(meta)
        except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            return ClipError("bad_metadata", source, str(e))
        rejection = self.filter.rejection(record)
        if rejection is not None:
            return rejection
        if "mp4" not in members:
            return ClipError("missing", source, "no .mp4 member")
        rng = np.random.default_rng([self.seed, self.epoch, zlib.crc32(os.path.basename(shard).encode()),
                                     zlib.crc32(key.encode())])
        try:
            video, _ = load_training_clip(members["mp4"], self.num_frames, self.frame_interval, self.image_size,
                                          rng=rng, flip_prob=self.flip_prob, antialias=self.antialias,
                                          threads=self.decode_threads)
        except ClipError as e:
            return ClipError(e.reason, source, e.detail)
        return {"video": video, "text": record.caption, "key": key}

    def __iter__(self) -> Iterator[dict]:
        shards, stride, offset = self._assignment()
        skipped = torch.zeros(len(SKIP_REASONS), dtype=torch.int64)  # since the last item yielded
        position = 0  # of the sample among those of all the shards read, for the sample-level split
        for shard in shards:
            try:
                for key, members in _iter_tar_samples(shard):
                    position += 1
                    if (position - 1) % stride != offset:
                        continue
                    result = self._load(shard, key, members)
                    if isinstance(result, ClipError):
                        skipped[self.skips.record(result)] += 1
                    elif isinstance(result, str):
                        self.excluded[result] += 1
                    else:
                        result["skipped"] = skipped
                        yield result
                        skipped = torch.zeros(len(SKIP_REASONS), dtype=torch.int64)
            except (OSError, tarfile.TarError, EOFError) as e:
                skipped[self.skips.record("bad_shard", shard, f"{type(e).__name__}: {e}")] += 1
        if skipped.any():
            logger.warning("OpenVidWebDataset: %s skipped after this worker's last item (not in any batch's "
                           "'skipped'); skipped in this process: %s", summarize_skipped(skipped),
                           dict(self.skip_counts))
        if self.excluded:
            logger.info("OpenVidWebDataset: excluded by the filters in this process: %s", dict(self.excluded))
