"""Video decoding with PyAV and the training-time clip transforms of Open-Sora 1.0, without torchvision.

Decoding: a clip is opened once, its frame count read from the container, the needed frame indices chosen,
and the decoder started at the keyframe at or before the first of them (seek by pts), then run only until
the last needed frame; only the needed frames are converted to RGB. A decoded frame's index is
``round((pts - start_time) * time_base * frame_rate)``, so the mapping holds for any time base and for
streams whose first pts is not 0; frame index i is the frame on screen at ``start_time + i / frame_rate``
(for constant frame rate, the i-th frame; a gap in the timestamps repeats the frame before it).

Transforms, as upstream ``DatasetFromCSV`` with ``get_transforms_video``: a random window of
``num_frames * frame_interval`` frames (``TemporalRandomCrop``) with ``num_frames`` frames spread evenly over
it (``np.linspace(begin, end - 1, num_frames)``); resize so the short side is ``image_size`` (bilinear) then
a center crop (``UCFCenterCropVideo``); random horizontal flip; ``(x / 255 - 0.5) / 0.5`` to [-1, 1];
output ``[C, T, H, W]`` float32.

Where this differs from upstream, on purpose: a clip with fewer than ``num_frames * frame_interval`` frames
is rejected (upstream sampled it more densely, so the frame spacing varied); the resize low-passes
(``antialias=True``; upstream aliased when downscaling 1080p); the flip comes after the crop (upstream flipped
first: the crop window then sits one column over when the margin is odd).

Every failure to produce a clip is raised as :class:`ClipError` with a ``reason`` from :data:`SKIP_REASONS`
so that datasets can skip the clip and count it by reason.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import BinaryIO, Union

import av
import numpy as np
import torch
import torch.nn.functional as F

VideoSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]

# Why a clip could not be used; datasets count skips under these names, in this order (the layout of an
# item's "skipped" counts). The last two come from WebDataset shards only: a sample whose JSON is unreadable
# or lacks a column, and a shard that is missing or not a readable tar (counted once per shard).
SKIP_REASONS = ("missing", "empty", "corrupt", "too_short", "truncated", "bad_metadata", "bad_shard")


class ClipError(RuntimeError):
    """A clip that cannot be used for training.

    ``reason`` is one of :data:`SKIP_REASONS`: ``missing`` (no such file), ``empty`` (0 bytes), ``corrupt``
    (FFmpeg cannot open or decode it, or it has no video stream / frame rate), ``too_short`` (fewer frames
    than the sampling window), ``truncated`` (the stream ends before a frame its header promises).
    """

    def __init__(self, reason: str, source: str, detail: str):
        if reason not in SKIP_REASONS:
            raise ValueError(f"reason must be one of {SKIP_REASONS}, got {reason!r}")
        super().__init__(f"{reason}: {source}: {detail}")
        self.reason = reason
        self.source = source
        self.detail = detail


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about a clip's first video stream (before any decoding)."""

    num_frames: int  # from the container's frame count, else estimated from duration x frame rate
    frame_rate: Fraction
    width: int
    height: int


