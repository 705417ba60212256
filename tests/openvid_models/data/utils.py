"""Synthetic clips for the data tests: every frame a solid colour that encodes the frame's index, written
with PyAV's bundled FFmpeg (H.264 with a fixed keyframe interval and B-frames, so seeking is exercised)."""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from openvid_models.data.csv_dataset import OPENVID_COLUMNS

_LEVELS, _STEP, _OFFSET = 8, 32, 16  # 8 levels per channel, 32 apart: codec error of < 16 keeps the index


def index_colour(index: int) -> tuple[int, int, int]:
    """The RGB colour of frame ``index`` (0 <= index < 512)."""
    digits = (index % _LEVELS, index // _LEVELS % _LEVELS, index // _LEVELS**2 % _LEVELS)
    return tuple(_OFFSET + _STEP * d for d in digits)


def frame_index(frame: np.ndarray) -> int:
    """The index encoded by a decoded uint8 ``[H, W, 3]`` frame (from its mean colour)."""
    mean = frame.reshape(-1, 3).astype(np.float64).mean(0)
    digits = np.clip(np.round((mean - _OFFSET) / _STEP), 0, _LEVELS - 1).astype(int)
    return int(digits[0] + _LEVELS * digits[1] + _LEVELS**2 * digits[2])


def max_colour_error(frame: np.ndarray, index: int) -> float:
    return float(np.abs(frame.reshape(-1, 3).astype(np.float64) - np.array(index_colour(index))).max())


def encode_clip(target, num_frames: int = 48, width: int = 64, height: int = 48, fps: int = 30, gop: int = 12,
                codec: str = "libx264", faststart: bool = False, pts_offset: int = 0,
                dropped: tuple[int, ...] = ()) -> None:
    """Write a clip whose frame i is solid ``index_colour(i)`` to ``target`` (a path or a binary file).

    ``pts_offset``: first pts (in frames), to test streams that do not start at 0. ``dropped``: frame
    indices left out of the stream (a variable-frame-rate gap; the time slot stays empty).
    """
    container = av.open(target, mode="w", format="mp4",
                        options={"movflags": "faststart"} if faststart else {})
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.codec_context.gop_size = gop
    if codec == "libx264":
        stream.options = {"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0", "bf": "2", "crf": "12"}
    for i in range(num_frames):
        if i in dropped:
            continue
        image = np.empty((height, width, 3), np.uint8)
        image[:] = index_colour(i)
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = i + pts_offset
        frame.time_base = Fraction(1, fps)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


def clip_bytes(**kwargs) -> bytes:
    buffer = io.BytesIO()
    encode_clip(buffer, **kwargs)
    return buffer.getvalue()


def openvid_row(video: str, caption: str = "a caption, with a comma", aesthetic: float = 5.0,
                motion: float = 3.0, temporal: float = 0.99, camera: str = "static", frames: int = 48,
                fps: float = 30.0) -> dict:
    """A row with the nine columns of OpenVid-1M.csv (the real names, spaces included)."""
    return {"video": video, "caption": caption, "aesthetic score": aesthetic, "motion score": motion,
            "temporal consistency score": temporal, "camera motion": camera, "frame": frames, "fps": fps,
            "seconds": round(frames / fps, 3)}


def write_openvid_csv(path, rows: list[dict], columns=OPENVID_COLUMNS) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)


def write_shard(path, samples: list[tuple[str, bytes | None, dict | str | None]]) -> Path:
    """A WebDataset tar shard: for each (key, mp4 bytes or None, metadata dict / raw text or None) the
    members ``<key>.mp4`` and ``<key>.json`` (a None leaves that member out)."""
    with tarfile.open(path, "w") as tar:
        for key, mp4, meta in samples:
            members = []
            if mp4 is not None:
                members.append((f"{key}.mp4", mp4))
            if meta is not None:
                text = meta if isinstance(meta, str) else json.dumps(meta)
                members.append((f"{key}.json", text.encode()))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return Path(path)


def truncate_file(path, fraction: float) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * fraction))


def truncate_media_data(path, keep: float) -> None:
    """Cut a faststart mp4 (index before the media data) inside its media data, keeping the index intact:
    the container still promises every frame, the file holds only the first ``keep`` of them."""
    data = Path(path).read_bytes()
    mdat = data.find(b"mdat")
    assert mdat > data.find(b"moov") >= 0, "expected a faststart mp4 (moov before mdat)"
    Path(path).write_bytes(data[:mdat + 4 + int((len(data) - mdat - 4) * keep)])
