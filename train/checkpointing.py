"""Training checkpoints with ``torch.distributed.checkpoint`` (DCP), published atomically.

Layout under ``<outdir>/checkpoints``::

    step-0000500/            a complete checkpoint: DCP shards + .metadata (model, EMA, optimizer), and
        rank-00000.pt ...    one file per rank of what is not a tensor of the model: step, the data loader's
                             position, RNG states (weights_only-loadable plain data)
    latest                   the name of the newest complete checkpoint (one line)
    step-0001000.tmp/        a checkpoint being written (or one whose writer died: ignored, and removed by
                             the next save)

A save writes everything into ``step-N.tmp/``, waits for every rank, then rank 0 renames the folder to
``step-N/`` and replaces ``latest`` (write ``latest.tmp``, fsync, ``os.replace``). A process killed at any
point leaves ``latest`` naming a complete checkpoint; older checkpoints are only deleted after ``latest``
names the new one.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

LATEST = "latest"
TMP_SUFFIX = ".tmp"


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(root))


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint that ``latest`` names, or None when there is none yet."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = ckpt_dir / name
    if not name or not (path / ".metadata").is_file():
        raise RuntimeError(f"{pointer} names {name!r}, which is not a complete checkpoint folder")
    return path


def save_checkpoint(ckpt_dir: str | os.PathLike, step: int, tensors: dict, rank_state: dict,
                    keep: int = 2, _before_publish=None) -> Path:
    """Write ``tensors`` (a DCP state dict: model, EMA, optimizer; every rank passes its shards) and
    ``rank_state`` (this rank's plain data) as checkpoint ``step``, then publish it as ``latest``.

    Collective: every rank must call it. ``_before_publish``: a test hook, called on rank 0 after everything
    is written and before the rename (to show that a writer dying there leaves the last checkpoint alone).
    Returns the published folder."""
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / checkpoint_name(step)
    tmp = final.with_name(final.name + TMP_SUFFIX)
    current = latest_checkpoint(ckpt_dir)
    if current is not None and current.name == final.name:
        raise ValueError(f"checkpoint {final} is already the latest; save each step at most once")
    if _rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_dir.glob(f"*{TMP_SUFFIX}"):  # left by a writer that died
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        tmp.mkdir()
    _barrier()
    dcp.save(tensors, checkpoint_id=str(tmp))
    torch.save(rank_state, tmp / f"rank-{_rank():05d}.pt")
    _barrier()  # every rank's files are in tmp
    if _rank() == 0:
        _fsync_tree(tmp)
        if _before_publish is not None:
            _before_publish(tmp)
        if final.exists():  # published by a writer that died before updating `latest`: not the latest
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_dir)
        pointer_tmp = ckpt_dir / (LATEST + TMP_SUFFIX)
        with open(pointer_tmp, "w") as f:
            f.write(final.name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer_tmp, ckpt_dir / LATEST)
        _fsync_dir(ckpt_dir)
        old = sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir() and not p.name.endswith(TMP_SUFFIX))
        for path in old[:-keep]:
            if path != final:
                shutil.rmtree(path)
    _barrier()
    return final


def load_checkpoint(path: str | os.PathLike, tensors: dict) -> dict:
    """Load checkpoint ``path`` into ``tensors`` in place (the same structure as was saved, e.g. fresh state
    dicts of the model and optimizer) and return this rank's plain data."""
    path = Path(path)
    dcp.load(tensors, checkpoint_id=str(path))
    rank_file = path / f"rank-{_rank():05d}.pt"
    if not rank_file.is_file():
        world = dist.get_world_size() if dist.is_initialized() else 1
        raise RuntimeError(f"{path} has no {rank_file.name}: it was saved by fewer ranks than this run's {world}; "
                           "resume with the world size it was saved with")
    return torch.load(rank_file, map_location="cpu", weights_only=True)


class StopRequest:
    """Turns SIGTERM (and SIGINT, if asked) into a flag that the training loop polls after each step, so that
    the step in flight finishes, a checkpoint is saved and the run exits cleanly."""

    def __init__(self, signals=(signal.SIGTERM,)):
        self.requested = False
        self.signal_name = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def restore(self) -> None:
        """Put back the handlers that were there before (a run inside a larger program)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def any_rank(self, device) -> bool:
        """Whether any rank got the signal (collective: every rank must call it at the same step)."""
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
