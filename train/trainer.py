"""The training loop: FSDP2 over STDiT / MVDiT, AdamW, gradient clipping, EMA in float32, DCP checkpoints.

One process per rank (``torchrun``), or a single process (a one-rank group is made for it, so that every run
takes the same FSDP2 path). NCCL on GPUs, gloo with an explicit CPU mesh on CPU ranks.

Determinism across world sizes and resumption: the diffusion timestep, noise and caption drop of each sample
are drawn from a generator seeded by (seed, step, the sample's position in the global batch), not from the
global RNG. Rank r's j-th sample is position ``j * world_size + r``, which is where ``DistributedSampler``
puts it, so a run on W ranks with batch b draws what one rank with batch W*b draws, and a resumed run draws
what the uninterrupted one drew.

Sequence parallelism (``sp_size`` P > 1): ranks ``g*P .. g*P + P - 1`` form group g, which reads one
data-parallel rank's samples (rank g of W / P) and splits their frames (``STDiT.set_sequence_parallel``):
each rank takes the loss on its frames, and FSDP's average over all W ranks then gives the gradient of the
whole samples' loss, so the losses and updates are those of W / P ranks without sequence parallelism.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import random
import resource
import socket
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from openvid_kernels.sequence_parallel import shard_frames
from train.checkpointing import StopRequest, latest_checkpoint, load_checkpoint, save_checkpoint
from train.config import TrainConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VAE_DOWNSAMPLE = 8  # SD VAE: latents are 8x smaller than pixels
LOSSES_FILE = "losses.jsonl"
GC_EVERY_STEPS = 50
CONFIG_FILE = "config.json"
EMA_FILE = "ema.safetensors"

# STDiT blocks return views (the residual kernels' outputs); nothing writes into them in place, which is the
# case this FSDP2 warning is about.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


# ---------------------------------------------------------------------------------------------------------
# Distributed set-up
# ---------------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def distributed(device_request: str = "auto"):
    """Yields (rank, world_size, device, mesh). Under torchrun the group comes from the environment; a plain
    process gets a one-rank group. The group is destroyed on exit if this made it."""
    from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415

    if device_request not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device_request!r}")
    use_cuda = torch.cuda.is_available() if device_request == "auto" else device_request == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but no CUDA GPU is available")
    created = not dist.is_initialized()
    if created:
        backend = "nccl" if use_cuda else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    mesh = init_device_mesh(device.type, (world,))
    try:
        yield rank, world, device, mesh
    finally:
        if created:
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------
# Text encoder, autoencoder, data
# ---------------------------------------------------------------------------------------------------------

class IdentityAutoencoder(nn.Module):
    """Pixel space: ``encode``/``decode`` return the video ``[B, 3, T, H, W]`` in [-1, 1] unchanged, so that the
    tiny model's samples can be judged by eye and by :func:`describe_clip`."""

    downsample = 1
    channels = 3

    def encode(self, video):
        return video

    def decode(self, latents):
        return latents


