"""Triton kernels for attention over long sequences, FlashAttention-2 style. The spatial, cross and joint
attention ops (``openvid_kernels.spatial``, ``.cross``, ``.joint``) run on them.

Tokens. A launch attends one run of queries to up to two runs of keys. Every run is a strided ``[B, S, H, D]``
view with a unit head-dim stride (any other strides, e.g. q, k, v of one packed qkv projection output):
  * fixed keys k, v ``[B, Sk, H, D]``, every row real (Sk may be 0);
  * text keys ``[B, L, H, D]`` whose first ``lens[b]`` rows are real, or, packed, rows ``starts[b] ..
    starts[b] + lens[b] - 1`` of a ``[1, total, H, D]`` view. Rows past a length are never read, and key blocks
    wholly past it are skipped;
  * queries q, out ``[B, Sq, H, D]``: every row real, or (text queries) the first ``lens[b]`` rows of padded
    text tokens, the others neither read nor written.
Spatial attention is queries against fixed keys; cross-attention queries against text keys; MVDiT joint
attention two launches, video queries and text queries, each against video (fixed) keys and text keys, as if
the two were concatenated per frame. ``lse`` (natural log of the softmax denominators, fp32) is a contiguous
``[B, H, Sq]`` per query run. A query with no keys at all gets out = 0 and lse = -inf.

A forward program owns BLOCK_M query rows of one (b, h) and streams the key runs in blocks of BLOCK_N with an
online softmax. The backward runs a dK/dV kernel (a program per key block, streaming the queries; with few key
blocks, e.g. 120 text keys against 16384 queries, the queries are split over programs that write fp32 partial
sums) and a dQ kernel (a program per query block, streaming the keys), so no atomics are needed. Self-attention
over many keys (``FUSED_DQ_MIN_KEYS``) instead adds dQ from the dK/dV kernel into an fp32 buffer with atomics:
two products per block pair fewer than recomputing the scores in the dQ kernel.

Head dims that are not a power of two are never padded to one. Tiles split the head dim into a power-of-two
main part and a small power-of-two tail window (72 = 64 + the last 16 columns; 96 = 64 + 32): every product
over the head dim is two products, and every product into the head dim two accumulators, so at D = 72 the
tensor cores do 80 columns of work, not 128.

Loads and stores carry no row masks (masked 16-wide tiles and a peeled last block both faulted under triton
3.6 on an H100): rows past a run's end are clamped to its last real row, so they recompute and rewrite that
row's values exactly, and their keys are masked out of the softmax. The head dim's tail window overlaps the
main part instead of running past the row. When a fixed run's length is a multiple of the block (256, 1024,
4096), its loop carries no bounds work at all (MASK_KEYS / MASK_QUERIES are compile-time).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from openvid_kernels import backends

LOG2E = 1.4426950408889634
MIN_BLOCK = 16  # smallest block side tl.dot takes
# Triton would compile a length of 1 as a constant, unrolling the one-trip loop; its operands then skip the
# software pipeline, and a 16-wide tail operand staged through registers with 4+ warps faulted (illegal
# address) under triton 3.6 on an H100. Lengths stay run-time values.
_LENGTHS = ["Sq", "Sk", "text_rows"]


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
def _load_split(ptr, rows, HEAD_DIM: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr,
                TAIL_TILE: tl.constexpr):
    """The main part and the tail window (overlap zeroed) of the given rows, for an operand loaded once per
    program (zeros without a tail)."""
    main = _load(ptr, rows, 0, D_MAIN, HEAD_DIM)
    return main, _zero_overlap(_load_tail(ptr, rows, HEAD_DIM, D_TAIL, TAIL_TILE), HEAD_DIM, D_MAIN, TAIL_TILE)


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


@triton.jit
def _text_range(LENS, STARTS, b, text_rows, HAS_TEXT: tl.constexpr, PACKED: tl.constexpr):
    """(number of real text tokens, row of the first) of batch entry b; (0, 0) without text. Lengths are clamped
    to [0, text_rows] here, so that lengths on the GPU need no checking pass before the launch."""
    length = tl.minimum(tl.maximum(tl.load(LENS + b), 0), text_rows) if HAS_TEXT else 0
    first = tl.load(STARTS + b).to(tl.int64) if PACKED else 0
    return length, first


# ---------------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------------

@triton.jit
def _forward_step(q, q_tail, acc, acc_tail, m_i, l_i, K, V, k_rows, v_rows, n, num_keys, scale_log2,
                  HEAD_DIM: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr, TAIL_TILE: tl.constexpr,
                  MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """One key block of the online softmax (base 2, scale folded into the exponent). Every block holds at least
    one real key, so the running maximum is finite after it."""
    k = _load(K, k_rows, 0, D_MAIN, HEAD_DIM)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if D_TAIL > 0:
        k_tail = _load_tail(K, k_rows, HEAD_DIM, D_TAIL, TAIL_TILE)
        s = tl.dot(q_tail, tl.trans(k_tail), s, input_precision=PRECISION)
    s = s * scale_log2
    if MASKED:
        s = tl.where((n < num_keys)[None, :], s, float("-inf"))
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
    Q, K, V, O, LSE, KT, VT, LENS, STARTS,
    Sq, Sk, H, text_rows,
    stride_q_b, stride_q_s, stride_q_h,
    stride_k_b, stride_k_s, stride_k_h,
    stride_v_b, stride_v_s, stride_v_h,
    stride_o_b, stride_o_s, stride_o_h,
    stride_kt_b, stride_kt_s, stride_kt_h,
    stride_vt_b, stride_vt_s, stride_vt_h,
    scale_log2,
    HEAD_DIM: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr, TAIL_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROW_ALIGN: tl.constexpr, PRECISION: tl.constexpr,
    MASK_KEYS: tl.constexpr, TEXT_KEYS: tl.constexpr, TEXT_QUERIES: tl.constexpr, PACKED_TEXT: tl.constexpr,
):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    text_len, text_first = _text_range(LENS, STARTS, b, text_rows, TEXT_KEYS or TEXT_QUERIES, PACKED_TEXT)
    num_queries = text_len if TEXT_QUERIES else Sq
    if tl.program_id(0) * BLOCK_M >= num_queries:  # a block of padded text queries
        return
    m = _clamped(tl.program_id(0) * BLOCK_M, BLOCK_M, num_queries)
    q_rows = _row_offsets(stride_q_b, stride_q_s, stride_q_h, b, h, m, ROW_ALIGN)
    q, q_tail = _load_split(Q, q_rows, HEAD_DIM, D_MAIN, D_TAIL, TAIL_TILE)

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
    if TEXT_KEYS:
        for start in range(0, text_len, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            rows = _clamped(start, BLOCK_N, text_len) + text_first
            k_rows = _row_offsets(stride_kt_b, stride_kt_s, stride_kt_h, b, h, rows, ROW_ALIGN)
            v_rows = _row_offsets(stride_vt_b, stride_vt_s, stride_vt_h, b, h, rows, ROW_ALIGN)
            acc, acc_tail, m_i, l_i = _forward_step(q, q_tail, acc, acc_tail, m_i, l_i, KT, VT, k_rows, v_rows, n,
                                                    text_len, scale_log2, HEAD_DIM, D_MAIN, D_TAIL, TAIL_TILE, True,
                                                    PRECISION)

    o_rows = _row_offsets(stride_o_b, stride_o_s, stride_o_h, b, h, m, ROW_ALIGN)
    l_safe = tl.where(l_i > 0, l_i, 1.0)  # no keys: acc is 0, so is the output
    _store(O, o_rows, acc / l_safe[:, None], acc_tail / l_safe[:, None], HEAD_DIM, D_MAIN, D_TAIL, TAIL_TILE)
    lse = tl.where(l_i > 0, (m_i + tl.log2(l_safe)) / 1.4426950408889634, float("-inf"))
    tl.store(LSE + bh.to(tl.int64) * Sq + m, lse)


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
               m, num_queries, scale_log2, DQ_ACC, dq_acc_rows, key_valid, softmax_scale,
               HEAD_DIM: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr, TAIL_TILE: tl.constexpr,
               MASKED: tl.constexpr, PRECISION: tl.constexpr, FUSED_DQ: tl.constexpr, MASK_KEYS: tl.constexpr):
    """One query block's contribution to a key block's dK and dV (transposed scores, [BLOCK_N, BLOCK_M]).
    ``stats`` indexes lse and delta (clamped like the rows); ``m`` are the true query indices. With FUSED_DQ it
    also adds the block's dQ = dS K (scaled) into the fp32 rows ``dq_acc_rows`` of DQ_ACC, atomically; keys
    past the end (clamped duplicates of the last key, ``key_valid`` False) are left out of it."""
    lse = tl.load(LSE + stats) * 1.4426950408889634
    if MASKED:
        lse = tl.where(m < num_queries, lse, float("inf"))  # queries past the end: P = 0
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
    if FUSED_DQ:
        if MASK_KEYS:
            ds_t = tl.where(key_valid[:, None], ds_t, 0.0).to(Q.dtype.element_ty)
        ds = tl.trans(ds_t)
        cols = tl.arange(0, D_MAIN)
        dq = tl.dot(ds, k, input_precision=PRECISION) * softmax_scale
        if D_MAIN <= HEAD_DIM:
            tl.atomic_add(DQ_ACC + dq_acc_rows[:, None] + cols[None, :], dq, sem="relaxed")
        else:
            tl.atomic_add(DQ_ACC + dq_acc_rows[:, None] + cols[None, :], dq, mask=(cols < HEAD_DIM)[None, :],
                          sem="relaxed")
        if D_TAIL > 0:  # k_tail's overlap columns are zero: add only the columns past the main part
            cols = HEAD_DIM - TAIL_TILE + tl.arange(0, TAIL_TILE)
            dq_tail = tl.dot(ds, k_tail, input_precision=PRECISION) * softmax_scale
            tl.atomic_add(DQ_ACC + dq_acc_rows[:, None] + cols[None, :], dq_tail, mask=(cols >= D_MAIN)[None, :],
                          sem="relaxed")
    return dk, dk_tail, dv, dv_tail


@triton.jit(do_not_specialize=["Sq", "Sk", "Lq", "text_rows", "queries_per_split"])
def _attention_backward_dkdv_kernel(
    DO, Q, LSE, DELTA, DOT, QT, LSET, DELTAT, K, V, DK, DV, DQ_ACC, LENS, STARTS,
    Sq, Sk, Lq, H, text_rows, queries_per_split,
    stride_do_b, stride_do_s, stride_do_h,
    stride_q_b, stride_q_s, stride_q_h,
    stride_dot_b, stride_dot_s, stride_dot_h,
    stride_qt_b, stride_qt_s, stride_qt_h,
    stride_k_b, stride_k_s, stride_k_h,
    stride_v_b, stride_v_s, stride_v_h,
    stride_dk_b, stride_dk_s, stride_dk_h,
    stride_dv_b, stride_dv_s, stride_dv_h,
    stride_split,
    softmax_scale, scale_log2,
    HEAD_DIM: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr, TAIL_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROW_ALIGN: tl.constexpr, PRECISION: tl.constexpr,
    MASK_QUERIES: tl.constexpr, TEXT_KEYS: tl.constexpr, TEXT_QUERIES: tl.constexpr, PACKED_TEXT: tl.constexpr,
    FUSED_DQ: tl.constexpr, MASK_KEYS: tl.constexpr,
):
    """dK, dV of one key block of one key run: the fixed keys, or the text keys (TEXT_KEYS). It streams the
    queries (Sq rows, split over program_id(2) in runs of ``queries_per_split``; the split programs write fp32
    partial sums at ``stride_split`` apart) and, in split 0, the text queries (TEXT_QUERIES, padded ``[B, Lq]``).
    With FUSED_DQ (fixed keys only, no text queries) it also adds each query block's dQ into DQ_ACC, a zeroed
    contiguous fp32 ``[B, Sq, H, HEAD_DIM]``, so that no dQ kernel recomputes the scores."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    text_len, text_first = _text_range(LENS, STARTS, b, text_rows, TEXT_KEYS or TEXT_QUERIES, PACKED_TEXT)
    num_keys = text_len if TEXT_KEYS else Sk
    if tl.program_id(0) * BLOCK_N >= num_keys:  # a block of padded text keys
        return
    n = _clamped(tl.program_id(0) * BLOCK_N, BLOCK_N, num_keys) + (text_first if TEXT_KEYS else 0)
    k_rows = _row_offsets(stride_k_b, stride_k_s, stride_k_h, b, h, n, ROW_ALIGN)
    v_rows = _row_offsets(stride_v_b, stride_v_s, stride_v_h, b, h, n, ROW_ALIGN)
    k, k_tail = _load_split(K, k_rows, HEAD_DIM, D_MAIN, D_TAIL, TAIL_TILE)
    v, v_tail = _load_split(V, v_rows, HEAD_DIM, D_MAIN, D_TAIL, TAIL_TILE)
    dk = tl.zeros([BLOCK_N, D_MAIN], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_MAIN], dtype=tl.float32)
    dk_tail = tl.zeros([BLOCK_N, TAIL_TILE], dtype=tl.float32)
    dv_tail = tl.zeros([BLOCK_N, TAIL_TILE], dtype=tl.float32)

    key_valid = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N) < num_keys
    split = tl.program_id(2)
    first_query = split * queries_per_split
    for start in range(first_query, tl.minimum(first_query + queries_per_split, Sq), BLOCK_M):
        m = start + tl.arange(0, BLOCK_M)
        rows = _clamped(start, BLOCK_M, Sq) if MASK_QUERIES else m
        q_rows = _row_offsets(stride_q_b, stride_q_s, stride_q_h, b, h, rows, ROW_ALIGN)
        do_rows = _row_offsets(stride_do_b, stride_do_s, stride_do_h, b, h, rows, ROW_ALIGN)
        dq_acc_rows = ((b * Sq + rows) * H + h) * HEAD_DIM
        dk, dk_tail, dv, dv_tail = _dkdv_step(
            k, k_tail, v, v_tail, dk, dk_tail, dv, dv_tail, Q, DO, LSE, DELTA, q_rows, do_rows,
            bh.to(tl.int64) * Sq + rows, m, Sq, scale_log2, DQ_ACC, dq_acc_rows, key_valid, softmax_scale, HEAD_DIM,
            D_MAIN, D_TAIL, TAIL_TILE, MASK_QUERIES, PRECISION, FUSED_DQ, MASK_KEYS)
    if TEXT_QUERIES:
        for start in range(0, tl.where(split == 0, text_len, 0), BLOCK_M):
            m = start + tl.arange(0, BLOCK_M)
            rows = _clamped(start, BLOCK_M, text_len)
            q_rows = _row_offsets(stride_qt_b, stride_qt_s, stride_qt_h, b, h, rows, ROW_ALIGN)
            do_rows = _row_offsets(stride_dot_b, stride_dot_s, stride_dot_h, b, h, rows, ROW_ALIGN)
            dk, dk_tail, dv, dv_tail = _dkdv_step(
                k, k_tail, v, v_tail, dk, dk_tail, dv, dv_tail, QT, DOT, LSET, DELTAT, q_rows, do_rows,
                bh.to(tl.int64) * Lq + rows, m, text_len, scale_log2, DQ_ACC, rows, key_valid, softmax_scale,
                HEAD_DIM, D_MAIN, D_TAIL, TAIL_TILE, True, PRECISION, False, False)

    partial = split.to(tl.int64) * stride_split * ROW_ALIGN
    dk_rows = _row_offsets(stride_dk_b, stride_dk_s, stride_dk_h, b, h, n, ROW_ALIGN) + partial
    dv_rows = _row_offsets(stride_dv_b, stride_dv_s, stride_dv_h, b, h, n, ROW_ALIGN) + partial
    _store(DK, dk_rows, dk * softmax_scale, dk_tail * softmax_scale, HEAD_DIM, D_MAIN, D_TAIL, TAIL_TILE)
    _store(DV, dv_rows, dv, dv_tail, HEAD_DIM, D_MAIN, D_TAIL, TAIL_TILE)


