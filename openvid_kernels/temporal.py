"""Temporal attention: attention over the T frames at every spatial position, read in the model's token order.

STDiT/MVDiT run, in every block, B * S independent attentions of length T (16 frames) per head. Their tokens are
frame-major (token ``t * S + s``), and the qkv projection gives ``[B, T*S, 3, H, D]``. These ops read q, k, v in
place from that layout and write the output in the same order, so the model needs no ``rearrange``:

* :func:`temporal_attention_packed` ``(qkv [B, T*S, 3, H, D], num_frames) -> [B, T*S, H, D]``; its gradient is
  one packed ``[B, T*S, 3, H, D]`` tensor, like the qkv projection's output.
* :func:`temporal_attention` ``(q, k, v [B, T, S, H, D]) -> [B, T, S, H, D]`` for any strides with a unit
  head-dim stride: the same kernels for other layouts (pass ``[N, T, H, D]`` tensors as 4-D, S = 1 implied).

Attention is over dim T, independently for every (b, s, h), non-causal, ``softmax(scale * q k^T) v`` with
scale ``D ** -0.5`` by default. Kernels (CUDA and Triton) take T <= 128, D a multiple of 8 up to 128, fp16/bf16
(Triton also fp32), fp32 softmax statistics. With ``backend="auto"`` longer sequences go to the long-sequence
path, PyTorch's ``scaled_dot_product_attention`` (FlashAttention / cuDNN), which is also the reference.

Layering: functional API (validation, backend choice) -> ``torch.ops.openvid.*`` custom ops (fake impls for
``torch.compile``, autograd through backward custom ops) -> CUDA extension or Triton kernel at run time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from openvid_kernels import _attention_args as args
from openvid_kernels import backends
from openvid_kernels.triton_kernels import temporal_attention as triton_temporal

MAX_FRAMES = 128


# ---------------------------------------------------------------------------------------------------------
# Reference: the spec, the fallback and the long-sequence path.
# ---------------------------------------------------------------------------------------------------------

def temporal_attention_reference(q, k, v, softmax_scale: float | None = None) -> torch.Tensor:
    """``softmax(scale * q k^T) v`` over dim 1 of ``[B, T, S, H, D]`` tensors; contiguous ``[B, T, S, H, D]``."""
    B, T, S, H, D = q.shape
    # [B*S, H, T, D]: SDPA attends over dim -2. (4-D: torch.compile of a 5-D SDPA between permutes returned a
    # wrongly shaped result on torch 2.13's CPU path.)
    to_sequences = [x.permute(0, 2, 3, 1, 4).reshape(B * S, H, T, D) for x in (q, k, v)]
    out = F.scaled_dot_product_attention(*to_sequences, scale=softmax_scale)
    return out.view(B, S, H, T, D).permute(0, 3, 1, 2, 4).contiguous()


def temporal_attention_packed_reference(qkv, num_frames: int, softmax_scale: float | None = None) -> torch.Tensor:
    """:func:`temporal_attention_reference` on ``qkv [B, T*S, 3, H, D]``; returns ``[B, T*S, H, D]``."""
    q, k, v = _unpack(qkv, num_frames)
    return temporal_attention_reference(q, k, v, softmax_scale).flatten(1, 2)


def _unpack(qkv: torch.Tensor, num_frames: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as ``[B, T, S, H, D]`` views of ``qkv [B, T*S, 3, H, D]`` (no copy)."""
    return qkv.unflatten(1, (num_frames, qkv.shape[1] // num_frames)).unbind(3)


# ---------------------------------------------------------------------------------------------------------
# Argument checks (shared ones in _attention_args). They read only shapes, dtypes, strides and devices.
# ---------------------------------------------------------------------------------------------------------

def _check_frames(frames: int, name: str, backend: str) -> None:
    if frames > MAX_FRAMES:
        raise ValueError(
            f"{name} has T = {frames} frames; the short-sequence kernels take T <= {MAX_FRAMES} "
            f"(backend={backend!r}); backend='auto' or 'reference' runs longer sequences through "
            "scaled_dot_product_attention"
        )


def _kernel_backend(backend: str | None, x: torch.Tensor, frames: int) -> str:
    """The resolved backend; ``auto`` sends sequences beyond the kernels' range to the reference (SDPA)."""
    name = backends.resolve_backend(backend, x.device)
    if name == "auto" and frames > MAX_FRAMES:
        return "reference"
    return name


# ---------------------------------------------------------------------------------------------------------
# Launchers, choosing CUDA or Triton at run time.
# ---------------------------------------------------------------------------------------------------------

def _auto_prefers_cuda(direction: str, frames: int) -> bool:
    """Where both kernel backends take a call, "auto" runs the faster, measured on an H100 at bf16, H = 16,
    D = 72 (BENCHMARKS.md, benchmarks/sweep_temporal.py): Triton up to T = 64 in both directions (forward
    116 us against 120 at 2048 x 16, backward 249 against 276), the CUDA forward beyond (192 against 201 at
    T = 128)."""
    return direction == "forward" and frames > 64


def _use_cuda(backend: str, direction: str, tensors: dict[str, torch.Tensor]) -> bool:
    frames = next(iter(tensors.values())).shape[1]
    if backend == "triton" or (
        backend == "auto" and not (backends.cuda_extension and _auto_prefers_cuda(direction, frames))
    ):
        return False
    problem = args.cuda_layout_problem(tensors)
    if backend == "cuda" and problem is not None:
        raise ValueError(f"backend='cuda' cannot take this call: {problem}; use backend='triton' or 'auto'")
    return problem is None


def _lse_shape(q: torch.Tensor) -> tuple[int, int, int, int]:
    B, T, S, H, _ = q.shape
    return B, S, H, T


def _forward(q, k, v, softmax_scale: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = map(args.unit_head_stride, (q, k, v))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(_lse_shape(q), dtype=torch.float32, device=q.device)
    if q.numel():
        cuda = _use_cuda(backend, "forward", dict(q=q, k=k, v=v))
        launch = backends.cuda_extension.temporal_attention_forward if cuda else triton_temporal.forward
        launch(q, k, v, out, lse, softmax_scale)
    return out, lse


def _backward(dout, q, k, v, out, lse, dq, dk, dv, softmax_scale: float, backend: str) -> None:
    """Writes dq, dk, dv (views into one packed buffer, or separate tensors)."""
    dout = args.unit_head_stride(dout)
    if q.numel():
        cuda = _use_cuda(backend, "backward", dict(dout=dout, q=q, k=k, v=v, out=out, dq=dq, dk=dk, dv=dv))
        launch = backends.cuda_extension.temporal_attention_backward if cuda else triton_temporal.backward
        launch(dout, q, k, v, out, lse, dq, dk, dv, softmax_scale)


# ---------------------------------------------------------------------------------------------------------
# Custom ops: separate q, k, v ([B, T, S, H, D] views) and packed qkv ([B, T*S, 3, H, D]).
# ---------------------------------------------------------------------------------------------------------

@torch.library.custom_op("openvid::temporal_attention_fwd", mutates_args=())
def _temporal_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, softmax_scale, backend)


@_temporal_attention_fwd.register_fake
def _(q, k, v, softmax_scale, backend):
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q), dtype=torch.float32)


