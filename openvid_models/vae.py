"""The video autoencoder: Stable Diffusion's image VAE (``sd-vae-ft-ema``, diffusers ``AutoencoderKL``) applied to
every frame, as OpenVid-1M / Open-Sora 1.0 do.

``encode``: pixels ``[B, 3, T, H, W]`` in [-1, 1] -> latents ``[B, 4, T, H/8, W/8]``, scaled by 0.18215;
``decode``: the reverse. Frames go through the VAE in micro-batches (a 16 x 512 x 512 clip at once would not fit
with activations), which changes nothing in the result.
"""

from __future__ import annotations

from pathlib import Path

import torch
from einops import rearrange
from torch import nn

SCALING_FACTOR = 0.18215  # sd-vae-ft-ema's latent scale, fixed by the checkpoints trained on it


class VideoAutoencoder(nn.Module):
    def __init__(self, vae: nn.Module, micro_batch_size: int | None = None, scaling_factor: float = SCALING_FACTOR):
        """vae: a diffusers ``AutoencoderKL``; micro_batch_size: frames per VAE call (None: all at once)."""
        super().__init__()
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be a positive int or None, got {micro_batch_size}")
        self.vae = vae
        self.micro_batch_size = micro_batch_size
        self.scaling_factor = scaling_factor

    @classmethod
    def from_pretrained(cls, path: str | Path, micro_batch_size: int | None = 4, **kwargs) -> VideoAutoencoder:
        """The VAE of a local diffusers directory (``config.json`` + weights; never fetched from the hub)."""
        from diffusers import AutoencoderKL  # noqa: PLC0415  (only the models need diffusers)

        return cls(AutoencoderKL.from_pretrained(path, local_files_only=True, **kwargs), micro_batch_size)

    def _per_frame(self, fn, video: torch.Tensor) -> torch.Tensor:
        frames = rearrange(video, "B C T H W -> (B T) C H W")
        size = self.micro_batch_size or frames.shape[0]
        out = torch.cat([fn(chunk) for chunk in frames.split(size)])
        return rearrange(out, "(B T) C H W -> B C T H W", B=video.shape[0])

    def encode(self, video: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None):
        """Latents of ``video [B, 3, T, H, W]``: a draw from the VAE's posterior (as upstream trains), or its mean
        with ``sample=False``."""
        def encode_frames(frames):
            posterior = self.vae.encode(frames).latent_dist
            return (posterior.sample(generator) if sample else posterior.mode()) * self.scaling_factor

        return self._per_frame(encode_frames, video)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, 3, T, H, W]`` (about [-1, 1]) of ``latents [B, 4, T, h, w]``."""
        return self._per_frame(lambda z: self.vae.decode(z / self.scaling_factor).sample, latents)