def _describe(source: VideoSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes in memory>"
    return getattr(source, "name", None) or f"<{type(source).__name__}>"


def _open(source: VideoSource, name: str):
    """An open av container; ClipError for missing, empty and unreadable input."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ClipError("missing", name, "no such file")
        if os.path.getsize(path) == 0:
            raise ClipError("empty", name, "file has 0 bytes")
        file = path
    elif isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ClipError("empty", name, "0 bytes")
        file = io.BytesIO(source)
    else:
        file = source
    try:
        return av.open(file, mode="r")
    except av.error.FFmpegError as e:
        raise ClipError("corrupt", name, f"FFmpeg cannot open it ({e})") from e
    except OSError as e:
        raise ClipError("corrupt", name, f"cannot read it ({e})") from e


def _video_stream(container, name: str):
    if not container.streams.video:
        raise ClipError("corrupt", name, "no video stream")
    return container.streams.video[0]


def _frame_rate(stream, name: str) -> Fraction:
    """The rate that turns timestamps into frame indices: FFmpeg's nominal rate (exact for constant frame
    rate; the average rate is frames / duration and drifts by a frame over a long clip when the last frame's
    duration is off), unless it is more than 10% from the average rate (variable frame rate with a
    fine time grid, e.g. phone video), where the average rate keeps indices within the frame count."""
    nominal = stream.guessed_rate or stream.base_rate
    average = stream.average_rate
    if nominal and average and abs(Fraction(nominal) / Fraction(average) - 1) > Fraction(1, 10):
        return Fraction(average)
    if nominal or average:
        return Fraction(nominal or average)
    raise ClipError("corrupt", name, "the video stream has no frame rate")


def _info(container, stream, name: str) -> VideoInfo:
    rate = _frame_rate(stream, name)
    num_frames = stream.frames
    if not num_frames:  # containers without a frame count (e.g. some webm/mkv): estimate from the duration
        if stream.duration is not None and stream.time_base:
            num_frames = math.floor(stream.duration * stream.time_base * rate)
        elif container.duration is not None:
            num_frames = math.floor(Fraction(container.duration, av.time_base) * rate)
        else:
            num_frames = 0
    return VideoInfo(num_frames=int(num_frames), frame_rate=rate, width=stream.codec_context.width,
                     height=stream.codec_context.height)


def probe_video(source: VideoSource) -> VideoInfo:
    """Frame count, frame rate and size of a clip's first video stream, without decoding.

    Raises ClipError (missing / empty / corrupt).
    """
    name = _describe(source)
    container = _open(source, name)
    try:
        return _info(container, _video_stream(container, name), name)
    finally:
        container.close()


def _decoded_frames(container, stream, name: str):
    """The stream's frames in presentation order from the current position. A packet that fails to decode
    raises ClipError: ``truncated`` when it is a short read at the end of the file (the demuxer flags it
    corrupt and nothing follows it), else ``corrupt``."""
    packets = container.demux(stream)
    for packet in packets:
        try:
            frames = packet.decode()
        except av.error.FFmpegError as e:
            if packet.is_corrupt and all(later.size == 0 for later in packets):
                raise ClipError("truncated", name, f"the file ends inside a frame ({e})") from e
            raise ClipError("corrupt", name, f"decoding failed ({e})") from e
        yield from frames


def _decode_indices(container, stream, wanted: Sequence[int], name: str, seek: bool,
                    stats: dict) -> dict[int, np.ndarray] | None:
    """RGB frames for the sorted, distinct frame indices ``wanted``: {index: uint8 [H, W, 3]}.

    A wanted index with no frame of its own (a gap in a variable-frame-rate stream) gets the frame shown at
    that time, the last one before it. With ``seek``, returns None when the seek landed after the first
    wanted frame, which the caller answers by decoding from the start (``seek=False``).
    """
    rate = _frame_rate(stream, name)
    time_base = stream.time_base
    origin = stream.start_time if stream.start_time is not None else 0
    first = wanted[0]
    if seek and first > 0:
        # Aim a quarter frame past frame `first`'s nominal pts: a keyframe there is found despite timestamp
        # rounding, the next frame is out of reach; the demuxer backs up to the keyframe at or before it.
        target = origin + math.floor((first + Fraction(1, 4)) / (rate * time_base))
        container.seek(max(target, origin), stream=stream, backward=True, any_frame=False)

    frames: dict[int, np.ndarray] = {}
    pending = 0  # position in `wanted` of the next frame to collect
    previous = None  # (index, frame) of the last decoded frame, kept undecoded to RGB until needed
    last_index = None
    stats["decoded"] = 0
    for frame in _decoded_frames(container, stream, name):
        stats["decoded"] += 1
        if frame.pts is None:  # no timestamp: count on from the previous frame
            index = 0 if last_index is None else last_index + 1
        else:
            index = round((frame.pts - origin) * time_base * rate)
        if previous is None:
            stats["first_decoded"] = index
        if previous is None and index > first and seek:
            return None  # the seek overshot: frames before `index` were never decoded
        last_index = index
        while pending < len(wanted) and wanted[pending] < index:
            # wanted[pending] fell in a gap: the frame on screen at that time is the previous one (before
            # the stream's first frame, when decoding from the start: the first one)
            held = previous[1] if previous is not None else frame
            frames[wanted[pending]] = held.to_ndarray(format="rgb24")
            pending += 1
        if pending < len(wanted) and wanted[pending] == index:
            frames[index] = frame.to_ndarray(format="rgb24")
            pending += 1
        previous = (index, frame)
        if pending == len(wanted):
            return frames
    decoded_to = "before any frame" if last_index is None else f"at frame {last_index}"
    raise ClipError("truncated", name, f"the stream ends {decoded_to}, frame {wanted[pending]} was needed")


def _read(container, stream, indices: Sequence[int], name: str, threads: int, stats: dict | None) -> np.ndarray:
    stats = {} if stats is None else stats
    if threads > 1:
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = threads
    wanted = sorted(set(int(i) for i in indices))
    if not wanted:
        raise ValueError("indices must name at least one frame")
    if wanted[0] < 0:
        raise ValueError(f"indices must be >= 0, got {wanted[0]}")
    try:
        stats["restarted"] = False
        frames = _decode_indices(container, stream, wanted, name, seek=True, stats=stats)
        if frames is None:
            stats["restarted"] = True  # the demuxer's seek was off: decode from the first frame instead
            container.seek(stream.start_time if stream.start_time is not None else 0, stream=stream,
                           backward=True, any_frame=False)
            frames = _decode_indices(container, stream, wanted, name, seek=False, stats=stats)
    except av.error.FFmpegError as e:
        raise ClipError("corrupt", name, f"decoding failed ({e})") from e
    return np.stack([frames[int(i)] for i in indices])


def read_frames(source: VideoSource, indices: Sequence[int], *, threads: int = 1,
                stats: dict | None = None) -> np.ndarray:
    """Decode the frames ``indices`` (0-based presentation order, any order, repeats allowed) of a clip.

    ``source``: a path, the file's bytes, or a binary file object. ``threads``: FFmpeg decoding threads
    (1 suits DataLoader workers; more helps a single process). ``stats``: a dict to receive ``decoded``
    (frames decoded), ``first_decoded`` (index of the first one: the keyframe the seek found) and
    ``restarted`` (the seek overshot and decoding started again from the first frame).

    Returns uint8 ``[len(indices), H, W, 3]`` RGB. Raises ClipError (missing / empty / corrupt / truncated).
    """
    name = _describe(source)
    container = _open(source, name)
    try:
        return _read(container, _video_stream(container, name), indices, name, threads, stats)
    finally:
        container.close()


def sample_frame_indices(total_frames: int, num_frames: int, frame_interval: int,
                         rng: np.random.Generator | None = None) -> np.ndarray:
    """Upstream's temporal sampling: a random window of ``num_frames * frame_interval`` frames, and
    ``num_frames`` indices spread evenly over it, first and last frame of the window included.

    The spacing is therefore ``(num_frames * frame_interval - 1) / (num_frames - 1)`` frames rounded down
    (3.13 for 16 x 3, so steps of 3 and 4), as in Open-Sora 1.0. As upstream, the window's start is drawn
    from ``[0, total_frames - window - 1]`` (the last possible start is left out, which also keeps clear of a
    frame count that is one too high). Returns int64 ``[num_frames]``.

    Raises ClipError("too_short") when ``total_frames < num_frames * frame_interval``: unlike upstream, a
    shorter clip is not sampled more densely, so that every sample has the same frame spacing.
    """
    if num_frames < 1 or frame_interval < 1:
        raise ValueError(f"num_frames and frame_interval must be >= 1, got {num_frames} and {frame_interval}")
    window = num_frames * frame_interval
    if total_frames < window:
        raise ClipError("too_short", "<clip>", f"{total_frames} frames, {num_frames} frames x interval "
                        f"{frame_interval} need {window}")
    rng = rng if rng is not None else np.random.default_rng()
    begin = int(rng.integers(0, max(0, total_frames - window - 1), endpoint=True))
    return np.linspace(begin, begin + window - 1, num_frames).astype(np.int64)


def read_clip(source: VideoSource, num_frames: int, frame_interval: int,
              rng: np.random.Generator | None = None, *, threads: int = 1,
              stats: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Open a clip once, sample a window (:func:`sample_frame_indices`) from its frame count, decode it.

    Returns (uint8 frames ``[num_frames, H, W, 3]``, int64 frame indices ``[num_frames]``); ``threads`` and
    ``stats`` as :func:`read_frames`.
    Raises ClipError with any reason of :data:`SKIP_REASONS`.
    """
    name = _describe(source)
    container = _open(source, name)
    try:
        stream = _video_stream(container, name)
        info = _info(container, stream, name)
        try:
            indices = sample_frame_indices(info.num_frames, num_frames, frame_interval, rng)
        except ClipError as e:
            raise ClipError(e.reason, name, e.detail) from None
        return _read(container, stream, indices.tolist(), name, threads, stats), indices
    finally:
        container.close()


