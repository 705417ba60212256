"""A small deterministic OpenVid-format dataset of coloured shapes moving in a stated direction, with a caption that
says colour, shape and motion: the embedded default data for training a tiny text-to-video model on a CPU, where a
clip sampled from the trained model can be checked against its caption (:func:`describe_clip`).

Layout written by :func:`write_sample_set` (the real OpenVid-1M layout: a CSV with all nine columns and a flat
folder of mp4 clips named in its ``video`` column)::

    <root>/sample_set.csv      video, caption, aesthetic score, ..., frame, fps, seconds
    <root>/sample_set.json     the parameters the set was made with (to reuse it, or refuse to mix sets)
    <root>/clips/sample_00000.mp4, ...

Run ``python -m openvid_models.data.sample_set --out DIR --num-clips N``. Read it without horizontal flips
(``OpenVidDataset(..., flip_prob=0.0)``): a flip turns "moving to the left" into moving to the right.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

# The vocabulary: few values, far apart, so that a tiny model can learn each word and a check can tell them apart.
# Colours are RGB in [0, 255], bright on the black background whatever the hue.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (240, 40, 40),
    "green": (40, 210, 40),
    "blue": (50, 90, 255),
    "yellow": (240, 220, 40),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
BACKGROUND = "black"

CSV_COLUMNS: tuple[str, ...] = ("video", "caption", "aesthetic score", "motion score", "temporal consistency score",
                                "camera motion", "frame", "fps", "seconds")
CSV_NAME = "sample_set.csv"
PARAMS_NAME = "sample_set.json"
CLIPS_DIR = "clips"  # the video root to read the CSV with

_MOTION_WORDS = {"left": "moving to the left", "right": "moving to the right", "up": "moving up", "down": "moving down"}
# (dx, dy) unit steps in image coordinates: rows grow downwards.
_DIRECTION_VECTORS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
_SUPERSAMPLE = 4  # sub-pixels per pixel side: anti-aliased edges move smoothly instead of in whole-pixel jumps
# Each direction keeps to its own lane, the third of the frame across its motion nearest one edge, going round
# clockwise: right along the top, down the right side, left along the bottom, up the left side. A caption then
# says where the shape is as well as where it goes; a tiny model learns the first from the caption, as it learns
# the colour, and the motion that goes with each lane from the clips (issue #9: without lanes, the tiny default
# did not learn to pick a direction from its caption; BENCHMARKS.md).
_LANE_AT_LOW_EDGE = {"right": True, "down": False, "left": False, "up": True}  # top / left edge, else bottom / right
_VERSION = 2  # of the rendering; part of the parameters, so that a set made by other code is not reused


def caption_for(colour: str, shape: str, direction: str) -> str:
    """``"a red circle moving to the left on a black background"``."""
    for name, value, allowed in (("colour", colour, COLOURS), ("shape", shape, SHAPES),
                                 ("direction", direction, DIRECTIONS)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return f"a {colour} {shape} {_MOTION_WORDS[direction]} on a {BACKGROUND} background"


def parse_caption(caption: str) -> tuple[str, str, str]:
    """(colour, shape, direction) named by a caption of :func:`caption_for`."""
    for colour, shape, direction in itertools.product(COLOURS, SHAPES, DIRECTIONS):
        if caption.strip().lower() == caption_for(colour, shape, direction):
            return colour, shape, direction
    raise ValueError(f"caption is not one of the sample set's captions: {caption!r}")


def all_captions() -> list[str]:
    """Every caption of the vocabulary (colour-major order), e.g. to sample from or to pre-encode."""
    return [caption_for(*combo) for combo in itertools.product(COLOURS, SHAPES, DIRECTIONS)]


# ---------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Scene:
    colour: str
    shape: str
    direction: str
    diameter: float  # the shape's side / diameter in pixels
    cross: float  # the shape's centre on the axis across the motion, in pixels
    start: float  # its centre along the motion axis at the first and last frames, in pixels
    stop: float


def _coverage(shape: str, size: int, cx: float, cy: float, diameter: float) -> np.ndarray:
    """float64 ``[size, size]`` in [0, 1]: how much of each pixel the shape covers (supersampled)."""
    ticks = (np.arange(size * _SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
    x, y = ticks[None, :] - cx, ticks[:, None] - cy
    r = diameter / 2
    if shape == "square":
        inside = (np.abs(x) <= r) & (np.abs(y) <= r)
    elif shape == "circle":
        inside = x * x + y * y <= r * r
    else:  # triangle pointing up: the half width grows from 0 at the apex to r at the base
        inside = (np.abs(y) <= r) & (np.abs(x) <= (y + r) / 2)
    return inside.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))


def _render(scene: _Scene, frames: int, size: int) -> np.ndarray:
    """uint8 ``[frames, size, size, 3]``: the shape moving at constant speed from ``start`` to ``stop``."""
    colour = np.asarray(COLOURS[scene.colour], dtype=np.float64)
    horizontal = scene.direction in ("left", "right")
    video = np.empty((frames, size, size, 3), dtype=np.uint8)
    for t in range(frames):
        along = scene.start + (scene.stop - scene.start) * t / max(frames - 1, 1)
        cx, cy = (along, scene.cross) if horizontal else (scene.cross, along)
        alpha = _coverage(scene.shape, size, cx, cy, scene.diameter)
        video[t] = np.rint(alpha[..., None] * colour).astype(np.uint8)
    return video


def _scenes(num_clips: int, size: int, seed: int) -> list[_Scene]:
    """Every colour x shape x direction equally often (in a seeded order, reshuffled each round), with seeded
    size and placement in the direction's lane; the shape travels across the frame, whole at both ends."""
    rng = np.random.default_rng(seed)
    combos = list(itertools.product(COLOURS, SHAPES, DIRECTIONS))
    scenes = []
    margin = 1.0
    while len(scenes) < num_clips:
        for k in rng.permutation(len(combos)):
            if len(scenes) == num_clips:
                break
            colour, shape, direction = combos[k]
            diameter = size * rng.uniform(0.28, 0.36)
            lo, hi = margin + diameter / 2, size - margin - diameter / 2
            third = (hi - lo) / 3
            cross = rng.uniform(lo, lo + third) if _LANE_AT_LOW_EDGE[direction] else rng.uniform(hi - third, hi)
            step = _DIRECTION_VECTORS[direction]
            forwards = step[0] + step[1] > 0  # right or down: from the low edge to the high one
            start, stop = (lo, hi) if forwards else (hi, lo)
            scenes.append(_Scene(colour, shape, direction, round(diameter, 4), round(cross, 4), start, stop))
    return scenes


