"""The trainer (train/run.py): loss goes down on the sample set, 2 gloo ranks match 1 rank, a SIGKILLed run
resumes to the uninterrupted run's losses, a checkpoint write that dies never replaces the last good one, and
the EMA export loads strictly. Everything runs on the CPU at toy sizes (a few seconds per run)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("av")
pytest.importorskip("transformers")

import openvid_models as om  # noqa: E402
from openvid_models.data import write_sample_set  # noqa: E402
from train.checkpointing import latest_checkpoint  # noqa: E402
from train.config import TRAIN_CONFIGS, apply_overrides  # noqa: E402
from train.trainer import read_losses, train  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RUN = str(REPO / "train" / "run.py")
# A toy version of the embedded default: 4 frames of 16 x 16 pixels, one block of width 32.
TOY = ["hidden_size=32", "depth=1", "num_heads=2", "num_frames=4", "frame_interval=4", "image_size=16",
       "lr=1e-3", "sample_at_end=false", "sample_set_clips=48", "tiny_t5_channels=16", "seed=3"]


@pytest.fixture(scope="module")
def sample_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sample_set")
    write_sample_set(root, num_clips=48)
    return root


def toy_args(sample_set: Path, outdir: Path, *extra: str) -> list[str]:
    sets = TOY + [f"sample_set_dir={sample_set}", f"outdir={outdir}", *extra]
    return [arg for item in sets for arg in ("--set", item)]


def toy_config(sample_set: Path, outdir: Path, *extra: str):
    return apply_overrides(TRAIN_CONFIGS["tiny"], TOY + [f"sample_set_dir={sample_set}", f"outdir={outdir}",
                                                         *extra])


def run_cli(args: list[str], nproc: int = 1, timeout: float = 240) -> subprocess.CompletedProcess:
    if nproc == 1:
        command = [sys.executable, RUN, *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", RUN,
                   *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command + ["--device", "cpu", "--no-progress"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def assert_same_losses(got: dict, expected: dict, rtol=1e-4, atol=1e-5):
    assert sorted(got) == sorted(expected), f"steps differ: {sorted(got)} vs {sorted(expected)}"
    steps = sorted(expected)
    torch.testing.assert_close(torch.tensor([got[s] for s in steps], dtype=torch.float64),
                               torch.tensor([expected[s] for s in steps], dtype=torch.float64), rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def reference_run(sample_set, tmp_path_factory):
    """One rank, batch 4, 16 steps, checkpoints every 4: the run the others are compared with."""
    outdir = tmp_path_factory.mktemp("reference")
    run_cli(toy_args(sample_set, outdir, "batch_size=4", "max_steps=16", "ckpt_every=4"))
    return outdir


# ---------------------------------------------------------------------------------------------------------

def test_loss_goes_down_and_ema_export_loads_strictly(sample_set, tmp_path):
    config = toy_config(sample_set, tmp_path, "batch_size=8", "max_steps=40", "ckpt_every=40", "ema_decay=0.9")
    result = train(config, device="cpu", progress=False)
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert len(losses) == 40 and all(map(torch.isfinite, torch.tensor(losses)))
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.7 * first, f"loss did not go down: first 8 steps {first:.4f}, last 8 {last:.4f}"
    assert read_losses(tmp_path) == result.losses  # the log holds the same numbers
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The EMA export: every name of the model, loaded strictly into a fresh STDiT built from its metadata.
    from safetensors import safe_open

    with safe_open(str(result.ema_path), "pt") as f:
        kwargs = json.loads(f.metadata()["model_kwargs"])
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    torch.manual_seed(config.seed)
    initial = om.STDiT(**kwargs).state_dict()
    model = om.STDiT.from_pretrained(result.ema_path, **kwargs).eval()  # strict: raises on any mismatch
    exported = model.state_dict()
    assert set(exported) == set(initial)
    moved = [n for n in initial if not torch.equal(initial[n], exported[n])]
    assert "final_layer.linear.weight" in moved and len(moved) > len(initial) // 2, "the EMA did not follow training"
    torch.testing.assert_close(exported["pos_embed"], initial["pos_embed"])  # buffers are the model's
    y = torch.randn(2, 1, kwargs["model_max_length"], kwargs["caption_channels"])
    with torch.no_grad():
        out = model(torch.randn(2, 3, *kwargs["input_size"]), torch.tensor([1, 500]), y)
    assert out.shape == (2, 6, *kwargs["input_size"]) and torch.isfinite(out).all()


def test_two_gloo_ranks_match_one_rank(sample_set, reference_run, tmp_path):
    """2 ranks x batch 2 under torchrun (gloo, CPU mesh, FSDP2) see the samples and draws of 1 rank x batch 4:
    the per-step losses agree to float tolerance (reduction order differs)."""
    run_cli(toy_args(sample_set, tmp_path, "batch_size=2", "max_steps=16", "ckpt_every=8"), nproc=2)
    expected = read_losses(reference_run)
    assert len(expected) == 16
    assert_same_losses(read_losses(tmp_path), expected)
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-0000016"
    assert sorted(p.name for p in latest_checkpoint(tmp_path / "checkpoints").glob("rank-*.pt")) == [
        "rank-00000.pt", "rank-00001.pt"]


@pytest.mark.parametrize("nproc, sp_size, batch_size", [(2, 2, 4), (4, 2, 2)])
def test_sequence_parallel_ranks_match_one_rank(sample_set, reference_run, tmp_path, nproc, sp_size, batch_size):
    """Every sample's 4 frames split over 2 ranks (--sp-size 2), alone or with 2 data-parallel groups of 2: the
    losses of 1 rank x batch 4."""
    run_cli(toy_args(sample_set, tmp_path, f"batch_size={batch_size}", "max_steps=16", "ckpt_every=16") +
            ["--sp-size", str(sp_size)], nproc=nproc, timeout=400)
    assert_same_losses(read_losses(tmp_path), read_losses(reference_run))


def test_checkpointed_blocks_match_the_plain_run(sample_set, tmp_path):
    """Activation checkpointing (all blocks, or the first N) changes no loss: the plain run's losses."""
    for blocks in ("none", "1"):
        outdir = tmp_path / blocks
        run_cli(toy_args(sample_set, outdir, "batch_size=4", "max_steps=16", "ckpt_every=16", "depth=2",
                         "grad_checkpointing=true", f"checkpointed_blocks={blocks}"))
        losses = read_losses(outdir)
        if blocks == "none":
            expected = losses  # depth 2, every block recomputed
        else:
            assert_same_losses(losses, expected, rtol=1e-6, atol=1e-7)
    plain = tmp_path / "plain"
    run_cli(toy_args(sample_set, plain, "batch_size=4", "max_steps=16", "ckpt_every=16", "depth=2"))
    assert_same_losses(read_losses(plain), expected, rtol=1e-6, atol=1e-7)