def _square_size(image_size) -> int:
    if isinstance(image_size, int) and image_size > 0:
        return image_size
    if (isinstance(image_size, (tuple, list)) and len(image_size) == 2 and image_size[0] == image_size[1]
            and isinstance(image_size[0], int) and image_size[0] > 0):
        return image_size[0]
    raise ValueError(f"image_size must be a positive int or a square (size, size), got {image_size!r}")


def resize_center_crop(video: torch.Tensor, image_size, *, antialias: bool = True) -> torch.Tensor:
    """Resize ``[T, C, H, W]`` so its short side is ``image_size`` (bilinear, aspect kept, each side
    rounded as upstream), then center-crop to ``image_size x image_size``; the dtype is kept.

    uint8 input on the CPU is resized in uint8 (PyTorch's vectorised kernel, about 15x faster than float on
    1080p): the result is the float resize rounded to integers, within 1/255 of it. ``antialias=True``
    low-passes when downscaling; upstream resized without it (1080p to 256 then aliases).
    """
    size = _square_size(image_size)
    if video.dim() != 4:
        raise ValueError(f"video must be [T, C, H, W], got shape {tuple(video.shape)}")
    height, width = video.shape[-2:]
    scale = size / min(height, width)
    new_h, new_w = int(round(height * scale)), int(round(width * scale))
    if (new_h, new_w) != (height, width):
        dtype = video.dtype
        if dtype == torch.uint8 and video.device.type != "cpu":
            video = video.float()
        elif dtype == torch.uint8:
            video = video.contiguous(memory_format=torch.channels_last)  # the fast uint8 kernel's layout
        video = F.interpolate(video, size=(new_h, new_w), mode="bilinear", align_corners=False,
                              antialias=antialias)
        if video.dtype != dtype:
            video = video.round_().clamp_(0, 255).to(dtype)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return video[..., top:top + size, left:left + size].contiguous()


