"""Layers shared by STDiT and MVDiT (Open-Sora 1.0 / PixArt-alpha), named as in the released checkpoints.

The attention sub-layers are ``openvid_kernels.modules``'. LayerNorm-modulation and the final layer run through
``openvid_kernels``; with ``openvid_kernels.use_backend("reference")`` they run on the plain PyTorch references.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import openvid_kernels as ok


# ---------------------------------------------------------------------------------------------------------
# Sine-cosine position embeddings (MAE's, with Open-Sora's scale: positions are divided by it)
# ---------------------------------------------------------------------------------------------------------

def sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """``[len(positions), embed_dim]``: sines of the positions times ``10000 ** -(2i / embed_dim)``, then cosines."""
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0))
    angles = positions.double().reshape(-1, 1) * omega
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(embed_dim: int, height: int, width: int, scale: float = 1.0) -> torch.Tensor:
    """``[height * width, embed_dim]`` in row-major token order: half the channels encode the column, half the
    row (the upstream meshgrid puts w first)."""
    rows = torch.arange(height, dtype=torch.float32) / scale
    cols = torch.arange(width, dtype=torch.float32) / scale
    grid_w, grid_h = torch.meshgrid(cols, rows, indexing="xy")  # [height, width] each
    return torch.cat([sincos_1d(embed_dim // 2, grid_w), sincos_1d(embed_dim // 2, grid_h)], dim=1)


def sincos_temporal(embed_dim: int, length: int, scale: float = 1.0) -> torch.Tensor:
    return sincos_1d(embed_dim, torch.arange(length, dtype=torch.float64) / scale)


# ---------------------------------------------------------------------------------------------------------
# Embedders and the final layer
# ---------------------------------------------------------------------------------------------------------

class PatchEmbed3D(nn.Module):
    """``[B, C, T, H, W]`` video latents to contiguous ``[B, T*S, hidden]`` tokens (frame-major): the released
    strided Conv3d, computed as one GEMM over the flattened patches. (The convolution's output, transposed to
    tokens, would leave every later activation channel-strided and cost a copy or a slow strided pass per op.)"""

    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = [(-size) % patch for size, patch in zip(x.shape[2:], self.patch_size)]  # T, H, W
        if any(pads):
            x = F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0]))
        pt, ph, pw = self.patch_size
        patches = rearrange(x, "B c (t pt) (h ph) (w pw) -> B (t h w) (c pt ph pw)", pt=pt, ph=ph, pw=pw)
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)


class TimestepEmbedder(nn.Module):
    """Diffusion timesteps to ``[B, hidden]``: GLIDE's sinusoidal features (cosines first), then an MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half)
        angles = timestep[:, None].float() * freqs
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=-1).to(dtype))


class Mlp(nn.Module):
    """fc1 -> GELU (tanh) -> fc2, as timm's ``Mlp`` that the checkpoints were saved from."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                gate: torch.Tensor | None = None) -> torch.Tensor:
        """``fc2(GELU(fc1(x)))``, or with ``residual`` and ``gate`` the residual step ``residual + gate * mlp(x)``
        (``ok.linear_gated_residual``: fused into fc2 at inference)."""
        if x.is_cuda and not torch.is_grad_enabled() and ok.default_backend() != "reference":
            # Inference: cuBLASLt adds the bias and applies the tanh GELU in the GEMM's epilogue, saving a pass
            # over the 4C-wide hidden activations. (No autograd formula exists for it, hence no-grad only.)
            hidden = torch._addmm_activation(self.fc1.bias, x.flatten(0, -2), self.fc1.weight.t(), use_gelu=True)
            hidden = hidden.unflatten(0, x.shape[:-1])
        else:
            hidden = F.gelu(self.fc1(x), approximate="tanh")
        if residual is None:
            return self.fc2(hidden)
        return ok.linear_gated_residual(residual, hidden, self.fc2.weight, self.fc2.bias, gate)


class CaptionEmbedder(nn.Module):
    """T5 features ``[B, 1, L, caption_channels]`` to ``[B, 1, L, hidden]``; in training, whole captions are
    replaced by the learned null caption ``y_embedding`` with probability ``uncond_prob`` (classifier-free
    guidance), or where ``force_drop_ids == 1``."""

    def __init__(self, caption_channels: int, hidden_size: int, uncond_prob: float, token_num: int):
        super().__init__()
        self.y_proj = Mlp(caption_channels, hidden_size, hidden_size)
        # A buffer, not a parameter, in the released checkpoints (upstream registers it so).
        self.register_buffer("y_embedding", torch.randn(token_num, caption_channels) / caption_channels**0.5)
        self.uncond_prob = uncond_prob

    def forward(self, caption: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None):
        if force_drop_ids is not None:
            drop = force_drop_ids == 1
        elif train and self.uncond_prob > 0:
            drop = torch.rand(caption.shape[0], device=caption.device) < self.uncond_prob
        else:
            drop = None
        if drop is not None:
            caption = torch.where(drop[:, None, None, None], self.y_embedding.to(caption.dtype), caption)
        return self.y_proj(caption)


class T2IFinalLayer(nn.Module):
    """PixArt's final layer: modulated LayerNorm (its own shift/scale table plus the timestep embedding), then
    a linear map to ``prod(patch) * out_channels`` per token."""

    def __init__(self, hidden_size: int, num_patch: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, num_patch * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        return self.linear(ok.layernorm_modulate(x, shift, scale))