def test_sp_size_must_divide_the_ranks_frames_and_heads(sample_set, tmp_path):
    with pytest.raises(ValueError, match=r"sp_size=2 must divide the number of ranks \(1\)"):
        train(toy_config(sample_set, tmp_path, "sp_size=2", "max_steps=1"), device="cpu", progress=False)
    with pytest.raises(ValueError, match="sp_size must be >= 1"):
        toy_config(sample_set, tmp_path, "sp_size=0")


def test_sigkill_then_resume_reproduces_losses(sample_set, reference_run, tmp_path):
    """Kill -9 the run once a checkpoint is published, resume it, and get the uninterrupted run's losses."""
    args = toy_args(sample_set, tmp_path, "batch_size=4", "max_steps=16", "ckpt_every=4")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, RUN, *args, "--device", "cpu", "--no-progress"], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pointer = tmp_path / "checkpoints" / "latest"
    deadline = time.monotonic() + 180
    while not pointer.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL, f"the run ended before it was killed:\n{stderr[-3000:]}"
    killed_at = int(latest_checkpoint(tmp_path / "checkpoints").name.split("-")[1])
    assert killed_at < 16

    run_cli(["--resume", str(tmp_path), "--max-steps", "16"])
    assert_same_losses(read_losses(tmp_path), read_losses(reference_run), rtol=1e-6, atol=1e-7)


