"""OpenVid-1M as a map-style dataset: the release's CSV (``OpenVid-1M.csv`` / ``OpenVidHD.csv``) over a flat
folder of ``.mp4`` clips, items as upstream Open-Sora 1.0 ``DatasetFromCSV``.

Skipped clips. A clip that cannot be used (missing, empty, corrupt, too short, truncated; see
:data:`~openvid_models.data.video.SKIP_REASONS`) never crashes the DataLoader: ``dataset[i]`` logs a warning
naming the file and the reason, counts it, and returns the next usable clip (``i + 1``, ``i + 2``, ...
wrapping around). Every item carries ``"skipped"``, int64 ``[len(SKIP_REASONS)]``: the clips skipped, by
reason, to produce it. The default collate stacks these to ``[B, R]``, so each batch reports the skips
behind it, from whatever worker process produced it; :func:`summarize_skipped` turns them into
``{reason: count}`` (sum over ranks with ``torch.distributed.all_reduce`` for a global count). Each process
also keeps its own totals in ``dataset.skip_counts``. ``max_consecutive_skips`` bad clips in a row raise a
RuntimeError: a wrong ``video_root`` or a broken mount should stop training, not spin.

Rows removed by the filters are not skips: they are counted once, at construction, in
``dataset.excluded`` (by reason) and logged.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from openvid_models.data.video import SKIP_REASONS, ClipError, load_training_clip

logger = logging.getLogger(__name__)

# The columns of OpenVid-1M.csv and OpenVidHD.csv, names as in the release (with spaces).
OPENVID_COLUMNS = ("video", "caption", "aesthetic score", "motion score", "temporal consistency score",
                   "camera motion", "frame", "fps", "seconds")


@dataclass(frozen=True)
class ClipRecord:
    """One row of the OpenVid-1M CSV (or one WebDataset sample's JSON)."""

    video: str  # file name of the clip, relative to the video folder
    caption: str
    aesthetic_score: float
    motion_score: float
    temporal_consistency_score: float
    camera_motion: str
    frame: int  # number of frames
    fps: float
    seconds: float

    @classmethod
    def from_row(cls, row: Mapping[str, object]) -> ClipRecord:
        """From a mapping with the release's column names (values as CSV strings or JSON numbers).

        Raises ValueError naming the missing or unparsable column.
        """
        missing = [c for c in OPENVID_COLUMNS if c not in row]
        if missing:
            raise ValueError(f"missing columns {missing}")
        values = {}
        for column, (field, kind) in _COLUMN_FIELDS.items():
            raw = row[column]
            try:
                if kind is str:
                    value = "" if raw is None else str(raw)
                elif kind is int:
                    value = int(float(raw))  # "121" and "121.0" both occur in exported CSVs
                else:
                    value = float(raw)
                    if math.isnan(value):
                        raise ValueError("NaN")
            except (TypeError, ValueError) as e:
                raise ValueError(f"column {column!r}: cannot read {raw!r} as {kind.__name__} ({e})") from None
            values[field] = value
        return cls(**values)


# column -> (ClipRecord field, type)
_COLUMN_FIELDS = {"video": ("video", str), "caption": ("caption", str), "aesthetic score": ("aesthetic_score", float),
                  "motion score": ("motion_score", float),
                  "temporal consistency score": ("temporal_consistency_score", float),
                  "camera motion": ("camera_motion", str), "frame": ("frame", int), "fps": ("fps", float),
                  "seconds": ("seconds", float)}
assert tuple(_COLUMN_FIELDS) == OPENVID_COLUMNS


def check_columns(columns: Collection[str], source: str) -> None:
    """Raise ValueError listing the release's columns missing from ``columns`` (a header)."""
    missing = [c for c in OPENVID_COLUMNS if c not in set(columns)]
    if missing:
        raise ValueError(f"{source}: the header lacks the OpenVid-1M columns {missing}; found {list(columns)}; "
                         f"expected all of {list(OPENVID_COLUMNS)}")


def read_openvid_csv(csv_path: str | os.PathLike) -> tuple[list[ClipRecord], dict[int, str]]:
    """Read an OpenVid-1M CSV (header with the nine release columns, in any order, extra columns ignored).

    Returns (records, unreadable rows as ``{line number: error}``). Raises ValueError for a bad header.
    """
    path = os.fspath(csv_path)
    records, bad_rows = [], {}
    # utf-8-sig: a byte-order mark from spreadsheet exports would otherwise glue itself to "video"
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            raise ValueError(f"{path}: empty file, expected a header with {list(OPENVID_COLUMNS)}")
        reader.fieldnames = [name.strip() for name in reader.fieldnames]
        check_columns(reader.fieldnames, path)
        for row in reader:
            try:
                if None in row:  # more fields than the header: an unquoted comma in a caption
                    raise ValueError(f"{len(reader.fieldnames) + len(row[None])} fields, header has "
                                     f"{len(reader.fieldnames)}")
                records.append(ClipRecord.from_row(row))
            except ValueError as e:
                bad_rows[reader.line_num] = str(e)
    return records, bad_rows


def read_video_names(csv_path: str | os.PathLike) -> frozenset[str]:
    """The ``video`` column of a CSV (e.g. OpenVidHD.csv, to select the HD subset)."""
    path = os.fspath(csv_path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        names = [name.strip() for name in reader.fieldnames or ()]
        if "video" not in names:
            raise ValueError(f"{path}: expected a 'video' column in the header, found {names}")
        reader.fieldnames = names
        return frozenset(row["video"] for row in reader)


@dataclass(frozen=True)
class ClipFilter:
    """Which clips to train on, from their CSV columns alone (nothing is decoded). None: no condition."""

    min_aesthetic: float | None = None
    min_motion: float | None = None
    max_motion: float | None = None
    min_temporal_consistency: float | None = None
    camera_motions: frozenset[str] | None = None  # keep only these "camera motion" labels
    min_frames: int | None = None  # from the "frame" column
    videos: frozenset[str] | None = None  # keep only these file names (e.g. the HD subset)
    predicate: Callable[[ClipRecord], bool] | None = None  # any other condition; True keeps the clip

    def rejection(self, record: ClipRecord) -> str | None:
        """Why ``record`` is filtered out (a short reason to count under), or None to keep it."""
        if self.videos is not None and record.video not in self.videos:
            return "not in subset"
        if self.min_frames is not None and record.frame < self.min_frames:
            return "too few frames (csv)"
        if self.min_aesthetic is not None and record.aesthetic_score < self.min_aesthetic:
            return "aesthetic score"
        if self.min_motion is not None and record.motion_score < self.min_motion:
            return "motion score low"
        if self.max_motion is not None and record.motion_score > self.max_motion:
            return "motion score high"
        if (self.min_temporal_consistency is not None
                and record.temporal_consistency_score < self.min_temporal_consistency):
            return "temporal consistency score"
        if self.camera_motions is not None and record.camera_motion not in self.camera_motions:
            return "camera motion"
        if self.predicate is not None and not self.predicate(record):
            return "predicate"
        return None


def make_clip_filter(*, num_frames: int, frame_interval: int, min_aesthetic: float | None = None,
                     min_motion: float | None = None, max_motion: float | None = None,
                     min_temporal_consistency: float | None = None, camera_motions: Collection[str] | None = None,
                     hd_subset_csv: str | os.PathLike | None = None,
                     predicate: Callable[[ClipRecord], bool] | None = None) -> ClipFilter:
    """The dataset's filter: the given conditions plus enough frames for the sampling window."""
    if isinstance(camera_motions, str):
        raise TypeError(f"camera_motions must be a collection of labels, got the string {camera_motions!r}")
    return ClipFilter(min_aesthetic=min_aesthetic, min_motion=min_motion, max_motion=max_motion,
                      min_temporal_consistency=min_temporal_consistency,
                      camera_motions=None if camera_motions is None else frozenset(camera_motions),
                      min_frames=num_frames * frame_interval,
                      videos=None if hd_subset_csv is None else read_video_names(hd_subset_csv),
                      predicate=predicate)


class StringTable:
    """Strings packed into one utf-8 numpy buffer with offsets: ``table[i]`` is the i-th string.

    No per-string Python objects, so DataLoader workers forked from the main process share these pages
    instead of copying them."""

    def __init__(self, strings: Iterable[str]):
        encoded = [s.encode("utf-8") for s in strings]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self._offsets[1:])
        self._data = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> str:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} strings")
        index %= len(self)
        return self._data[self._offsets[index]:self._offsets[index + 1]].tobytes().decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))


