"""Text-to-video sampling: prompts -> T5 -> STDiT/MVDiT with IDDPM or DPM-Solver++ and classifier-free guidance ->
VAE -> mp4 files (PyAV), one per prompt, with the prompt and the settings beside it.

    python -m openvid_models.sample --config STDiT-16x512x512 --ckpt OpenVid-STDiT-16x512x512.safetensors \
        --t5 t5-v1_1-xxl/ --vae sd-vae-ft-ema/ --prompt "a red panda eating bamboo" --out samples/

Or from Python: ``TextToVideo.from_config(SAMPLE_CONFIGS["STDiT-16x512x512"], ckpt=..., t5=..., vae=...)``, then
``videos = pipe(prompts, seed=42)`` and ``write_video(path, videos[0], fps=8)``.

Speed and memory: the prompts are encoded first, then T5 leaves the GPU (9.5 GB in bf16); the DiT runs in the
config's dtype on openvid_kernels, its forward replayed from a CUDA graph; the VAE decodes a few frames at a time.

Sequence parallelism for long or large videos: ``torchrun --nproc_per_node=N -m openvid_models.sample --sp-size N
...`` splits every step's frames over the N GPUs (``STDiT.set_sequence_parallel``); rank 0 writes the files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from openvid_kernels.sequence_parallel import gather_frames, shard_frames
from openvid_models.checkpoint import load_state_dict
from openvid_models.configs import MODEL_SIZES
from openvid_models.diffusion import IDDPM
from openvid_models.dpm_solver import PREDICTIONS, DPMSolverSampler
from openvid_models.mvdit import MVDiT
from openvid_models.stdit import STDiT

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SAMPLERS = ("iddpm", "dpm-solver")


@dataclass(frozen=True)
class SampleConfig:
    """One inference setting of the release (OpenVid-1M / Open-Sora 1.0 ``configs/*/inference``)."""

    model: str  # a name in MODEL_SIZES
    num_frames: int = 16
    image_size: tuple[int, int] = (512, 512)  # pixels (H, W); latents are 8x smaller with the SD VAE
    space_scale: float = 1.0
    time_scale: float = 1.0
    sampler: str = "iddpm"
    num_sampling_steps: int = 100
    cfg_scale: float = 7.0
    dtype: str = "bf16"
    vae_micro_batch_size: int = 4  # frames per VAE decode call
    fps: int = 8  # 24 fps sources read at frame interval 3
    prediction: str = "eps"  # what the DiT predicts: "eps" (the releases) or "v" (trained with prediction="v")


SAMPLE_CONFIGS: dict[str, SampleConfig] = {
    "STDiT-16x256x256": SampleConfig("STDiT-XL/2", image_size=(256, 256), space_scale=0.5),
    "STDiT-16x512x512": SampleConfig("STDiT-XL/2", image_size=(512, 512), space_scale=1.0, vae_micro_batch_size=2),
    "STDiT-16x1024x1024": SampleConfig("STDiT-XL/2", image_size=(1024, 1024), space_scale=2.0,
                                       vae_micro_batch_size=1),
    "MVDiT-16x256x256": SampleConfig("MVDiT-XL/2", image_size=(256, 256), space_scale=0.5),
    "MVDiT-16x512x512": SampleConfig("MVDiT-XL/2", image_size=(512, 512), space_scale=1.0, vae_micro_batch_size=2),
}


def _require_path(path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def build_sampler(config: SampleConfig):
    if config.prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {config.prediction!r}")
    if config.sampler == "iddpm":
        return IDDPM(num_sampling_steps=config.num_sampling_steps, cfg_scale=config.cfg_scale,
                     predict_v=config.prediction == "v")
    if config.sampler == "dpm-solver":
        return DPMSolverSampler(num_sampling_steps=config.num_sampling_steps, cfg_scale=config.cfg_scale,
                                prediction=config.prediction)
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {config.sampler!r}")


def build_model(config: SampleConfig, latent_size: tuple[int, int, int]):
    """The config's STDiT or MVDiT for latents ``(T, h, w)``, with random weights."""
    if config.model not in MODEL_SIZES:
        raise ValueError(f"model {config.model!r} is not a known size; known: {sorted(MODEL_SIZES)}")
    model_class = MVDiT if config.model.startswith("MVDiT") else STDiT
    size = dict(MODEL_SIZES[config.model], input_size=latent_size, space_scale=config.space_scale,
                time_scale=config.time_scale)
    return model_class(**size)


class _Denoiser(nn.Module):
    """A DiT behind a different forward, with what the samplers read from the DiT."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def in_channels(self) -> int:
        return self.model.in_channels

    @property
    def y_embedder(self) -> nn.Module:  # the samplers read the null caption from it
        return self.model.y_embedder


class FramesGathered(_Denoiser):
    """Whole-video calls to a DiT whose frames are split over ``group`` (``set_sequence_parallel``): each rank
    runs its frames, and every rank gets the whole output, so the sampler runs unchanged (and identically) on
    every rank."""

    def __init__(self, model: nn.Module, group):
        super().__init__(model)
        self.group = group

    def forward(self, x, timestep, y, mask):
        out = self.model(shard_frames(x, self.group, dim=2), timestep, y, mask)
        return gather_frames(out, self.group, dim=2)


class CUDAGraphed(_Denoiser):
    """The DiT's forward captured in a CUDA graph per input shape, then replayed: one sampling step launches
    several hundred kernels, and replaying removes the host's launch time between them. Inputs are copied into
    the graph's static tensors; the output is copied out (the next replay overwrites it)."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...], torch.Tensor]] = {}

    def forward(self, x, timestep, y, mask):
        inputs = (x, timestep, y, mask)
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        if key not in self.graphs:
            static = tuple(t.clone() for t in inputs)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the capture: kernels compile and autotune here
                for _ in range(2):
                    self.model(*static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.model(*static)
            self.graphs[key] = (graph, static, out)
        graph, static, out = self.graphs[key]
        for dst, src in zip(static, inputs):
            dst.copy_(src)
        graph.replay()
        return out.clone()


class _Encoded:
    """Captions encoded ahead of sampling, handed to the samplers in the text encoder's place."""

    def __init__(self, encoded: dict[str, torch.Tensor]):
        self.encoded = encoded

    def encode(self, prompts):
        return self.encoded


class TextToVideo:
    """DiT + sampler + T5 + VAE. ``pipe(prompts, seed)`` -> list of uint8 videos ``[T, H, W, 3]``."""

    def __init__(self, model, text_encoder, vae, config: SampleConfig, device, text_encoder_after: str = "cpu",
                 cuda_graph: bool = True, sequence_parallel=None):
        """``text_encoder_after``: where T5 goes once the prompts are encoded: ``"cpu"`` (moved off the GPU, back
        for the next call), ``"free"`` (released: the CLI encodes every prompt at once; moving 9.5 GB to the CPU
        takes seconds) or ``"keep"`` (stays on the GPU). ``cuda_graph``: replay the DiT from CUDA graphs.
        ``sequence_parallel``: a process group whose ranks all call the pipeline with the same arguments and split
        every step's frames (no CUDA graph then); each rank returns the same videos."""
        if text_encoder_after not in ("cpu", "free", "keep"):
            raise ValueError(f"text_encoder_after must be 'cpu', 'free' or 'keep', got {text_encoder_after!r}")
        caption_channels = model.y_embedder.y_embedding.shape[1]
        if text_encoder.output_dim != caption_channels:
            raise ValueError(f"the text encoder gives {text_encoder.output_dim} channels per token but the model "
                             f"({config.model}) takes captions of {caption_channels}")
        self.model, self.text_encoder, self.vae, self.config = model, text_encoder, vae, config
        self.device = torch.device(device)
        self.dtype = DTYPES[config.dtype]
        self.sampler = build_sampler(config)
        self.text_encoder_after = text_encoder_after
        if sequence_parallel is not None:
            model.set_sequence_parallel(sequence_parallel)
            self.denoiser = FramesGathered(model, sequence_parallel)
        else:
            self.denoiser = CUDAGraphed(model) if cuda_graph and self.device.type == "cuda" else model
        self.text_encoder.model_max_length = model.y_embedder.y_embedding.shape[0]

    @classmethod
    def from_config(cls, config: SampleConfig, ckpt, t5, vae, device="cuda", **kwargs) -> TextToVideo:
        """Load the DiT weights ``ckpt`` (.safetensors/.pt/.pth), T5 and the VAE from local directories."""
        from openvid_models.text_encoder import T5TextEncoder  # noqa: PLC0415  (transformers, only here)
        from openvid_models.vae import VideoAutoencoder  # noqa: PLC0415  (diffusers, only here)

        if config.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}")
        ckpt, t5, vae = (_require_path(p, what) for p, what in ((ckpt, "checkpoint"), (t5, "T5 directory"),
                                                                (vae, "VAE directory")))
        dtype = DTYPES[config.dtype]
        autoencoder = VideoAutoencoder.from_pretrained(vae, micro_batch_size=config.vae_micro_batch_size)
        autoencoder = autoencoder.to(device=device, dtype=dtype).eval()
        down = 2 ** (len(autoencoder.vae.config.block_out_channels) - 1)
        if config.image_size[0] % down or config.image_size[1] % down:
            raise ValueError(f"image_size {config.image_size} must be a multiple of the VAE's downsampling {down}")
        model = build_model(config, (config.num_frames, config.image_size[0] // down, config.image_size[1] // down))
        try:
            model.load_state_dict(load_state_dict(ckpt), strict=True)
        except RuntimeError as error:  # names or shapes differ: say which config the file does not fit
            raise ValueError(f"checkpoint {ckpt} does not fit the config's model {config.model} "
                             f"({type(model).__name__}):\n{error}") from None
        model = model.to(device=device, dtype=dtype).eval()
        text_encoder = T5TextEncoder.from_pretrained(t5, device=device, dtype=dtype)
        return cls(model, text_encoder, autoencoder, config, device, **kwargs)

    @property
    def latent_size(self) -> tuple[int, int, int, int]:
        return (self.model.in_channels, *self.model.input_size)

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """T5 features of all prompts; then T5 leaves the GPU as ``text_encoder_after`` says."""
        if self.text_encoder is None:
            raise RuntimeError("the text encoder was freed after the last encoding (text_encoder_after='free')")
        encoder = self.text_encoder.encoder
        encoder.to(self.device)
        encoded = self.text_encoder.encode(prompts)
        if self.text_encoder_after != "keep" and self.device.type == "cuda":
            if self.text_encoder_after == "free":
                self.text_encoder = None
            else:
                encoder.to("cpu")
            del encoder
            torch.cuda.empty_cache()
        return encoded

    @torch.no_grad()
    def __call__(self, prompts: list[str], seed: int = 42, batch_size: int = 1, progress: bool = True):
        """One uint8 video ``[T, H, W, 3]`` per prompt. Batches of ``batch_size`` prompts (2x that in the DiT
        with guidance); batch b draws its noise from ``seed + b``."""
        if isinstance(prompts, str) or not prompts:
            raise TypeError(f"prompts must be a non-empty list of strings, got {prompts!r:.80}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        encoded = self.encode(list(prompts))
        videos = []
        for b, start in enumerate(range(0, len(prompts), batch_size)):
            batch = {k: v[start:start + batch_size] for k, v in encoded.items()}
            n = batch["y"].shape[0]
            generator = torch.Generator(self.device).manual_seed(seed + b)
            latents = self.sampler.sample(self.denoiser, _Encoded(batch), self.latent_size, prompts[start:start + n],
                                          self.device, generator=generator, progress=progress, dtype=self.dtype)
            pixels = self.vae.decode(latents.to(self.dtype)).float()
            videos += list(to_uint8_frames(pixels))
        return videos


def to_uint8_frames(pixels: torch.Tensor) -> torch.Tensor:
    """``[B, 3, T, H, W]`` in about [-1, 1] to uint8 ``[B, T, H, W, 3]`` on the CPU (values clamped)."""
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu()


def write_video(path, frames: torch.Tensor, fps: int = 8, crf: int = 18) -> Path:
    """Write uint8 ``[T, H, W, 3]`` RGB frames to an H.264 mp4 (yuv420p, playable everywhere; an odd height or
    width is padded by one repeated row/column, as yuv420p needs even sizes). Written to a temporary name first,
    so an interrupted write leaves no broken file under ``path``."""
    import av  # noqa: PLC0415  (PyAV: only writing videos needs it)

    if frames.dim() != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = torch.nn.functional.pad(frames.permute(0, 3, 1, 2), (0, pad_w, 0, pad_h), mode="replicate")
        frames = frames.permute(0, 2, 3, 1)
    partial = path.with_name(path.name + ".partial")
    with av.open(str(partial), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames.numpy():
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    partial.replace(path)
    return path


def slug(text: str, length: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:length] or "prompt"


def read_prompts(prompts: list[str] | None, prompt_file: str | None) -> list[str]:
    found = list(prompts or [])
    if prompt_file is not None:
        lines = _require_path(prompt_file, "prompt file").read_text().splitlines()
        found += [line.strip() for line in lines if line.strip()]
    if not found:
        raise ValueError("no prompts: give --prompt TEXT (repeatable) or --prompt-file FILE (one per line)")
    return found


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m openvid_models.sample", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, choices=sorted(SAMPLE_CONFIGS), help="inference config")
    parser.add_argument("--ckpt", required=True, help="DiT weights (.safetensors, .pt or .pth)")
    parser.add_argument("--t5", required=True, help="local directory of the T5 encoder and tokenizer")
    parser.add_argument("--vae", required=True, help="local directory of the VAE (diffusers AutoencoderKL)")
    parser.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    parser.add_argument("--prompt-file", help="a text file of prompts, one per line")
    parser.add_argument("--out", default="samples", help="output directory (default: samples)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--batch-size", type=int, default=1, help="prompts per DiT batch (x2 with guidance)")
    parser.add_argument("--sampler", choices=SAMPLERS, help="default: the config's (iddpm)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the config's; 20-25 for dpm-solver)")
    parser.add_argument("--cfg-scale", type=float, help="guidance scale (default: the config's, 7.0)")
    parser.add_argument("--prediction", choices=PREDICTIONS, help="what the DiT predicts (default: eps, as the "
                        "releases; v for a model trained with prediction=v)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="DiT/T5/VAE dtype (default: the config's)")
    parser.add_argument("--model", choices=sorted(MODEL_SIZES), help="override the config's model size")
    parser.add_argument("--num-frames", type=int, help="override the config's frame count")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), help="override the pixel size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sp-size", type=int, default=1, help="split the frames over this many ranks (run under "
                        "torchrun with as many processes; sequence parallelism)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> SampleConfig:
    overrides = dict(model=args.model, num_frames=args.num_frames, sampler=args.sampler, cfg_scale=args.cfg_scale,
                     num_sampling_steps=args.steps, dtype=args.dtype, prediction=args.prediction,
                     image_size=tuple(args.image_size) if args.image_size else None)
    config = dataclasses.replace(SAMPLE_CONFIGS[args.config], **{k: v for k, v in overrides.items() if v is not None})
    if args.sampler == "dpm-solver" and args.steps is None:
        config = dataclasses.replace(config, num_sampling_steps=20)
    return config


def sequence_parallel_group(sp_size: int, device: str):
    """(group or None, this rank's device, rank) for ``--sp-size``: the torchrun world, which must have exactly
    ``sp_size`` ranks."""
    if sp_size < 1:
        raise ValueError(f"--sp-size must be >= 1, got {sp_size}")
    if sp_size == 1:
        return None, device, 0
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world != sp_size:
        raise ValueError(f"--sp-size {sp_size} needs {sp_size} processes (torchrun --nproc_per_node={sp_size}); this "
                         f"run has {world}")
    cuda = torch.device(device).type == "cuda"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    return dist.group.WORLD, device, dist.get_rank()


def main(argv=None) -> list[Path]:
    args = parse_args(argv)
    config = config_from_args(args)
    prompts = read_prompts(args.prompt, args.prompt_file)
    group, device, rank = sequence_parallel_group(args.sp_size, args.device)
    try:
        return generate(args, config, prompts, group, device, rank)
    finally:
        if group is not None:
            dist.destroy_process_group()


def generate(args, config, prompts, group, device, rank) -> list[Path]:
    """The videos of ``prompts`` written under ``args.out`` (by rank 0; other ranks return [])."""
    pipe = TextToVideo.from_config(config, args.ckpt, args.t5, args.vae, device=device, text_encoder_after="free",
                                   sequence_parallel=group)
    start = time.perf_counter()
    videos = pipe(prompts, seed=args.seed, batch_size=args.batch_size, progress=not args.no_progress and rank == 0)
    seconds = time.perf_counter() - start
    if rank != 0:  # every rank holds the same videos; rank 0 writes them
        return []
    out = Path(args.out)
    written = []
    for i, (prompt, video) in enumerate(zip(prompts, videos)):
        path = write_video(out / f"{i:04d}_{slug(prompt)}.mp4", video, fps=config.fps)
        settings = dict(prompt=prompt, config=args.config, ckpt=str(args.ckpt), seed=args.seed + i // args.batch_size,
                        batch_size=args.batch_size, **dataclasses.asdict(config))
        path.with_suffix(".json").write_text(json.dumps(settings, indent=2) + "\n")
        written.append(path)
    print(f"wrote {len(written)} video(s) to {out} in {seconds:.1f} s", file=sys.stderr)
    return written


if __name__ == "__main__":
    main()
