"""Linear layers with the adaLN gated residual in the GEMM's epilogue: ``x + gate * (input @ weight^T + bias)``.

In STDiT/MVDiT the attention output projections and the MLP's second linear feed a gated residual. Unfused,
the projection is written to memory and read back by :func:`openvid_kernels.gated_residual`.
:func:`linear_gated_residual` computes the sum in the epilogue of the GEMM (a CUTLASS Hopper kernel in the CUDA
extension), which reads the residual tile where it writes the output tile: two passes over the ``[B, N, C]``
activations fewer per sub-layer.

The fused kernel serves inference. In training the gate's gradient needs the projection itself, which the
fused kernel never writes, so with autograd recording the op runs unfused (cuBLAS, then the gated-residual
kernel, whose backward has what it needs) rather than recomputing the projection in the backward.

Layering: functional API (validation, backend choice) -> ``torch.ops.openvid.linear_gated_residual`` (fake
impl for ``torch.compile``, autograd) -> the CUDA extension when it takes the call, else the unfused ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from openvid_kernels import backends
from openvid_kernels.adaln import (_by_group, _check_inputs, _check_tensor, _grouped, gated_residual,
                                   gated_residual_reference)

# The fused kernel runs a GEMM per modulation group (sample, or frame): groups shorter than one 128-row tile
# (e.g. per-token gates) would waste most of each tile, so they run unfused.
_MIN_ROWS_PER_GROUP = 128


def linear_gated_residual_reference(x, input, weight, bias, gate):
    """Plain-PyTorch ``x + gate * F.linear(input, weight, bias)`` (``gate`` None: ``x + F.linear(...)``): the
    spec, and the unfused path's math."""
    projection = F.linear(input, weight, bias)
    return x + projection if gate is None else gated_residual_reference(x, projection, gate)


def _unfused(x, input, weight, bias, gate, backend: str):
    """cuBLAS linear, then the residual step on ``backend`` (gate ``[B, G, C]`` or None)."""
    projection = F.linear(input, weight, bias)
    if gate is None:
        return x + projection
    return gated_residual(x, projection, gate.unsqueeze(2), backend=backend)  # [B, G, 1, C]: per group


# ---------------------------------------------------------------------------------------------------------
# Custom op. The CUDA kernel takes [L, M, K] x [N, K] -> [L, M, N] with one gate row per l: the tokens of each
# modulation group (a sample, or a frame with per-frame gates) are one batch entry.
# ---------------------------------------------------------------------------------------------------------

