"""Sequence parallelism over frames (Ulysses all-to-all), for video DiTs whose sequence does not fit one GPU.

Each rank of a sequence-parallel group holds ``T / P`` consecutive frames of every sample (``P`` the group's
size): spatial attention, cross-attention to the caption, joint attention and the MLPs work on whole frames
and stay local. Temporal attention needs every frame, so it swaps the sharding around the op: an all-to-all
turns ``[frames / P, all heads]`` into ``[all frames, heads / P]``, the op runs on the local heads, and a
second all-to-all turns the output back. The two all-to-alls carry ``4 C`` values per local token (qkv and
output), the same as sharding within frames and exchanging around spatial attention would, but here the
attention that runs distributed is the cheap one (T = 16 keys, against S = 4096 within a frame at 1024 px).

Gradients: the all-to-all's backward is the reverse all-to-all. A loss that sums (or averages) over the local
frames on every rank therefore gives each rank its share of every parameter's gradient; summing (or, with
equal shares, averaging) over the group gives the full-sequence gradient, which is what FSDP's reduction
over a mesh that includes the group does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from openvid_kernels.temporal import temporal_attention_packed


def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    size = dist.get_world_size(group)
    if size == 1:
        return x
    send = torch.stack(x.chunk(size, dim=scatter_dim)).contiguous()  # [P, ...]: piece p goes to rank p
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    return torch.cat(received.unbind(0), dim=gather_dim)  # rank p's piece lands at position p


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scatter_dim: int, gather_dim: int, group):
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return _all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad.contiguous(), gather_dim, scatter_dim, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    """Split ``x`` into ``P`` equal pieces along ``scatter_dim``, send piece p to rank p, and concatenate what
    arrives along ``gather_dim`` in rank order. Differentiable (the backward is the reverse exchange)."""
    size = dist.get_world_size(group)
    if x.shape[scatter_dim] % size:
        raise ValueError(f"all_to_all: dim {scatter_dim} of x (size {x.shape[scatter_dim]}) must be a multiple of "
                         f"the sequence-parallel group size {size}")
    return _AllToAll.apply(x, scatter_dim, gather_dim, group)


def shard_frames(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """This rank's ``T / P`` consecutive frames of ``x`` along ``dim`` (a view). The frame count must divide."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if x.shape[dim] % size:
        raise ValueError(f"shard_frames: {x.shape[dim]} frames (dim {dim}) cannot be split over a sequence-parallel "
                         f"group of {size} ranks; use a group size that divides the frame count")
    return x.chunk(size, dim=dim)[rank]


@torch.no_grad()
def gather_frames(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """The whole sequence from every rank's frames along ``dim``, on every rank (inference: training takes its
    loss on the local frames instead, see the module docstring)."""
    size = dist.get_world_size(group)
    if size == 1:
        return x
    pieces = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(pieces, x.contiguous(), group=group)
    return torch.cat(pieces, dim=dim)


def temporal_attention_packed_sp(qkv: torch.Tensor, num_frames: int, group, softmax_scale: float | None = None,
                                 backend: str | None = None) -> torch.Tensor:
    """:func:`openvid_kernels.temporal_attention_packed` over the frames of a sequence-parallel group.

    Args:
        qkv: this rank's ``[B, T_local*S, 3, H, D]`` (frame-major), the qkv projection of its ``T_local``
            frames; rank p holds frames ``p*T_local .. (p+1)*T_local - 1``. H must be a multiple of the group size.
        num_frames: T_local.

    Returns:
        ``[B, T_local*S, H, D]``: the attention output of this rank's frames over all ``P * T_local`` frames.
    """
    size = dist.get_world_size(group)
    B, N, three, H, D = qkv.shape
    if H % size:
        raise ValueError(f"temporal attention over a sequence-parallel group of {size} ranks needs a number of heads "
                         f"divisible by it; got {H} heads")
    if N % num_frames:
        raise ValueError(f"qkv has {N} tokens, not a multiple of num_frames={num_frames}")
    frames = qkv.unflatten(1, (num_frames, N // num_frames))  # [B, T_local, S, 3, H, D]
    by_heads = all_to_all(frames, scatter_dim=4, gather_dim=1, group=group)  # [B, T, S, 3, H / P, D]
    out = temporal_attention_packed(by_heads.flatten(1, 2), num_frames * size, softmax_scale, backend)
    out = all_to_all(out.unflatten(1, (num_frames * size, -1)), scatter_dim=1, gather_dim=3, group=group)
    return out.flatten(1, 2)  # [B, T_local*S, H, D]
