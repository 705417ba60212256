"""Argument checks and layout helpers shared by the attention op families (temporal, spatial).

They read only shapes, dtypes, strides and devices, so they also run while ``torch.compile`` traces.
"""

from __future__ import annotations

import math

import torch

MAX_HEAD_DIM = 128
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CUDA_DTYPES = (torch.float16, torch.bfloat16)


def check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def check_same(tensors: dict[str, torch.Tensor], dims: slice | None = slice(None)) -> None:
    """Every tensor has the first one's dtype, device and ``shape[dims]`` (dims None: any shape)."""
    (first_name, first), *others = tensors.items()
    for name, t in others:
        if dims is not None and (t.dim() != first.dim() or t.shape[dims] != first.shape[dims]):
            raise ValueError(f"{name} has shape {list(t.shape)} but {first_name} has {list(first.shape)}")
        if t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")


def check_kernel_dtype_and_head_dim(x: torch.Tensor, name: str) -> None:
    """Limits every attention kernel backend shares (the references take any size and float dtype)."""
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name} has dtype {x.dtype}; the kernels take {KERNEL_DTYPES} (use backend='reference')")
    head_dim = x.shape[-1]
    if head_dim % 8 or not 8 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(
            f"{name} has head dim D = {head_dim}; the kernels take a multiple of 8 in [8, {MAX_HEAD_DIM}] "
            "(use backend='reference')"
        )
    if x.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous head dim (stride(-1) == 1), got strides {x.stride()}")


def softmax_scale_or_default(softmax_scale: float | None, head_dim: int) -> float:
    if softmax_scale is None:
        return head_dim ** -0.5
    softmax_scale = float(softmax_scale)
    if not 0.0 < softmax_scale < math.inf:
        raise ValueError(f"softmax_scale must be a positive finite number, got {softmax_scale}")
    return softmax_scale


def cuda_layout_problem(tensors: dict[str, torch.Tensor]) -> str | None:
    """Why the CUDA attention kernels (16-byte vector or bulk-copy accesses, fp16/bf16) cannot take these
    tensors, or None. Strides of size-1 dims are never used, so they are not checked."""
    for name, t in tensors.items():
        if t.dtype not in CUDA_DTYPES:
            return f"{name} has dtype {t.dtype}; the CUDA kernels take float16 and bfloat16"
        if t.data_ptr() % 16:
            return f"{name}'s data pointer is not 16-byte aligned"
        if any(stride % 8 for stride, size in zip(t.stride()[:-1], t.shape[:-1]) if size > 1):
            return f"{name} has strides {t.stride()}, not multiples of 8 elements"
    return None


def unit_head_stride(t: torch.Tensor) -> torch.Tensor:
    # The public functions reject other strides; a compiled graph could still hand over a relaid-out tensor.
    return t if t.stride(-1) == 1 else t.contiguous()


def check_lengths(lens, name: str, batch: int, max_len: int, device: torch.device) -> torch.Tensor:
    """Per-sequence token counts as an int32 ``[batch]`` tensor on ``device``.

    Lengths given on the host (a CPU tensor or a sequence of ints) are checked against ``[0, max_len]`` with a
    clear error. Lengths already on the GPU are not read back (that would stall the host on every call) nor
    clamped here: every kernel clamps the lengths it loads into ``[0, max_len]`` (a bad value never reaches
    memory past the tokens), and the references' ``arange(max_len) < lens`` masks mean the same.
    """
    if not isinstance(lens, torch.Tensor):
        lens = torch.as_tensor(lens)
    if lens.dtype == torch.bool or lens.is_floating_point() or lens.is_complex():
        raise TypeError(f"{name} must hold integers (token counts), got dtype {lens.dtype}")
    if lens.shape != (batch,):
        raise ValueError(f"{name} must have shape [{batch}] (one length per sequence), got {list(lens.shape)}")
    if lens.device.type == "cpu" and not torch.compiler.is_compiling():
        bad = (lens < 0) | (lens > max_len)
        if bad.any():
            index = int(bad.nonzero()[0, 0])
            raise ValueError(f"{name}[{index}] = {int(lens[index])} is outside [0, {max_len}] (the padded length)")
        return lens.to(device=device, dtype=torch.int32)
    return lens.to(device=device, dtype=torch.int32)