def _encoder_name(preferred: tuple[str, ...] = ("libx264", "mpeg4")) -> str:
    """h264 where PyAV's ffmpeg has an encoder for it (as OpenVid's clips are), else mpeg4."""
    for name in preferred:
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # noqa: BLE001  (PyAV raises different types for an unknown codec across versions)
            continue
    raise RuntimeError("PyAV's ffmpeg has neither a libx264 nor an mpeg4 encoder")


def _rgb_to_yuv420p(frame: np.ndarray) -> np.ndarray:
    """uint8 ``[H * 3 / 2, W]`` (Y, then U and V planes, as ``VideoFrame.from_ndarray(..., "yuv420p")`` takes
    them) of an RGB uint8 ``[H, W, 3]`` frame: BT.601 limited range, the decoders' default for untagged video,
    chroma averaged over 2 x 2 pixels. Done here so that the encoder's input is fixed by this code, not by the
    swscale build or its choice of SIMD path."""
    rgb = frame.astype(np.float64) / 255
    h, w = frame.shape[:2]
    y = 16 + rgb @ np.array([65.481, 128.553, 24.966])
    pooled = rgb.reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))
    u = 128 + pooled @ np.array([-37.797, -74.203, 112.0])
    v = 128 + pooled @ np.array([112.0, -93.786, -18.214])
    planes = [np.clip(np.rint(p), 0, 255).astype(np.uint8) for p in (y, u, v)]
    return np.concatenate([planes[0], planes[1].reshape(h // 4, w), planes[2].reshape(h // 4, w)])


def _write_mp4(path: Path, video: np.ndarray, fps: int, codec: str) -> None:
    """Encode uint8 ``[T, H, W, 3]`` as a yuv420p mp4 at ``path`` (written to a temporary name, then moved).

    Our own colour conversion, one encoder thread and no timestamps in the container keep the bytes a function
    of the pixels alone."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = video.shape[2], video.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        stream.codec_context.time_base = Fraction(1, fps)
        # Near-lossless: a tiny model should learn the shapes, not the compression artifacts.
        if codec == "libx264":
            # mbtree off: at these tiny frame sizes x264's macroblock-tree rate control was seen to give
            # different bytes from run to run.
            stream.options = {"crf": "8", "preset": "medium", "x264-params": "mbtree=0"}
        else:
            stream.bit_rate = 8_000_000  # far above what a small clip needs: near-lossless
        for t, frame_rgb in enumerate(video):
            frame = av.VideoFrame.from_ndarray(_rgb_to_yuv420p(frame_rgb), format="yuv420p")
            frame.pts = t
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    _atomic_write_bytes(path, buffer.getvalue())


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _temporal_consistency(video: np.ndarray) -> float:
    """Mean cosine similarity of consecutive frames' pixels (OpenVid scores CLIP features; this is the pixel
    analogue, near 1 for smooth motion)."""
    flat = video.reshape(video.shape[0], -1).astype(np.float64)
    if len(flat) < 2:
        return 1.0
    a, b = flat[:-1], flat[1:]
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return float(cos.mean())


# ---------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------

def write_sample_set(root: str | os.PathLike, num_clips: int = 96, frames: int = 32, size: int = 32, fps: int = 8,
                     seed: int = 0, overwrite: bool = False) -> Path:
    """Write ``num_clips`` clips of ``frames`` frames of ``size x size`` pixels at ``fps`` under ``root`` and return
    the path of the CSV (clips in ``root / CLIPS_DIR``).

    Every colour x shape x direction (4 x 3 x 4 = 48) appears equally often; captions name all three. The output
    is a function of the arguments alone: the same bytes on every run with the same PyAV build.

    If ``root`` already holds a sample set made with the same arguments, it is returned as it is; a set made with
    other arguments is only replaced with ``overwrite=True`` (FileExistsError otherwise).
    """
    for name, value, least in (("num_clips", num_clips, 1), ("frames", frames, 2), ("size", size, 16),
                               ("fps", fps, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    if size % 4:
        raise ValueError(f"size must be a multiple of 4 (yuv420p halves the chroma planes, stored two rows to a "
                         f"line), got {size}")
    root = Path(root)
    csv_path, params_path, clips = root / CSV_NAME, root / PARAMS_NAME, root / CLIPS_DIR
    params = dict(version=_VERSION, num_clips=num_clips, frames=frames, size=size, fps=fps, seed=seed)
    codec = _encoder_name()
    if csv_path.exists() and not overwrite:
        try:
            existing = json.loads(params_path.read_text())["params"]
        except (OSError, ValueError, KeyError, TypeError):  # absent or not ours: never reused
            existing = None
        if existing == params and all((clips / f"sample_{i:05d}.mp4").exists() for i in range(num_clips)):
            return csv_path
        raise FileExistsError(f"{csv_path} exists and was made with other parameters ({existing}, asked for "
                              f"{params}); pass overwrite=True (--overwrite) to replace it, or another root")
    clips.mkdir(parents=True, exist_ok=True)

    rows = []
    rng = np.random.default_rng([seed, 1])  # scores: a stream apart from the scenes'
    seconds = frames / fps
    for i, scene in enumerate(_scenes(num_clips, size, seed)):
        video = _render(scene, frames, size)
        name = f"sample_{i:05d}.mp4"
        _write_mp4(clips / name, video, fps, codec)
        speed = abs(scene.stop - scene.start) / (frames - 1)  # pixels per frame: the motion score's analogue
        rows.append([name, caption_for(scene.colour, scene.shape, scene.direction),
                     f"{rng.uniform(4.6, 5.6):.3f}", f"{speed:.3f}", f"{_temporal_consistency(video):.4f}",
                     "static", str(frames), f"{float(fps):.1f}", f"{seconds:.3f}"])

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    writer.writerows(rows)
    # The parameters go last: a set is only reused when they are there, i.e. when everything else was written.
    params_path.unlink(missing_ok=True)
    _atomic_write_bytes(csv_path, text.getvalue().encode())
    # The encoder is recorded, not compared: a set made by another PyAV build shows the same scenes.
    made = dict(params=params, codec=codec, pyav=av.__version__)
    _atomic_write_bytes(params_path, (json.dumps(made, indent=1, sort_keys=True) + "\n").encode())
    return csv_path


# ---------------------------------------------------------------------------------------------------------
# Checking a clip against its caption
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClipDescription:
    """What :func:`describe_clip` sees: None where there is too little foreground (or motion) to tell."""

    colour: str | None
    shape: str | None
    direction: str | None
    displacement: tuple[float, float]  # (dx, dy) of the foreground's centroid over the clip, pixels (dy: down)
    colour_distance: float  # of the mean foreground colour to the chosen one, RGB in [0, 1] (nan: no foreground)
    foreground_fraction: float  # of all pixels of all frames

    def matches(self, caption: str, check_shape: bool = False) -> bool:
        """Whether the clip shows the caption's colour and direction (and shape, if asked)."""
        colour, shape, direction = parse_caption(caption)
        return (self.colour == colour and self.direction == direction
                and (not check_shape or self.shape == shape))


def describe_clip(video, threshold: float = 0.5, min_displacement: float = 1.0) -> ClipDescription:
    """The dominant colour, shape and motion direction of a clip on a dark background.

    video: ``[3, T, H, W]`` (torch tensor or numpy array) in [-1, 1]. Foreground: pixels whose brightest channel
    exceeds ``threshold`` in [0, 1]. Colour: the palette colour nearest the foreground's mean colour. Direction:
    the dominant axis and sign of the least-squares motion of the foreground's centroid, None if it moves less than
    ``min_displacement`` pixels over the clip. Shape: by how much of its bounding box the foreground fills
    (the least sure of the three on blurry clips; :meth:`ClipDescription.matches` leaves it out by default).
    """
    array = video.detach().float().cpu().numpy() if hasattr(video, "detach") else np.asarray(video, np.float32)
    if array.ndim != 4 or array.shape[0] != 3:
        raise ValueError(f"video must be [3, T, H, W] in [-1, 1], got shape {tuple(array.shape)}")
    rgb = np.clip((array.astype(np.float64) + 1) / 2, 0, 1)  # [3, T, H, W] in [0, 1]
    foreground = rgb.max(axis=0) > threshold  # [T, H, W]
    fraction = float(foreground.mean())
    if not foreground.any():
        return ClipDescription(None, None, None, (0.0, 0.0), float("nan"), 0.0)

    mean_colour = rgb[:, foreground].mean(axis=1)
    names = list(COLOURS)
    palette = np.asarray([COLOURS[n] for n in names], dtype=np.float64) / 255
    distances = np.linalg.norm(palette - mean_colour, axis=1)
    colour = names[int(distances.argmin())]

    # Shape: how much of its bounding box the shape's soft area fills (square 1, circle pi/4, triangle 1/2). Extents
    # are sums of per-column / per-row maximum coverage, which blur (chroma subsampling) and sub-pixel placement
    # leave nearly unchanged; decoded 32-pixel clips measure squares 0.99-1.01, circles 0.78-0.82, triangles
    # 0.57-0.71 (blur rounds their tips), hence the cuts at 0.9 and 0.75.
    coverage = np.clip(rgb.max(axis=0) / (max(COLOURS[colour]) / 255), 0, 1)  # [T, H, W]
    coverage = np.where(coverage > 0.1, coverage, 0.0)  # background noise would add to every extent
    times, xs, ys, fills = [], [], [], []
    for t, mask in enumerate(foreground):
        rows, cols = np.nonzero(mask)
        if len(rows) == 0:
            continue
        times.append(t)
        xs.append(cols.mean())
        ys.append(rows.mean())
        fills.append(coverage[t].sum() / (coverage[t].max(0).sum() * coverage[t].max(1).sum()))
    fill = float(np.median(fills))
    shape = "square" if fill >= 0.9 else "circle" if fill >= 0.75 else "triangle"

    span = foreground.shape[0] - 1
    if len(times) >= 2:
        dx, dy = (float(np.polyfit(times, c, 1)[0]) * span for c in (xs, ys))
    else:
        dx = dy = 0.0
    if max(abs(dx), abs(dy)) < min_displacement:
        direction = None
    elif abs(dx) >= abs(dy):
        direction = "right" if dx > 0 else "left"
    else:
        direction = "down" if dy > 0 else "up"
    return ClipDescription(colour, shape, direction, (dx, dy), float(distances.min()), fraction)


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m openvid_models.data.sample_set",
                                     description="Write the deterministic coloured-shapes sample set (OpenVid "
                                                 "format: CSV of nine columns + mp4 clips).")
    parser.add_argument("--out", required=True, help="directory to write the CSV and clips/ into")
    parser.add_argument("--num-clips", type=int, default=96)
    parser.add_argument("--frames", type=int, default=32, help="frames per clip")
    parser.add_argument("--size", type=int, default=32, help="frame height and width in pixels (even)")
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace a set made with other parameters")
    args = parser.parse_args(argv)
    try:
        csv_path = write_sample_set(args.out, num_clips=args.num_clips, frames=args.frames, size=args.size,
                                    fps=args.fps, seed=args.seed, overwrite=args.overwrite)
    except (ValueError, FileExistsError) as error:
        parser.error(str(error))
    print(f"{csv_path} (clips in {csv_path.parent / CLIPS_DIR})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
