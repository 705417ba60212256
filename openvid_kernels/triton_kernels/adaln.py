"""Triton kernels for fused adaLN modulation (see ``openvid_kernels.adaln`` for the op and its spec).

Layout contract, shared with the CUDA kernels in ``csrc/adaln.cu``:
  * token tensors ``[B, N, C]`` (x, y, h, x_out, grads) with any batch/token strides, unit channel stride;
  * modulation tensors ``[B, G, C]`` (shift, scale, gate) with any batch/group strides, unit channel stride:
    token ``n`` of sample ``b`` uses row ``(b, n // (N // G))``;
  * ``mean``/``rstd``: fp32 ``[B * N]``;
  * backward writes fp32 partial sums of the modulation gradients, ``[B, G, K, C]``: slot ``k`` of group
    ``g`` sums rows ``g * gs + k * rpc`` up to the group's end, ``gs = N // G``, ``rpc = ceil(gs / K)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _adaln_forward_kernel(
    X, Y, GATE, SHIFT, SCALE, H, X_OUT, MEAN, RSTD,
    rows, N, C, group_size,
    stride_x_b, stride_x_n, stride_y_b, stride_y_n,
    stride_gate_b, stride_gate_g, stride_shift_b, stride_shift_g, stride_scale_b, stride_scale_g,
    stride_h_b, stride_h_n, stride_xo_b, stride_xo_n,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # A [BLOCK_ROWS, BLOCK_C] tile of whole rows: more bytes in flight per program than one row.
    row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    b = (row // N)[:, None]
    n = (row % N)[:, None]
    g = n // group_size
    cols = tl.arange(0, BLOCK_C)[None, :]
    mask = (row < rows)[:, None] & (cols < C)

    x = tl.load(X + b * stride_x_b + n * stride_x_n + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        y = tl.load(Y + b * stride_y_b + n * stride_y_n + cols, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(GATE + b * stride_gate_b + g * stride_gate_g + cols, mask=mask, other=0.0).to(tl.float32)
        # Normalise the value as stored, so backward recomputes the same x_hat from x_out.
        x_out = (x + gate * y).to(X_OUT.dtype.element_ty)
        tl.store(X_OUT + b * stride_xo_b + n * stride_xo_n + cols, x_out, mask=mask)
        x = x_out.to(tl.float32)

    mean = tl.sum(x, axis=1) / C
    centered = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(centered * centered, axis=1) / C
    rstd = 1.0 / tl.sqrt(var + eps)

    shift = tl.load(SHIFT + b * stride_shift_b + g * stride_shift_g + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + b * stride_scale_b + g * stride_scale_g + cols, mask=mask, other=0.0).to(tl.float32)
    h = centered * rstd[:, None] * (1.0 + scale) + shift
    tl.store(H + b * stride_h_b + n * stride_h_n + cols, h.to(H.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean, mask=row < rows)
    tl.store(RSTD + row, rstd, mask=row < rows)


@triton.jit
def _adaln_backward_kernel(
    GRAD_H, GRAD_X_OUT, X_LN, MEAN, RSTD, SCALE, Y, GATE,
    GRAD_X, GRAD_Y, PARTIAL_SHIFT, PARTIAL_SCALE, PARTIAL_GATE,
    N, C, G, K, group_size, rows_per_chunk,
    stride_dh_b, stride_dh_n, stride_dxo_b, stride_dxo_n, stride_x_b, stride_x_n,
    stride_scale_b, stride_scale_g, stride_y_b, stride_y_n, stride_gate_b, stride_gate_g,
    stride_dx_b, stride_dx_n, stride_dy_b, stride_dy_n,
    HAS_RESIDUAL: tl.constexpr,
    HAS_GRAD_X_OUT: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    k = pid % K
    b = pid // (G * K)
    g = (pid // K) % G
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C

    # The modulation rows are the same for every token of this program's chunk: load them once.
    one_plus_scale = 1.0 + tl.load(
        SCALE + b * stride_scale_b + g * stride_scale_g + cols, mask=mask, other=0.0
    ).to(tl.float32)
    if HAS_RESIDUAL:
        gate = tl.load(GATE + b * stride_gate_b + g * stride_gate_g + cols, mask=mask, other=0.0).to(tl.float32)
        acc_gate = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_shift = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_scale = tl.zeros([BLOCK_C], dtype=tl.float32)

    n_start = g * group_size + k * rows_per_chunk
    n_end = tl.minimum(n_start + rows_per_chunk, (g + 1) * group_size)
    for n in range(n_start, n_end):
        row = b * N + n
        dh = tl.load(GRAD_H + b * stride_dh_b + n * stride_dh_n + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X_LN + b * stride_x_b + n * stride_x_n + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        x_hat = tl.where(mask, (x - mean) * rstd, 0.0)
        dx_hat = dh * one_plus_scale
        mean_dx_hat = tl.sum(dx_hat, axis=0) / C
        mean_dx_hat_x_hat = tl.sum(dx_hat * x_hat, axis=0) / C
        dx = (dx_hat - mean_dx_hat - x_hat * mean_dx_hat_x_hat) * rstd
        if HAS_GRAD_X_OUT:
            dx += tl.load(GRAD_X_OUT + b * stride_dxo_b + n * stride_dxo_n + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            y = tl.load(Y + b * stride_y_b + n * stride_y_n + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(GRAD_Y + b * stride_dy_b + n * stride_dy_n + cols, (dx * gate).to(GRAD_Y.dtype.element_ty), mask=mask)
            acc_gate += dx * y
        tl.store(GRAD_X + b * stride_dx_b + n * stride_dx_n + cols, dx.to(GRAD_X.dtype.element_ty), mask=mask)
        acc_shift += dh
        acc_scale += dh * x_hat

    slot = pid * C + cols
    tl.store(PARTIAL_SHIFT + slot, acc_shift, mask=mask)
    tl.store(PARTIAL_SCALE + slot, acc_scale, mask=mask)
    if HAS_RESIDUAL:
        tl.store(PARTIAL_GATE + slot, acc_gate, mask=mask)


@triton.jit
def _gated_residual_kernel(
    X, Y, GATE, OUT,
    rows, N, C, group_size, groups,
    stride_x_b, stride_x_n, stride_y_b, stride_y_n, stride_gate_b, stride_gate_g, stride_o_b, stride_o_n,
    HAS_Y: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # out = x + gate * y (HAS_Y) or x + gate in fp32, one rounding. A 2-D grid of [BLOCK_ROWS, BLOCK_C] tiles:
    # the gate row is gathered per token (it stays in L1/L2), so broadcasting costs no extra pass as
    # torch.addcmul's does. Token n takes gate row (n // group_size) % groups.
    row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C))[None, :]
    b = (row // N)[:, None]
    n = (row % N)[:, None]
    g = (n // group_size) % groups
    mask = (row < rows)[:, None] & (cols < C)
    x = tl.load(X + b * stride_x_b + n * stride_x_n + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(GATE + b * stride_gate_b + g * stride_gate_g + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_Y:
        y = tl.load(Y + b * stride_y_b + n * stride_y_n + cols, mask=mask, other=0.0).to(tl.float32)
        out = x + gate * y
    else:
        out = x + gate
    tl.store(OUT + b * stride_o_b + n * stride_o_n + cols, out.to(OUT.dtype.element_ty), mask=mask)


GATED_RESIDUAL_BLOCK_C = 256
GATED_RESIDUAL_TILE_ELEMENTS = 4096


def gated_residual(x, y, gate, out, group_size: int | None = None) -> None:
    """``out = x + gate * y`` (y None: ``x + gate``): token tensors ``[B, N, C]``, gate ``[B, G, C]``, all with
    unit channel stride. Token n takes gate row ``(n // group_size) % G``; by default ``group_size = N // G``
    (consecutive groups: per frame, or per sample with G = 1)."""
    B, N, C = x.shape
    groups = gate.shape[1]
    block_c = min(GATED_RESIDUAL_BLOCK_C, triton.next_power_of_2(C))
    block_rows = GATED_RESIDUAL_TILE_ELEMENTS // block_c
    grid = (triton.cdiv(B * N, block_rows), triton.cdiv(C, block_c))
    _gated_residual_kernel[grid](
        x, x if y is None else y, gate, out, B * N, N, C, group_size or N // groups, groups,
        *_strides(x), *_strides(y), *_strides(gate), *_strides(out),
        HAS_Y=y is not None, BLOCK_ROWS=block_rows, BLOCK_C=block_c, num_warps=4,
    )


# Launch shapes tuned on an H100 at bf16 C = 1152 (benchmarks/sweep_adaln.py): two rows of 2048 lanes per
# forward program and four warps for either kernel beat wider tiles and more warps.
FORWARD_TILE_ELEMENTS = 4096


def _num_warps(tile_elements: int) -> int:
    return max(1, min(16, tile_elements // 1024))


def _strides(t: torch.Tensor | None) -> tuple[int, int]:
    return (0, 0) if t is None else (t.stride(0), t.stride(1))


def forward(x, y, gate, shift, scale, h, x_out, mean, rstd, eps: float, *, block_rows=None, num_warps=None) -> None:
    """Launch the forward kernel; the argument list matches ``openvid_kernels._C.adaln_forward``.

    ``block_rows`` and ``num_warps`` override the tuned launch (for ``benchmarks/sweep_adaln.py``).
    """
    B, N, C = x.shape
    G = shift.shape[1]
    block_c = triton.next_power_of_2(C)
    block_rows = block_rows or max(1, FORWARD_TILE_ELEMENTS // block_c)
    residual = y is not None
    _adaln_forward_kernel[(triton.cdiv(B * N, block_rows),)](
        x, y if residual else x, gate if residual else shift, shift, scale, h, x_out if residual else h,
        mean, rstd,
        B * N, N, C, N // G,
        *_strides(x), *_strides(y), *_strides(gate), *_strides(shift), *_strides(scale),
        *_strides(h), *_strides(x_out),
        eps,
        HAS_RESIDUAL=residual,
        BLOCK_ROWS=block_rows,
        BLOCK_C=block_c,
        num_warps=num_warps or _num_warps(block_rows * block_c),
    )


def backward(grad_h, grad_x_out, x_ln, mean, rstd, scale, y, gate, grad_x, grad_y,
             partial_shift, partial_scale, partial_gate, *, num_warps=None) -> None:
    """Launch the backward kernel; the argument list matches ``openvid_kernels._C.adaln_backward``."""
    B, N, C = x_ln.shape
    G, K = partial_shift.shape[1], partial_shift.shape[2]
    group_size = N // G
    block_c = triton.next_power_of_2(C)
    residual = y is not None
    _adaln_backward_kernel[(B * G * K,)](
        grad_h, grad_x_out if grad_x_out is not None else grad_h, x_ln, mean, rstd, scale,
        y if residual else x_ln, gate if residual else scale,
        grad_x, grad_y if residual else grad_x,
        partial_shift, partial_scale, partial_gate if residual else partial_shift,
        N, C, G, K, group_size, triton.cdiv(group_size, K),
        *_strides(grad_h), *_strides(grad_x_out), *_strides(x_ln),
        *_strides(scale), *_strides(y), *_strides(gate),
        *_strides(grad_x), *_strides(grad_y),
        HAS_RESIDUAL=residual,
        HAS_GRAD_X_OUT=grad_x_out is not None,
        BLOCK_C=block_c,
        num_warps=num_warps or _num_warps(2 * block_c),
    )
