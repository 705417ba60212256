"""Triton kernels for attention over many short sequences (see ``openvid_kernels.temporal``).

Layout contract, shared with the CUDA kernels in ``csrc/temporal_attention.cu``:
  * q, k, v, out and their gradients are ``[B, T, S, H, D]`` views with any strides and a unit head-dim
    stride; attention runs over T for every ``(b, s, h)``;
  * ``lse`` (natural log of the softmax denominators, fp32) is a contiguous ``[B, S, H, T]``.

A program takes BLOCK_S consecutive positions of one head and holds their whole sequences (T <= BLOCK_T keys)
in registers, so no online softmax and no second pass are needed. Its BLOCK_S * BLOCK_T rows (row r is frame
r % BLOCK_T of position r // BLOCK_T) form one 2-D tile, and a block-diagonal mask keeps the sequences apart
(with BLOCK_S = 1, the default, there is nothing to mask but padding). Programs of neighbouring heads run side
by side, so together they read whole tokens of the packed qkv layout. Loads and stores move exactly D
elements per row (masked); in registers the head dim is split into a power-of-two main part and a small tail
(72 = 64 + 8, computed as 64 + 16) with up to 2 warps, and padded to the next power of two with more (see
``head_dim_split``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MIN_BLOCK = 16  # smallest block side tl.dot takes


@triton.jit
def _row_offsets(stride_b, stride_t, stride_s, stride_h, b, h, s, t, ROW_ALIGN: tl.constexpr):
    """Element offsets of rows (b, t[r], s[r], h) of a strided [B, T, S, H, D] tensor.

    The strides arrive divided by ROW_ALIGN and are scaled back here: a product with a constant is what lets
    Triton prove every row starts on a ROW_ALIGN-element boundary and use 16-byte loads (a head stride of 72,
    say, is a multiple of 8 but not of the 16 that Triton's argument specialisation detects).
    """
    # int64: a frame stride times T can pass 2**31 elements in large packed tensors.
    rows = b * stride_b + h * stride_h + s.to(tl.int64) * stride_s + t.to(tl.int64) * stride_t
    return rows * ROW_ALIGN


@triton.jit
def _load_rows(ptr, rows, row_mask, D0: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr):
    cols = D0 + tl.arange(0, WIDTH)
    mask = row_mask[:, None] & (cols < HEAD_DIM)[None, :]
    return tl.load(ptr + rows[:, None] + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(ptr, rows, row_mask, value, D0: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr):
    cols = D0 + tl.arange(0, WIDTH)
    mask = row_mask[:, None] & (cols < HEAD_DIM)[None, :]
    tl.store(ptr + rows[:, None] + cols[None, :], value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _temporal_attention_forward_kernel(
    Q, K, V, O, LSE,
    T, S, H,
    stride_q_b, stride_q_t, stride_q_s, stride_q_h,
    stride_k_b, stride_k_t, stride_k_s, stride_k_h,
    stride_v_b, stride_v_t, stride_v_s, stride_v_h,
    stride_o_b, stride_o_t, stride_o_s, stride_o_h,
    scale_log2,
    HEAD_DIM: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, ROW_ALIGN: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    h = pid % H
    b = tl.program_id(1).to(tl.int64)
    r = tl.arange(0, BLOCK_S * BLOCK_T)
    s = (pid // H) * BLOCK_S + r // BLOCK_T
    t = r % BLOCK_T
    row_mask = (s < S) & (t < T)
    # Keys a row may attend: real frames of its own position (every row has one: T >= 1).
    attend = (r[:, None] // BLOCK_T == r[None, :] // BLOCK_T) & (t < T)[None, :]
    q_rows = _row_offsets(stride_q_b, stride_q_t, stride_q_s, stride_q_h, b, h, s, t, ROW_ALIGN)
    k_rows = _row_offsets(stride_k_b, stride_k_t, stride_k_s, stride_k_h, b, h, s, t, ROW_ALIGN)
    v_rows = _row_offsets(stride_v_b, stride_v_t, stride_v_s, stride_v_h, b, h, s, t, ROW_ALIGN)
    o_rows = _row_offsets(stride_o_b, stride_o_t, stride_o_s, stride_o_h, b, h, s, t, ROW_ALIGN)

    q = _load_rows(Q, q_rows, row_mask, 0, D_MAIN, HEAD_DIM)
    k = _load_rows(K, k_rows, row_mask, 0, D_MAIN, HEAD_DIM)
    v = _load_rows(V, v_rows, row_mask, 0, D_MAIN, HEAD_DIM)
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if D_TAIL > 0:
        q_tail = _load_rows(Q, q_rows, row_mask, D_MAIN, D_TAIL, HEAD_DIM)
        k_tail = _load_rows(K, k_rows, row_mask, D_MAIN, D_TAIL, HEAD_DIM)
        v_tail = _load_rows(V, v_rows, row_mask, D_MAIN, D_TAIL, HEAD_DIM)
        scores += tl.dot(q_tail, tl.trans(k_tail), input_precision=PRECISION)

    # Softmax over the keys, in base 2.
    scores = tl.where(attend, scores * scale_log2, float("-inf"))
    row_max = tl.max(scores, axis=1)
    p = tl.exp2(scores - row_max[:, None])
    denom = tl.sum(p, axis=1)
    p = (p / denom[:, None]).to(V.dtype.element_ty)

    _store_rows(O, o_rows, row_mask, tl.dot(p, v, input_precision=PRECISION), 0, D_MAIN, HEAD_DIM)
    if D_TAIL > 0:
        _store_rows(O, o_rows, row_mask, tl.dot(p, v_tail, input_precision=PRECISION), D_MAIN, D_TAIL, HEAD_DIM)
    lse = (row_max + tl.log2(denom)) / 1.4426950408889634  # natural log
    tl.store(LSE + ((b * S + s) * H + h) * T + t, lse, mask=row_mask)


@triton.jit
def _temporal_attention_backward_kernel(
    DO, Q, K, V, O, LSE, DQ, DK, DV,
    T, S, H,
    stride_do_b, stride_do_t, stride_do_s, stride_do_h,
    stride_q_b, stride_q_t, stride_q_s, stride_q_h,
    stride_k_b, stride_k_t, stride_k_s, stride_k_h,
    stride_v_b, stride_v_t, stride_v_s, stride_v_h,
    stride_o_b, stride_o_t, stride_o_s, stride_o_h,
    stride_dq_b, stride_dq_t, stride_dq_s, stride_dq_h,
    stride_dk_b, stride_dk_t, stride_dk_s, stride_dk_h,
    stride_dv_b, stride_dv_t, stride_dv_s, stride_dv_h,
    softmax_scale, scale_log2,
    HEAD_DIM: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, ROW_ALIGN: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    h = pid % H
    b = tl.program_id(1).to(tl.int64)
    r = tl.arange(0, BLOCK_S * BLOCK_T)
    s = (pid // H) * BLOCK_S + r // BLOCK_T
    t = r % BLOCK_T
    row_mask = (s < S) & (t < T)
    attend = (r[:, None] // BLOCK_T == r[None, :] // BLOCK_T) & (t < T)[None, :] & row_mask[:, None]
    do_rows = _row_offsets(stride_do_b, stride_do_t, stride_do_s, stride_do_h, b, h, s, t, ROW_ALIGN)
    q_rows = _row_offsets(stride_q_b, stride_q_t, stride_q_s, stride_q_h, b, h, s, t, ROW_ALIGN)
    k_rows = _row_offsets(stride_k_b, stride_k_t, stride_k_s, stride_k_h, b, h, s, t, ROW_ALIGN)
    v_rows = _row_offsets(stride_v_b, stride_v_t, stride_v_s, stride_v_h, b, h, s, t, ROW_ALIGN)
    o_rows = _row_offsets(stride_o_b, stride_o_t, stride_o_s, stride_o_h, b, h, s, t, ROW_ALIGN)

    do = _load_rows(DO, do_rows, row_mask, 0, D_MAIN, HEAD_DIM)
    o = _load_rows(O, o_rows, row_mask, 0, D_MAIN, HEAD_DIM)
    q = _load_rows(Q, q_rows, row_mask, 0, D_MAIN, HEAD_DIM)
    k = _load_rows(K, k_rows, row_mask, 0, D_MAIN, HEAD_DIM)
    v = _load_rows(V, v_rows, row_mask, 0, D_MAIN, HEAD_DIM)
    lse = tl.load(LSE + ((b * S + s) * H + h) * T + t, mask=row_mask, other=0.0) * 1.4426950408889634
    # delta_t = sum_d dO[t, d] * O[t, d]: the softmax Jacobian's row term, from O as stored.
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    if D_TAIL > 0:
        do_tail = _load_rows(DO, do_rows, row_mask, D_MAIN, D_TAIL, HEAD_DIM)
        o_tail = _load_rows(O, o_rows, row_mask, D_MAIN, D_TAIL, HEAD_DIM)
        q_tail = _load_rows(Q, q_rows, row_mask, D_MAIN, D_TAIL, HEAD_DIM)
        k_tail = _load_rows(K, k_rows, row_mask, D_MAIN, D_TAIL, HEAD_DIM)
        v_tail = _load_rows(V, v_rows, row_mask, D_MAIN, D_TAIL, HEAD_DIM)
        delta += tl.sum(do_tail.to(tl.float32) * o_tail.to(tl.float32), axis=1)
        scores += tl.dot(q_tail, tl.trans(k_tail), input_precision=PRECISION)
        dp += tl.dot(do_tail, tl.trans(v_tail), input_precision=PRECISION)

    # P recomputed from the saved log-sum-exp; padded rows, padded keys and other positions get 0.
    p = tl.where(attend, tl.exp2(scores * scale_log2 - lse[:, None]), 0.0)
    ds = (p * (dp - delta[:, None])).to(Q.dtype.element_ty)
    p = p.to(DO.dtype.element_ty)

    dq_rows = _row_offsets(stride_dq_b, stride_dq_t, stride_dq_s, stride_dq_h, b, h, s, t, ROW_ALIGN)
    dk_rows = _row_offsets(stride_dk_b, stride_dk_t, stride_dk_s, stride_dk_h, b, h, s, t, ROW_ALIGN)
    dv_rows = _row_offsets(stride_dv_b, stride_dv_t, stride_dv_s, stride_dv_h, b, h, s, t, ROW_ALIGN)
    p_t, ds_t = tl.trans(p), tl.trans(ds)
    _store_rows(DV, dv_rows, row_mask, tl.dot(p_t, do, input_precision=PRECISION), 0, D_MAIN, HEAD_DIM)
    dq = tl.dot(ds, k, input_precision=PRECISION) * softmax_scale
    _store_rows(DQ, dq_rows, row_mask, dq, 0, D_MAIN, HEAD_DIM)
    dk = tl.dot(ds_t, q, input_precision=PRECISION) * softmax_scale
    _store_rows(DK, dk_rows, row_mask, dk, 0, D_MAIN, HEAD_DIM)
    if D_TAIL > 0:
        _store_rows(DV, dv_rows, row_mask, tl.dot(p_t, do_tail, input_precision=PRECISION), D_MAIN, D_TAIL, HEAD_DIM)
        dq_tail = tl.dot(ds, k_tail, input_precision=PRECISION) * softmax_scale
        _store_rows(DQ, dq_rows, row_mask, dq_tail, D_MAIN, D_TAIL, HEAD_DIM)
        dk_tail = tl.dot(ds_t, q_tail, input_precision=PRECISION) * softmax_scale
        _store_rows(DK, dk_rows, row_mask, dk_tail, D_MAIN, D_TAIL, HEAD_DIM)


# ---------------------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------------------

def head_dim_split(head_dim: int, num_warps: int) -> tuple[int, int]:
    """(main, tail) power-of-two widths covering ``head_dim`` (tail 0: none), e.g. 72 -> (64, 16).

    The split is used with at most 2 warps: with more, tiles of 64+ rows and a 16-wide tail product were seen
    to fault (illegal address) under triton 3.6 on an H100; there the head dim is padded in registers instead
    (memory traffic is the same, only the tensor-core work grows).
    """
    padded = max(MIN_BLOCK, triton.next_power_of_2(head_dim))
    main = max(MIN_BLOCK, 1 << (head_dim.bit_length() - 1))
    if num_warps > 2 or main >= head_dim:
        return padded, 0
    tail = max(MIN_BLOCK, triton.next_power_of_2(head_dim - main))
    return (padded, 0) if tail == main else (main, tail)


# Rows (BLOCK_S * BLOCK_T) of one program and its warps, by BLOCK_T and direction, measured on an H100 (bf16,
# H = 16, D = 72; benchmarks/sweep_temporal.py): at T = 16 four sequences per program for the forward
# (2.47 TB/s) and two for the backward (2.43 TB/s).
_CONFIGS = {
    "forward": {16: (64, 4), 32: (64, 4), 64: (64, 4), 128: (128, 4)},
    "backward": {16: (32, 4), 32: (32, 4), 64: (64, 4), 128: (128, 8)},
}


def launch_config(T: int, D: int, direction: str, block_rows: int | None = None, num_warps: int | None = None):
    """(BLOCK_S, BLOCK_T, num_warps, D_MAIN, D_TAIL) for sequences of length T and head dim D (block_rows /
    num_warps override the table)."""
    block_t = max(MIN_BLOCK, triton.next_power_of_2(T))
    rows, warps = _CONFIGS[direction][block_t]
    block_s = max(1, (block_rows or rows) // block_t)
    warps = num_warps or warps
    return (block_s, block_t, warps, *head_dim_split(D, warps))


def _row_align(*tensors: torch.Tensor) -> int:
    """Largest of 8, 4, 2, 1 elements that divides every stride and every data pointer (in elements)."""
    for align in (8, 4, 2):
        if all(t.data_ptr() % (align * t.element_size()) == 0 and all(st % align == 0 for st in t.stride()[:4])
               for t in tensors):
            return align
    return 1


def _strides(t: torch.Tensor, align: int) -> tuple[int, int, int, int]:
    return tuple(st // align for st in t.stride()[:4])


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit operands


def forward(q, k, v, out, lse, softmax_scale: float, block_rows: int | None = None, num_warps: int | None = None):
    """Writes out [B, T, S, H, D] and lse [B, S, H, T]; same signature as ``_C.temporal_attention_forward``
    (plus tuning overrides)."""
    B, T, S, H, D = q.shape
    block_s, block_t, warps, d_main, d_tail = launch_config(T, D, "forward", block_rows, num_warps)
    grid = (triton.cdiv(S, block_s) * H, B)
    align = _row_align(q, k, v, out)
    _temporal_attention_forward_kernel[grid](
        q, k, v, out, lse, T, S, H,
        *(st for t in (q, k, v, out) for st in _strides(t, align)),
        softmax_scale * LOG2E,
        HEAD_DIM=D, D_MAIN=d_main, D_TAIL=d_tail, BLOCK_S=block_s, BLOCK_T=block_t, ROW_ALIGN=align,
        PRECISION=_precision(q.dtype), num_warps=warps,
    )


def backward(dout, q, k, v, out, lse, dq, dk, dv, softmax_scale: float,
             block_rows: int | None = None, num_warps: int | None = None):
    """Writes dq, dk, dv [B, T, S, H, D]; same signature as ``_C.temporal_attention_backward``."""
    B, T, S, H, D = q.shape
    block_s, block_t, warps, d_main, d_tail = launch_config(T, D, "backward", block_rows, num_warps)
    grid = (triton.cdiv(S, block_s) * H, B)
    align = _row_align(dout, q, k, v, out, dq, dk, dv)
    _temporal_attention_backward_kernel[grid](
        dout, q, k, v, out, lse, dq, dk, dv, T, S, H,
        *(st for t in (dout, q, k, v, out, dq, dk, dv) for st in _strides(t, align)),
        softmax_scale, softmax_scale * LOG2E,
        HEAD_DIM=D, D_MAIN=d_main, D_TAIL=d_tail, BLOCK_S=block_s, BLOCK_T=block_t, ROW_ALIGN=align,
        PRECISION=_precision(q.dtype), num_warps=warps,
    )
