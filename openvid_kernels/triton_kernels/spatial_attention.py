"""Triton kernels for attention over long sequences (see ``openvid_kernels.spatial``), FlashAttention-2 style.

Layout contract, shared with the CUDA kernels in ``csrc/spatial_attention.cu``:
  * q, out, dout, dq are ``[B, Sq, H, D]`` and k, v, dk, dv ``[B, Sk, H, D]`` views with any strides and a unit
    head-dim stride (q, k, v usually views of one packed ``[B, S, 3, H, D]`` qkv projection output);
  * ``lse`` (natural log of the softmax denominators, fp32) is a contiguous ``[B, H, Sq]``.

A forward program owns BLOCK_M query rows of one (b, h) and streams the keys in blocks of BLOCK_N with an
online softmax. The backward runs a dK/dV kernel (a program per key block, streaming the queries) and a dQ
kernel (a program per query block, streaming the keys), so no atomics are needed.

Head dims that are not a power of two are never padded to one. Tiles split the head dim into a power-of-two
main part and a small power-of-two tail window (72 = 64 + the last 16 columns; 96 = 64 + 32): every product
over the head dim is two products, and every product into the head dim two accumulators, so at D = 72 the
tensor cores do 80 columns of work, not 128.

Loads and stores carry no row masks (masked 16-wide tiles and a peeled last block both faulted under triton
3.6 on an H100): rows past a sequence's end are clamped to its last row, so they recompute and rewrite that
row's values exactly, and their keys are masked out of the softmax. The head dim's tail window overlaps the
main part instead of running past the row. When the length is a multiple of the block (256, 1024, 4096), the
loop carries no bounds work at all (MASK_KEYS / MASK_QUERIES are compile-time).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MIN_BLOCK = 16  # smallest block side tl.dot takes
# Triton would compile a length of 1 as a constant, unrolling the one-trip loop; its operands then skip the
# software pipeline, and a 16-wide tail operand staged through registers with 4+ warps faulted (illegal
# address) under triton 3.6 on an H100. Lengths stay run-time values.
_LENGTHS = ["Sq", "Sk"]


@triton.jit
def _row_offsets(stride_b, stride_s, stride_h, b, h, s, ROW_ALIGN: tl.constexpr):
    """Element offsets of rows (b, s[r], h) of a strided [B, S, H, D] tensor.

    The strides arrive divided by ROW_ALIGN and are scaled back here, which lets Triton prove that every row
    starts on a ROW_ALIGN-element boundary and use 16-byte accesses (a head stride of 72 elements is a multiple
    of 8, not of the 16 that Triton's argument specialisation detects).
    """
    return (b * stride_b + h * stride_h + s.to(tl.int64) * stride_s) * ROW_ALIGN


@triton.jit
def _load(ptr, rows, D0: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Columns [D0, D0 + WIDTH) of the given rows. Only head dims below MIN_BLOCK need a column mask."""
    cols = D0 + tl.arange(0, WIDTH)
    ptrs = ptr + rows[:, None] + cols[None, :]
    if D0 + WIDTH <= HEAD_DIM:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=(cols < HEAD_DIM)[None, :], other=0.0)


@triton.jit
def _load_tail(ptr, rows, HEAD_DIM: tl.constexpr, D_TAIL: tl.constexpr, TAIL_TILE: tl.constexpr):
    """The tail window, the last TAIL_TILE columns of the head dim (zeros without a tail). It overlaps the main
    part (72: columns 56..71) so that no load needs a mask; products over the head dim zero the overlap in one
    operand (``_zero_overlap``), and stores skip it."""
    if D_TAIL > 0:
        return _load(ptr, rows, HEAD_DIM - TAIL_TILE, TAIL_TILE, HEAD_DIM)
    return tl.zeros([rows.shape[0], TAIL_TILE], dtype=ptr.dtype.element_ty)


@triton.jit
def _zero_overlap(tail, HEAD_DIM: tl.constexpr, D_MAIN: tl.constexpr, TAIL_TILE: tl.constexpr):
    cols = HEAD_DIM - TAIL_TILE + tl.arange(0, TAIL_TILE)
    return tl.where((cols >= D_MAIN)[None, :], tail, 0.0)


