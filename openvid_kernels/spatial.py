"""Spatial attention: attention over the S tokens of every frame, read in the model's token order.

STDiT/MVDiT run, in every block, B * T independent attentions of length S (256 / 1024 / 4096 tokens at 256 /
512 / 1024 px) per head, head dim 72. Tokens are frame-major (token ``t * S + s``), so the qkv projection's
``[B, T*S, 3, H, D]`` is, with no copy, ``[B*T, S, 3, H, D]``: the ops read q, k, v in place from it and
write the output in the same order.

* :func:`spatial_attention_packed` ``(qkv [B, T*S, 3, H, D], num_frames) -> [B, T*S, H, D]``; its gradient is
  one packed ``[B, T*S, 3, H, D]`` tensor, like the qkv projection's output.
* :func:`spatial_attention` ``(q [B, Sq, H, D], k, v [B, Sk, H, D]) -> [B, Sq, H, D]``: plain
  ``[batch, seq, heads, dim]`` tensors with any strides and a unit head-dim stride, as other DiTs hold them.

Non-causal ``softmax(scale * q k^T) v``, scale ``D ** -0.5`` by default, fp32 softmax statistics and
accumulation. Kernels take D a multiple of 8 up to 128 and fp16/bf16 (Triton also fp32); at D = 72 they do 80
columns of tensor-core work, not the 96 or 128 of FlashAttention's and cuDNN's padded kernels.

Layering: functional API (validation, backend choice) -> ``torch.ops.openvid.*`` custom ops (fake impls for
``torch.compile``, autograd through backward custom ops) -> CUDA extension or Triton kernel at run time. The
reference is PyTorch's ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from openvid_kernels import _attention_args as args
from openvid_kernels import backends
from openvid_kernels.triton_kernels import attention as triton_attention


# ---------------------------------------------------------------------------------------------------------
# Reference: the spec and the fallback.
# ---------------------------------------------------------------------------------------------------------

def spatial_attention_reference(q, k, v, softmax_scale: float | None = None) -> torch.Tensor:
    """``softmax(scale * q k^T) v`` over dim 1 of ``[B, S, H, D]`` tensors; contiguous ``[B, Sq, H, D]``."""
    out = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), scale=softmax_scale)
    return out.transpose(1, 2).contiguous()


def spatial_attention_packed_reference(qkv, num_frames: int, softmax_scale: float | None = None) -> torch.Tensor:
    """:func:`spatial_attention_reference` on ``qkv [B, T*S, 3, H, D]`` per frame; returns ``[B, T*S, H, D]``."""
    return spatial_attention_reference(*_unpack(qkv, num_frames), softmax_scale).view(qkv.shape[:2] + qkv.shape[3:])


def _unpack(qkv: torch.Tensor, num_frames: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as ``[B*T, S, H, D]`` views of ``qkv [B, T*S, 3, H, D]`` (a copy only if B and T cannot merge)."""
    B, N = qkv.shape[:2]
    return qkv.reshape(B * num_frames, N // num_frames, *qkv.shape[2:]).unbind(2)


def _lse_shape(q: torch.Tensor) -> tuple[int, int, int]:
    B, S, H, _ = q.shape
    return B, H, S


# ---------------------------------------------------------------------------------------------------------
# Launchers, choosing CUDA or Triton at run time.
# ---------------------------------------------------------------------------------------------------------

def cuda_kernel(direction: str):
    """The extension's launcher for a direction, or None when the build has none. Cross and joint attention
    run on the same forward kernel (its optional text keys)."""
    return getattr(backends.cuda_extension, f"spatial_attention_{direction}", None)


def _cuda_problem(direction: str, tensors: dict[str, torch.Tensor], text: dict[str, torch.Tensor]) -> str | None:
    """Why the CUDA kernel for a direction cannot take these tensors, or None."""
    problem = args.cuda_layout_problem({**tensors, **{name: text[name] for name in ("k_text", "v_text") if text}})
    supported = getattr(backends.cuda_extension, f"spatial_attention_{direction}_supported", None)
    if problem is None and supported is not None and not supported(*tensors.values(), **text):
        problem = "its kernel needs an sm_90 (Hopper) GPU and tensor-map-compatible strides"
    return problem


def use_cuda(backend: str, direction: str, tensors: dict[str, torch.Tensor], text: dict | None = None,
             problem: str | None = None) -> bool:
    """CUDA where the extension has a kernel for the direction and it takes the call, else Triton ("auto" prefers
    CUDA: at D = 72 its forward is the faster, BENCHMARKS.md). ``text`` holds the optional text keys (k_text,
    v_text, text_lens); ``problem`` is a reason the caller already knows. With ``backend="cuda"`` a call it
    cannot take is an error, while a direction it has no kernel for (the backward, for now) runs on Triton."""
    if backend == "triton" or cuda_kernel(direction) is None:
        return False
    problem = problem or _cuda_problem(direction, tensors, text or {})
    if backend == "cuda" and problem is not None:
        raise ValueError(f"backend='cuda' cannot take this call: {problem}; use backend='triton' or 'auto'")
    return problem is None


def _forward(q, k, v, softmax_scale: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = map(args.unit_head_stride, (q, k, v))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(_lse_shape(q), dtype=torch.float32, device=q.device)
    if q.numel():
        cuda = use_cuda(backend, "forward", dict(q=q, k=k, v=v, out=out))
        launch = cuda_kernel("forward") if cuda else triton_attention.forward
        launch(q, k, v, out, lse, softmax_scale)
    return out, lse


def _backward(dout, q, k, v, out, lse, dq, dk, dv, softmax_scale: float, backend: str) -> None:
    """Writes dq, dk, dv (views into one packed buffer, or separate tensors)."""
    dout = args.unit_head_stride(dout)
    if q.numel():
        cuda = use_cuda(backend, "backward", dict(dout=dout, q=q, k=k, v=v, out=out, dq=dq, dk=dk, dv=dv))
        launch = cuda_kernel("backward") if cuda else triton_attention.backward
        launch(dout, q, k, v, out, lse, dq, dk, dv, softmax_scale)


# ---------------------------------------------------------------------------------------------------------
# Custom ops: separate q, k, v ([B, S, H, D] views) and packed qkv ([B, T*S, 3, H, D]).
# ---------------------------------------------------------------------------------------------------------

@torch.library.custom_op("openvid::spatial_attention_fwd", mutates_args=())
def _spatial_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, softmax_scale, backend)


@_spatial_attention_fwd.register_fake
def _(q, k, v, softmax_scale, backend):
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q), dtype=torch.float32)


