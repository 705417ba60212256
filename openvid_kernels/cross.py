"""Cross-attention to variable-length text: every query token attends to its sequence's real text tokens.

Captions are encoded to at most 120 T5 tokens, padded, with a mask of real tokens. STDiT's cross-attention
lets every video token of a sample (all T*S) attend to the sample's real caption tokens; MVDiT's runs per
frame (S video tokens against that frame's text tokens). Upstream packs all captions into one sequence with a
block-diagonal mask (xformers); here the keys come either padded with per-sequence lengths or packed with
``cu_seqlens`` as upstream, and padded keys are never read: key blocks past a length are skipped, and the
last block's rows past it are never loaded.

* :func:`cross_attention` ``(q [B, N, H, D], k, v [B, L, H, D], kv_lens [B]) -> [B, N, H, D]``
* :func:`cross_attention` ``(q [B, N, H, D], k, v [total, H, D], cu_seqlens_kv=[B + 1])`` (packed)

Non-causal ``softmax(scale * q k^T) v`` over the real keys, fp32 statistics and accumulation. A sequence with
no real text tokens gets a zero output and zero gradients (not NaN). The reference is PyTorch's
``scaled_dot_product_attention`` with a boolean key mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from openvid_kernels import _attention_args as args
from openvid_kernels import backends, spatial
from openvid_kernels.triton_kernels import attention as triton_attention


# ---------------------------------------------------------------------------------------------------------
# Reference: the spec and the fallback.
# ---------------------------------------------------------------------------------------------------------

def cross_attention_reference(q, k, v, kv_lens=None, cu_seqlens_kv=None, softmax_scale: float | None = None):
    """Dense masked attention: ``q [B, N, H, D]`` against the first ``kv_lens[b]`` rows of ``k, v [B, L, H, D]``
    (all rows when None), or against rows ``cu_seqlens_kv[b] .. cu_seqlens_kv[b + 1] - 1`` of packed ``k, v
    [total, H, D]``. Returns a contiguous ``[B, N, H, D]``, zero where a sequence has no keys."""
    if cu_seqlens_kv is not None:
        k, v, kv_lens = _padded_from_packed(k, v, cu_seqlens_kv)
    B, L = k.shape[:2]
    if kv_lens is None:
        kv_lens = torch.full((B,), L)
    real = torch.arange(L, device=q.device) < torch.as_tensor(kv_lens, device=q.device)[:, None]  # [B, L]
    has_keys = real.any(1)
    mask = real | ~has_keys[:, None]  # a sequence without keys attends to all of them; its output is zeroed
    out = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), attn_mask=mask[:, None, None],
                                         scale=softmax_scale)
    return (out.transpose(1, 2) * has_keys[:, None, None, None]).contiguous()


def _padded_from_packed(k, v, cu_seqlens):
    """Packed ``[total, H, D]`` rows as ``[B, total, H, D]`` (a differentiable gather; rows past a sequence's
    length repeat its rows and are masked) and the lengths, without reading the offsets on the host."""
    cu_seqlens = torch.as_tensor(cu_seqlens).to(k.device, torch.int64)
    total = k.shape[0]
    rows = (cu_seqlens[:-1, None] + torch.arange(total, device=k.device)).clamp(max=max(total - 1, 0))
    return k[rows], v[rows], cu_seqlens[1:] - cu_seqlens[:-1]


# ---------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------

def _text_tokens(k, v, kv_lens, kv_starts, **grads) -> triton_attention.TextTokens:
    """The kernels' view of the keys: padded ``[B, L, H, D]``, or packed ``[total, H, D]`` rows with starts."""
    B = kv_lens.shape[0]
    if kv_starts is not None:
        k, v = (t.unsqueeze(0).expand(B, *t.shape) for t in (k, v))
        grads = {name: g.unsqueeze(0).expand(B, *g.shape) for name, g in grads.items()}
    return triton_attention.TextTokens(kv_lens, k, v, starts=kv_starts, **grads)


