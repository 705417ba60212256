"""MVDiT joint attention: per frame, the S video tokens and the L text tokens attend jointly, as if concatenated.

MVDiT carries a second stream of text tokens (the caption repeated per frame) through its blocks; the spatial
attention of a block runs, per frame, over the concatenation [video; text] with padded text tokens masked out
as keys. Upstream concatenates the two streams (a copy of every token) and builds the full fp32 score matrix;
here q, k, v are read in place from the two streams' qkv projections, the keys are streamed video first, then
the real text tokens (text key blocks past a frame's length are skipped), and the outputs go back to the two
streams.

* :func:`joint_attention` ``(video_qkv [B, T, S, 3, H, D], text_qkv [B, T, L, 3, H, D], text_lens)
  -> (video_out [B, T, S, H, D], text_out [B, T, L, H, D])``

Padded text tokens (index >= the length) are never read, and their outputs and gradients are zero, so changing
them changes no output. Upstream computes outputs for them too; those only ever reach padded positions of the
text stream, which nothing real reads. The reference is PyTorch's ``scaled_dot_product_attention`` on the
concatenated tokens with a boolean key mask.
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

def joint_attention_reference(video_qkv, text_qkv, text_lens, softmax_scale: float | None = None):
    """Dense masked attention over ``cat([video, text], dim=2)`` per frame, keys of padded text tokens masked,
    outputs of padded text tokens zeroed. ``text_lens`` is ``[B]`` or ``[B, T]``."""
    B, T, S = video_qkv.shape[:3]
    L = text_qkv.shape[2]
    lens = torch.as_tensor(text_lens, device=video_qkv.device)
    lens = lens.view(B, T) if lens.dim() == 2 else lens[:, None].expand(B, T)
    real = torch.cat([torch.ones(B, T, S, dtype=torch.bool, device=video_qkv.device),
                      torch.arange(L, device=video_qkv.device) < lens[..., None]], dim=2).flatten(0, 1)
    q, k, v = torch.cat([video_qkv, text_qkv], dim=2).flatten(0, 1).unbind(2)  # [B*T, S+L, H, D]
    out = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), attn_mask=real[:, None, None],
                                         scale=softmax_scale)
    out = (out.transpose(1, 2) * real[..., None, None]).unflatten(0, (B, T))
    return out[:, :, :S].contiguous(), out[:, :, S:].contiguous()


# ---------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------

def _frames(t: torch.Tensor) -> torch.Tensor:
    """``[B, T, N, ...]`` as ``[B*T, N, ...]`` (a view unless B and T cannot merge)."""
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def _forward(video_qkv, text_qkv, text_lens, softmax_scale: float, backend: str):
    B, T, S, _, H, D = video_qkv.shape
    L = text_qkv.shape[2]
    video_out = torch.empty(B, T, S, H, D, dtype=video_qkv.dtype, device=video_qkv.device)
    text_out = torch.zeros(B, T, L, H, D, dtype=text_qkv.dtype, device=text_qkv.device)  # padded tokens: 0
    video_lse = torch.empty(B * T, H, S, dtype=torch.float32, device=video_qkv.device)
    text_lse = torch.zeros(B * T, H, L, dtype=torch.float32, device=video_qkv.device)  # padded rows: 0
    if video_out.numel():
        q, k, v = map(args.unit_head_stride, _frames(video_qkv).unbind(2))
        text_q, text_k, text_v = map(args.unit_head_stride, _frames(text_qkv).unbind(2))
        # Video queries on the CUDA kernel where it takes them (its keys: the video's, then the text's); the
        # text queries (a tenth of the work, only the real ones computed) on Triton.
        cuda_text = dict(k_text=text_k, v_text=text_v, text_lens=text_lens)
        text = triton_attention.TextTokens(text_lens, text_k, text_v)
        if spatial.use_cuda(backend, "forward", dict(q=q, k=k, v=v, out=_frames(video_out)), cuda_text):
            spatial.cuda_kernel("forward")(q, k, v, _frames(video_out), video_lse, softmax_scale, **cuda_text)
        else:
            triton_attention.forward(q, k, v, _frames(video_out), video_lse, softmax_scale, text=text)
        triton_attention.forward(text_q, k, v, _frames(text_out), text_lse, softmax_scale, text=text,
                                 text_queries=True)
    return video_out, text_out, video_lse, text_lse


# ---------------------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------------------

@torch.library.custom_op("openvid::joint_attention_fwd", mutates_args=())
def _joint_attention_fwd(
    video_qkv: torch.Tensor, text_qkv: torch.Tensor, text_lens: torch.Tensor, softmax_scale: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(video_qkv, text_qkv, text_lens, softmax_scale, backend)


@_joint_attention_fwd.register_fake
def _(video_qkv, text_qkv, text_lens, softmax_scale, backend):
    B, T, S, _, H, D = video_qkv.shape
    L = text_qkv.shape[2]
    lse_of = lambda tokens: video_qkv.new_empty(B * T, H, tokens, dtype=torch.float32)  # noqa: E731
    return video_qkv.new_empty(B, T, S, H, D), text_qkv.new_empty(B, T, L, H, D), lse_of(S), lse_of(L)


@torch.library.custom_op("openvid::joint_attention_bwd", mutates_args=())
def _joint_attention_bwd(
    dvideo_out: torch.Tensor, dtext_out: torch.Tensor, video_qkv: torch.Tensor, text_qkv: torch.Tensor,
    text_lens: torch.Tensor, video_out: torch.Tensor, text_out: torch.Tensor, video_lse: torch.Tensor,
    text_lse: torch.Tensor, softmax_scale: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    dvideo_qkv = torch.empty(video_qkv.shape, dtype=video_qkv.dtype, device=video_qkv.device)
    dtext_qkv = torch.zeros(text_qkv.shape, dtype=text_qkv.dtype, device=text_qkv.device)  # padded tokens: 0
    if video_out.numel():
        q, k, v = _frames(video_qkv).unbind(2)
        dq, dk, dv = _frames(dvideo_qkv).unbind(2)
        text_q, text_k, text_v = _frames(text_qkv).unbind(2)
        text_dq, text_dk, text_dv = _frames(dtext_qkv).unbind(2)
        text = triton_attention.TextTokens(
            text_lens, text_k, text_v, dk=text_dk, dv=text_dv, q=text_q, out=_frames(text_out), lse=text_lse,
            dout=args.unit_head_stride(_frames(dtext_out)), dq=text_dq,
        )
        triton_attention.backward(args.unit_head_stride(_frames(dvideo_out)), q, k, v, _frames(video_out), video_lse,
                                  dq, dk, dv, softmax_scale, text=text)
    return dvideo_qkv, dtext_qkv


@_joint_attention_bwd.register_fake
def _(dvideo_out, dtext_out, video_qkv, text_qkv, text_lens, video_out, text_out, video_lse, text_lse,
      softmax_scale, backend):
    return video_qkv.new_empty(video_qkv.shape), text_qkv.new_empty(text_qkv.shape)


def _joint_attention_setup(ctx, inputs, output):
    video_qkv, text_qkv, text_lens, softmax_scale, backend = inputs
    ctx.save_for_backward(video_qkv, text_qkv, text_lens, *output)
    ctx.softmax_scale, ctx.backend = softmax_scale, backend


def _joint_attention_grad(ctx, dvideo_out, dtext_out, _dvideo_lse, _dtext_lse):
    dvideo_qkv, dtext_qkv = _joint_attention_bwd(dvideo_out, dtext_out, *ctx.saved_tensors, ctx.softmax_scale,
                                                 ctx.backend)
    return dvideo_qkv, dtext_qkv, None, None, None


_joint_attention_fwd.register_autograd(_joint_attention_grad, setup_context=_joint_attention_setup)


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------

def joint_attention(
    video_qkv, text_qkv, text_lens, softmax_scale: float | None = None, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per frame, attention of the video and the real text tokens over both, read from the two streams in place.

    Args:
        video_qkv: ``[B, T, S, 3, H, D]``, the video stream's qkv projection (``linear(x).view(B, T, S, 3, H,
            D)``), any strides with a unit head-dim stride.
        text_qkv: ``[B, T, L, 3, H, D]``, the text stream's (caption tokens per frame, padded to L).
        text_lens: integer ``[B]`` (every frame of a sample) or ``[B, T]``: real text tokens, 0..L. Lengths on
            the CPU are checked; lengths on the GPU are not read back, and values outside 0..L are clamped.
        softmax_scale: multiplies ``q k^T`` before the softmax; default ``D ** -0.5``.
        backend: ``None`` (the default from :func:`openvid_kernels.use_backend` / ``OPENVID_BACKEND``),
            ``"auto"``, ``"cuda"``, ``"triton"`` or ``"reference"``. Kernel backends take D a multiple of 8 up
            to 128 and fp16/bf16 (Triton also fp32).

    Returns:
        ``(video_out [B, T, S, H, D], text_out [B, T, L, H, D])``, contiguous, the inputs' dtype; text_out is
        zero at padded tokens. Differentiable in both qkv tensors (zero gradient at padded text tokens).
    """
    for name, t in dict(video_qkv=video_qkv, text_qkv=text_qkv).items():
        args.check_tensor(t, name)
        if t.dim() != 6 or t.shape[3] != 3:
            raise ValueError(f"{name} must be 6-D [B, T, tokens, 3, H, D], got shape {list(t.shape)}")
    args.check_same(dict(video_qkv=video_qkv, text_qkv=text_qkv), dims=None)
    B, T, S, _, H, D = video_qkv.shape
    L = text_qkv.shape[2]
    if text_qkv.shape[:2] != (B, T) or text_qkv.shape[4:] != (H, D):
        raise ValueError(
            f"text_qkv must be [B, T, L, 3, H, D] = [{B}, {T}, L, 3, {H}, {D}] like video_qkv, got "
            f"{list(text_qkv.shape)}"
        )
    if S == 0 or L == 0:
        raise ValueError(f"video_qkv and text_qkv need at least one token (dim 2), got S = {S} and L = {L}")
    lens = _lengths_per_frame(text_lens, B, T, L, video_qkv.device)
    scale = args.softmax_scale_or_default(softmax_scale, D)
    name = backends.resolve_backend(backend, video_qkv.device)
    if name == "reference":
        return joint_attention_reference(video_qkv, text_qkv, lens.view(B, T), scale)
    for tensor_name, t in dict(video_qkv=video_qkv, text_qkv=text_qkv).items():
        args.check_kernel_dtype_and_head_dim(t, tensor_name)
    video_out, text_out, _, _ = _joint_attention_fwd(video_qkv, text_qkv, lens, scale, name)
    return video_out, text_out


def _lengths_per_frame(text_lens, B: int, T: int, L: int, device: torch.device) -> torch.Tensor:
    """int32 ``[B*T]`` lengths on the device, one per frame, from ``[B]`` or ``[B, T]``."""
    lens = text_lens if isinstance(text_lens, torch.Tensor) else torch.as_tensor(text_lens)
    if lens.dim() == 2:
        if lens.shape != (B, T):
            raise ValueError(f"text_lens must have shape [B] = [{B}] or [B, T] = [{B}, {T}], got {list(lens.shape)}")
        return args.check_lengths(lens.flatten(), "text_lens", B * T, L, device)
    return args.check_lengths(lens, "text_lens", B, L, device)[:, None].expand(B, T).flatten().contiguous()