@torch.library.custom_op("openvid::spatial_attention_bwd", mutates_args=())
def _spatial_attention_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    softmax_scale: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk, dv = (torch.empty(k.shape, dtype=k.dtype, device=k.device) for _ in range(2))
    _backward(dout, q, k, v, out, lse, dq, dk, dv, softmax_scale, backend)
    return dq, dk, dv


@_spatial_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, softmax_scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), k.new_empty(k.shape)


def _spatial_attention_setup(ctx, inputs, output):
    q, k, v, softmax_scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.softmax_scale, ctx.backend = softmax_scale, backend


def _spatial_attention_grad(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _spatial_attention_bwd(dout, q, k, v, out, lse, ctx.softmax_scale, ctx.backend)
    return dq, dk, dv, None, None


_spatial_attention_fwd.register_autograd(_spatial_attention_grad, setup_context=_spatial_attention_setup)


@torch.library.custom_op("openvid::spatial_attention_packed_fwd", mutates_args=())
def _spatial_attention_packed_fwd(
    qkv: torch.Tensor, num_frames: int, softmax_scale: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _forward(*_unpack(qkv, num_frames), softmax_scale, backend)
    return out.view(qkv.shape[:2] + qkv.shape[3:]), lse


@_spatial_attention_packed_fwd.register_fake
def _(qkv, num_frames, softmax_scale, backend):
    B, N, _, H, D = qkv.shape
    return qkv.new_empty(B, N, H, D), qkv.new_empty(B * num_frames, H, N // num_frames, dtype=torch.float32)


@torch.library.custom_op("openvid::spatial_attention_packed_bwd", mutates_args=())
def _spatial_attention_packed_bwd(
    dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, num_frames: int,
    softmax_scale: float, backend: str,
) -> torch.Tensor:
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    as_frames = lambda t: t.reshape(t.shape[0] * num_frames, t.shape[1] // num_frames, *t.shape[2:])  # noqa: E731
    _backward(as_frames(dout), *_unpack(qkv, num_frames), as_frames(out), lse, *_unpack(dqkv, num_frames),
              softmax_scale, backend)
    return dqkv


@_spatial_attention_packed_bwd.register_fake
def _(dout, qkv, out, lse, num_frames, softmax_scale, backend):
    return qkv.new_empty(qkv.shape)


def _spatial_attention_packed_setup(ctx, inputs, output):
    qkv, num_frames, softmax_scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)
    ctx.num_frames, ctx.softmax_scale, ctx.backend = num_frames, softmax_scale, backend


def _spatial_attention_packed_grad(ctx, dout, _dlse):
    qkv, out, lse = ctx.saved_tensors
    dqkv = _spatial_attention_packed_bwd(dout, qkv, out, lse, ctx.num_frames, ctx.softmax_scale, ctx.backend)
    return dqkv, None, None, None


_spatial_attention_packed_fwd.register_autograd(
    _spatial_attention_packed_grad, setup_context=_spatial_attention_packed_setup
)


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------

def spatial_attention(q, k, v, softmax_scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Attention over dim 1 (the sequence) for every batch entry and head, reading strided tensors in place.

    Args:
        q: ``[B, Sq, H, D]``; k, v: ``[B, Sk, H, D]`` (Sk may differ from Sq). One dtype and device; any strides
            with a unit head-dim stride. Kernel backends: D a multiple of 8 up to 128, fp32/fp16/bf16 (CUDA:
            fp16/bf16).
        softmax_scale: multiplies ``q k^T`` before the softmax; default ``D ** -0.5``.
        backend: ``None`` (the default from :func:`openvid_kernels.use_backend` / ``OPENVID_BACKEND``),
            ``"auto"``, ``"cuda"``, ``"triton"`` or ``"reference"``.

    Returns:
        ``[B, Sq, H, D]`` contiguous, q's dtype. Differentiable in q, k and v.
    """
    for name, t in dict(q=q, k=k, v=v).items():
        args.check_tensor(t, name)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, S, H, D], got shape {list(t.shape)}")
    args.check_same(dict(k=k, v=v))
    if (q.shape[0], *q.shape[2:]) != (k.shape[0], *k.shape[2:]):
        raise ValueError(f"q has shape {list(q.shape)} and k {list(k.shape)}; they must agree in B, H and D")
    args.check_same(dict(q=q, k=k), dims=None)  # dtype and device
    if q.shape[1] == 0 or k.shape[1] == 0:
        raise ValueError(f"q and k need at least one token (dim 1), got {q.shape[1]} and {k.shape[1]}")
    head_dim = q.shape[-1]
    scale = args.softmax_scale_or_default(softmax_scale, head_dim)
    name = backends.resolve_backend(backend, q.device)
    if name == "reference":
        return spatial_attention_reference(q, k, v, scale)
    for tensor_name, t in dict(q=q, k=k, v=v).items():
        args.check_kernel_dtype_and_head_dim(t, tensor_name)
    out, _ = _spatial_attention_fwd(q, k, v, scale, name)
    return out


def spatial_attention_packed(
    qkv, num_frames: int, softmax_scale: float | None = None, backend: str | None = None
) -> torch.Tensor:
    """Attention within every frame on the packed output of a qkv projection, in the model's token order.

    Args:
        qkv: ``[B, T*S, 3, H, D]`` with tokens frame-major (token ``t * S + s``), any strides with a unit
            head-dim stride (e.g. ``linear(x).unflatten(-1, (3, H, D))``). Limits as :func:`spatial_attention`.
        num_frames: T; ``qkv.shape[1]`` must be a multiple of it (use 1 for images or a single sequence).
        softmax_scale, backend: as :func:`spatial_attention`.

    Returns:
        ``[B, T*S, H, D]`` contiguous, qkv's dtype, token order unchanged. The gradient flows back as one packed
        ``[B, T*S, 3, H, D]`` tensor.
    """
    args.check_tensor(qkv, "qkv")
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must be 5-D [B, T*S, 3, H, D], got shape {list(qkv.shape)}")
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
    if qkv.shape[1] == 0 or qkv.shape[1] % num_frames:
        raise ValueError(
            f"qkv has {qkv.shape[1]} tokens (dim 1), not a positive multiple of num_frames = {num_frames}; tokens "
            "must be T*S in frame-major order"
        )
    scale = args.softmax_scale_or_default(softmax_scale, qkv.shape[-1])
    name = backends.resolve_backend(backend, qkv.device)
    if name == "reference":
        return spatial_attention_packed_reference(qkv, num_frames, scale)
    args.check_kernel_dtype_and_head_dim(qkv, "qkv")
    out, _ = _spatial_attention_packed_fwd(qkv, num_frames, scale, name)
    return out