def test_checkpoint_write_that_dies_never_replaces_the_last_good_one(sample_set, tmp_path):
    config = toy_config(sample_set, tmp_path, "batch_size=4", "max_steps=8", "ckpt_every=4")

    class WriterDied(Exception):
        pass

    def die_before_publishing(tmp):  # everything of step 8 is written, the rename has not happened
        if tmp.name.startswith("step-0000008"):
            raise WriterDied

    with pytest.raises(WriterDied):
        train(config, device="cpu", progress=False, _before_publish=die_before_publishing)
    checkpoints = tmp_path / "checkpoints"
    assert latest_checkpoint(checkpoints).name == "step-0000004"
    assert (checkpoints / "step-0000008.tmp" / ".metadata").is_file()  # complete on disk, yet never published
    assert not (checkpoints / "step-0000008").exists()

    # Resuming ignores the orphan, continues from step 4, and the next save cleans the orphan up.
    result = train(config, resume=tmp_path, device="cpu", progress=False)
    assert sorted(result.losses) == [5, 6, 7, 8]
    assert latest_checkpoint(checkpoints).name == "step-0000008"
    assert not list(checkpoints.glob("*.tmp"))


def test_overrides_are_typed_and_checked():
    config = apply_overrides(TRAIN_CONFIGS["STDiT-16x512x512"], ["batch_size=3", "patch_size=1,2,2",
                                                                 "init_from=none", "csv_path=a.csv",
                                                                 "video_root=v", "tensorboard=true"])
    assert (config.batch_size, config.patch_size, config.init_from, config.tensorboard) == (3, (1, 2, 2), None, True)
    assert (config.lr, config.grad_clip, config.frame_interval, config.dtype) == (2e-5, 1.0, 3, "bf16")
    with pytest.raises(ValueError, match="no field 'batchsize'"):
        apply_overrides(TRAIN_CONFIGS["tiny"], ["batchsize=3"])
    with pytest.raises(ValueError, match="batch_size=three"):
        apply_overrides(TRAIN_CONFIGS["tiny"], ["batch_size=three"])
    with pytest.raises(ValueError, match="csv_path and video_root"):
        apply_overrides(TRAIN_CONFIGS["STDiT-16x256x256"], [])


@pytest.mark.parametrize("name", [n for n in TRAIN_CONFIGS if n != "tiny"])
def test_release_configs_build_the_released_model(name):
    """Each release stage: 16 frames at interval 3, bf16, lr 2e-5, clip 1.0, EMA 0.9999, and (on the meta device)
    the XL/2 model at the stage's latent size, its parameter names those of the released checkpoints."""
    from train.trainer import model_class, model_kwargs

    config = apply_overrides(TRAIN_CONFIGS[name], ["csv_path=a.csv", "video_root=v"])
    assert (config.num_frames, config.frame_interval, config.dtype, config.lr, config.grad_clip,
            config.ema_decay, config.grad_checkpointing) == (16, 3, "bf16", 2e-5, 1.0, 0.9999, True)
    kwargs = model_kwargs(config, caption_channels=4096, latent_channels=4, downsample=8)
    side = config.image_size // 8
    assert kwargs["input_size"] == (16, side, side) and kwargs["space_scale"] == config.image_size / 512
    with torch.device("meta"):
        model = model_class(config.model)(**kwargs)
    released = om.MODEL_SIZES[config.model]
    assert len(model.blocks) == released["depth"] == 28
    assert model.x_embedder.proj.weight.shape[0] == released["hidden_size"] == 1152


def test_quick_embedded_default_writes_clip_plot_and_weights(tmp_path):
    """`python train/run.py --quick`: CI's shortened embedded default, end to end through the sampled clip."""
    run_cli(["--quick", "--outdir", str(tmp_path)])
    assert len(read_losses(tmp_path)) == 30
    for name in ("sample.mp4", "sample.json", "loss.png", "ema.safetensors", "checkpoints/latest"):
        assert (tmp_path / name).exists(), name
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sample = json.loads((tmp_path / "sample.json").read_text())
    assert sample["caption"] and set(sample["description"]) >= {"colour", "direction"}


