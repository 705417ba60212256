"""Fused adaLN modulation: ``LayerNorm(x) * (1 + scale) + shift`` and the gated residual step before it.

In STDiT/MVDiT (adaLN-single, as in PixArt-alpha) every sub-layer does::

    h = LayerNorm(x) * (1 + scale) + shift        # LayerNorm without affine, eps 1e-6
    x = x + gate * f(h)

:func:`layernorm_modulate` is the first line in one pass over memory. :func:`gated_residual_layernorm_modulate`
fuses the residual step of one sub-layer with the modulated LayerNorm of the next:
``x_new = x + gate * y; h = LayerNorm(x_new) * (1 + scale) + shift``, returning both. :func:`gated_residual`
is the residual step alone, for a sum that feeds no LayerNorm. :func:`add_position_embedding` adds an embedding
broadcast over tokens (spatial or temporal position embeddings), on the same kernel.

Shapes: ``x``/``y`` are ``[B, N, C]``; each modulation tensor (shift, scale, gate, all of one shape) is one of
  * ``[B, C]`` or ``[B, 1, C]``: per sample;
  * ``[B, T, 1, C]`` with ``N = T * S`` tokens in frame-major order (token ``t * S + s``): per frame;
  * ``[B, N, C]``: per token.
Any batch/token strides are read in place (e.g. shift/scale/gate as chunks of one ``[B, 6, C]`` tensor); a
tensor whose channel dim is not contiguous is copied first. Statistics are fp32; outputs have x's dtype and
are contiguous. fp32/fp16/bf16 on the kernel backends, any float dtype on the reference backend.

Layering: functional API (validation, backend choice) -> ``torch.ops.openvid.*`` custom ops (fake impls for
``torch.compile``, autograd through backward custom ops) -> CUDA extension or Triton kernel at run time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from openvid_kernels import backends
from openvid_kernels.triton_kernels import adaln as triton_adaln

MAX_CHANNELS = 8192
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Backward CTAs per multiprocessor when modulation gradients are reduced over many tokens.
_BACKWARD_PROGRAMS_PER_SM = 4


# ---------------------------------------------------------------------------------------------------------
# Reference: the spec, and the fallback. Same math as upstream's `t2i_modulate(norm(x), shift, scale)`.
# ---------------------------------------------------------------------------------------------------------

def _by_group(t: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, N, C]`` tokens as ``[B, G, N // G, C]``, so a ``[B, G, 1, C]`` modulation broadcasts in place."""
    B, N, C = t.shape
    return t.reshape(B, groups, N // groups, C)


def layernorm_modulate_reference(x, shift, scale, eps: float = 1e-6):
    """Plain-PyTorch ``LayerNorm(x) * (1 + scale) + shift``; shapes as in the module docstring."""
    shift, scale = _grouped(shift, x, "shift"), _grouped(scale, x, "scale")
    normed = _by_group(F.layer_norm(x, (x.shape[-1],), eps=eps), shift.shape[1])
    return (normed * (1 + scale.unsqueeze(2)) + shift.unsqueeze(2)).flatten(1, 2)


def gated_residual_reference(x, y, gate):
    """Plain-PyTorch ``x + gate * y`` (the product rounded to x's dtype before the sum)."""
    gate = _grouped(gate, x, "gate")
    groups = gate.shape[1]
    return (_by_group(x, groups) + gate.unsqueeze(2) * _by_group(y, groups)).flatten(1, 2)


def add_position_embedding_reference(x, embedding, tokens_per_row: int = 1):
    """Plain-PyTorch ``x + embedding`` broadcast over tokens: token n of ``x [B, N, C]`` gets row
    ``(n // tokens_per_row) % R`` of ``embedding [R, C]`` (or ``[1 or B, R, C]``), summed in at least fp32 and
    rounded once to x's dtype."""
    B, N, C = x.shape
    rows = _embedding_rows(embedding)
    R = rows.shape[1]
    dtype = torch.promote_types(torch.promote_types(x.dtype, rows.dtype), torch.float32)
    out = x.to(dtype).reshape(B, N // (R * tokens_per_row), R, tokens_per_row, C) + rows.to(dtype)[:, None, :, None]
    return out.reshape(B, N, C).to(x.dtype)


def _embedding_rows(embedding: torch.Tensor) -> torch.Tensor:
    return embedding if embedding.dim() == 3 else embedding.unsqueeze(0)


def gated_residual_layernorm_modulate_reference(x, y, gate, shift, scale, eps: float = 1e-6):
    """Plain-PyTorch ``x_new = x + gate * y; h = LayerNorm(x_new) * (1 + scale) + shift``; returns both."""
    x_new = gated_residual_reference(x, y, gate)
    return x_new, layernorm_modulate_reference(x_new, shift, scale, eps)


# ---------------------------------------------------------------------------------------------------------
# Argument checks. They read only shapes, dtypes and devices, so they also run while torch.compile traces.
# ---------------------------------------------------------------------------------------------------------

def _grouped(mod: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    """The ``[B, G, C]`` view of a modulation tensor given in any of the accepted shapes."""
    B, N, C = x.shape
    shape = tuple(mod.shape)
    if shape == (B, C):
        return mod.unsqueeze(1)
    if shape in ((B, 1, C), (B, N, C)):
        return mod
    if mod.dim() == 4 and shape[0] == B and shape[2] == 1 and shape[3] == C and shape[1] > 0 and N % shape[1] == 0:
        return mod.squeeze(2)
    raise ValueError(
        f"{name} must have shape [B, C], [B, 1, C] (per sample), [B, T, 1, C] with N divisible by T "
        f"(per frame) or [B, N, C] (per token) for x of shape [B, N, C] = {list(x.shape)}; got {list(shape)}"
    )


def _check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _check_inputs(x: torch.Tensor, y: torch.Tensor | None, mods: dict[str, torch.Tensor]) -> None:
    _check_tensor(x, "x")
    if x.dim() != 3:
        raise ValueError(f"x must be 3-D [B, N, C], got shape {list(x.shape)}")
    others = dict(mods) if y is None else {"y": y, **mods}
    for name, t in others.items():
        _check_tensor(t, name)
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; cast it to x's dtype")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if y is not None and y.shape != x.shape:
        raise ValueError(f"y must have x's shape {list(x.shape)}, got {list(y.shape)}")
    for name, t in mods.items():
        _grouped(t, x, name)
    shapes = {name: list(t.shape) for name, t in mods.items()}
    if len({tuple(shape) for shape in shapes.values()}) != 1:
        raise ValueError(f"the modulation tensors must share one shape, got {shapes}")


def _check_kernel_limits(x: torch.Tensor) -> None:
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; the kernels take {KERNEL_DTYPES} (use backend='reference')")
    if x.shape[-1] > MAX_CHANNELS:
        raise ValueError(
            f"x has C = {x.shape[-1]} channels; the kernels take at most {MAX_CHANNELS} (use backend='reference')"
        )


# ---------------------------------------------------------------------------------------------------------
# Launchers: one forward and one backward for both ops, choosing CUDA or Triton at run time.
# ---------------------------------------------------------------------------------------------------------

def _unit_channel_stride(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _cuda_layout_problem(tensors: dict[str, torch.Tensor | None]) -> str | None:
    """Why the CUDA kernels (16-byte vector accesses) cannot take these tensors, or None if they can."""
    for name, t in tensors.items():
        if t is None:
            continue
        if t.shape[-1] % 8:
            return f"{name} has C = {t.shape[-1]} channels, not a multiple of 8"
        if t.data_ptr() % 16:
            return f"{name}'s data pointer is not 16-byte aligned"
        if any(s % 8 for s in t.stride()[:-1]):
            return f"{name} has strides {t.stride()}, not multiples of 8 elements"
    return None


# Where both kernel backends take a call, "auto" runs the faster, measured on an H100 at bf16 C = 1152
# (BENCHMARKS.md): the CUDA kernels except for the residual forward, where Triton moves 2.9 TB/s to 2.5.
_AUTO_PREFERS_CUDA = {"forward": True, "residual_forward": False, "backward": True}


def _use_cuda(backend: str, direction: str, tensors: dict[str, torch.Tensor | None]) -> bool:
    if backend == "triton" or (backend == "auto" and not (backends.cuda_extension and _AUTO_PREFERS_CUDA[direction])):
        return False
    problem = _cuda_layout_problem(tensors)
    if backend == "cuda" and problem is not None:
        raise ValueError(f"backend='cuda' cannot take this call: {problem}; use backend='triton' or 'auto'")
    return problem is None


def _forward(x, y, gate, shift, scale, eps: float, backend: str):
    x, y, gate, shift, scale = map(_unit_channel_stride, (x, y, gate, shift, scale))
    B, N, C = x.shape
    h = torch.empty((B, N, C), dtype=x.dtype, device=x.device)
    x_out = torch.empty_like(h) if y is not None else None
    mean = torch.empty(B * N, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    args = (x, y, gate, shift, scale, h, x_out, mean, rstd, eps)
    tensors = dict(x=x, y=y, gate=gate, shift=shift, scale=scale)
    direction = "forward" if y is None else "residual_forward"
    launch = backends.cuda_extension.adaln_forward if _use_cuda(backend, direction, tensors) else triton_adaln.forward
    if x.numel():
        launch(*args)
    return h, x_out, mean, rstd


def _chunks_per_group(batch: int, groups: int, group_size: int, device: torch.device) -> int:
    """Split each modulation group's tokens into enough chunks to fill the GPU (each chunk one CTA)."""
    target = _BACKWARD_PROGRAMS_PER_SM * backends.multiprocessor_count(device)
    chunks = max(1, min(group_size, -(-target // (batch * groups))))
    rows_per_chunk = -(-group_size // chunks)
    return -(-group_size // rows_per_chunk)


def _backward(grad_h, grad_x_out, x_ln, mean, rstd, scale, y, gate, backend: str):
    grad_h, grad_x_out, x_ln, scale, y, gate = map(_unit_channel_stride, (grad_h, grad_x_out, x_ln, scale, y, gate))
    B, N, C = x_ln.shape
    G = scale.shape[1]
    K = _chunks_per_group(B, G, N // G, x_ln.device) if N else 1
    grad_x = torch.empty((B, N, C), dtype=x_ln.dtype, device=x_ln.device)
    grad_y = torch.empty_like(grad_x) if y is not None else None
    partials = torch.empty((3 if y is not None else 2, B, G, K, C), dtype=torch.float32, device=x_ln.device)
    partial_gate = partials[2] if y is not None else None
    args = (grad_h, grad_x_out, x_ln, mean, rstd, scale, y, gate, grad_x, grad_y,
            partials[0], partials[1], partial_gate)
    tensors = dict(grad_h=grad_h, grad_x_out=grad_x_out, x_ln=x_ln, scale=scale, y=y, gate=gate)
    launch = backends.cuda_extension.adaln_backward if _use_cuda(backend, "backward", tensors) else triton_adaln.backward
    if N:
        launch(*args)
    else:
        partials.zero_()
    grad_mods = [partial.sum(2).to(x_ln.dtype) for partial in partials]  # separate tensors: outputs may not alias
    return grad_x, grad_y, grad_mods


# ---------------------------------------------------------------------------------------------------------
# Custom ops. Modulation tensors arrive as [B, G, C] views; mean/rstd are returned for backward only.
# ---------------------------------------------------------------------------------------------------------

@torch.library.custom_op("openvid::layernorm_modulate_fwd", mutates_args=())
def _layernorm_modulate_fwd(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h, _, mean, rstd = _forward(x, None, None, shift, scale, eps, backend)
    return h, mean, rstd


@_layernorm_modulate_fwd.register_fake
def _(x, shift, scale, eps, backend):
    B, N, C = x.shape
    stats = x.new_empty(B * N, dtype=torch.float32)
    return x.new_empty(B, N, C), stats, torch.empty_like(stats)


@torch.library.custom_op("openvid::layernorm_modulate_bwd", mutates_args=())
def _layernorm_modulate_bwd(
    grad_h: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, scale: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_x, _, (grad_shift, grad_scale) = _backward(grad_h, None, x, mean, rstd, scale, None, None, backend)
    return grad_x, grad_shift, grad_scale


@_layernorm_modulate_bwd.register_fake
def _(grad_h, x, mean, rstd, scale, backend):
    return x.new_empty(x.shape), scale.new_empty(scale.shape), scale.new_empty(scale.shape)


def _layernorm_modulate_setup(ctx, inputs, output):
    x, _, scale, _, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, mean, rstd, scale)
    ctx.backend = backend


def _layernorm_modulate_grad(ctx, grad_h, _grad_mean, _grad_rstd):
    x, mean, rstd, scale = ctx.saved_tensors
    grad_x, grad_shift, grad_scale = _layernorm_modulate_bwd(grad_h, x, mean, rstd, scale, ctx.backend)
    return grad_x, grad_shift, grad_scale, None, None


_layernorm_modulate_fwd.register_autograd(_layernorm_modulate_grad, setup_context=_layernorm_modulate_setup)


@torch.library.custom_op("openvid::gated_residual_layernorm_modulate_fwd", mutates_args=())
def _gated_residual_fwd(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
    eps: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    h, x_out, mean, rstd = _forward(x, y, gate, shift, scale, eps, backend)
    return x_out, h, mean, rstd


@_gated_residual_fwd.register_fake
def _(x, y, gate, shift, scale, eps, backend):
    B, N, C = x.shape
    stats = x.new_empty(B * N, dtype=torch.float32)
    return x.new_empty(B, N, C), x.new_empty(B, N, C), stats, torch.empty_like(stats)


@torch.library.custom_op("openvid::gated_residual_layernorm_modulate_bwd", mutates_args=())
def _gated_residual_bwd(
    grad_h: torch.Tensor, grad_x_out: torch.Tensor | None, x_out: torch.Tensor, mean: torch.Tensor,
    rstd: torch.Tensor, scale: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_x, grad_y, (grad_shift, grad_scale, grad_gate) = _backward(
        grad_h, grad_x_out, x_out, mean, rstd, scale, y, gate, backend
    )
    return grad_x, grad_y, grad_gate, grad_shift, grad_scale


@_gated_residual_bwd.register_fake
def _(grad_h, grad_x_out, x_out, mean, rstd, scale, y, gate, backend):
    mod = scale.new_empty(scale.shape)
    return x_out.new_empty(x_out.shape), x_out.new_empty(x_out.shape), mod, torch.empty_like(mod), torch.empty_like(mod)


def _gated_residual_setup(ctx, inputs, output):
    _, y, gate, _, scale, _, backend = inputs
    x_out, _, mean, rstd = output
    ctx.save_for_backward(x_out, mean, rstd, scale, y, gate)
    ctx.backend = backend


def _gated_residual_grad(ctx, grad_x_out, grad_h, _grad_mean, _grad_rstd):
    x_out, mean, rstd, scale, y, gate = ctx.saved_tensors
    if grad_h is None:
        grad_h = torch.zeros_like(x_out)
    grad_x, grad_y, grad_gate, grad_shift, grad_scale = _gated_residual_bwd(
        grad_h, grad_x_out, x_out, mean, rstd, scale, y, gate, ctx.backend
    )
    return grad_x, grad_y, grad_gate, grad_shift, grad_scale, None, None


_gated_residual_fwd.register_autograd(_gated_residual_grad, setup_context=_gated_residual_setup)


@torch.library.custom_op("openvid::gated_residual_fwd", mutates_args=())
def _residual_fwd(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    x, y, gate = map(_unit_channel_stride, (x, y, gate))
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    triton_adaln.gated_residual(x, y, gate, out)
    return out


@_residual_fwd.register_fake
def _(x, y, gate):
    return x.new_empty(x.shape)


def _residual_setup(ctx, inputs, output):
    _, y, gate = inputs
    ctx.save_for_backward(y, gate)


def _residual_grad(ctx, grad_out):
    y, gate = ctx.saved_tensors
    groups = gate.shape[1]
    grad_by_group = _by_group(grad_out, groups)
    grad_y = (grad_by_group * gate.unsqueeze(2)).flatten(1, 2)
    # As torch.addcmul's own backward: the product in the input dtype, summed with fp32 accumulation.
    grad_gate = (grad_by_group * _by_group(y, groups)).sum(2)
    return grad_out, grad_y, grad_gate


_residual_fwd.register_autograd(_residual_grad, setup_context=_residual_setup)


@torch.library.custom_op("openvid::add_position_embedding", mutates_args=())
def _add_embedding_fwd(x: torch.Tensor, rows: torch.Tensor, tokens_per_row: int) -> torch.Tensor:
    x, rows = map(_unit_channel_stride, (x, rows))
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    triton_adaln.gated_residual(x, None, rows, out, group_size=tokens_per_row)
    return out


@_add_embedding_fwd.register_fake
def _(x, rows, tokens_per_row):
    return x.new_empty(x.shape)


def _add_embedding_setup(ctx, inputs, output):
    _, rows, tokens_per_row = inputs
    ctx.rows_shape, ctx.rows_dtype, ctx.tokens_per_row = rows.shape, rows.dtype, tokens_per_row


def _add_embedding_grad(ctx, grad_out):
    grad_rows = None
    if ctx.needs_input_grad[1]:  # each row's gradient: the sum over the tokens that took it
        B, R, C = ctx.rows_shape
        grad_rows = grad_out.reshape(B, -1, R, ctx.tokens_per_row, C).sum((1, 3), dtype=torch.float32)
        grad_rows = grad_rows.to(ctx.rows_dtype)
    return grad_out, grad_rows, None


_add_embedding_fwd.register_autograd(_add_embedding_grad, setup_context=_add_embedding_setup)


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------

def layernorm_modulate(x, shift, scale, eps: float = 1e-6, backend: str | None = None) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale) + shift`` (LayerNorm without affine), in one pass over memory.

    Args:
        x: ``[B, N, C]`` tokens, fp32/fp16/bf16, C <= 8192 on the kernel backends; unit channel stride is
            read in place, other strides are copied first.
        shift, scale: modulation of one shape: ``[B, C]`` / ``[B, 1, C]`` (per sample), ``[B, T, 1, C]``
            (per frame, ``N = T * S`` frame-major) or ``[B, N, C]`` (per token); x's dtype and device.
        eps: LayerNorm epsilon (1e-6 in STDiT/MVDiT).
        backend: ``None`` (the default from :func:`openvid_kernels.use_backend` / ``OPENVID_BACKEND``),
            ``"auto"``, ``"cuda"``, ``"triton"`` or ``"reference"``.

    Returns:
        ``h``: ``[B, N, C]`` contiguous, x's dtype. Differentiable in x, shift and scale.
    """
    _check_inputs(x, None, {"shift": shift, "scale": scale})
    name = backends.resolve_backend(backend, x.device)
    if name == "reference":
        return layernorm_modulate_reference(x, shift, scale, eps)
    _check_kernel_limits(x)
    shift_g, scale_g = _grouped(shift, x, "shift"), _grouped(scale, x, "scale")
    h, _, _ = _layernorm_modulate_fwd(x, shift_g, scale_g, float(eps), name)
    return h


def gated_residual_layernorm_modulate(
    x, y, gate, shift, scale, eps: float = 1e-6, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual step and the next modulated LayerNorm in one pass: returns ``(x_new, h)`` with

    ``x_new = x + gate * y`` and ``h = LayerNorm(x_new) * (1 + scale) + shift``.

    ``y`` is the sub-layer's output, of x's shape; ``gate``, ``shift`` and ``scale`` share one modulation
    shape (see :func:`layernorm_modulate`). ``h`` is computed from ``x_new`` as stored in x's dtype.
    Differentiable in all five tensors; either output may be used.
    """
    _check_inputs(x, y, {"gate": gate, "shift": shift, "scale": scale})
    name = backends.resolve_backend(backend, x.device)
    if name == "reference":
        return gated_residual_layernorm_modulate_reference(x, y, gate, shift, scale, eps)
    _check_kernel_limits(x)
    gate_g, shift_g, scale_g = (_grouped(t, x, n) for t, n in ((gate, "gate"), (shift, "shift"), (scale, "scale")))
    x_out, h, _, _ = _gated_residual_fwd(x, y, gate_g, shift_g, scale_g, float(eps), name)
    return x_out, h


def gated_residual(x, y, gate, backend: str | None = None) -> torch.Tensor:
    """The residual step ``x + gate * y`` of a sub-layer whose sum feeds no LayerNorm (otherwise use
    :func:`gated_residual_layernorm_modulate`), in one pass over memory.

    ``x``, ``y``: ``[B, N, C]``; ``gate``: a modulation shape (see :func:`layernorm_modulate`). The kernel
    (Triton, for every kernel backend: the step is a pure stream of memory) computes in fp32 with one rounding,
    where the reference makes two passes (a product rounded to x's dtype, then the sum). Differentiable in all
    three; the backward is plain PyTorch (one product and one reduction per gradient).
    """
    _check_inputs(x, y, {"gate": gate})
    if backends.resolve_backend(backend, x.device) == "reference":
        return gated_residual_reference(x, y, gate)
    _check_kernel_limits(x)
    return _residual_fwd(x, y, _grouped(gate, x, "gate"))


def add_position_embedding(x, embedding, tokens_per_row: int = 1, backend: str | None = None) -> torch.Tensor:
    """``x + embedding`` broadcast over tokens, in one pass over memory, summed in fp32 and rounded once.

    Token n of ``x [B, N, C]`` gets row ``(n // tokens_per_row) % R`` of ``embedding``:
      * spatial position embedding ``[S, C]`` (or ``[1, S, C]``) on frame-major tokens ``N = T * S``:
        ``tokens_per_row=1``, token ``t * S + s`` gets row s;
      * temporal position embedding ``[T, C]``: ``tokens_per_row=S``, every token of frame t gets row t.
    ``embedding`` is ``[R, C]``, ``[1, R, C]`` or ``[B, R, C]`` (per sample), any float dtype (e.g. a float32
    buffer with bf16 tokens: no rounding of the embedding first); N must be a multiple of ``R * tokens_per_row``.
    Returns a contiguous tensor of x's dtype; differentiable in both (the embedding's gradient sums its tokens').
    Broadcasting in PyTorch takes its slower non-vectorized path here (about a third of the memory bandwidth).
    """
    _check_tensor(x, "x")
    _check_tensor(embedding, "embedding")
    if x.dim() != 3:
        raise ValueError(f"x must be 3-D [B, N, C], got shape {list(x.shape)}")
    B, N, C = x.shape
    rows = _embedding_rows(embedding)
    if embedding.dim() not in (2, 3) or rows.shape[0] not in (1, B) or rows.shape[2] != C:
        raise ValueError(f"embedding must be [R, C], [1, R, C] or [B, R, C] with C = {C} and B = {B} (x is "
                         f"{list(x.shape)}), got {list(embedding.shape)}")
    if embedding.device != x.device:
        raise ValueError(f"embedding is on {embedding.device} but x is on {x.device}")
    if not isinstance(tokens_per_row, int) or isinstance(tokens_per_row, bool) or tokens_per_row < 1:
        raise ValueError(f"tokens_per_row must be an int >= 1, got {tokens_per_row!r}")
    R = rows.shape[1]
    if R == 0 or N % (R * tokens_per_row):
        raise ValueError(f"x's N = {N} tokens must be a multiple of the embedding's R = {R} rows times "
                         f"tokens_per_row = {tokens_per_row}")
    if backends.resolve_backend(backend, x.device) == "reference":
        return add_position_embedding_reference(x, embedding, tokens_per_row)
    _check_kernel_limits(x)
    if embedding.dtype not in KERNEL_DTYPES:
        raise TypeError(f"embedding has dtype {embedding.dtype}; the kernels take {KERNEL_DTYPES} (use "
                        "backend='reference')")
    return _add_embedding_fwd(x, rows.expand(B, R, C), tokens_per_row)
