"""Decoding (frame indices and colours of synthetic clips, seeking, bad files) and the clip transforms."""

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from openvid_models.data import video as V
from tests.openvid_models.data.utils import (clip_bytes, encode_clip, frame_index, max_colour_error,
                                             truncate_file, truncate_media_data)

COLOUR_TOLERANCE = 12  # codec error in a solid colour; the index encoding survives anything below 16


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    paths = {}
    specs = {
        "h264": dict(num_frames=60, gop=12),
        "offset": dict(num_frames=60, gop=12, pts_offset=7),  # first pts is not 0
        "gap": dict(num_frames=40, gop=12, dropped=(20,)),  # no frame in time slot 20
        "mpeg4": dict(num_frames=60, gop=12, codec="mpeg4"),  # another codec and time base
        "faststart": dict(num_frames=60, gop=12, faststart=True),
    }
    for name, spec in specs.items():
        paths[name] = root / f"{name}.mp4"
        encode_clip(paths[name], **spec)
    return paths


def assert_frames(frames, expected):
    assert frames.dtype == np.uint8 and frames.shape == (len(expected), 48, 64, 3)
    assert [frame_index(f) for f in frames] == list(expected)
    for frame, index in zip(frames, expected):
        assert max_colour_error(frame, index) <= COLOUR_TOLERANCE, index


@pytest.mark.parametrize("name", ["h264", "offset", "mpeg4"])
def test_read_frames_exact_indices(clips, name):
    # windows starting inside a GOP (keyframes at 0, 12, 24, 36, 48), unsorted, repeated, first and last
    indices = [17, 20, 23, 26, 29, 13, 13, 0, 59, 48, 47]
    assert_frames(V.read_frames(clips[name], indices), indices)


def test_every_frame_in_order(clips):
    assert_frames(V.read_frames(clips["h264"], range(60)), range(60))


def test_seek_starts_at_keyframe_before_window(clips):
    stats = {}
    frames = V.read_frames(clips["h264"], [40, 43, 46], stats=stats)
    assert_frames(frames, [40, 43, 46])
    assert stats["first_decoded"] == 36 and not stats["restarted"]  # the keyframe at or before frame 40
    assert stats["decoded"] == 46 - 36 + 1  # nothing past the last needed frame
    stats = {}
    V.read_frames(clips["h264"], [36], stats=stats)
    assert stats["first_decoded"] == 36 and stats["decoded"] == 1  # window starting on a keyframe


@pytest.mark.parametrize("threads", [1, 2])
def test_sources_bytes_file_object_threads(clips, threads):
    data = clips["h264"].read_bytes()
    indices = [5, 30, 31, 50]
    assert_frames(V.read_frames(data, indices, threads=threads), indices)
    assert_frames(V.read_frames(io.BytesIO(data), indices, threads=threads), indices)


def test_gap_repeats_frame_on_screen(clips):
    frames = V.read_frames(clips["gap"], [19, 20, 21, 38])
    assert [frame_index(f) for f in frames] == [19, 19, 21, 38]


def test_probe_video(clips):
    info = V.probe_video(clips["offset"])
    assert (info.num_frames, info.frame_rate, info.width, info.height) == (60, 30, 64, 48)


def test_bad_files_raise_clip_error_with_reason(tmp_path, clips):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).bytes(4000))
    cut = tmp_path / "cut.mp4"  # index at the end, cut off
    cut.write_bytes(clips["h264"].read_bytes())
    truncate_file(cut, 0.5)
    cases = {"missing": tmp_path / "nope.mp4", "empty": empty, "corrupt": junk}
    for reason, path in cases.items():
        with pytest.raises(V.ClipError) as info:
            V.read_frames(path, [0])
        assert info.value.reason == reason and str(path) in str(info.value)
    with pytest.raises(V.ClipError, match="corrupt"):
        V.read_frames(cut, [0])
    with pytest.raises(V.ClipError, match="empty"):
        V.read_frames(b"", [0])


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.9, 0.97])  # cuts between frames and inside one
def test_truncated_media_data(tmp_path, clips, keep):
    path = tmp_path / "truncated.mp4"
    path.write_bytes(clips["faststart"].read_bytes())
    truncate_media_data(path, keep=keep)
    assert V.probe_video(path).num_frames == 60  # the header still promises every frame
    assert_frames(V.read_frames(path, [0, 2]), [0, 2])  # the start is there
    with pytest.raises(V.ClipError) as info:
        V.read_frames(path, [55])
    assert info.value.reason == "truncated"


def upstream_indices(total, num_frames, frame_interval, begin):
    """Open-Sora 1.0: TemporalRandomCrop(num_frames * frame_interval) then np.linspace(..., dtype=int)."""
    end = min(begin + num_frames * frame_interval, total)
    return np.linspace(begin, end - 1, num_frames, dtype=int)