def test_multi_gpu_scaling_script_runs_its_plumbing_on_gloo_ranks(tmp_path):
    """benchmarks/multi_gpu_scaling.py (issue #12) on CPU ranks with a toy model: both parts run and report."""
    toy = ["hidden_size=32", "depth=1", "num_heads=2", "num_frames=4", "image_size=32", "dtype=fp32", "num_workers=0"]
    command = [sys.executable, str(REPO / "benchmarks" / "multi_gpu_scaling.py"), "--device", "cpu", "--gpus", "1",
               "2", "--sp", "2", "--steps", "3", "--sp-steps", "2", "--warmup", "1", "--latent-shape", "4", "4", "4",
               "4", "--sp-latent-shape", "4", "4", "4", "4", "--out", str(tmp_path)]
    for item in toy:
        command += ["--set", item]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "scaling.json").read_text())
    assert set(report["fsdp"]) == {"1", "2"} and set(report["sp"]) == {"2"}
    for row in [*report["fsdp"].values(), *report["sp"].values()]:
        assert row["step_s"] > 0 and row["tokens_per_s"] > 0 and row["losses"]["1"] > 0
    assert report["fsdp"]["1"]["efficiency"] == 1.0
    assert "| 2 |" in (tmp_path / "scaling.md").read_text()


def test_train_throughput_script_runs_its_plumbing_on_the_cpu(tmp_path):
    """benchmarks/train_throughput.py (issue #9) with a toy model: two cases run and report tokens/s and MFU."""
    command = [sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), "--device", "cpu", "--cases",
               "stdit256-b8-ckpt", "stdit256-b8", "--steps", "2", "--out", str(tmp_path)]
    for item in ["hidden_size=32", "depth=1", "num_heads=2", "dtype=fp32", "num_workers=0"]:
        command += ["--set", item]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "train_throughput.json").read_text())
    assert set(report["cases"]) == {"stdit256-b8-ckpt", "stdit256-b8"}
    for row in report["cases"].values():
        assert row["step_s"] > 0 and row["tokens_per_s"] > 0 and row["mfu"] > 0, row
    assert "| stdit256-b8 |" in (tmp_path / "train_throughput.md").read_text()


def test_v_weight_cap_weights_the_noise_mse_by_capped_inverse_alpha_bar():
    from openvid_models import IDDPM
    from train.trainer import weighted_loss

    diffusion = IDDPM(timestep_respacing="")
    t = torch.tensor([0, 300, 999])
    terms = {"mse": torch.tensor([1.0, 2.0, 3.0]), "vb": torch.tensor([0.5, 0.25, 0.125])}
    terms["loss"] = terms["mse"] + terms["vb"]
    assert weighted_loss(terms, t, diffusion, None) is terms["loss"]
    alpha_bar = torch.tensor(diffusion.alphas_cumprod)[t]
    assert alpha_bar[0] > 0.99 and 1 / alpha_bar[1] < 20 < 1 / alpha_bar[2]  # the cap binds only at t = 999
    expected = terms["mse"] * torch.stack([1 / alpha_bar[0], 1 / alpha_bar[1], torch.tensor(20.0)]).float() + terms["vb"]
    torch.testing.assert_close(weighted_loss(terms, t, diffusion, 20.0), expected)
    with pytest.raises(ValueError, match="v_weight_cap must be None or >= 1"):
        apply_overrides(TRAIN_CONFIGS["tiny"], ["v_weight_cap=0.5"])


def test_prediction_is_checked_and_reaches_the_diffusion_and_the_export(tmp_path):
    with pytest.raises(ValueError, match="prediction must be one of"):
        apply_overrides(TRAIN_CONFIGS["tiny"], ["prediction=x0"])
    with pytest.raises(ValueError, match="v_weight_cap reweights the noise MSE"):
        apply_overrides(TRAIN_CONFIGS["tiny"], ["prediction=v", "v_weight_cap=20"])
    from safetensors import safe_open

    from train.trainer import EMA, export_ema

    model = torch.nn.Linear(2, 2)
    export_ema(model, EMA(model), tmp_path / "ema.safetensors", {"depth": 1}, 0, "v")
    with safe_open(str(tmp_path / "ema.safetensors"), "pt") as f:
        assert f.metadata() == {"model_kwargs": '{"depth": 1}', "prediction": "v"}