@triton.jit
def _dq_step(q, q_tail, do, do_tail, lse, delta, dq, dq_tail, K, V, k_rows, v_rows, n, num_keys, scale_log2,
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
        p = tl.where((n < num_keys)[None, :], p, 0.0)
    ds = (p * (dp - delta[:, None])).to(K.dtype.element_ty)
    dq = tl.dot(ds, k, dq, input_precision=PRECISION)
    if D_TAIL > 0:
        dq_tail = tl.dot(ds, k_tail, dq_tail, input_precision=PRECISION)
    return dq, dq_tail


@triton.jit(do_not_specialize=_LENGTHS)
def _attention_backward_dq_kernel(
    DO, Q, K, V, LSE, DELTA, DQ, KT, VT, LENS, STARTS,
    Sq, Sk, H, text_rows,
    stride_do_b, stride_do_s, stride_do_h,
    stride_q_b, stride_q_s, stride_q_h,
    stride_k_b, stride_k_s, stride_k_h,
    stride_v_b, stride_v_s, stride_v_h,
    stride_dq_b, stride_dq_s, stride_dq_h,
    stride_kt_b, stride_kt_s, stride_kt_h,
    stride_vt_b, stride_vt_s, stride_vt_h,
    softmax_scale, scale_log2,
    HEAD_DIM: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr, TAIL_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROW_ALIGN: tl.constexpr, PRECISION: tl.constexpr,
    MASK_KEYS: tl.constexpr, TEXT_KEYS: tl.constexpr, TEXT_QUERIES: tl.constexpr, PACKED_TEXT: tl.constexpr,
):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    text_len, text_first = _text_range(LENS, STARTS, b, text_rows, TEXT_KEYS or TEXT_QUERIES, PACKED_TEXT)
    num_queries = text_len if TEXT_QUERIES else Sq
    if tl.program_id(0) * BLOCK_M >= num_queries:  # a block of padded text queries
        return
    m = _clamped(tl.program_id(0) * BLOCK_M, BLOCK_M, num_queries)
    q_rows = _row_offsets(stride_q_b, stride_q_s, stride_q_h, b, h, m, ROW_ALIGN)
    do_rows = _row_offsets(stride_do_b, stride_do_s, stride_do_h, b, h, m, ROW_ALIGN)
    q, q_tail = _load_split(Q, q_rows, HEAD_DIM, D_MAIN, D_TAIL, TAIL_TILE)
    do, do_tail = _load_split(DO, do_rows, HEAD_DIM, D_MAIN, D_TAIL, TAIL_TILE)
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
    if TEXT_KEYS:
        for start in range(0, text_len, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            rows = _clamped(start, BLOCK_N, text_len) + text_first
            k_rows = _row_offsets(stride_kt_b, stride_kt_s, stride_kt_h, b, h, rows, ROW_ALIGN)
            v_rows = _row_offsets(stride_vt_b, stride_vt_s, stride_vt_h, b, h, rows, ROW_ALIGN)
            dq, dq_tail = _dq_step(q, q_tail, do, do_tail, lse, delta, dq, dq_tail, KT, VT, k_rows, v_rows, n,
                                   text_len, scale_log2, HEAD_DIM, D_MAIN, D_TAIL, TAIL_TILE, True, PRECISION)

    dq_rows = _row_offsets(stride_dq_b, stride_dq_s, stride_dq_h, b, h, m, ROW_ALIGN)
    _store(DQ, dq_rows, dq * softmax_scale, dq_tail * softmax_scale, HEAD_DIM, D_MAIN, D_TAIL, TAIL_TILE)


# ---------------------------------------------------------------------------------------------------------
# Short keys: every key of a sequence in one block (cross-attention to <= 128 text tokens)
# ---------------------------------------------------------------------------------------------------------

@triton.jit
def _resident_keys(KT, VT, LENS, STARTS, b, h, num_rows, stride_kt_b, stride_kt_s, stride_kt_h,
                   stride_vt_b, stride_vt_s, stride_vt_h,
                   HEAD_DIM: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr, TAIL_TILE: tl.constexpr,
                   BLOCK_N: tl.constexpr, ROW_ALIGN: tl.constexpr, PACKED_TEXT: tl.constexpr):
    """All of a sequence's text keys and values as one block, loaded once per program; rows past the length
    repeat the last real row (a sequence without text reads one row and masks it), and ``real`` marks the rest."""
    text_len, text_first = _text_range(LENS, STARTS, b, num_rows, True, PACKED_TEXT)
    n = tl.arange(0, BLOCK_N)
    rows = tl.minimum(text_first + tl.minimum(n, tl.maximum(text_len - 1, 0)), num_rows - 1)
    k_rows = _row_offsets(stride_kt_b, stride_kt_s, stride_kt_h, b, h, rows, ROW_ALIGN)
    v_rows = _row_offsets(stride_vt_b, stride_vt_s, stride_vt_h, b, h, rows, ROW_ALIGN)
    k, k_tail = _load_split(KT, k_rows, HEAD_DIM, D_MAIN, D_TAIL, TAIL_TILE)
    v, v_tail = _load_split(VT, v_rows, HEAD_DIM, D_MAIN, D_TAIL, TAIL_TILE)
    return k, k_tail, v, v_tail, n < text_len


@triton.jit
def _short_keys_scores(q, q_tail, k, k_tail, D_TAIL: tl.constexpr, PRECISION: tl.constexpr):
    """Unscaled scores against the resident keys (their columns past the length repeat the last key); the
    callers fold the scale into a multiply-add."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if D_TAIL > 0:
        s = tl.dot(q_tail, tl.trans(k_tail), s, input_precision=PRECISION)
    return s


@triton.jit(do_not_specialize=["Sq"])
def _short_keys_forward_kernel(
    Q, O, LSE, KT, VT, LENS, STARTS,
    Sq, H, num_rows,
    stride_q_b, stride_q_s, stride_q_h,
    stride_o_b, stride_o_s, stride_o_h,
    stride_kt_b, stride_kt_s, stride_kt_h,
    stride_vt_b, stride_vt_s, stride_vt_h,
    scale_log2,
    HEAD_DIM: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr, TAIL_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROW_ALIGN: tl.constexpr, PRECISION: tl.constexpr,
    PACKED_TEXT: tl.constexpr, QUERY_AXIS: tl.constexpr,
):
    """A program keeps one (b, h)'s keys and values and streams query blocks program_id(QUERY_AXIS), + grid
    size, ...: one exact softmax per block, no rescaling, and the keys are read once per program instead of per
    block. With QUERY_AXIS = 1 the (b, h) axis is the grid's fastest: programs that run together cover all
    heads of the same query rows, which share memory sectors (a 72-wide head is 4.5 of them)."""
    bh = tl.program_id(1 - QUERY_AXIS)
    b = (bh // H).to(tl.int64)
    h = bh % H
    k, k_tail, v, v_tail, real = _resident_keys(
        KT, VT, LENS, STARTS, b, h, num_rows, stride_kt_b, stride_kt_s, stride_kt_h, stride_vt_b, stride_vt_s,
        stride_vt_h, HEAD_DIM, D_MAIN, D_TAIL, TAIL_TILE, BLOCK_N, ROW_ALIGN, PACKED_TEXT)
    for block in range(tl.program_id(QUERY_AXIS), tl.cdiv(Sq, BLOCK_M), tl.num_programs(QUERY_AXIS)):
        m = _clamped(block * BLOCK_M, BLOCK_M, Sq)
        q_rows = _row_offsets(stride_q_b, stride_q_s, stride_q_h, b, h, m, ROW_ALIGN)
        q, q_tail = _load_split(Q, q_rows, HEAD_DIM, D_MAIN, D_TAIL, TAIL_TILE)
        # A select, not an add: a NaN in the padded row read for a sequence without text cannot leak.
        s = tl.where(real[None, :], _short_keys_scores(q, q_tail, k, k_tail, D_TAIL, PRECISION),
                     float("-inf"))
        # Unscaled scores: the scale goes into one multiply-add with the row maximum (finite without keys, so
        # that exp2(-inf - m) = 0).
        m_i = tl.maximum(tl.max(s, axis=1), -1e30) * scale_log2
        p = tl.exp2(s * scale_log2 - m_i[:, None])
        l_i = tl.sum(p, axis=1)
        inv_l = tl.where(l_i > 0, 1.0 / l_i, 0.0)  # no keys: a zero output
        p = p.to(VT.dtype.element_ty)
        acc = tl.dot(p, v, input_precision=PRECISION)
        acc_tail = tl.dot(p, v_tail, input_precision=PRECISION)
        o_rows = _row_offsets(stride_o_b, stride_o_s, stride_o_h, b, h, m, ROW_ALIGN)
        _store(O, o_rows, acc * inv_l[:, None], acc_tail * inv_l[:, None], HEAD_DIM, D_MAIN, D_TAIL, TAIL_TILE)
        lse = tl.where(l_i > 0, (m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
        tl.store(LSE + bh.to(tl.int64) * Sq + m, lse)


@triton.jit(do_not_specialize=["Sq"])
def _short_keys_backward_kernel(
    DO, Q, LSE, DELTA, DQ, KT, VT, DK, DV, LENS, STARTS,
    Sq, H, num_rows,
    stride_do_b, stride_do_s, stride_do_h,
    stride_q_b, stride_q_s, stride_q_h,
    stride_dq_b, stride_dq_s, stride_dq_h,
    stride_kt_b, stride_kt_s, stride_kt_h,
    stride_vt_b, stride_vt_s, stride_vt_h,
    stride_dk_b, stride_dk_s, stride_dk_h,
    stride_dv_b, stride_dv_s, stride_dv_h,
    stride_split,
    softmax_scale, scale_log2,
    HEAD_DIM: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr, TAIL_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROW_ALIGN: tl.constexpr, PRECISION: tl.constexpr,
    PACKED_TEXT: tl.constexpr,
):
    """dQ of the query blocks program_id(0), + grid size, ... and this program's fp32 partial sums of dK, dV
    (written program_id(0) * stride_split apart, summed by the launcher): q and dO are read once."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    k, k_tail, v, v_tail, real = _resident_keys(
        KT, VT, LENS, STARTS, b, h, num_rows, stride_kt_b, stride_kt_s, stride_kt_h, stride_vt_b, stride_vt_s,
        stride_vt_h, HEAD_DIM, D_MAIN, D_TAIL, TAIL_TILE, BLOCK_N, ROW_ALIGN, PACKED_TEXT)
    dk = tl.zeros([BLOCK_N, D_MAIN], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_MAIN], dtype=tl.float32)
    dk_tail = tl.zeros([BLOCK_N, TAIL_TILE], dtype=tl.float32)
    dv_tail = tl.zeros([BLOCK_N, TAIL_TILE], dtype=tl.float32)
    for block in range(tl.program_id(0), tl.cdiv(Sq, BLOCK_M), tl.num_programs(0)):
        start = block * BLOCK_M
        m = _clamped(start, BLOCK_M, Sq)
        q_rows = _row_offsets(stride_q_b, stride_q_s, stride_q_h, b, h, m, ROW_ALIGN)
        do_rows = _row_offsets(stride_do_b, stride_do_s, stride_do_h, b, h, m, ROW_ALIGN)
        q, q_tail = _load_split(Q, q_rows, HEAD_DIM, D_MAIN, D_TAIL, TAIL_TILE)
        do, do_tail = _load_split(DO, do_rows, HEAD_DIM, D_MAIN, D_TAIL, TAIL_TILE)
        stats = bh.to(tl.int64) * Sq + m
        lse = tl.load(LSE + stats) * 1.4426950408889634
        lse = tl.where(lse > float("-inf"), lse, float("inf"))  # no keys: P = 0
        delta = tl.load(DELTA + stats)
        s = _short_keys_scores(q, q_tail, k, k_tail, D_TAIL, PRECISION)
        p = tl.exp2(s * scale_log2 - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if D_TAIL > 0:
            dp = tl.dot(do_tail, tl.trans(v_tail), dp, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        # Rows and columns past the ends repeat the last query / key, so they recompute (and their stores rewrite)
        # its values; but dQ must leave the repeated keys out, and dK, dV the repeated queries.
        dq_ds = tl.where(real[None, :], ds, 0.0).to(Q.dtype.element_ty)
        real_queries = ((start + tl.arange(0, BLOCK_M)) < Sq)[:, None]
        p = tl.where(real_queries, p, 0.0).to(DO.dtype.element_ty)
        ds = tl.where(real_queries, ds, 0.0).to(Q.dtype.element_ty)
        dq = tl.dot(dq_ds, k, input_precision=PRECISION)
        dq_tail = tl.dot(dq_ds, k_tail, input_precision=PRECISION)
        dq_rows = _row_offsets(stride_dq_b, stride_dq_s, stride_dq_h, b, h, m, ROW_ALIGN)
        _store(DQ, dq_rows, dq * softmax_scale, dq_tail * softmax_scale, HEAD_DIM, D_MAIN, D_TAIL, TAIL_TILE)
        dv = tl.dot(tl.trans(p), do, dv, input_precision=PRECISION)
        dk = tl.dot(tl.trans(ds), q, dk, input_precision=PRECISION)
        if D_TAIL > 0:
            dv_tail = tl.dot(tl.trans(p), do_tail, dv_tail, input_precision=PRECISION)
            dk_tail = tl.dot(tl.trans(ds), q_tail, dk_tail, input_precision=PRECISION)

    text_len, text_first = _text_range(LENS, STARTS, b, num_rows, True, PACKED_TEXT)
    n = text_first + _clamped(0, BLOCK_N, tl.maximum(text_len, 1))  # rows past the length repeat the last
    partial = tl.program_id(0).to(tl.int64) * stride_split * ROW_ALIGN
    if text_len > 0:
        dk_rows = _row_offsets(stride_dk_b, stride_dk_s, stride_dk_h, b, h, n, ROW_ALIGN) + partial
        dv_rows = _row_offsets(stride_dv_b, stride_dv_s, stride_dv_h, b, h, n, ROW_ALIGN) + partial
        _store(DK, dk_rows, dk * softmax_scale, dk_tail * softmax_scale, HEAD_DIM, D_MAIN, D_TAIL, TAIL_TILE)
        _store(DV, dv_rows, dv, dv_tail, HEAD_DIM, D_MAIN, D_TAIL, TAIL_TILE)


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
    "fused": {64: (64, 64, 4, 3), 80: (64, 64, 4, 3), 96: (64, 64, 4, 3), 128: (64, 64, 4, 3)},
}
# Self-attention over at least this many keys adds dQ atomically from the dK/dV kernel ("fused": 5 products per
# block pair, plus zeroing an fp32 dQ and converting it) instead of recomputing the scores in a dQ kernel (7).
# H200, D = 72, bf16 backward: 3558 against 3919 us at 64 x 1024; 1401 against 1399 us at 256 x 256.
FUSED_DQ_MIN_KEYS = 1024
# Short keys (every text key in one block): (BLOCK_M, 0, num_warps, num_stages); BLOCK_N covers the keys.
_CONFIGS["short_forward"] = dict.fromkeys((64, 80, 96, 128), (64, 0, 4, 3))
_CONFIGS["short_backward"] = dict.fromkeys((64, 80, 96, 128), (128, 0, 8, 2))
SHORT_KEYS_HEADS_FASTEST = True  # the short-keys forward's grid order (see its kernel)
SHORT_KEYS_MAX = 128  # text runs up to this long take the short-keys kernels (T5 captions: 120 tokens)
# Programs per multiprocessor of a short-keys launch (H100 sweep at D = 72, 120 keys: 8 for the forward, 2 for
# the backward, whose programs also carry dK, dV accumulators and write them once each).
_SHORT_KEYS_PROGRAMS_PER_SM = {"short_forward": 8, "short_backward": 2}
# fp32 operands take twice the shared memory: the short-keys backward's tuned tiles (q, dO double-buffered
# plus P^T and dS^T at 128 rows) need 369 KiB of the H100's 227 at D = 72.
_FP32_CONFIGS = {"short_backward": (64, 0, 4, 1)}
_INTERPRETER_CONFIG = (16, 16, 1, 1)  # small tiles keep the CPU interpreter fast and exercise many blocks
# A dK/dV launch with fewer programs than this many per multiprocessor splits its queries (cross-attention:
# 2 text key blocks per (b, h) against 16384 queries would otherwise leave most of the GPU idle).
_DKDV_PROGRAMS_PER_SM = 4


def launch_config(head_dim: int, kind: str, device: torch.device, override: tuple | None = None,
                  dtype: torch.dtype | None = None):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a kernel ("forward", "dkdv", "dq", "short_forward",
    "short_backward") on operands of ``dtype``."""
    if override is not None:
        return override
    if device.type != "cuda":
        return _INTERPRETER_CONFIG
    if dtype == torch.float32 and kind in _FP32_CONFIGS:
        return _FP32_CONFIGS[kind]
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


# ---------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------

class TextTokens(NamedTuple):
    """Text tokens of variable length per batch entry: keys (k, v) and, in joint attention, queries too.

    lens: int32 ``[B]`` on the device, the real tokens of each batch entry (at most the run's length).
    k, v: ``[B, L, H, D]``, the first ``lens[b]`` rows real; or, with ``starts`` (int32 ``[B]``), packed rows of
        all batch entries, passed as ``[1, total, H, D]`` views expanded to ``[B, total, H, D]`` (batch stride 0).
    max_len: an upper bound of ``lens`` that trims the backward's grid (default: ``k.shape[1]``).
    dk, dv: the keys' gradients, laid out like k, v (backward; rows of padded tokens are not written).
    q, out, lse, dout, dq: the text queries' tensors in joint attention (``[B, L, H, D]``, lse ``[B, H, L]``);
        only their first ``lens[b]`` rows are read or written.
    """
    lens: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    starts: torch.Tensor | None = None
    max_len: int | None = None
    dk: torch.Tensor | None = None
    dv: torch.Tensor | None = None
    q: torch.Tensor | None = None
    out: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    dout: torch.Tensor | None = None
    dq: torch.Tensor | None = None


def _text_args(text: TextTokens | None, placeholder: torch.Tensor) -> tuple[list, int, dict[str, bool]]:
    """The kernels' text operands (k, v, lens, starts; ``placeholder`` where absent, never read), the text run's
    rows (the kernels clamp the lengths to it) and flags."""
    if text is None:
        return [placeholder] * 4, 0, dict(TEXT_KEYS=False, PACKED_TEXT=False)
    lens = text.lens.contiguous()  # indexed by batch entry
    starts = text.starts.contiguous() if text.starts is not None else lens
    return [text.k, text.v, lens, starts], text.k.shape[1], dict(TEXT_KEYS=True, PACKED_TEXT=text.starts is not None)


def forward(q, k, v, out, lse, softmax_scale: float, config: tuple | None = None, *,
            text: TextTokens | None = None, text_queries: bool = False):
    """Writes out ``[B, Sq, H, D]`` and lse ``[B, H, Sq]``: queries q against the keys k, v ``[B, Sk, H, D]``
    (None: none) followed by the text keys. With ``text_queries``, q and out are the padded text tokens, of
    which only the first ``text.lens[b]`` rows are computed. The first six arguments are those of
    ``_C.spatial_attention_forward``; ``config`` overrides (BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    B, Sq, H, D = q.shape
    Sk = 0 if k is None else k.shape[1]
    text_operands, text_rows, text_flags = _text_args(text, q)
    if _short_keys(k, text, text_queries):
        block_m, _, warps, stages = launch_config(D, "short_forward", q.device, config, q.dtype)
        align = _row_align(q, out, *text_operands[:2])
        programs = _short_keys_programs("short_forward", Sq, block_m, B * H, q.device)
        grid = (B * H, programs) if SHORT_KEYS_HEADS_FASTEST else (programs, B * H)
        _short_keys_forward_kernel[grid](
            q, out, lse, *text_operands, Sq, H, text.k.shape[1], *_strides((q, out, *text_operands[:2]), align),
            softmax_scale * LOG2E, **_head_dims(D), BLOCK_M=block_m, BLOCK_N=_short_keys_block(text),
            ROW_ALIGN=align, PRECISION=_precision(q.dtype), PACKED_TEXT=text_flags["PACKED_TEXT"],
            QUERY_AXIS=int(SHORT_KEYS_HEADS_FASTEST), num_warps=warps, num_stages=stages,
        )
        return
    if k is None:
        k = v = q  # placeholders: a loop over 0 keys reads nothing
    block_m, block_n, warps, stages = launch_config(D, "forward", q.device, config, q.dtype)
    align = _row_align(q, k, v, out, *text_operands[:2])
    _attention_forward_kernel[(triton.cdiv(Sq, block_m), B * H)](
        q, k, v, out, lse, *text_operands, Sq, Sk, H, text_rows, *_strides((q, k, v, out, *text_operands[:2]), align),
        softmax_scale * LOG2E, **_head_dims(D), BLOCK_M=block_m, BLOCK_N=block_n, ROW_ALIGN=align,
        PRECISION=_precision(q.dtype), MASK_KEYS=Sk % block_n != 0, TEXT_QUERIES=text_queries, **text_flags,
        num_warps=warps, num_stages=stages,
    )


def _short_keys(k, text: TextTokens | None, text_queries: bool) -> bool:
    """Whether a launch attends to text keys only, few enough for one block (cross-attention)."""
    return k is None and text is not None and not text_queries and _text_rows(text) <= SHORT_KEYS_MAX


def _text_rows(text: TextTokens) -> int:
    return text.max_len or text.k.shape[1]


def _short_keys_block(text: TextTokens) -> int:
    return max(MIN_BLOCK, triton.next_power_of_2(_text_rows(text)))


def _short_keys_programs(kind: str, Sq: int, block_m: int, sequences: int, device: torch.device) -> int:
    """Programs per (b, h) of a short-keys launch: enough to fill the GPU, each streaming several query blocks."""
    wanted = _SHORT_KEYS_PROGRAMS_PER_SM[kind] * backends.multiprocessor_count(device)
    return max(1, min(triton.cdiv(Sq, block_m), triton.cdiv(wanted, sequences)))


def _delta(dout: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """rowsum(dO * O) as a contiguous fp32 ``[B, H, S]``."""
    B, S, H, D = out.shape
    delta = torch.empty(B, H, S, dtype=torch.float32, device=out.device)
    align = _row_align(dout, out)
    rows = 64 if out.device.type == "cuda" else 16
    _attention_backward_delta_kernel[(triton.cdiv(S, rows), B * H)](
        dout, out, delta, S, H, *_strides((dout, out), align), **_head_dims(D), BLOCK_M=rows, ROW_ALIGN=align,
    )
    return delta


def _query_splits(Sq: int, block_m: int, programs: int, device: torch.device) -> tuple[int, int]:
    """(splits, queries per split) of a dK/dV launch of ``programs`` programs over Sq queries."""
    query_blocks = triton.cdiv(Sq, block_m)
    wanted = _DKDV_PROGRAMS_PER_SM * backends.multiprocessor_count(device)
    splits = max(1, min(query_blocks, wanted // max(programs, 1)))
    per_split = triton.cdiv(query_blocks, splits) * block_m
    return triton.cdiv(Sq, per_split), per_split


def _partials(grad: torch.Tensor, splits: int) -> torch.Tensor:
    """A zeroed fp32 ``[splits, *grad.shape]`` buffer laid out like grad (an expanded packed view too); zeros, so
    that rows no program writes (padded text keys) add nothing."""
    shape = (splits, 1, *grad.shape[1:]) if grad.stride(0) == 0 else (splits, *grad.shape)
    return torch.zeros(shape, dtype=torch.float32, device=grad.device).expand(splits, *grad.shape)


def _add_partials(partials: torch.Tensor, grad: torch.Tensor) -> None:
    """Sums the splits' fp32 partials into ``grad`` (once per memory row where grad is an expanded view)."""
    total = partials.sum(0)
    if grad.stride(0) == 0:
        grad, total = grad[:1], total[:1]
    grad.copy_(total)


def backward(dout, q, k, v, out, lse, dq, dk, dv, softmax_scale: float,
             dkdv_config: tuple | None = None, dq_config: tuple | None = None, *,
             text: TextTokens | None = None, query_splits: int | None = None, fused_dq: bool | None = None):
    """Writes dq ``[B, Sq, H, D]``, dk and dv ``[B, Sk, H, D]`` (k None: no fixed keys) and, with ``text``, the
    text keys' text.dk, text.dv and, when text.q is given, the text queries' text.dq. The first ten arguments
    are those of ``_C.spatial_attention_backward``; ``query_splits`` overrides the dK/dV query split and
    ``fused_dq`` the choice of the fused dQ (self-attention without text only; default: from
    ``FUSED_DQ_MIN_KEYS``)."""
    B, Sq, H, D = q.shape
    Sk = 0 if k is None else k.shape[1]
    heads = _head_dims(D)
    precision = _precision(q.dtype)
    text_queries = text is not None and text.q is not None
    text_operands, text_rows, text_flags = _text_args(text, q)
    delta = _delta(dout, out)
    if _short_keys(k, text, text_queries):
        _short_keys_backward(dout, q, lse, delta, dq, text, text_operands, softmax_scale, dkdv_config)
        return
    if text_queries:
        text_delta, Lq = _delta(text.dout, text.out), text.q.shape[1]
        text_query_operands = [text.dout, text.q, text.lse, text_delta]
    else:
        text_delta, Lq = None, 0
        text_query_operands = [dout, q, lse, delta]  # placeholders, never read

    fused_dq = (Sk >= FUSED_DQ_MIN_KEYS if fused_dq is None else fused_dq) and text is None and k is not None
    dq_acc = torch.zeros(B, Sq, H, D, dtype=torch.float32, device=q.device) if fused_dq else delta  # else unread
    block_m, block_n, warps, stages = launch_config(D, "fused" if fused_dq else "dkdv", q.device, dkdv_config,
                                                    q.dtype)
    key_runs = [] if k is None else [(k, v, dk, dv, Sk, False)]
    if text is not None:
        key_runs.append((text.k, text.v, text.dk, text.dv, text.max_len or text.k.shape[1], True))
    for keys, values, dkeys, dvalues, num_keys, is_text in key_runs:
        key_blocks = triton.cdiv(num_keys, block_n)
        if query_splits is None:
            splits, per_split = _query_splits(Sq, block_m, key_blocks * B * H, q.device)
        else:
            per_split = triton.cdiv(triton.cdiv(Sq, block_m), query_splits) * block_m
            splits = triton.cdiv(Sq, per_split)
        grads = (dkeys, dvalues) if splits == 1 else tuple(_partials(g, splits) for g in (dkeys, dvalues))
        split_grads = grads if splits == 1 else tuple(g[0] for g in grads)  # split 0's views
        tensors = (dout, q, *text_query_operands[:2], keys, values, *split_grads)
        align = _row_align(*tensors)
        _attention_backward_dkdv_kernel[(key_blocks, B * H, splits)](
            dout, q, lse, delta, *text_query_operands, keys, values, *split_grads, dq_acc, *text_operands[2:],
            Sq, num_keys, Lq, H, text_rows, per_split, *_strides(tensors, align),
            grads[0].stride(0) // align if splits > 1 else 0,
            softmax_scale, softmax_scale * LOG2E, **heads, BLOCK_M=block_m, BLOCK_N=block_n, ROW_ALIGN=align,
            PRECISION=precision, MASK_QUERIES=Sq % block_m != 0, TEXT_KEYS=is_text, TEXT_QUERIES=text_queries,
            PACKED_TEXT=text_flags["PACKED_TEXT"], FUSED_DQ=fused_dq, MASK_KEYS=num_keys % block_n != 0,
            num_warps=warps, num_stages=stages,
        )
        if splits > 1:
            _add_partials(grads[0], dkeys)
            _add_partials(grads[1], dvalues)
    if fused_dq:
        dq.copy_(dq_acc)  # already scaled
        return

    block_m, block_n, warps, stages = launch_config(D, "dq", q.device, dq_config, q.dtype)
    if k is None:
        k = v = q  # placeholders: a loop over 0 keys reads nothing
    query_runs = [(dout, q, lse, delta, dq, Sq, False)]
    if text_queries:
        query_runs.append((text.dout, text.q, text.lse, text_delta, text.dq, Lq, True))
    for douts, queries, lses, deltas, dqueries, num_queries, is_text in query_runs:
        tensors = (douts, queries, k, v, dqueries, *text_operands[:2])
        align = _row_align(*tensors)
        _attention_backward_dq_kernel[(triton.cdiv(num_queries, block_m), B * H)](
            douts, queries, k, v, lses, deltas, dqueries, *text_operands, num_queries, Sk, H, text_rows,
            *_strides(tensors, align), softmax_scale, softmax_scale * LOG2E, **heads,
            BLOCK_M=block_m, BLOCK_N=block_n, ROW_ALIGN=align, PRECISION=precision, MASK_KEYS=Sk % block_n != 0,
            TEXT_QUERIES=is_text, **text_flags, num_warps=warps, num_stages=stages,
        )


def _short_keys_backward(dout, q, lse, delta, dq, text: TextTokens, text_operands: list, softmax_scale: float,
                         config: tuple | None):
    """dq, and text.dk, text.dv from the programs' fp32 partial sums, in one pass over q and dout."""
    B, Sq, H, D = q.shape
    block_m, _, warps, stages = launch_config(D, "short_backward", q.device, config, q.dtype)
    programs = _short_keys_programs("short_backward", Sq, block_m, B * H, q.device)
    grads = tuple(_partials(g, programs) for g in (text.dk, text.dv))
    tensors = (dout, q, dq, *text_operands[:2], grads[0][0], grads[1][0])
    align = _row_align(*tensors)
    _short_keys_backward_kernel[(programs, B * H)](
        dout, q, lse, delta, dq, *text_operands[:2], grads[0][0], grads[1][0], *text_operands[2:],
        Sq, H, text.k.shape[1], *_strides(tensors, align), grads[0].stride(0) // align,
        softmax_scale, softmax_scale * LOG2E, **_head_dims(D), BLOCK_M=block_m, BLOCK_N=_short_keys_block(text),
        ROW_ALIGN=align, PRECISION=_precision(q.dtype), PACKED_TEXT=text.starts is not None,
        num_warps=warps, num_stages=stages,
    )
    _add_partials(grads[0], text.dk)
    _add_partials(grads[1], text.dv)