@torch.library.custom_op("openvid::temporal_attention_bwd", mutates_args=())
def _temporal_attention_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    softmax_scale: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    _backward(dout, q, k, v, out, lse, dq, dk, dv, softmax_scale, backend)
    return dq, dk, dv


@_temporal_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, softmax_scale, backend):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _temporal_attention_setup(ctx, inputs, output):
    q, k, v, softmax_scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.softmax_scale, ctx.backend = softmax_scale, backend


def _temporal_attention_grad(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _temporal_attention_bwd(dout, q, k, v, out, lse, ctx.softmax_scale, ctx.backend)
    return dq, dk, dv, None, None


_temporal_attention_fwd.register_autograd(_temporal_attention_grad, setup_context=_temporal_attention_setup)


@torch.library.custom_op("openvid::temporal_attention_packed_fwd", mutates_args=())
def _temporal_attention_packed_fwd(
    qkv: torch.Tensor, num_frames: int, softmax_scale: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _forward(*_unpack(qkv, num_frames), softmax_scale, backend)
    return out.flatten(1, 2), lse


@_temporal_attention_packed_fwd.register_fake
def _(qkv, num_frames, softmax_scale, backend):
    B, N, _, H, D = qkv.shape
    return qkv.new_empty(B, N, H, D), qkv.new_empty(B, N // num_frames, H, num_frames, dtype=torch.float32)


@torch.library.custom_op("openvid::temporal_attention_packed_bwd", mutates_args=())
def _temporal_attention_packed_bwd(
    dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, num_frames: int,
    softmax_scale: float, backend: str,
) -> torch.Tensor:
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    as_frames = lambda t: t.unflatten(1, (num_frames, t.shape[1] // num_frames))  # noqa: E731
    _backward(as_frames(dout), *_unpack(qkv, num_frames), as_frames(out), lse, *_unpack(dqkv, num_frames),
              softmax_scale, backend)
    return dqkv


@_temporal_attention_packed_bwd.register_fake
def _(dout, qkv, out, lse, num_frames, softmax_scale, backend):
    return qkv.new_empty(qkv.shape)


def _temporal_attention_packed_setup(ctx, inputs, output):
    qkv, num_frames, softmax_scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)
    ctx.num_frames, ctx.softmax_scale, ctx.backend = num_frames, softmax_scale, backend


def _temporal_attention_packed_grad(ctx, dout, _dlse):
    qkv, out, lse = ctx.saved_tensors
    dqkv = _temporal_attention_packed_bwd(dout, qkv, out, lse, ctx.num_frames, ctx.softmax_scale, ctx.backend)
    return dqkv, None, None, None


_temporal_attention_packed_fwd.register_autograd(
    _temporal_attention_packed_grad, setup_context=_temporal_attention_packed_setup
)


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------

def temporal_attention(q, k, v, softmax_scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Attention over dim 1 (frames) for every position and head, reading strided q, k, v in place.

    Args:
        q, k, v: ``[B, T, S, H, D]`` (or ``[N, T, H, D]``, read as S = 1) of one shape, dtype and device; any
            strides with a unit head-dim stride. Kernel backends: T <= 128 (``auto`` sends longer sequences to
            ``scaled_dot_product_attention``), D a multiple of 8 up to 128, fp32/fp16/bf16 (CUDA: fp16/bf16).
        softmax_scale: multiplies ``q k^T`` before the softmax; default ``D ** -0.5``.
        backend: ``None`` (the default from :func:`openvid_kernels.use_backend` / ``OPENVID_BACKEND``),
            ``"auto"``, ``"cuda"``, ``"triton"`` or ``"reference"``.

    Returns:
        The output, contiguous, of q's shape and dtype. Differentiable in q, k and v.
    """
    tensors = dict(q=q, k=k, v=v)
    for name, t in tensors.items():
        args.check_tensor(t, name)
    args.check_same(tensors)
    if q.dim() == 4:
        return temporal_attention(q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2), softmax_scale, backend).squeeze(2)
    if q.dim() != 5:
        raise ValueError(f"q, k, v must be 5-D [B, T, S, H, D] or 4-D [N, T, H, D], got shape {list(q.shape)}")
    frames, head_dim = q.shape[1], q.shape[-1]
    scale = args.softmax_scale_or_default(softmax_scale, head_dim)
    name = _kernel_backend(backend, q, frames)
    if name == "reference":
        return temporal_attention_reference(q, k, v, scale)
    for tensor_name, t in tensors.items():
        args.check_kernel_dtype_and_head_dim(t, tensor_name)
    _check_frames(frames, "q", name)
    out, _ = _temporal_attention_fwd(q, k, v, scale, name)
    return out


def temporal_attention_packed(
    qkv, num_frames: int, softmax_scale: float | None = None, backend: str | None = None
) -> torch.Tensor:
    """Temporal attention on the packed output of a qkv projection, in the model's token order.

    Args:
        qkv: ``[B, T*S, 3, H, D]`` with tokens frame-major (token ``t * S + s``), any strides with a unit
            head-dim stride (e.g. ``linear(x).unflatten(-1, (3, H, D))``). Limits as :func:`temporal_attention`.
        num_frames: T; ``qkv.shape[1]`` must be a multiple of it.
        softmax_scale, backend: as :func:`temporal_attention`.

    Returns:
        ``[B, T*S, H, D]`` contiguous, qkv's dtype, token order unchanged. The gradient flows back as one packed
        ``[B, T*S, 3, H, D]`` tensor.
    """
    args.check_tensor(qkv, "qkv")
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must be 5-D [B, T*S, 3, H, D], got shape {list(qkv.shape)}")
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
    if qkv.shape[1] % num_frames:
        raise ValueError(
            f"qkv has {qkv.shape[1]} tokens (dim 1), not a multiple of num_frames = {num_frames}; tokens must be "
            "T*S in frame-major order"
        )
    head_dim = qkv.shape[-1]
    scale = args.softmax_scale_or_default(softmax_scale, head_dim)
    name = _kernel_backend(backend, qkv, num_frames)
    if name == "reference":
        return temporal_attention_packed_reference(qkv, num_frames, scale)
    args.check_kernel_dtype_and_head_dim(qkv, "qkv")
    _check_frames(num_frames, "qkv", name)
    out, _ = _temporal_attention_packed_fwd(qkv, num_frames, scale, name)
    return out