@triton.jit
def _store(ptr, rows, value, value_tail, HEAD_DIM: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr,
           TAIL_TILE: tl.constexpr):
    """Stores the main part and the tail window's columns past the main part (each column once). Rows past the
    sequence end arrive clamped to its last row, whose values they repeat exactly (same inputs, same
    arithmetic), so they need no mask."""
    cols = tl.arange(0, D_MAIN)
    if D_MAIN <= HEAD_DIM:
        tl.store(ptr + rows[:, None] + cols[None, :], value.to(ptr.dtype.element_ty))
    else:
        tl.store(ptr + rows[:, None] + cols[None, :], value.to(ptr.dtype.element_ty),
                 mask=(cols < HEAD_DIM)[None, :])
    if D_TAIL > 0:
        cols = HEAD_DIM - TAIL_TILE + tl.arange(0, TAIL_TILE)
        tl.store(ptr + rows[:, None] + cols[None, :], value_tail.to(ptr.dtype.element_ty),
                 mask=(cols >= D_MAIN)[None, :])


@triton.jit
def _clamped(start, BLOCK: tl.constexpr, length):
    """Indices start..start+BLOCK-1 with those past the sequence end pointing at its last row, so that every
    load stays in bounds without a mask (their results are masked out of the softmax or never stored)."""
    return tl.minimum(start + tl.arange(0, BLOCK), length - 1)


# ---------------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------------