def _forward(q, k, v, kv_lens, kv_starts, softmax_scale: float, backend: str):
    q, k, v = map(args.unit_head_stride, (q, k, v))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32, device=q.device)
    if not q.numel():
        return out, lse
    # "auto": up to SHORT_KEYS_MAX text keys, Triton's short-keys kernel (keys resident, queries streamed) is
    # the faster (BENCHMARKS.md); longer text goes to the CUDA kernel, which attends to its fixed keys (none
    # here: empty views) followed by the text keys.
    packed = kv_starts is not None
    no_keys = dict(k=k, v=v) if packed else dict(k=k[:, :0], v=v[:, :0])
    text = dict(k_text=k, v_text=v, text_lens=kv_lens)
    short = backend == "auto" and k.shape[-3] <= triton_attention.SHORT_KEYS_MAX
    if not short and spatial.use_cuda(
        backend, "forward", dict(q=q, **no_keys, out=out), text,
        problem="its kernel takes padded keys with kv_lens, not cu_seqlens_kv" if packed else None,
    ):
        spatial.cuda_kernel("forward")(q, *no_keys.values(), out, lse, softmax_scale, **text)
    else:
        triton_attention.forward(q, None, None, out, lse, softmax_scale, text=_text_tokens(k, v, kv_lens, kv_starts))
    return out, lse


# ---------------------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------------------

@torch.library.custom_op("openvid::cross_attention_fwd", mutates_args=())
def _cross_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lens: torch.Tensor, kv_starts: torch.Tensor | None,
    softmax_scale: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, kv_lens, kv_starts, softmax_scale, backend)


@_cross_attention_fwd.register_fake
def _(q, k, v, kv_lens, kv_starts, softmax_scale, backend):
    B, N, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty(B, H, N, dtype=torch.float32)


@torch.library.custom_op("openvid::cross_attention_bwd", mutates_args=())
def _cross_attention_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lens: torch.Tensor,
    kv_starts: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor, softmax_scale: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dout = args.unit_head_stride(dout)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk, dv = (torch.zeros(k.shape, dtype=k.dtype, device=k.device) for _ in range(2))  # padded keys: 0
    if q.numel():
        text = _text_tokens(k, v, kv_lens, kv_starts, dk=dk, dv=dv)
        triton_attention.backward(dout, q, None, None, out, lse, dq, None, None, softmax_scale, text=text)
    return dq, dk, dv


@_cross_attention_bwd.register_fake
def _(dout, q, k, v, kv_lens, kv_starts, out, lse, softmax_scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _cross_attention_setup(ctx, inputs, output):
    q, k, v, kv_lens, kv_starts, softmax_scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, kv_lens, kv_starts, out, lse)
    ctx.softmax_scale, ctx.backend = softmax_scale, backend


def _cross_attention_grad(ctx, dout, _dlse):
    q, k, v, kv_lens, kv_starts, out, lse = ctx.saved_tensors
    dq, dk, dv = _cross_attention_bwd(dout, q, k, v, kv_lens, kv_starts, out, lse, ctx.softmax_scale, ctx.backend)
    return dq, dk, dv, None, None, None, None


_cross_attention_fwd.register_autograd(_cross_attention_grad, setup_context=_cross_attention_setup)


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------

