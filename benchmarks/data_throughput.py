"""Data-loading throughput of one worker: OpenVidDataset items (16 frames at interval 3, 512 px) from 1080p H.264.

A plain script, not a pytest suite:

    python benchmarks/data_throughput.py [--clips 20] [--image-size 512] [--decode-threads 1]

Writes a synthetic 1920x1080 clip (10 s at 30 fps, H.264 with a keyframe every 30 frames, B-frames, moving
patterns plus noise so that the bitrate is that of real footage) to a temporary folder, then times
``dataset[i]`` in this process (what one DataLoader worker does: torch at 1 thread, FFmpeg at
``--decode-threads``), each item a fresh random window and flip. Prints clips/s and where the time goes.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import av
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from openvid_models.data import OPENVID_COLUMNS, OpenVidDataset, frames_to_model_input, read_clip  # noqa: E402


def write_clip(path: str, width: int, height: int, fps: int, seconds: float, gop: int, preset: str) -> None:
    container = av.open(path, mode="w")
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.options = {"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0", "preset": preset, "crf": "23"}
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    noise = np.random.default_rng(0).integers(0, 24, (height, width, 3), dtype=np.uint8)
    for i in range(round(fps * seconds)):
        red = 128 + 100 * np.sin((cols + 8 * i) / 97)
        green = 128 + 100 * np.cos((rows - 5 * i) / 61)
        blue = (cols + rows + 3 * i) % 256
        image = np.stack([red, green, blue], -1).astype(np.uint8) + np.roll(noise, 7 * i, axis=1)
        for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=20, help="timed items (after one warm-up item)")
    parser.add_argument("--num-frames", type=int, default=16)
    parser.add_argument("--frame-interval", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--decode-threads", type=int, default=1, help="FFmpeg threads per clip")
    parser.add_argument("--torch-threads", type=int, default=1, help="1 as in a DataLoader worker")
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--gop", type=int, default=30)
    parser.add_argument("--preset", default="veryfast", help="x264 preset of the synthetic clip")
    parser.add_argument("--video", help="time this clip instead of writing a synthetic one")
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)

    with tempfile.TemporaryDirectory() as workdir:
        if args.video:
            video_root, name = os.path.split(os.path.abspath(args.video))
        else:
            video_root, name = workdir, "synthetic_1080p.mp4"
            start = time.perf_counter()
            write_clip(os.path.join(workdir, name), args.width, args.height, args.fps, args.seconds, args.gop,
                       args.preset)
            print(f"wrote {name}: {os.path.getsize(os.path.join(workdir, name)) / 1e6:.1f} MB in "
                  f"{time.perf_counter() - start:.0f} s")
        with av.open(os.path.join(video_root, name)) as container:
            stream = container.streams.video[0]
            frames, width, height, rate = stream.frames, stream.width, stream.height, stream.average_rate
            bitrate = container.bit_rate / 1e6 if container.bit_rate else float("nan")
        csv_path = os.path.join(workdir, "clips.csv")
        with open(csv_path, "w") as f:
            f.write(",".join(OPENVID_COLUMNS) + "\n")
            seconds = float(frames / rate)
            f.write(f'{name},"a synthetic clip",5.0,3.0,0.99,static,{frames},{float(rate)},{seconds:.2f}\n')
        dataset = OpenVidDataset(csv_path, video_root, args.num_frames, args.frame_interval, args.image_size,
                                 decode_threads=args.decode_threads)

        dataset[0]  # warm-up: imports, FFmpeg and interpolate kernels
        start = time.perf_counter()
        for _ in range(args.clips):
            item = dataset[0]
        total = time.perf_counter() - start
        assert item["video"].shape == (3, args.num_frames, args.image_size, args.image_size)
        assert item["skipped"].sum() == 0

        # where the time goes: decoding (seek + decode + RGB) vs. resize/crop/flip/normalise
        rng = np.random.default_rng(0)
        decode_s = transform_s = decoded = 0
        for _ in range(args.clips):
            stats = {}
            t0 = time.perf_counter()
            frames_rgb, _ = read_clip(os.path.join(video_root, name), args.num_frames, args.frame_interval, rng,
                                      threads=args.decode_threads, stats=stats)
            t1 = time.perf_counter()
            frames_to_model_input(frames_rgb, args.image_size, flip=True)
            t2 = time.perf_counter()
            decode_s, transform_s, decoded = decode_s + t1 - t0, transform_s + t2 - t1, decoded + stats["decoded"]

    print(f"source: {width}x{height}, {frames} frames at {float(rate):.2f} fps, {bitrate:.1f} Mb/s, "
          f"keyframe every {args.gop} frames" + ("" if args.video else f", x264 preset {args.preset}"))
    print(f"item: {args.num_frames} frames at interval {args.frame_interval} -> [3, {args.num_frames}, "
          f"{args.image_size}, {args.image_size}] float32")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch "
          f"{torch.__version__} at {torch.get_num_threads()} thread(s), PyAV {av.__version__} "
          f"(libavcodec {'.'.join(map(str, av.library_versions['libavcodec']))}), decode threads {args.decode_threads}")
    print(f"throughput: {args.clips / total:.2f} clips/s per worker ({1000 * total / args.clips:.0f} ms per clip, "
          f"{args.clips} clips)")
    print(f"  decode {1000 * decode_s / args.clips:.0f} ms per clip ({decoded / args.clips:.0f} frames decoded "
          f"for {args.num_frames}), resize+crop+flip+normalise {1000 * transform_s / args.clips:.0f} ms")


if __name__ == "__main__":
    main()