@triton.jit
def _forward_step(q, q_tail, acc, acc_tail, m_i, l_i, K, V, k_rows, v_rows, n, Sk, scale_log2,
                  HEAD_DIM: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr, TAIL_TILE: tl.constexpr,
                  MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """One key block of the online softmax (base 2, scale folded into the exponent)."""
    k = _load(K, k_rows, 0, D_MAIN, HEAD_DIM)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if D_TAIL > 0:
        k_tail = _load_tail(K, k_rows, HEAD_DIM, D_TAIL, TAIL_TILE)
        s = tl.dot(q_tail, tl.trans(k_tail), s, input_precision=PRECISION)
    s = s * scale_log2
    if MASKED:
        s = tl.where((n < Sk)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    p = p.to(V.dtype.element_ty)
    acc = tl.dot(p, _load(V, v_rows, 0, D_MAIN, HEAD_DIM), acc * alpha[:, None], input_precision=PRECISION)
    if D_TAIL > 0:
        v_tail = _load_tail(V, v_rows, HEAD_DIM, D_TAIL, TAIL_TILE)
        acc_tail = tl.dot(p, v_tail, acc_tail * alpha[:, None], input_precision=PRECISION)
    return acc, acc_tail, m_new, l_i


@triton.jit(do_not_specialize=_LENGTHS)
def _attention_forward_kernel(
    Q, K, V, O, LSE,
    Sq, Sk, H,
    stride_q_b, stride_q_s, stride_q_h,
    stride_k_b, stride_k_s, stride_k_h,
    stride_v_b, stride_v_s, stride_v_h,
    stride_o_b, stride_o_s, stride_o_h,
    scale_log2,
    HEAD_DIM: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr, TAIL_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROW_ALIGN: tl.constexpr, PRECISION: tl.constexpr,
    MASK_KEYS: tl.constexpr,
):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    m = _clamped(tl.program_id(0) * BLOCK_M, BLOCK_M, Sq)
    q_rows = _row_offsets(stride_q_b, stride_q_s, stride_q_h, b, h, m, ROW_ALIGN)
    q = _load(Q, q_rows, 0, D_MAIN, HEAD_DIM)
    q_tail = _zero_overlap(_load_tail(Q, q_rows, HEAD_DIM, D_TAIL, TAIL_TILE),
                           HEAD_DIM, D_MAIN, TAIL_TILE)  # unused without a tail

    acc = tl.zeros([BLOCK_M, D_MAIN], dtype=tl.float32)
    acc_tail = tl.zeros([BLOCK_M, TAIL_TILE], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, Sk, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        rows = _clamped(start, BLOCK_N, Sk) if MASK_KEYS else n
        k_rows = _row_offsets(stride_k_b, stride_k_s, stride_k_h, b, h, rows, ROW_ALIGN)
        v_rows = _row_offsets(stride_v_b, stride_v_s, stride_v_h, b, h, rows, ROW_ALIGN)
        acc, acc_tail, m_i, l_i = _forward_step(q, q_tail, acc, acc_tail, m_i, l_i, K, V, k_rows, v_rows, n, Sk,
                                                scale_log2, HEAD_DIM, D_MAIN, D_TAIL, TAIL_TILE, MASK_KEYS, PRECISION)

    o_rows = _row_offsets(stride_o_b, stride_o_s, stride_o_h, b, h, m, ROW_ALIGN)
    _store(O, o_rows, acc / l_i[:, None], acc_tail / l_i[:, None], HEAD_DIM, D_MAIN, D_TAIL, TAIL_TILE)
    tl.store(LSE + bh.to(tl.int64) * Sq + m, (m_i + tl.log2(l_i)) / 1.4426950408889634)


# ---------------------------------------------------------------------------------------------------------
# Backward: delta = rowsum(dO * O), then dK/dV over key blocks and dQ over query blocks.
# ---------------------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["Sq"])
def _attention_backward_delta_kernel(
    DO, O, DELTA, Sq, H,
    stride_do_b, stride_do_s, stride_do_h,
    stride_o_b, stride_o_s, stride_o_h,
    HEAD_DIM: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr, TAIL_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, ROW_ALIGN: tl.constexpr,
):
    """delta[b, h, m] = sum_d dO * O (fp32, from O as stored): the softmax Jacobian's row term."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    m = _clamped(tl.program_id(0) * BLOCK_M, BLOCK_M, Sq)
    do_rows = _row_offsets(stride_do_b, stride_do_s, stride_do_h, b, h, m, ROW_ALIGN)
    o_rows = _row_offsets(stride_o_b, stride_o_s, stride_o_h, b, h, m, ROW_ALIGN)
    do = _load(DO, do_rows, 0, D_MAIN, HEAD_DIM).to(tl.float32)
    delta = tl.sum(do * _load(O, o_rows, 0, D_MAIN, HEAD_DIM).to(tl.float32), axis=1)
    if D_TAIL > 0:
        do_tail = _load_tail(DO, do_rows, HEAD_DIM, D_TAIL, TAIL_TILE).to(tl.float32)
        o_tail = _load_tail(O, o_rows, HEAD_DIM, D_TAIL, TAIL_TILE).to(tl.float32)
        delta += tl.sum(_zero_overlap(do_tail * o_tail, HEAD_DIM, D_MAIN, TAIL_TILE), axis=1)
    tl.store(DELTA + bh.to(tl.int64) * Sq + m, delta)


@triton.jit
def _dkdv_step(k, k_tail, v, v_tail, dk, dk_tail, dv, dv_tail, Q, DO, LSE, DELTA, q_rows, do_rows, stats,
               m, Sq, scale_log2,
               HEAD_DIM: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr, TAIL_TILE: tl.constexpr,
               MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """One query block's contribution to a key block's dK and dV (transposed scores, [BLOCK_N, BLOCK_M]).
    ``stats`` indexes lse and delta (clamped like the rows); ``m`` are the true query indices."""
    lse = tl.load(LSE + stats) * 1.4426950408889634
    if MASKED:
        lse = tl.where(m < Sq, lse, float("inf"))  # padded queries: P = 0
    delta = tl.load(DELTA + stats)
    q = _load(Q, q_rows, 0, D_MAIN, HEAD_DIM)
    do = _load(DO, do_rows, 0, D_MAIN, HEAD_DIM)
    s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    if D_TAIL > 0:
        q_tail = _load_tail(Q, q_rows, HEAD_DIM, D_TAIL, TAIL_TILE)
        do_tail = _load_tail(DO, do_rows, HEAD_DIM, D_TAIL, TAIL_TILE)
        s_t = tl.dot(k_tail, tl.trans(q_tail), s_t, input_precision=PRECISION)
        dp_t = tl.dot(v_tail, tl.trans(do_tail), dp_t, input_precision=PRECISION)
    p_t = tl.exp2(s_t * scale_log2 - lse[None, :])
    ds_t = (p_t * (dp_t - delta[None, :])).to(Q.dtype.element_ty)
    p_t = p_t.to(DO.dtype.element_ty)
    dv = tl.dot(p_t, do, dv, input_precision=PRECISION)
    dk = tl.dot(ds_t, q, dk, input_precision=PRECISION)
    if D_TAIL > 0:
        dv_tail = tl.dot(p_t, do_tail, dv_tail, input_precision=PRECISION)
        dk_tail = tl.dot(ds_t, q_tail, dk_tail, input_precision=PRECISION)
    return dk, dk_tail, dv, dv_tail


@triton.jit(do_not_specialize=_LENGTHS)
def _attention_backward_dkdv_kernel(
    DO, Q, K, V, LSE, DELTA, DK, DV,
    Sq, Sk, H,
    stride_do_b, stride_do_s, stride_do_h,
    stride_q_b, stride_q_s, stride_q_h,
    stride_k_b, stride_k_s, stride_k_h,
    stride_v_b, stride_v_s, stride_v_h,
    stride_dk_b, stride_dk_s, stride_dk_h,
    stride_dv_b, stride_dv_s, stride_dv_h,
    softmax_scale, scale_log2,
    HEAD_DIM: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr, TAIL_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROW_ALIGN: tl.constexpr, PRECISION: tl.constexpr,
    MASK_QUERIES: tl.constexpr,
):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    stats = bh.to(tl.int64) * Sq
    n = _clamped(tl.program_id(0) * BLOCK_N, BLOCK_N, Sk)
    k_rows = _row_offsets(stride_k_b, stride_k_s, stride_k_h, b, h, n, ROW_ALIGN)
    v_rows = _row_offsets(stride_v_b, stride_v_s, stride_v_h, b, h, n, ROW_ALIGN)
    k = _load(K, k_rows, 0, D_MAIN, HEAD_DIM)
    v = _load(V, v_rows, 0, D_MAIN, HEAD_DIM)
    k_tail = _zero_overlap(_load_tail(K, k_rows, HEAD_DIM, D_TAIL, TAIL_TILE),
                           HEAD_DIM, D_MAIN, TAIL_TILE)
    v_tail = _zero_overlap(_load_tail(V, v_rows, HEAD_DIM, D_TAIL, TAIL_TILE),
                           HEAD_DIM, D_MAIN, TAIL_TILE)
    dk = tl.zeros([BLOCK_N, D_MAIN], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_MAIN], dtype=tl.float32)
    dk_tail = tl.zeros([BLOCK_N, TAIL_TILE], dtype=tl.float32)
    dv_tail = tl.zeros([BLOCK_N, TAIL_TILE], dtype=tl.float32)

    for start in range(0, Sq, BLOCK_M):
        m = start + tl.arange(0, BLOCK_M)
        rows = _clamped(start, BLOCK_M, Sq) if MASK_QUERIES else m
        q_rows = _row_offsets(stride_q_b, stride_q_s, stride_q_h, b, h, rows, ROW_ALIGN)
        do_rows = _row_offsets(stride_do_b, stride_do_s, stride_do_h, b, h, rows, ROW_ALIGN)
        dk, dk_tail, dv, dv_tail = _dkdv_step(
            k, k_tail, v, v_tail, dk, dk_tail, dv, dv_tail, Q, DO, LSE, DELTA, q_rows, do_rows, stats + rows, m, Sq,
            scale_log2, HEAD_DIM, D_MAIN, D_TAIL, TAIL_TILE, MASK_QUERIES, PRECISION)

    dk_rows = _row_offsets(stride_dk_b, stride_dk_s, stride_dk_h, b, h, n, ROW_ALIGN)
    dv_rows = _row_offsets(stride_dv_b, stride_dv_s, stride_dv_h, b, h, n, ROW_ALIGN)
    _store(DK, dk_rows, dk * softmax_scale, dk_tail * softmax_scale, HEAD_DIM, D_MAIN, D_TAIL, TAIL_TILE)
    _store(DV, dv_rows, dv, dv_tail, HEAD_DIM, D_MAIN, D_TAIL, TAIL_TILE)


@triton.jit
def _dq_step(q, q_tail, do, do_tail, lse, delta, dq, dq_tail, K, V, k_rows, v_rows, n, Sk, scale_log2,
             HEAD_DIM: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr, TAIL_TILE: tl.constexpr,
             MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """One key block's contribution to a query block's dQ."""
    k = _load(K, k_rows, 0, D_MAIN, HEAD_DIM)
    v = _load(V, v_rows, 0, D_MAIN, HEAD_DIM)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    if D_TAIL > 0:
        k_tail = _load_tail(K, k_rows, HEAD_DIM, D_TAIL, TAIL_TILE)
        v_tail = _load_tail(V, v_rows, HEAD_DIM, D_TAIL, TAIL_TILE)
        s = tl.dot(q_tail, tl.trans(k_tail), s, input_precision=PRECISION)
        dp = tl.dot(do_tail, tl.trans(v_tail), dp, input_precision=PRECISION)
    p = tl.exp2(s * scale_log2 - lse[:, None])
    if MASKED:
        p = tl.where((n < Sk)[None, :], p, 0.0)
    ds = (p * (dp - delta[:, None])).to(K.dtype.element_ty)
    dq = tl.dot(ds, k, dq, input_precision=PRECISION)
    if D_TAIL > 0:
        dq_tail = tl.dot(ds, k_tail, dq_tail, input_precision=PRECISION)
    return dq, dq_tail


@triton.jit(do_not_specialize=_LENGTHS)
def _attention_backward_dq_kernel(
    DO, Q, K, V, LSE, DELTA, DQ,
    Sq, Sk, H,
    stride_do_b, stride_do_s, stride_do_h,
    stride_q_b, stride_q_s, stride_q_h,
    stride_k_b, stride_k_s, stride_k_h,
    stride_v_b, stride_v_s, stride_v_h,
    stride_dq_b, stride_dq_s, stride_dq_h,
    softmax_scale, scale_log2,
    HEAD_DIM: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr, TAIL_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROW_ALIGN: tl.constexpr, PRECISION: tl.constexpr,
    MASK_KEYS: tl.constexpr,
):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    m = _clamped(tl.program_id(0) * BLOCK_M, BLOCK_M, Sq)
    q_rows = _row_offsets(stride_q_b, stride_q_s, stride_q_h, b, h, m, ROW_ALIGN)
    do_rows = _row_offsets(stride_do_b, stride_do_s, stride_do_h, b, h, m, ROW_ALIGN)
    q = _load(Q, q_rows, 0, D_MAIN, HEAD_DIM)
    do = _load(DO, do_rows, 0, D_MAIN, HEAD_DIM)
    q_tail = _zero_overlap(_load_tail(Q, q_rows, HEAD_DIM, D_TAIL, TAIL_TILE),
                           HEAD_DIM, D_MAIN, TAIL_TILE)
    do_tail = _zero_overlap(_load_tail(DO, do_rows, HEAD_DIM, D_TAIL, TAIL_TILE),
                            HEAD_DIM, D_MAIN, TAIL_TILE)
    stats = bh.to(tl.int64) * Sq + m
    lse = tl.load(LSE + stats) * 1.4426950408889634
    delta = tl.load(DELTA + stats)
    dq = tl.zeros([BLOCK_M, D_MAIN], dtype=tl.float32)
    dq_tail = tl.zeros([BLOCK_M, TAIL_TILE], dtype=tl.float32)

    for start in range(0, Sk, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        rows = _clamped(start, BLOCK_N, Sk) if MASK_KEYS else n
        k_rows = _row_offsets(stride_k_b, stride_k_s, stride_k_h, b, h, rows, ROW_ALIGN)
        v_rows = _row_offsets(stride_v_b, stride_v_s, stride_v_h, b, h, rows, ROW_ALIGN)
        dq, dq_tail = _dq_step(q, q_tail, do, do_tail, lse, delta, dq, dq_tail, K, V, k_rows, v_rows, n, Sk,
                               scale_log2, HEAD_DIM, D_MAIN, D_TAIL, TAIL_TILE, MASK_KEYS, PRECISION)

    dq_rows = _row_offsets(stride_dq_b, stride_dq_s, stride_dq_h, b, h, m, ROW_ALIGN)
    _store(DQ, dq_rows, dq * softmax_scale, dq_tail * softmax_scale, HEAD_DIM, D_MAIN, D_TAIL, TAIL_TILE)


# ---------------------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------------------

def head_dim_split(head_dim: int) -> tuple[int, int]:
    """(main, tail) power-of-two widths covering ``head_dim`` (tail 0: none): 72 -> (64, 16), 96 -> (64, 32),
    120 -> (64, 64), 64 -> (64, 0). The tail window is the last ``tail`` columns, overlapping the main part
    where ``main + tail > head_dim``; head dims below MIN_BLOCK take one masked tile."""
    main = max(MIN_BLOCK, 1 << (head_dim.bit_length() - 1))
    if main >= head_dim:
        return main, 0
    return main, max(MIN_BLOCK, triton.next_power_of_2(head_dim - main))


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per direction, by padded head-dim width.
_CONFIGS = {
    "forward": {64: (128, 64, 4, 3), 80: (128, 64, 4, 3), 96: (128, 64, 4, 3), 128: (128, 64, 8, 3)},
    "dkdv": {64: (64, 64, 4, 3), 80: (64, 64, 4, 3), 96: (64, 64, 4, 3), 128: (64, 64, 4, 3)},
    "dq": {64: (64, 64, 4, 2), 80: (64, 64, 4, 2), 96: (64, 64, 4, 2), 128: (64, 64, 4, 2)},
}
_INTERPRETER_CONFIG = (16, 16, 1, 1)  # small tiles keep the CPU interpreter fast and exercise many blocks


def launch_config(head_dim: int, kind: str, device: torch.device, override: tuple | None = None):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a kernel ("forward", "dkdv", "dq")."""
    if override is not None:
        return override
    if device.type != "cuda":
        return _INTERPRETER_CONFIG
    main, tail = head_dim_split(head_dim)
    width = main + tail
    return _CONFIGS[kind][min((w for w in _CONFIGS[kind] if w >= width), default=128)]


def _head_dims(head_dim: int) -> dict[str, int]:
    main, tail = head_dim_split(head_dim)
    return dict(HEAD_DIM=head_dim, D_MAIN=main, D_TAIL=tail, TAIL_TILE=max(tail, MIN_BLOCK))


def _row_align(*tensors: torch.Tensor) -> int:
    """Largest of 8, 4, 2, 1 elements that divides every stride and every data pointer (in elements)."""
    for align in (8, 4, 2):
        if all(t.data_ptr() % (align * t.element_size()) == 0 and all(st % align == 0 for st in t.stride()[:3])
               for t in tensors):
            return align
    return 1


def _strides(tensors, align: int) -> list[int]:
    return [st // align for t in tensors for st in t.stride()[:3]]


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit operands


def forward(q, k, v, out, lse, softmax_scale: float, config: tuple | None = None):
    """Writes out [B, Sq, H, D] and lse [B, H, Sq]; same signature as ``_C.spatial_attention_forward`` (plus
    a (BLOCK_M, BLOCK_N, num_warps, num_stages) override for tuning)."""
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    block_m, block_n, warps, stages = launch_config(D, "forward", q.device, config)
    align = _row_align(q, k, v, out)
    _attention_forward_kernel[(triton.cdiv(Sq, block_m), B * H)](
        q, k, v, out, lse, Sq, Sk, H, *_strides((q, k, v, out), align), softmax_scale * LOG2E,
        **_head_dims(D), BLOCK_M=block_m, BLOCK_N=block_n, ROW_ALIGN=align, PRECISION=_precision(q.dtype),
        MASK_KEYS=Sk % block_n != 0, num_warps=warps, num_stages=stages,
    )


def backward(dout, q, k, v, out, lse, dq, dk, dv, softmax_scale: float,
             dkdv_config: tuple | None = None, dq_config: tuple | None = None):
    """Writes dq [B, Sq, H, D], dk and dv [B, Sk, H, D]; same signature as ``_C.spatial_attention_backward``."""
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    heads = _head_dims(D)
    delta = torch.empty(B, H, Sq, dtype=torch.float32, device=q.device)
    align = _row_align(dout, out)
    delta_rows = 64 if q.device.type == "cuda" else 16
    _attention_backward_delta_kernel[(triton.cdiv(Sq, delta_rows), B * H)](
        dout, out, delta, Sq, H, *_strides((dout, out), align), **heads, BLOCK_M=delta_rows, ROW_ALIGN=align,
    )

    align = _row_align(dout, q, k, v, dq, dk, dv)
    precision = _precision(q.dtype)
    block_m, block_n, warps, stages = launch_config(D, "dkdv", q.device, dkdv_config)
    _attention_backward_dkdv_kernel[(triton.cdiv(Sk, block_n), B * H)](
        dout, q, k, v, lse, delta, dk, dv, Sq, Sk, H, *_strides((dout, q, k, v, dk, dv), align),
        softmax_scale, softmax_scale * LOG2E, **heads, BLOCK_M=block_m, BLOCK_N=block_n, ROW_ALIGN=align,
        PRECISION=precision, MASK_QUERIES=Sq % block_m != 0, num_warps=warps, num_stages=stages,
    )
    block_m, block_n, warps, stages = launch_config(D, "dq", q.device, dq_config)
    _attention_backward_dq_kernel[(triton.cdiv(Sq, block_m), B * H)](
        dout, q, k, v, lse, delta, dq, Sq, Sk, H, *_strides((dout, q, k, v, dq), align),
        softmax_scale, softmax_scale * LOG2E, **heads, BLOCK_M=block_m, BLOCK_N=block_n, ROW_ALIGN=align,
        PRECISION=precision, MASK_KEYS=Sk % block_n != 0, num_warps=warps, num_stages=stages,
    )
