"""DataLoader set-up for distributed training over a map-style dataset, with a resumable sample order.

The order of an epoch is ``DistributedSampler``'s: a permutation drawn from (seed, epoch), padded or cut to a
multiple of world_size, rank r taking positions r, r + world_size, ... . :class:`ResumableDataLoader` counts
the samples it has handed out in the current epoch; its ``state_dict()`` (epoch, samples consumed) saved with
a checkpoint lets a new loader continue with exactly the samples that came next, batch for batch.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data.distributed import DistributedSampler


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` that can begin its epoch after the first ``start`` samples of this rank."""

    def __init__(self, dataset: Dataset, *, rank: int, world_size: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start = 0

    def set_start(self, start: int) -> None:
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start must be in [0, {self.num_samples}] (samples per rank per epoch), got {start}")
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return self.num_samples - self.start


class ResumableDataLoader:
    """A DataLoader over a :class:`ResumableDistributedSampler` that knows where it is in the epoch.

    Iterating runs the rest of the current epoch (all of it on a fresh loader) and then moves to the next
    epoch; each pass calls ``set_epoch`` on the sampler and, if it has one, on the dataset. Leaving a pass
    early and iterating again continues where it stopped. :meth:`state_dict` counts every batch already handed
    out, so save it after the step that used the last batch.
    """

    def __init__(self, loader: DataLoader, sampler: ResumableDistributedSampler, generator: torch.Generator):
        self.loader, self.sampler, self.generator = loader, sampler, generator
        self.batch_size: int = loader.batch_size
        self.drop_last: bool = loader.drop_last
        self.epoch = 0
        self.samples_consumed = 0  # of this rank, in the current epoch

    @property
    def dataset(self) -> Dataset:
        return self.loader.dataset

    def _epoch_done(self) -> bool:
        remaining = self.sampler.num_samples - self.samples_consumed
        return remaining < self.batch_size if self.drop_last else remaining == 0

    def __len__(self) -> int:
        """Batches left in the current epoch (a whole epoch once it is finished)."""
        if self._epoch_done():
            remaining = self.sampler.num_samples
        else:
            remaining = self.sampler.num_samples - self.samples_consumed
        return remaining // self.batch_size if self.drop_last else math.ceil(remaining / self.batch_size)

    def __iter__(self) -> Iterator:
        if self._epoch_done():
            self.epoch, self.samples_consumed = self.epoch + 1, 0
        self.sampler.set_epoch(self.epoch)
        self.sampler.set_start(self.samples_consumed)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)  # picked up by workers, which copy the dataset as they start
        # Workers' seeds come from this generator: reseeding it per epoch and position makes the unseeded
        # random draws of a resumed pass independent of how the run got there.
        self.generator.manual_seed(hash((self.sampler.seed, self.epoch, self.samples_consumed)) % 2**63)
        remaining = self.sampler.num_samples - self.samples_consumed
        for batch in self.loader:
            taken = min(self.batch_size, remaining)
            remaining -= taken
            self.samples_consumed += taken
            yield batch
        self.epoch, self.samples_consumed = self.epoch + 1, 0

    def state_dict(self) -> dict:
        """Where this rank is: ``epoch`` and ``samples_consumed`` in it, plus the settings that must match
        on resume."""
        epoch, consumed = self.epoch, self.samples_consumed
        if self._epoch_done():
            epoch, consumed = epoch + 1, 0
        return {"epoch": epoch, "samples_consumed": consumed, "seed": self.sampler.seed,
                "world_size": self.sampler.num_replicas, "rank": self.sampler.rank,
                "dataset_size": len(self.sampler.dataset), "shuffle": self.sampler.shuffle,
                "drop_last": self.sampler.drop_last}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (from :meth:`state_dict` of the same rank). The seed, world size, dataset
        size, shuffle and drop_last must be those of the saved run: with any other the permutation, or this
        rank's share of it, differs and "the next samples" has no meaning. The batch size may change."""
        current = self.state_dict()
        mismatched = {k: (state[k], current[k]) for k in ("seed", "world_size", "rank", "dataset_size", "shuffle",
                                                          "drop_last") if k in state and state[k] != current[k]}
        if mismatched:
            raise ValueError("cannot resume the sample order: saved vs. current " +
                             ", ".join(f"{k}={saved!r} vs {now!r}" for k, (saved, now) in mismatched.items()))
        self.sampler.set_start(int(state["samples_consumed"]))  # validates the range
        self.epoch, self.samples_consumed = int(state["epoch"]), int(state["samples_consumed"])


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``(rank, world_size)`` as given, or from the initialised process group (else a single process)."""
    if (rank is None) != (world_size is None):
        raise ValueError(f"give both rank and world_size or neither, got rank={rank}, world_size={world_size}")
    if rank is None:
        dist = torch.distributed
        initialized = dist.is_available() and dist.is_initialized()
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if initialized else (0, 1)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    return rank, world_size


def build_dataloader(dataset: Dataset, batch_size: int, *, rank: int | None = None, world_size: int | None = None,
                     num_workers: int = 0, seed: int = 0, shuffle: bool = True, drop_last: bool = True,
                     pin_memory: bool | None = None, prefetch_factor: int | None = None,
                     collate_fn: Callable | None = None, multiprocessing_context=None,
                     timeout: float = 0) -> ResumableDataLoader:
    """A resumable DataLoader for this rank's share of a map-style ``dataset``.

    rank, world_size: None takes them from ``torch.distributed`` when it is initialised, else 0 and 1.
    seed: the sample order of epoch e is a function of (seed, e); every rank must pass the same seed.
    drop_last: drop the samples that would make the ranks' shares unequal, and a last partial batch.
    pin_memory: None pins when CUDA is available. Workers are not persistent, so that each epoch's workers
    see the dataset's ``set_epoch``.

    Items are collated by ``collate_fn`` (default: torch's, which stacks ``"video"`` to ``[B, 3, T, H, W]``,
    lists ``"text"``, and stacks ``"skipped"`` to ``[B, R]``; see ``summarize_skipped``).
    """
    if isinstance(dataset, IterableDataset):
        raise TypeError("build_dataloader needs a map-style dataset; an IterableDataset such as "
                        "OpenVidWebDataset splits itself across ranks and workers: pass it to "
                        "torch.utils.data.DataLoader directly and call its set_epoch each epoch")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    rank, world_size = resolve_rank(rank, world_size)
    sampler = ResumableDistributedSampler(dataset, rank=rank, world_size=world_size, seed=seed, shuffle=shuffle,
                                          drop_last=drop_last)
    generator = torch.Generator()
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        collate_fn=collate_fn, pin_memory=pin_memory,
                        drop_last=drop_last, timeout=timeout, generator=generator,
                        prefetch_factor=prefetch_factor if num_workers > 0 else None,
                        multiprocessing_context=multiprocessing_context if num_workers > 0 else None,
                        persistent_workers=False)
    return ResumableDataLoader(loader, sampler, generator)
