"""``nn.Module`` building blocks on the ops, for people writing new video DiTs.

Parameter names are those of the Open-Sora 1.0 / PixArt-alpha checkpoints (``qkv``, ``proj``, ``q_linear``,
``kv_linear``, ``scale_shift_table``), so STDiT/MVDiT (``openvid_models``) are built from these modules and
load the released weights unchanged. Tokens are ``[B, N, C]``; video tokens are frame-major (``N = T * S``,
token ``t * S + s``).
"""

from __future__ import annotations

import torch
from torch import nn

from openvid_kernels.cross import cross_attention
from openvid_kernels.linear import linear_gated_residual
from openvid_kernels.sequence_parallel import temporal_attention_packed_sp
from openvid_kernels.spatial import spatial_attention_packed
from openvid_kernels.temporal import temporal_attention_packed


def modulation(table: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """adaLN-single (PixArt-alpha): a block's learned ``table [n, C]`` plus the timestep's shared projection
    ``t [B, n*C]``, as n ``[B, 1, C]`` vectors (e.g. shift, scale, gate for attention, then for the MLP), the
    modulation shape the adaLN ops take."""
    if table.dim() != 2 or t.dim() != 2 or t.shape[1] != table.numel():
        raise ValueError(f"modulation: table must be [n, C] and t [B, n*C]; got table {tuple(table.shape)} and t "
                         f"{tuple(t.shape)}")
    return (table[None] + t.unflatten(1, (table.shape[0], -1))).chunk(table.shape[0], dim=1)


class AdaLNSingle(nn.Module):
    """A block's adaLN-single table: ``forward(t [B, n*C])`` returns the n modulation vectors ``[B, 1, C]``
    (:func:`modulation`). ``t`` is computed once per model (``Linear(SiLU(timestep embedding))`` to n*C)."""

    def __init__(self, hidden_size: int, num_vectors: int = 6):
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.randn(num_vectors, hidden_size) / hidden_size**0.5)

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return modulation(self.scale_shift_table, t)


class SelfAttention(nn.Module):
    """qkv projection, attention within frames (``over="spatial"``) or across frames (``"temporal"``), output
    projection. ``forward(x [B, T*S, C], num_frames=T)``; the op reads the packed qkv in place, so no token is
    rearranged. Use ``num_frames=1`` for plain self-attention over a sequence (images, text).

    ``sequence_parallel``: a process group over which the frames of every sample are split (each rank holds
    ``T / group size`` consecutive frames, and ``num_frames`` is that local count). Spatial attention is
    local; temporal attention switches from frame to head sharding and back with two all-to-alls (Ulysses),
    so ``num_heads`` must be a multiple of the group size.
    """

    def __init__(self, hidden_size: int, num_heads: int, over: str = "spatial"):
        super().__init__()
        if over not in ("spatial", "temporal"):
            raise ValueError(f"over must be 'spatial' or 'temporal', got {over!r}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
        self.num_heads, self.over = num_heads, over
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.sequence_parallel = None

    def forward(self, x: torch.Tensor, num_frames: int = 1, residual: torch.Tensor | None = None,
                gate: torch.Tensor | None = None) -> torch.Tensor:
        """The attention output, or with ``residual`` and ``gate`` the residual step ``residual + gate * output``
        (:func:`linear_gated_residual`: fused into the output projection at inference)."""
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, -1))
        if self.over == "spatial":
            out = spatial_attention_packed(qkv, num_frames)
        elif self.sequence_parallel is not None:
            out = temporal_attention_packed_sp(qkv, num_frames, self.sequence_parallel)
        else:
            out = temporal_attention_packed(qkv, num_frames)
        if residual is None:
            return self.proj(out.flatten(-2))
        return linear_gated_residual(residual, out.flatten(-2), self.proj.weight, self.proj.bias, gate)


class CrossAttention(nn.Module):
    """Queries from the tokens ``x [B, N, C]``, keys and values from the caption tokens ``y [B, L, C]`` of which
    the first ``lens[b]`` are real (padded tokens are never read). ``lens`` None: all L."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.q_linear = nn.Linear(hidden_size, hidden_size)
        self.kv_linear = nn.Linear(hidden_size, 2 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, y: torch.Tensor, lens: torch.Tensor | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """The attention output, or with ``residual`` the residual step ``residual + output``
        (:func:`linear_gated_residual` without a gate: fused into the output projection at inference)."""
        q = self.q_linear(x).unflatten(-1, (self.num_heads, -1))
        k, v = self.kv_linear(y).unflatten(-1, (2, self.num_heads, -1)).unbind(2)
        out = cross_attention(q, k, v, lens).flatten(-2)
        if residual is None:
            return self.proj(out)
        return linear_gated_residual(residual, out, self.proj.weight, self.proj.bias, None)