def test_sample_frame_indices_as_upstream():
    total, num_frames, interval = 100, 16, 3
    begins = set()
    for seed in range(400):
        indices = V.sample_frame_indices(total, num_frames, interval, np.random.default_rng(seed))
        begin = int(indices[0])
        begins.add(begin)
        np.testing.assert_array_equal(indices, upstream_indices(total, num_frames, interval, begin))
        assert indices[-1] == begin + num_frames * interval - 1
    assert begins == set(range(0, total - 48))  # upstream's range: [0, total - window - 1]
    steps = np.diff(V.sample_frame_indices(48, 16, 3, np.random.default_rng(0)))
    assert set(steps.tolist()) == {3, 4} and steps.sum() == 47
    np.testing.assert_array_equal(V.sample_frame_indices(48, 16, 3), upstream_indices(48, 16, 3, 0))
    np.testing.assert_array_equal(V.sample_frame_indices(10, 1, 1, np.random.default_rng(1)).shape, (1,))


def test_sample_frame_indices_too_short():
    with pytest.raises(V.ClipError) as info:
        V.sample_frame_indices(47, 16, 3)
    assert info.value.reason == "too_short" and "47 frames" in str(info.value)
    with pytest.raises(ValueError, match="num_frames"):
        V.sample_frame_indices(47, 0, 3)


def test_read_clip_too_short(clips):
    with pytest.raises(V.ClipError) as info:
        V.read_clip(clips["h264"], 16, 4)  # 64 frames needed, 60 there
    assert info.value.reason == "too_short" and str(clips["h264"]) in str(info.value)


def test_read_clip_window(clips):
    frames, indices = V.read_clip(clips["h264"], 8, 3, np.random.default_rng(3))
    assert indices.tolist() == upstream_indices(60, 8, 3, int(indices[0])).tolist()
    assert_frames(frames, indices.tolist())


def test_resize_center_crop_shapes_and_offsets():
    # short side already the size: no resize, a pure center crop at upstream's offsets
    video = torch.arange(2 * 3 * 4 * 9, dtype=torch.float32).reshape(2, 3, 4, 9)
    out = V.resize_center_crop(video, 4)
    torch.testing.assert_close(out, video[..., :, 2:6])  # round((9 - 4) / 2) = 2 (round half to even)
    portrait = torch.rand(1, 3, 10, 4)
    torch.testing.assert_close(V.resize_center_crop(portrait, 4), portrait[..., 3:7, :])
    for height, width, size in [(1080, 1920, 512), (48, 64, 32), (64, 48, 32), (30, 30, 64)]:
        assert V.resize_center_crop(torch.zeros(1, 3, height, width, dtype=torch.uint8), size).shape == \
            (1, 3, size, size)
    with pytest.raises(ValueError, match="image_size"):
        V.resize_center_crop(video, (4, 5))


def test_resize_matches_float_interpolate():
    torch.manual_seed(0)
    video = torch.randint(0, 256, (3, 3, 90, 160), dtype=torch.uint8)
    reference = F.interpolate(video.float(), size=(32, 57), mode="bilinear", align_corners=False, antialias=True)
    reference = reference[..., :, 12:44]  # round(90 * 32 / 90) x round(160 * 32 / 90) = 32 x 57, crop at 12
    out_u8 = V.resize_center_crop(video, 32)
    assert out_u8.dtype == torch.uint8
    assert (out_u8.float() - reference).abs().max() <= 1.0  # rounding of the uint8 kernel
    torch.testing.assert_close(V.resize_center_crop(video.float(), 32), reference)
    aliased = V.resize_center_crop(video.float(), 32, antialias=False)
    assert not torch.allclose(aliased, reference)


def test_normalize_and_flip():
    frames = np.zeros((2, 4, 6, 3), np.uint8)
    frames[..., 0] = 255
    frames[:, :, :3, 1] = 128  # left half of green set: a flip moves it right
    out = V.frames_to_model_input(frames, 4, flip=False)
    assert out.dtype == torch.float32 and out.shape == (3, 2, 4, 4)
    assert torch.all(out[0] == 1.0) and torch.all(out[2] == -1.0)
    green = out[1, 0, 0]  # crop of columns 1..4: two columns at 128, two at 0
    torch.testing.assert_close(green, torch.tensor([128 / 127.5 - 1] * 2 + [-1.0] * 2))
    flipped = V.frames_to_model_input(frames, 4, flip=True)
    torch.testing.assert_close(flipped, out.flip(-1))
    torch.testing.assert_close(V.normalize_to_unit_range(torch.tensor([0, 255], dtype=torch.uint8)),
                               torch.tensor([-1.0, 1.0]))
    with pytest.raises(ValueError, match="uint8"):
        V.frames_to_model_input(frames.astype(np.float32), 4, flip=False)


def test_load_training_clip(clips):
    for seed in range(4):
        video, indices = V.load_training_clip(clips["h264"], 8, 3, 32, rng=np.random.default_rng(seed),
                                              flip_prob=0.5)
        assert video.shape == (3, 8, 32, 32) and video.dtype == torch.float32
        assert video.min() >= -1 and video.max() <= 1
        frames = ((video.permute(1, 2, 3, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
        decoded = [frame_index(f) for f in frames]
        assert decoded == indices.tolist()
    rgb = clip_bytes(num_frames=30, width=96, height=48)
    video, _ = V.load_training_clip(rgb, 4, 2, 16, rng=np.random.default_rng(0))
    assert video.shape == (3, 4, 16, 16)
    with pytest.raises(ValueError, match="flip_prob"):
        V.load_training_clip(clips["h264"], 8, 3, 32, flip_prob=2)