def normalize_to_unit_range(video: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] to float32 [-1, 1]: ``(x / 255 - 0.5) / 0.5`` (upstream's mean 0.5, std 0.5)."""
    if video.dtype != torch.uint8:
        raise TypeError(f"video must be uint8, got {video.dtype}")
    return video.float().div_(127.5).sub_(1.0)


def frames_to_model_input(frames: np.ndarray | torch.Tensor, image_size, *, flip: bool,
                          antialias: bool = True) -> torch.Tensor:
    """uint8 RGB ``[T, H, W, 3]`` frames to the model's float32 ``[3, T, image_size, image_size]`` in
    [-1, 1]: short-side resize + center crop, horizontal flip if ``flip``, normalisation."""
    frames = torch.as_tensor(frames)
    if frames.dim() != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    video = resize_center_crop(frames.permute(0, 3, 1, 2), image_size, antialias=antialias)  # [T, 3, S, S]
    if flip:
        video = video.flip(-1)
    return normalize_to_unit_range(video).permute(1, 0, 2, 3).contiguous()


def load_training_clip(source: VideoSource, num_frames: int, frame_interval: int, image_size, *,
                       rng: np.random.Generator | None = None, flip_prob: float = 0.5, antialias: bool = True,
                       threads: int = 1) -> tuple[torch.Tensor, np.ndarray]:
    """One training sample from a clip, as upstream ``DatasetFromCSV``: random temporal window
    (:func:`read_clip`), short-side resize + center crop, horizontal flip with probability ``flip_prob``,
    [-1, 1]. The window is drawn before the flip, both from ``rng``.

    Returns (float32 ``[3, num_frames, S, S]``, int64 frame indices ``[num_frames]``). Raises ClipError.
    """
    if not 0.0 <= flip_prob <= 1.0:
        raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
    _square_size(image_size)  # a bad size is the caller's error, not the clip's: raise before decoding
    rng = rng if rng is not None else np.random.default_rng()
    frames, indices = read_clip(source, num_frames, frame_interval, rng, threads=threads)
    flip = bool(rng.random() < flip_prob)
    return frames_to_model_input(frames, image_size, flip=flip, antialias=antialias), indices