def cross_attention(q, k, v, kv_lens=None, *, cu_seqlens_kv=None, softmax_scale: float | None = None,
                    backend: str | None = None) -> torch.Tensor:
    """Attention of every query of a sequence to that sequence's real keys (text tokens).

    Args:
        q: ``[B, N, H, D]`` (N = T*S video tokens of a sample, or S of a frame), any strides with a unit
            head-dim stride.
        k, v: padded ``[B, L, H, D]`` (the first ``kv_lens[b]`` rows of sequence b are real), or, with
            ``cu_seqlens_kv``, packed ``[total, H, D]``. Same dtype, device and head dim as q.
        kv_lens: integer ``[B]`` real keys per sequence (padded keys only); None: all L. Lengths on the CPU are
            checked (0..L); lengths on the GPU are not read back, and values outside 0..L are clamped.
        cu_seqlens_kv: integer ``[B + 1]`` offsets of the packed keys (``cu_seqlens_kv[b] .. [b + 1] - 1`` are
            sequence b's), as xformers' ``BlockDiagonalMask.from_seqlens`` and flash-attn's varlen API take them.
            Checked like ``kv_lens``.
        softmax_scale: multiplies ``q k^T`` before the softmax; default ``D ** -0.5``.
        backend: ``None`` (the default from :func:`openvid_kernels.use_backend` / ``OPENVID_BACKEND``),
            ``"auto"``, ``"cuda"``, ``"triton"`` or ``"reference"``. Kernel backends take D a multiple of 8 up
            to 128 and fp16/bf16 (Triton also fp32).

    Returns:
        ``[B, N, H, D]`` contiguous, q's dtype; zero for a sequence with no real keys. Differentiable in q, k, v
        (padded keys get zero gradients).
    """
    for name, t in dict(q=q, k=k, v=v).items():
        args.check_tensor(t, name)
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D [B, N, H, D], got shape {list(q.shape)}")
    args.check_same(dict(k=k, v=v))
    args.check_same(dict(q=q, k=k), dims=None)  # dtype and device
    B, _, H, D = q.shape
    if cu_seqlens_kv is None:
        if k.dim() != 4 or k.shape[0] != B or k.shape[2:] != (H, D):
            raise ValueError(f"k must be [B, L, H, D] = [{B}, L, {H}, {D}] (padded keys), got {list(k.shape)}")
        kv_lens, kv_starts = _lengths(kv_lens, B, k.shape[1], q.device), None
    else:
        if kv_lens is not None:
            raise ValueError("give kv_lens (padded keys) or cu_seqlens_kv (packed keys), not both")
        if k.dim() != 3 or k.shape[1:] != (H, D):
            raise ValueError(f"k must be [total, H, D] = [total, {H}, {D}] (packed keys), got {list(k.shape)}")
        kv_lens, kv_starts = _packed_lengths(cu_seqlens_kv, B, k.shape[0], q.device)
    if k.shape[-3] == 0:
        raise ValueError(f"k and v need at least one row (padded length or total >= 1), got shape {list(k.shape)}")
    scale = args.softmax_scale_or_default(softmax_scale, D)
    name = backends.resolve_backend(backend, q.device)
    if name == "reference":
        padded_lens = kv_lens if kv_starts is None else None
        return cross_attention_reference(q, k, v, padded_lens, cu_seqlens_kv, softmax_scale=scale)
    for tensor_name, t in dict(q=q, k=k, v=v).items():
        args.check_kernel_dtype_and_head_dim(t, tensor_name)
    out, _ = _cross_attention_fwd(q, k, v, kv_lens, kv_starts, scale, name)
    return out


def _lengths(kv_lens, batch: int, padded_len: int, device: torch.device) -> torch.Tensor:
    if kv_lens is None:
        return torch.full((batch,), padded_len, dtype=torch.int32, device=device)
    return args.check_lengths(kv_lens, "kv_lens", batch, padded_len, device)


def _packed_lengths(cu_seqlens, batch: int, total: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(lengths, starts) as int32 ``[B]`` device tensors from offsets ``[B + 1]``."""
    if not isinstance(cu_seqlens, torch.Tensor):
        cu_seqlens = torch.as_tensor(cu_seqlens)
    if cu_seqlens.shape != (batch + 1,):
        raise ValueError(f"cu_seqlens_kv must have shape [B + 1] = [{batch + 1}], got {list(cu_seqlens.shape)}")
    if cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling():
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total or (cu_seqlens.diff() < 0).any():
            raise ValueError(
                f"cu_seqlens_kv must rise from 0 to the {total} packed keys (non-decreasing), got {cu_seqlens.tolist()}"
            )
    starts = cu_seqlens[:-1].to(device=device, dtype=torch.int32).clamp(0, total)
    lens = args.check_lengths(cu_seqlens.diff(), "cu_seqlens_kv.diff()", batch, total, device)
    return torch.minimum(lens, total - starts), starts