def summarize_skipped(skipped: torch.Tensor) -> dict[str, int]:
    """``{reason: count}`` from items' or batches' ``"skipped"`` counts (``[..., len(SKIP_REASONS)]``)."""
    skipped = torch.as_tensor(skipped)
    if skipped.shape[-1:] != (len(SKIP_REASONS),):
        raise ValueError(f"skipped must end in a dimension of {len(SKIP_REASONS)} ({SKIP_REASONS}), "
                         f"got shape {tuple(skipped.shape)}")
    totals = skipped.reshape(-1, len(SKIP_REASONS)).sum(0).tolist()
    return dict(zip(SKIP_REASONS, (int(t) for t in totals)))


class SkipTally:
    """A process's count of skipped clips, by reason, with a warning logged for each."""

    def __init__(self, dataset_name: str):
        self.dataset_name = dataset_name
        self.counts: Counter[str] = Counter()

    def record(self, error: ClipError | str, source: str = "", detail: str = "") -> int:
        """Count a skip; returns the position of its reason in SKIP_REASONS."""
        reason = error.reason if isinstance(error, ClipError) else error
        message = str(error) if isinstance(error, ClipError) else f"{reason}: {source}: {detail}"
        self.counts[reason] += 1
        total = sum(self.counts.values())
        logger.warning("%s: skipping %s (%d skipped in this process: %s)", self.dataset_name, message, total,
                       dict(self.counts))
        return SKIP_REASONS.index(reason)