def _kernel_views(x, input, weight, bias, gate, out):
    """The [L, M, *] views the CUDA kernel takes (L = B * groups), or None when it cannot take the call."""
    if backends.cuda_extension is None or x.device.type != "cuda":
        return None
    B, N, C = x.shape
    groups = 1 if gate is None else gate.shape[1]
    if N // groups < _MIN_ROWS_PER_GROUP:
        return None
    views = (
        input.reshape(B * groups, N // groups, input.shape[-1]),
        weight,
        bias,
        None if gate is None else gate.reshape(B * groups, C),  # a copy of a few kilobytes if not a view
        x.reshape(B * groups, N // groups, C),
        out.view(B * groups, N // groups, C),
    )
    return views if backends.cuda_extension.linear_gated_residual_supported(*views) else None


@torch.library.custom_op("openvid::linear_gated_residual", mutates_args=())
def _linear_gated_residual(x: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           gate: torch.Tensor | None, backend: str) -> torch.Tensor:
    if backend in ("auto", "cuda"):
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        views = _kernel_views(x, input, weight, bias, gate, out)
        if views is not None:
            backends.cuda_extension.linear_gated_residual(*views)
            return out
        if backend == "cuda":
            raise ValueError(
                "linear_gated_residual: backend='cuda' cannot take this call (it needs the CUDA extension on an "
                f"sm_90 GPU, fp16/bf16, C and K multiples of 8 and at least {_MIN_ROWS_PER_GROUP} tokens per gate "
                f"row); got x {list(x.shape)} {x.dtype}, input {list(input.shape)}, gate "
                f"{None if gate is None else list(gate.shape)}"
            )
    return _unfused(x, input, weight, bias, gate, "triton" if backend != "reference" and x.is_cuda else "reference")


@_linear_gated_residual.register_fake
def _(x, input, weight, bias, gate, backend):
    return x.new_empty(x.shape)


def _setup(ctx, inputs, output):
    _, input, weight, bias, gate, _ = inputs
    ctx.save_for_backward(input, weight, bias, gate)
    ctx.has_bias = bias is not None


def _grad(ctx, grad_out):
    # Used only when the op is called directly with autograd recording (the public function runs unfused
    # then): the projection is recomputed for the gate's gradient.
    input, weight, bias, gate = ctx.saved_tensors
    grad_projection, grad_gate = grad_out, None
    if gate is not None:
        groups = gate.shape[1]
        grad_projection = (_by_group(grad_out, groups) * gate.unsqueeze(2)).flatten(1, 2)
        grad_gate = (_by_group(grad_out, groups) * _by_group(F.linear(input, weight, bias), groups)).sum(2)
    grad_input = grad_projection @ weight
    grad_weight = grad_projection.flatten(0, -2).t() @ input.flatten(0, -2)
    grad_bias = grad_projection.flatten(0, -2).sum(0) if ctx.has_bias else None
    return grad_out, grad_input, grad_weight, grad_bias, grad_gate, None


_linear_gated_residual.register_autograd(_grad, setup_context=_setup)


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------

def linear_gated_residual(x, input, weight, bias, gate, backend: str | None = None) -> torch.Tensor:
    """``x + gate * (input @ weight^T + bias)``: a linear layer and the (gated) residual step after it.

    Args:
        x: the residual stream ``[B, N, C]``.
        input: the linear's input ``[B, N, K]`` (e.g. the attention output, or the MLP's hidden activations).
        weight: ``[C, K]`` (``nn.Linear.weight``); bias: ``[C]`` or None.
        gate: a modulation shape (see :func:`openvid_kernels.layernorm_modulate`): ``[B, C]`` / ``[B, 1, C]``
            per sample, ``[B, T, 1, C]`` per frame, or ``[B, N, C]`` per token; or None for a plain residual
            ``x + input @ weight^T + bias``. All tensors of x's dtype and device.
        backend: as every op's. ``"auto"`` and ``"cuda"`` run the fused Hopper GEMM (fp16/bf16, C and K
            multiples of 8, per-sample or per-frame gates over at least 128 tokens) when autograd is not
            recording; otherwise, and on ``"triton"``, a cuBLAS linear and the gated-residual kernel.

    Returns:
        ``[B, N, C]`` contiguous, x's dtype. Differentiable in every tensor argument. The fused kernel adds in
        fp32 and rounds once; the reference rounds the projection and the gated product to x's dtype first.
    """
    if gate is None:
        _check_tensor(x, "x")
        if x.dim() != 3:
            raise ValueError(f"x must be 3-D [B, N, C], got shape {list(x.shape)}")
    else:
        _check_inputs(x, None, {"gate": gate})
    B, N, C = x.shape
    for name, t in (("input", input), ("weight", weight)) + ((("bias", bias),) if bias is not None else ()):
        if not isinstance(t, torch.Tensor) or t.dtype != x.dtype or t.device != x.device:
            raise TypeError(f"{name} must be a tensor of x's dtype {x.dtype} on {x.device}, got "
                            f"{getattr(t, 'dtype', type(t).__name__)} on {getattr(t, 'device', None)}")
    if input.dim() != 3 or input.shape[:2] != (B, N):
        raise ValueError(f"input must be [B, N, K] with [B, N] = {[B, N]} (x is {list(x.shape)}), got "
                         f"{list(input.shape)}")
    if tuple(weight.shape) != (C, input.shape[2]):
        raise ValueError(f"weight must be [C, K] = {[C, input.shape[2]]} for x {list(x.shape)} and input "
                         f"{list(input.shape)}, got {list(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (C,):
        raise ValueError(f"bias must be [C] = {[C]}, got {list(bias.shape)}")
    name = backends.resolve_backend(backend, x.device)
    if name == "reference":
        return linear_gated_residual_reference(x, input, weight, bias, gate)
    recording = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, input, weight, bias, gate))
    grouped_gate = None if gate is None else _grouped(gate, x, "gate")
    if recording or name == "triton":
        return _unfused(x, input, weight, bias, grouped_gate, name)
    return _linear_gated_residual(x, input, weight, bias, grouped_gate, name)