def build_tiny_t5(directory: Path, captions: list[str], d_model: int, seed: int) -> None:
    """Save a random one-layer T5 encoder of width ``d_model`` and a word-level tokenizer trained on ``captions``
    as a transformers directory (random and frozen: the captions only need distinct, fixed features)."""
    import tokenizers  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    specials = ["<pad>", "</s>", "<unk>"]
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="<unk>"))
    backend.normalizer = tokenizers.normalizers.Lowercase()
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.train_from_iterator(captions, tokenizers.trainers.WordLevelTrainer(special_tokens=specials))
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", backend.token_to_id("</s>"))])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                                     unk_token="<unk>")
    torch.manual_seed(seed)
    config = transformers.T5Config(vocab_size=backend.get_vocab_size(), d_model=d_model, d_kv=d_model // 4,
                                   d_ff=2 * d_model, num_layers=1, num_heads=4, pad_token_id=0, eos_token_id=1)
    transformers.T5EncoderModel(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def build_text_encoder(config: TrainConfig, captions: list[str], rank: int, device):
    from openvid_models.text_encoder import T5TextEncoder  # noqa: PLC0415

    if config.text_encoder == "tiny":
        directory = Path(config.outdir) / "text_encoder"
        if rank == 0 and not (directory / "config.json").is_file():
            build_tiny_t5(directory, captions, config.tiny_t5_channels, config.seed)
        dist.barrier()
        encoder = T5TextEncoder.from_pretrained(directory, device=device, dtype=torch.float32,
                                                model_max_length=config.model_max_length, clean=False)
    else:
        if not Path(config.text_encoder).is_dir():
            raise FileNotFoundError(f"text_encoder: expected a local T5 directory or 'tiny', got "
                                    f"{config.text_encoder!r}")
        encoder = T5TextEncoder.from_pretrained(config.text_encoder, device=device, dtype=DTYPES[config.dtype],
                                                model_max_length=config.model_max_length)
    return encoder


def build_vae(config: TrainConfig, device):
    if config.vae == "identity":
        return IdentityAutoencoder()
    from openvid_models.vae import VideoAutoencoder  # noqa: PLC0415

    if not Path(config.vae).is_dir():
        raise FileNotFoundError(f"vae: expected a local diffusers AutoencoderKL directory or 'identity', got "
                                f"{config.vae!r}")
    vae = VideoAutoencoder.from_pretrained(config.vae, micro_batch_size=config.vae_micro_batch_size)
    vae = vae.to(device, DTYPES[config.dtype]).eval().requires_grad_(False)
    vae.downsample, vae.channels = VAE_DOWNSAMPLE, 4
    return vae


def build_dataset(config: TrainConfig, rank: int):
    """The map-style dataset and its captions (for the tiny tokenizer and the sample at the end)."""
    from openvid_models.data import LatentCacheDataset, OpenVidDataset, write_sample_set  # noqa: PLC0415

    if config.data == "latent-cache":
        dataset = LatentCacheDataset(config.latent_cache)
        return dataset, [dataset[i]["text"] for i in range(min(len(dataset), 64))]
    if config.data == "sample-set":
        root = Path(config.sample_set_dir or Path(config.outdir) / "data")
        if rank == 0:
            write_sample_set(root, num_clips=config.sample_set_clips)
        dist.barrier()
        csv_path, video_root = root / "sample_set.csv", root / "clips"
        flip_prob = 0.0  # a flip would turn "moving to the left" into moving to the right
    else:
        csv_path, video_root, flip_prob = config.csv_path, config.video_root, 0.5
    dataset = OpenVidDataset(csv_path, video_root, config.num_frames, config.frame_interval, config.image_size,
                             flip_prob=flip_prob, seed=config.seed)
    return dataset, list(dataset.captions)


# ---------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------

def model_kwargs(config: TrainConfig, caption_channels: int, latent_channels: int, downsample: int) -> dict:
    """The STDiT/MVDiT constructor arguments of this config (saved beside the EMA export)."""
    from openvid_models import MODEL_SIZES  # noqa: PLC0415

    if config.model not in MODEL_SIZES:
        raise ValueError(f"model must be one of {list(MODEL_SIZES)}, got {config.model!r}")
    if config.image_size % downsample:
        raise ValueError(f"image_size {config.image_size} must be a multiple of the VAE's {downsample}")
    kwargs = dict(MODEL_SIZES[config.model])
    for name in ("hidden_size", "depth", "num_heads", "patch_size"):
        if getattr(config, name) is not None:
            kwargs[name] = getattr(config, name)
    side = config.image_size // downsample
    kwargs.update(input_size=(config.num_frames, side, side), in_channels=latent_channels,
                  caption_channels=caption_channels, model_max_length=config.model_max_length,
                  class_dropout_prob=config.class_dropout_prob, space_scale=config.space_scale,
                  time_scale=config.time_scale)
    kwargs["patch_size"] = tuple(kwargs["patch_size"])
    kwargs["input_size"] = tuple(kwargs["input_size"])
    return kwargs


def model_class(name: str):
    from openvid_models import MVDiT, STDiT  # noqa: PLC0415

    return MVDiT if name.startswith("MVDiT") else STDiT


def initialise_from(model: nn.Module, path: str) -> None:
    """Weights of ``path``: a video checkpoint of this model family (the previous stage: position embeddings
    are recomputed for this size), or a PixArt-alpha image checkpoint (temporal attention starts as identity)."""
    from openvid_models import load_state_dict  # noqa: PLC0415

    state = load_state_dict(path)
    is_image_model = not any(".attn_temp." in name for name in state)
    if is_image_model:
        model.init_from_image_model(state)
        return
    state = {k: v for k, v in state.items() if k not in ("pos_embed", "pos_embed_temporal")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in ("pos_embed", "pos_embed_temporal")]
    if missing or unexpected:
        raise ValueError(f"init_from={path}: not a checkpoint of this model (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")


def data_and_sequence_groups(sp_size: int, rank: int, world: int, device_type: str):
    """(data-parallel rank, data-parallel size, this rank's sequence-parallel group or None): consecutive ranks
    ``g*sp_size ..`` form sequence-parallel group g, which is data-parallel rank g."""
    from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415

    if world % sp_size:
        raise ValueError(f"sp_size={sp_size} must divide the number of ranks ({world})")
    if sp_size == 1:
        return rank, world, None
    mesh = init_device_mesh(device_type, (world // sp_size, sp_size), mesh_dim_names=("dp", "sp"))
    return rank // sp_size, world // sp_size, mesh["sp"].get_group()


def shard_model(model: nn.Module, mesh, dtype: torch.dtype) -> nn.Module:
    """FSDP2: each block its own unit, then the root (embedders, final layer). Compute in ``dtype``, gradients
    reduced in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: PLC0415

    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) DTensor; collective for DTensors."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


class EMA:
    """Float32 exponential moving average of the trainable parameters, sharded like them (a dict of DTensors,
    saved with DCP), starting as a copy of the model and updated after every step, as upstream. ``update``
    works on the local shards only: no communication."""

    def __init__(self, model: nn.Module):
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.shadow = {name: p.detach().float().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def update(self, decay: float) -> None:
        shadow = [_local(t) for t in self.shadow.values()]
        torch._foreach_lerp_(shadow, [_local(p.detach()).float() for p in self.params.values()], 1.0 - decay)


def export_ema(model: nn.Module, ema: EMA, path: Path, kwargs: dict, rank: int, prediction: str = "eps") -> None:
    """The EMA weights, with the model's frozen parameters and buffers, as one ``.safetensors`` holding every
    name of ``model.state_dict()`` (loads strictly into ``STDiT(**kwargs)``; upstream's names), with the
    constructor arguments and what the model predicts (``"eps"`` or ``"v"``, for the sampler) in its metadata.
    Collective."""
    from safetensors.torch import save_file  # noqa: PLC0415

    tensors = {}
    for name, value in model.state_dict().items():
        full = _full(ema.shadow[name] if name in ema.shadow else value.detach())
        if rank == 0:
            tensors[name] = full.float().cpu().contiguous()
    if rank == 0:
        partial = path.with_name(path.name + ".partial")
        save_file(tensors, str(partial), metadata={"model_kwargs": json.dumps(kwargs), "prediction": prediction})
        os.replace(partial, path)


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------

def per_sample_draws(step: int, seed: int, positions: list[int], sample_shape, num_timesteps: int,
                     drop_prob: float, device):
    """Timesteps ``[B]`` (int64), noise ``[B, *sample_shape]`` and caption drops ``[B]`` (int64, 1 = drop) of
    the samples at global ``positions`` of ``step``'s batch: functions of (seed, step, position) only."""
    ts, noises, drops = [], [], []
    generator = torch.Generator(device=device)
    for position in positions:
        generator.manual_seed(hash((seed, step, position)) % 2**63)
        ts.append(torch.randint(0, num_timesteps, (1,), generator=generator, device=device))
        drops.append((torch.rand(1, generator=generator, device=device) < drop_prob).long())
        noises.append(torch.randn(sample_shape, generator=generator, device=device))
    return torch.cat(ts), torch.stack(noises), torch.cat(drops)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


@dataclass
class TrainResult:
    outdir: Path
    losses: dict[int, float]  # step -> global mean loss (this run's steps; the log file has all of them)
    last_step: int
    stopped_by_signal: bool
    ema_path: Path | None
    sample: dict | None  # caption, path, description, matched


def read_losses(outdir) -> dict[int, float]:
    path = Path(outdir) / LOSSES_FILE
    if not path.is_file():
        return {}
    return {entry["step"]: entry["loss"] for entry in map(json.loads, path.read_text().splitlines()) if entry}


def _truncate_losses(outdir: Path, last_step: int) -> None:
    """Keep the log's entries up to ``last_step``, whole (a resumed run rewrites what came after its
    checkpoint)."""
    lines = (outdir / LOSSES_FILE).read_text().splitlines() if (outdir / LOSSES_FILE).is_file() else []
    text = "".join(line + "\n" for line in lines if line and json.loads(line)["step"] <= last_step)
    partial = outdir / (LOSSES_FILE + ".partial")
    partial.write_text(text)
    os.replace(partial, outdir / LOSSES_FILE)


def train(config: TrainConfig, resume: str | os.PathLike | None = None, device: str = "auto", progress: bool = True,
          _before_publish=None) -> TrainResult:
    """Train ``config`` (from the checkpoint ``resume``, a run folder or a checkpoint folder, when given) until
    ``config.max_steps`` or SIGTERM; checkpoint, export the EMA and (``sample_at_end``) sample a clip."""

    outdir = Path(config.outdir)
    with distributed(device) as (rank, world, dev, mesh):
        if rank == 0:
            outdir.mkdir(parents=True, exist_ok=True)
            (outdir / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(config), indent=1) + "\n")
        dist.barrier()
        stop, gc_was_enabled = StopRequest(), gc.isenabled()
        try:
            return _run(config, resume, progress, _before_publish, outdir, rank, world, dev, mesh, stop)
        finally:
            stop.restore()
            if gc_was_enabled:
                gc.enable()


def _run(config, resume, progress, _before_publish, outdir, rank, world, dev, mesh, stop) -> TrainResult:
    from openvid_models import IDDPM  # noqa: PLC0415
    from openvid_models.data import build_dataloader  # noqa: PLC0415

    dp_rank, dp_world, sp_group = data_and_sequence_groups(config.sp_size, rank, world, dev.type)
    dataset, captions = build_dataset(config, rank)
    text_encoder = None if config.data == "latent-cache" else build_text_encoder(config, captions, rank, dev)
    vae = build_vae(config, dev) if config.data != "latent-cache" else None
    if config.data == "latent-cache":
        first = dataset[0]
        caption_channels, latent_channels = first["y"].shape[-1], first["latents"].shape[0]
        downsample = config.image_size // first["latents"].shape[-1]
    else:
        caption_channels, latent_channels, downsample = text_encoder.output_dim, vae.channels, vae.downsample
    kwargs = model_kwargs(config, caption_channels, latent_channels, downsample)

    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = model_class(config.model)(**kwargs, freeze=config.freeze)
    if config.init_from and resume is None:
        initialise_from(model, config.init_from)
    model.grad_checkpointing, model.checkpointed_blocks = config.grad_checkpointing, config.checkpointed_blocks
    model.set_sequence_parallel(sp_group)
    model.train()
    shard_model(model, mesh, DTYPES[config.dtype])
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Fused on GPUs: one kernel per step over all parameters instead of several foreach passes (the step is
    # host-bound; BENCHMARKS.md, training profile).
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay, eps=config.adam_eps,
                                  fused=dev.type == "cuda")
    ema = EMA(model)
    diffusion = IDDPM(timestep_respacing="", predict_v=config.prediction == "v")
    loader = build_dataloader(dataset, config.batch_size, rank=dp_rank, world_size=dp_world,
                              num_workers=config.num_workers, seed=config.seed, shuffle=True, drop_last=True)
    if len(loader.sampler) < config.batch_size:
        raise ValueError(f"batch_size {config.batch_size} x {dp_world} data-parallel ranks exceeds the "
                         f"{len(dataset)} samples")

    step = 0
    ckpt_dir = outdir / "checkpoints"
    if resume is not None:
        resume = Path(resume)
        path = resume if (resume / ".metadata").is_file() else latest_checkpoint(resume / "checkpoints")
        if path is None:
            raise FileNotFoundError(f"--resume {resume}: no checkpoint there (expected {resume}/checkpoints/"
                                    "latest or a checkpoint folder)")
        step = _load(path, model, optimizer, ema, loader)
        if rank == 0:
            _truncate_losses(outdir, step)
            print(f"resumed from {path} at step {step}", file=sys.stderr)
    elif rank == 0 and (outdir / LOSSES_FILE).exists():
        (outdir / LOSSES_FILE).unlink()  # a fresh run in an old folder starts a fresh log

    tokens_per_sample = math.prod(g for g in model.grid)
    losses: dict[int, float] = {}
    writer = _tensorboard(config, outdir) if rank == 0 else None
    log = open(outdir / LOSSES_FILE, "a") if rank == 0 else None
    bar = None
    if rank == 0 and progress:
        from tqdm.auto import tqdm  # noqa: PLC0415

        bar = tqdm(total=config.max_steps, initial=step, desc="train", dynamic_ncols=True)
    batches = iter(loader)
    last_saved, stopped = step if resume is not None else -1, False
    # Python's cyclic garbage collector on a schedule: left automatic, its full passes over the objects of the
    # autograd graphs stall random steps by a large fraction of a step.
    gc.collect()
    gc.disable()
    while step < config.max_steps:
        if step % GC_EVERY_STEPS == 0:
            gc.collect(1)
        start = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:  # an epoch ended; the loader moves on to the next one
            batches = iter(loader)
            batch = next(batches)
        step += 1
        loss = _train_step(model, diffusion, optimizer, batch, text_encoder, vae, config, step, dp_rank, dp_world,
                           sp_group, dev)
        ema.update(config.ema_decay)
        dist.all_reduce(loss, op=dist.ReduceOp.AVG if dev.type == "cuda" else dist.ReduceOp.SUM)
        if dev.type != "cuda":  # gloo has no AVG
            loss /= world
        loss_value = loss.item()
        losses[step] = loss_value
        elapsed = time.perf_counter() - start
        if rank == 0:
            tokens, memory = tokens_per_sample * config.batch_size * dp_world / elapsed, _memory_gb(dev)
            log.write(json.dumps({"step": step, "loss": loss_value, "step_s": round(elapsed, 4),
                                  "tokens_per_s": round(tokens), "peak_gb": round(memory, 2)}) + "\n")
            log.flush()
            if bar is not None:
                bar.set_postfix(loss=f"{loss_value:.4f}", step_s=f"{elapsed:.3f}", tok_s=f"{tokens:.3g}",
                                mem_gb=f"{memory:.2f}")
                bar.update(1)
            if writer is not None and step % config.log_every == 0:
                writer.add_scalar("loss", loss_value, step)
                writer.add_scalar("step_time_s", elapsed, step)
        stopped = stop.any_rank(dev)
        if step % config.ckpt_every == 0 or step == config.max_steps or stopped:
            gc.collect()  # the full pass the scheduled ones (generation 1) leave out
            _save(ckpt_dir, step, model, optimizer, ema, loader, config, _before_publish)
            last_saved = step
        if stopped:
            if rank == 0:
                print(f"{stop.signal_name or 'stop'} received: saved step {step}, exiting", file=sys.stderr)
            break
    if last_saved != step:
        _save(ckpt_dir, step, model, optimizer, ema, loader, config, _before_publish)
    if bar is not None:
        bar.close()
    if log is not None:
        log.close()
    if writer is not None:
        writer.close()

    ema_path, sample = None, None
    if not stopped:
        ema_path = outdir / EMA_FILE
        export_ema(model, ema, ema_path, kwargs, rank, config.prediction)
        if rank == 0:
            write_loss_plot(read_losses(outdir), outdir / "loss.png")
            if config.sample_at_end and text_encoder is not None:
                sample = sample_clip(config, kwargs, ema_path, text_encoder, vae, captions, dev, outdir)
        dist.barrier()
    return TrainResult(outdir, losses, step, stopped, ema_path, sample)


def _train_step(model, diffusion, optimizer, batch, text_encoder, vae, config, step, dp_rank, dp_world, sp_group,
                dev):
    """One optimiser step on this rank's batch (its frames of it under sequence parallelism); returns the local
    mean loss (a float32 0-d tensor)."""
    with torch.no_grad():
        if "latents" in batch:  # latent cache: VAE latents and T5 features were computed ahead
            x = batch["latents"].to(dev, torch.float32)
            y, mask = batch["y"].to(dev), batch["mask"].to(dev)
        else:
            video = batch["video"].to(dev, non_blocking=True)
            if config.vae == "identity":
                x = video
            else:  # the posterior draw from a per-step generator too, for exact resumption
                seed = hash((config.seed, step, dp_rank, -1)) % 2**63  # ints only: the same in every process
                generator = torch.Generator(device=dev).manual_seed(seed)
                x = vae.encode(video.to(DTYPES[config.dtype]), generator=generator).float()
            encoded = text_encoder.encode(list(batch["text"]))
            y, mask = encoded["y"], encoded["mask"]
    B = x.shape[0]
    positions = [j * dp_world + dp_rank for j in range(B)]
    t, noise, drop = per_sample_draws(step, config.seed, positions, x.shape[1:], diffusion.num_timesteps,
                                      config.class_dropout_prob, dev)
    if sp_group is not None:
        x, noise = (shard_frames(tensor, sp_group, dim=2) for tensor in (x, noise))
    terms = diffusion.training_losses(model, x, t, dict(y=y, mask=mask, force_drop_ids=drop), noise=noise)
    loss = weighted_loss(terms, t, diffusion, config.v_weight_cap).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach().float()


def weighted_loss(terms: dict, t: torch.Tensor, diffusion, v_weight_cap: float | None) -> torch.Tensor:
    """Per-sample loss ``[B]``: upstream's ``terms["loss"]``, or with ``v_weight_cap`` g the noise MSE weighted by
    ``min(1 / alpha_bar_t, g)`` plus the vb term. (The noise MSE weights an error in the predicted clean sample
    by the signal-to-noise ratio, nearly 0 at high noise; 1 / alpha_bar = 1 + 1 / SNR lifts those steps.)"""
    if v_weight_cap is None:
        return terms["loss"]
    alpha_bar = torch.as_tensor(diffusion.alphas_cumprod, device=t.device)[t].float()
    return terms["mse"] * (1.0 / alpha_bar).clamp(max=v_weight_cap) + terms.get("vb", 0.0)


def _state(model, optimizer, ema) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict  # noqa: PLC0415

    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optim_state, "ema": ema.shadow}


def _save(ckpt_dir, step, model, optimizer, ema, loader, config, before_publish) -> None:
    rank_state = {"step": step, "loader": loader.state_dict(), "rng": _rng_state()}
    save_checkpoint(ckpt_dir, step, _state(model, optimizer, ema), rank_state, keep=config.keep_checkpoints,
                    _before_publish=before_publish)


def _load(path, model, optimizer, ema, loader) -> int:
    from torch.distributed.checkpoint.state_dict import set_state_dict  # noqa: PLC0415

    state = _state(model, optimizer, ema)
    rank_state = load_checkpoint(path, state)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    loader.load_state_dict(rank_state["loader"])
    _set_rng_state(rank_state["rng"])
    return int(rank_state["step"])


def _tensorboard(config: TrainConfig, outdir: Path):
    if not config.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415
    except ImportError as e:
        raise RuntimeError("tensorboard=True needs the tensorboard package (pip install tensorboard)") from e
    return SummaryWriter(str(outdir / "tensorboard"))


# ---------------------------------------------------------------------------------------------------------
# After training: the loss curve and a sampled clip
# ---------------------------------------------------------------------------------------------------------

def write_loss_plot(losses: dict[int, float], path: Path) -> None:
    """The loss curve as a PNG: with matplotlib when it is installed, else a plain raster line plot."""
    if not losses:
        return
    steps, values = zip(*sorted(losses.items()))
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        _write_png_plot(list(values), path)
        return
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, values, lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _write_png_plot(values: list[float], path: Path, width: int = 600, height: int = 300) -> None:
    """A log-scale line plot of ``values`` (black on white, no axes labels) written with zlib alone."""
    import struct  # noqa: PLC0415
    import zlib  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415

    logs = np.log(np.maximum(np.asarray(values, dtype=np.float64), 1e-12))
    lo, hi = logs.min(), logs.max()
    margin = 10
    xs = np.linspace(margin, width - margin - 1, len(logs))
    ys = height - margin - 1 - (logs - lo) / max(hi - lo, 1e-12) * (height - 2 * margin - 1)
    image = np.full((height, width), 255, dtype=np.uint8)
    image[height - margin, margin:width - margin] = 160  # x axis
    image[margin:height - margin, margin] = 160  # y axis
    for (x0, y0), (x1, y1) in zip(zip(xs[:-1], ys[:-1]), zip(xs[1:], ys[1:])):
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        image[np.rint(np.linspace(y0, y1, n)).astype(int), np.rint(np.linspace(x0, x1, n)).astype(int)] = 0
    if len(logs) == 1:
        image[int(ys[0]), int(xs[0])] = 0
    raw = b"".join(b"\x00" + row.tobytes() for row in image)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    path.write_bytes(png)


def sample_clip(config: TrainConfig, kwargs: dict, ema_path: Path, text_encoder, vae, captions: list[str], device,
                outdir: Path) -> dict:
    """Sample one clip from the exported EMA weights (DPM-Solver++, classifier-free guidance), write
    ``sample.mp4``, and say whether :func:`describe_clip` sees the caption's colour and direction (sample-set
    captions only)."""
    from openvid_models import DPMSolverSampler  # noqa: PLC0415
    from openvid_models.data import describe_clip, parse_caption  # noqa: PLC0415
    from openvid_models.sample import to_uint8_frames, write_video  # noqa: PLC0415

    caption = config.sample_caption or captions[0]
    model = model_class(config.model).from_pretrained(ema_path, **kwargs).to(device).eval()
    sampler = DPMSolverSampler(num_sampling_steps=config.sample_steps, cfg_scale=config.cfg_scale,
                               prediction=config.prediction)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    z_size = (kwargs["in_channels"], *kwargs["input_size"])
    latents = sampler.sample(model, text_encoder, z_size, [caption], device, generator=generator, progress=False)
    with torch.no_grad():
        pixels = vae.decode(latents.to(DTYPES[config.dtype]) if config.vae != "identity" else latents).float()
    path = write_video(outdir / "sample.mp4", to_uint8_frames(pixels)[0], fps=8)  # 24 fps sources at interval 3
    result = {"caption": caption, "path": str(path), "description": None, "matched": None}
    try:
        parse_caption(caption)
    except ValueError:
        return result  # not a sample-set caption: nothing to check it against
    description = describe_clip(pixels[0].clamp(-1, 1))
    result["description"] = {"colour": description.colour, "direction": description.direction,
                             "shape": description.shape}
    result["matched"] = description.matches(caption)
    (outdir / "sample.json").write_text(json.dumps(result, indent=1) + "\n")
    return result