def item_rng(seed: int | None, epoch: int, index: int) -> np.random.Generator:
    """The random numbers of one item: from (seed, epoch, index) when seeded, so an item's window and flip
    do not depend on which worker loads it or on a resume; else from torch's generator, which the DataLoader
    seeds per worker."""
    if seed is None:
        return np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
    return np.random.default_rng([seed, epoch, index])


def _log_excluded(name: str, kept: int, excluded: Counter, bad_rows: Mapping[int, str]) -> None:
    if excluded:
        logger.info("%s: %d clips kept, %d excluded: %s", name, kept, sum(excluded.values()), dict(excluded))
    if bad_rows:
        first = list(bad_rows.items())[:5]
        logger.warning("%s: %d unreadable rows excluded; first: %s", name, len(bad_rows),
                       "; ".join(f"line {line}: {error}" for line, error in first))


class OpenVidDataset(torch.utils.data.Dataset):
    """OpenVid-1M clips from the release CSV, as upstream ``DatasetFromCSV`` items.

    Args:
        csv_path: ``OpenVid-1M.csv`` or ``OpenVidHD.csv`` (or any CSV with the nine release columns).
        video_root: the folder holding the ``.mp4`` files named in the ``video`` column.
        num_frames, frame_interval: ``num_frames`` frames over a random window of ``num_frames *
            frame_interval`` frames (16 and 3 in the release; see ``video.sample_frame_indices``). Clips with
            fewer frames by the ``frame`` column are excluded up front; by the file itself, skipped.
        image_size: output side; short-side resize then center crop (256, 512 or 1024 in the release).
        min_aesthetic, min_motion, max_motion, min_temporal_consistency, camera_motions: filters on the
            CSV's columns (None: no condition). hd_subset_csv: keep only clips listed in this CSV (e.g.
            ``OpenVidHD.csv``). predicate: any other condition on a :class:`ClipRecord`, True keeps (under
            DataLoader workers started by spawn it must be picklable, not a lambda).
        flip_prob: probability of a horizontal flip. antialias: low-pass when downscaling (upstream did not).
        seed: None draws windows and flips from torch's RNG (seeded per worker by the DataLoader); an int
            makes them a function of (seed, epoch, index): see :meth:`set_epoch`.
        decode_threads: FFmpeg threads per clip (1 per DataLoader worker is right; more for num_workers=0).
        max_consecutive_skips: bad clips in a row before ``dataset[i]`` gives up with a RuntimeError.

    ``dataset[i]`` -> ``{"video": float32 [3, num_frames, image_size, image_size] in [-1, 1], "text": caption,
    "index": int (the row used: i, or a later one when i was skipped), "skipped": int64
    [len(SKIP_REASONS)]}``; see the module docstring for how skips are reported.
    """

    def __init__(self, csv_path: str | os.PathLike, video_root: str | os.PathLike, num_frames: int = 16,
                 frame_interval: int = 3, image_size: int = 256, *, min_aesthetic: float | None = None,
                 min_motion: float | None = None, max_motion: float | None = None,
                 min_temporal_consistency: float | None = None, camera_motions: Collection[str] | None = None,
                 hd_subset_csv: str | os.PathLike | None = None,
                 predicate: Callable[[ClipRecord], bool] | None = None, flip_prob: float = 0.5,
                 antialias: bool = True, seed: int | None = None, decode_threads: int = 1,
                 max_consecutive_skips: int = 50):
        if num_frames < 1 or frame_interval < 1:
            raise ValueError(f"num_frames and frame_interval must be >= 1, got {num_frames} and {frame_interval}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        if max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips must be >= 1, got {max_consecutive_skips}")
        if not os.path.isdir(video_root):
            raise ValueError(f"video_root must be a folder of .mp4 clips, {os.fspath(video_root)!r} is not a folder")
        self.csv_path = os.fspath(csv_path)
        self.video_root = os.fspath(video_root)
        self.num_frames, self.frame_interval, self.image_size = num_frames, frame_interval, image_size
        self.flip_prob, self.antialias, self.seed = flip_prob, antialias, seed
        self.decode_threads, self.max_consecutive_skips = decode_threads, max_consecutive_skips
        self.epoch = 0
        clip_filter = make_clip_filter(num_frames=num_frames, frame_interval=frame_interval,
                                       min_aesthetic=min_aesthetic, min_motion=min_motion, max_motion=max_motion,
                                       min_temporal_consistency=min_temporal_consistency,
                                       camera_motions=camera_motions, hd_subset_csv=hd_subset_csv,
                                       predicate=predicate)

        records, bad_rows = read_openvid_csv(csv_path)
        self.excluded: Counter[str] = Counter()
        if bad_rows:
            self.excluded["unreadable row"] = len(bad_rows)
        kept = []
        for record in records:
            reason = clip_filter.rejection(record)
            if reason is None:
                kept.append(record)
            else:
                self.excluded[reason] += 1
        name = f"OpenVidDataset({os.path.basename(self.csv_path)})"
        _log_excluded(name, len(kept), self.excluded, bad_rows)
        if not kept:
            raise ValueError(f"{self.csv_path}: no clips left after filtering ({len(records)} rows read, "
                             f"excluded: {dict(self.excluded)})")
        # Only what items need, packed: a million rows as Python objects would be copied into every forked
        # worker page by page as their reference counts change.
        self.video_names = StringTable(record.video for record in kept)
        self.captions = StringTable(record.caption for record in kept)
        self.skips = SkipTally(name)

    @property
    def skip_counts(self) -> Counter[str]:
        """Clips skipped so far in this process, by reason (each DataLoader worker has its own)."""
        return self.skips.counts

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's random windows and flips when ``seed`` is set. DataLoader workers copy the
        dataset when they start, so call this before iterating (``loader.build_dataloader`` does it), and do
        not use persistent workers with a seeded dataset."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.video_names)

    def video_path(self, index: int) -> str:
        return os.path.join(self.video_root, self.video_names[index])

    def __getitem__(self, index: int) -> dict:
        size = len(self.video_names)
        if not -size <= index < size:
            raise IndexError(f"index {index} out of range for {size} clips")
        index %= size
        skipped = torch.zeros(len(SKIP_REASONS), dtype=torch.int64)
        for _ in range(self.max_consecutive_skips):
            try:
                video, _ = load_training_clip(
                    self.video_path(index), self.num_frames, self.frame_interval, self.image_size,
                    rng=item_rng(self.seed, self.epoch, index), flip_prob=self.flip_prob,
                    antialias=self.antialias, threads=self.decode_threads)
            except ClipError as e:
                skipped[self.skips.record(e)] += 1
                last_error = e
                index = (index + 1) % size
                continue
            return {"video": video, "text": self.captions[index], "index": index, "skipped": skipped}
        raise RuntimeError(f"{self.max_consecutive_skips} unusable clips in a row (last: {last_error}; skipped "
                           f"in this process: {dict(self.skip_counts)}); is video_root {self.video_root!r} right?")
