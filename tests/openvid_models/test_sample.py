"""The text-to-video CLI end to end on a tiny STDiT, a tiny T5 and a tiny VAE (no hub access): a playable mp4 per
prompt with its settings, deterministic by seed, and clear errors for missing or mismatched files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from openvid_models import MVDiT, STDiT
from openvid_models.sample import SAMPLE_CONFIGS, main, to_uint8_frames, write_video
from tests.openvid_models.utils import save_tiny_t5, tiny_model, tiny_vae

REPO = Path(__file__).resolve().parents[2]

av = pytest.importorskip("av")
pytest.importorskip("transformers")
pytest.importorskip("diffusers")

# The tiny STDiT takes 3 x 6 x 10 latents: 3 frames of 12 x 20 pixels through the tiny VAE (2x downsampling).
TINY = ["--config", "STDiT-16x256x256", "--model", "STDiT-tiny", "--num-frames", "3", "--image-size", "12", "20",
        "--dtype", "fp32", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    for model_class in (STDiT, MVDiT):
        save_file(tiny_model(model_class).state_dict(), root / f"{model_class.__name__.lower()}.safetensors")
    save_tiny_t5(root / "t5")
    tiny_vae().save_pretrained(root / "vae")
    return root


def paths(root, ckpt="stdit.safetensors"):
    return ["--ckpt", str(root / ckpt), "--t5", str(root / "t5"), "--vae", str(root / "vae")]


def decode(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        return frames, stream.average_rate


@pytest.mark.parametrize("sampler,steps", [("iddpm", "10"), ("dpm-solver", "4")])
def test_cli_writes_a_playable_mp4_per_prompt_with_its_settings(files, tmp_path, sampler, steps):
    prompts = ["a dog runs on the beach", "the dog runs"]
    written = main([*TINY, *paths(files), "--prompt", prompts[0], "--prompt", prompts[1], "--sampler", sampler,
                    "--steps", steps, "--batch-size", "2", "--out", str(tmp_path)])
    assert [p.name for p in written] == ["0000_a_dog_runs_on_the_beach.mp4", "0001_the_dog_runs.mp4"]
    for path, prompt in zip(written, prompts):
        frames, fps = decode(path)
        assert len(frames) == 3 and frames[0].shape == (12, 20, 3) and fps == 8
        settings = json.loads(path.with_suffix(".json").read_text())
        assert settings["prompt"] == prompt and settings["sampler"] == sampler
        assert settings["num_sampling_steps"] == int(steps) and settings["model"] == "STDiT-tiny"
    assert not list(tmp_path.glob("*.partial"))


def test_prompt_file_and_seed_make_the_same_video(files, tmp_path):
    (tmp_path / "prompts.txt").write_text("a dog runs\n\n  the beach  \n")
    args = [*TINY, *paths(files), "--prompt-file", str(tmp_path / "prompts.txt"), "--sampler", "dpm-solver",
            "--steps", "3", "--seed", "7"]
    first = main([*args, "--out", str(tmp_path / "a")])
    second = main([*args, "--out", str(tmp_path / "b")])
    assert [p.name for p in first] == ["0000_a_dog_runs.mp4", "0001_the_beach.mp4"]
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes()
    other = main([*args, "--seed", "8", "--out", str(tmp_path / "c")])
    assert other[0].read_bytes() != first[0].read_bytes()


def test_sequence_parallel_sampling_on_two_ranks_makes_the_same_video(files, tmp_path):
    """torchrun with --sp-size 2: each rank runs 2 of the 4 frames per step; rank 0 writes what one process
    writes (decoded frames within one level of rounding)."""
    save_file(tiny_model(STDiT, input_size=(4, 6, 10)).state_dict(), tmp_path / "four_frames.safetensors")
    args = [*TINY, *paths(files, ckpt=str(tmp_path / "four_frames.safetensors")), "--num-frames", "4", "--prompt",
            "a dog runs", "--sampler", "dpm-solver", "--steps", "3"]
    (single,) = main([*args, "--out", str(tmp_path / "one")])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "openvid_models.sample", *args, "--sp-size", "2", "--out", str(tmp_path / "two")]
    result = subprocess.run(command, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    (parallel,) = (tmp_path / "two").glob("*.mp4")
    assert parallel.name == single.name
    for a, b in zip(decode(single)[0], decode(parallel)[0], strict=True):
        assert abs(a.astype(int) - b.astype(int)).max() <= 1
    with pytest.raises(ValueError, match="--sp-size 2 needs 2 processes"):
        main([*args, "--sp-size", "2", "--out", str(tmp_path / "three")])


def test_clear_errors_for_missing_and_mismatched_files(files, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        main([*TINY, *paths(files, "nothing.safetensors"), "--prompt", "a dog"])
    with pytest.raises(FileNotFoundError, match="T5 directory not found"):
        main([*TINY, "--ckpt", str(files / "stdit.safetensors"), "--t5", str(tmp_path / "t5"), "--vae",
              str(files / "vae"), "--prompt", "a dog"])
    with pytest.raises(ValueError, match="does not fit the config's model STDiT-tiny"):
        main([*TINY, *paths(files, "mvdit.safetensors"), "--prompt", "a dog"])
    with pytest.raises(ValueError, match="no prompts"):
        main([*TINY, *paths(files)])
    with pytest.raises(ValueError, match="multiple of the VAE's downsampling 2"):
        main([*TINY, *paths(files), "--image-size", "13", "20", "--prompt", "a dog"])


def test_release_configs_mirror_the_inference_settings():
    assert set(SAMPLE_CONFIGS) == {"STDiT-16x256x256", "STDiT-16x512x512", "STDiT-16x1024x1024", "MVDiT-16x256x256",
                                   "MVDiT-16x512x512"}
    assert SAMPLE_CONFIGS["STDiT-16x256x256"].space_scale == 0.5
    assert SAMPLE_CONFIGS["STDiT-16x512x512"].space_scale == 1.0
    config = SAMPLE_CONFIGS["MVDiT-16x512x512"]
    assert (config.num_frames, config.sampler, config.num_sampling_steps, config.cfg_scale, config.fps) == \
        (16, "iddpm", 100, 7.0, 8)


def test_write_video_round_trips_frames_and_pads_odd_sizes(tmp_path):
    pixels = torch.zeros(1, 3, 4, 15, 16)
    pixels[0, 0, :, :, :8] = 1  # left half (255, 128, 128), the rest mid grey
    frames = to_uint8_frames(pixels)[0]
    assert frames.shape == (4, 15, 16, 3) and frames[0, 0, 0].tolist() == [255, 128, 128]
    decoded, _ = decode(write_video(tmp_path / "clip.mp4", frames))
    assert len(decoded) == 4 and decoded[0].shape == (16, 16, 3)
    assert abs(int(decoded[2][7, 3, 0]) - 255) < 12 and abs(int(decoded[2][7, 12, 0]) - 128) < 12
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "bad.mp4", frames.float())


@pytest.mark.gpu
def test_cuda_graphed_dit_replays_the_models_forward():
    from openvid_models.sample import CUDAGraphed  # noqa: PLC0415

    model = tiny_model(STDiT).cuda()
    graphed = CUDAGraphed(model)
    for batch, step in ((2, 10), (4, 500), (2, 900)):  # a new shape captures again; a known one replays
        torch.manual_seed(batch + step)
        x = torch.randn(batch, 4, 3, 6, 10, device="cuda")
        timestep = torch.full((batch,), step, device="cuda")
        y = torch.randn(batch, 1, 7, 24, device="cuda")
        mask = (torch.arange(7, device="cuda") < 4).expand(batch // 2, 7).long()
        with torch.no_grad():
            torch.testing.assert_close(graphed(x, timestep, y, mask), model(x, timestep, y, mask))
    assert len(graphed.graphs) == 2
