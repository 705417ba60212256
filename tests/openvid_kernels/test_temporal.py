"""Temporal attention: output and every gradient against the float64 reference, on every backend and layout."""

import pytest
import torch

import openvid_kernels as ok
from openvid_kernels import temporal as ta
from tests.utils import (KERNEL_CONFIGS, assert_close_to_reference, check_against_reference,
                         check_compiled_block)

# The CUDA kernels take fp16/bf16 only (fp32 goes to Triton under "auto"; test_auto_choice_and_cuda_backend_limits).
CONFIGS = [p for p in KERNEL_CONFIGS if p.id != "cuda-cuda-float32"]
FIRST_CPU_AND_GPU = KERNEL_CONFIGS[:1] + KERNEL_CONFIGS[2:3] + KERNEL_CONFIGS[5:6]  # CPU Triton fp32; GPU bf16 on both

FRAMES = [1, 3, 16, 17, 64]
HEAD_DIMS = [64, 72, 128]
B, H, S = 2, 3, 5  # S = 5: not a multiple of any block of positions


@pytest.mark.parametrize("device,backend,dtype", CONFIGS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("frames", FRAMES)
def test_packed_qkv_matches_reference(device, backend, dtype, frames, head_dim):
    torch.manual_seed(frames * 1000 + head_dim)
    qkv = torch.randn(B, frames * S, 3, H, head_dim, device=device, dtype=dtype)
    check_against_reference(
        lambda t: ok.temporal_attention_packed(t, frames, backend=backend),
        lambda t: ta.temporal_attention_packed_reference(t, frames),
        (qkv,), dtype, ("qkv",),
    )


@pytest.mark.parametrize("device,backend,dtype", CONFIGS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("frames", FRAMES)
def test_separate_qkv_matches_reference(device, backend, dtype, frames, head_dim):
    torch.manual_seed(frames * 1000 + head_dim + 1)
    q, k, v = (torch.randn(B, frames, S, H, head_dim, device=device, dtype=dtype) for _ in range(3))
    check_against_reference(
        lambda *t: ok.temporal_attention(*t, softmax_scale=0.3, backend=backend),
        lambda *t: ta.temporal_attention_reference(*t, softmax_scale=0.3),
        (q, k, v), dtype, ("q", "k", "v"),
    )


@pytest.mark.parametrize("device,backend,dtype", CONFIGS)
def test_other_layouts_are_read_in_place(device, backend, dtype):
    """[N, T, H, D] tensors (as other DiTs hold them), and q, k, v with three different stride patterns."""
    torch.manual_seed(7)
    factory = dict(device=device, dtype=dtype)
    T, D = 16, 40
    q4, k4, v4 = (torch.randn(7, T, H, D, **factory) for _ in range(3))
    check_against_reference(
        lambda *t: ok.temporal_attention(*t, backend=backend),
        lambda *t: ta.temporal_attention_reference(*(x.unsqueeze(2) for x in t)).squeeze(2),
        (q4, k4, v4), dtype, ("q", "k", "v"),
    )
    q = torch.randn(B, S, H, T, D, **factory).permute(0, 3, 1, 2, 4)            # frames innermost but one
    k = torch.randn(B, T, S, H, D + 16, **factory)[..., 8:8 + D]                # head rows padded, offset 8
    v = torch.randn(B, T, H, S, D, **factory).transpose(2, 3)                    # heads before positions
    check_against_reference(
        lambda *t: ok.temporal_attention(*t, backend=backend),
        ta.temporal_attention_reference,
        (q, k, v), dtype, ("q", "k", "v"),
    )


@pytest.mark.parametrize("device,backend,dtype", [p for p in CONFIGS if "triton" in p.id])
@pytest.mark.parametrize("frames,block_rows", [(3, 64), (16, 64), (17, 64)])
def test_triton_several_positions_per_program(device, backend, dtype, frames, block_rows):
    """Non-default launch: several sequences share a program's tile (kept apart by the block-diagonal mask)."""
    torch.manual_seed(frames)
    qkv = torch.randn(B, frames * S, 3, H, 72, device=device, dtype=dtype)
    q, k, v = ta._unpack(qkv, frames)
    out, lse = torch.empty_like(q), torch.empty(B, S, H, frames, device=device)
    ta.triton_temporal.forward(q, k, v, out, lse, 0.2, block_rows=block_rows)
    dout = torch.randn_like(out)
    dqkv = torch.empty_like(qkv)
    ta.triton_temporal.backward(dout, q, k, v, out, lse, *ta._unpack(dqkv, frames), 0.2, block_rows=block_rows)

    ref_qkv = qkv.double().requires_grad_()
    ref = ta.temporal_attention_reference(*ta._unpack(ref_qkv, frames), softmax_scale=0.2)
    (ref_grad,) = torch.autograd.grad(ref, ref_qkv, dout.double())
    assert_close_to_reference(out, ref, dtype, "output")
    assert_close_to_reference(dqkv, ref_grad, dtype, "packed gradient")


@pytest.mark.parametrize("device,backend,dtype", FIRST_CPU_AND_GPU)
def test_large_scores_and_a_single_frame_give_no_nan(device, backend, dtype):
    torch.manual_seed(8)
    qkv = torch.randn(1, 1 * 3, 3, 2, 16, device=device, dtype=dtype) * 30
    out = ok.temporal_attention_packed(qkv, 1, backend=backend)
    # One frame: attention returns v unchanged.
    torch.testing.assert_close(out, qkv[:, :, 2], rtol=0, atol=0)
    qkv = (torch.randn(1, 8 * 3, 3, 2, 16, device=device, dtype=dtype) * 30).requires_grad_()
    out = ok.temporal_attention_packed(qkv, 8, backend=backend)
    (grad,) = torch.autograd.grad(out.float().square().sum(), qkv)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("device,backend,dtype", FIRST_CPU_AND_GPU)
def test_opcheck(device, backend, dtype):
    torch.manual_seed(9)
    factory = dict(device=device, dtype=dtype)
    T, D = 3, 24
    qkv = torch.randn(B, T * S, 3, H, D, **factory, requires_grad=True)
    q, k, v = (t.detach().clone().requires_grad_() for t in ta._unpack(qkv.detach(), T))
    torch.library.opcheck(torch.ops.openvid.temporal_attention_packed_fwd.default, (qkv, T, 0.25, backend))
    torch.library.opcheck(torch.ops.openvid.temporal_attention_fwd.default, (q, k, v, 0.25, backend))
    # Backward ops have no autograd formula of their own (no double backward): check them on plain tensors.
    qkv, q, k, v = (t.detach() for t in (qkv, q, k, v))
    out, lse = torch.ops.openvid.temporal_attention_packed_fwd(qkv, T, 0.25, backend)
    torch.library.opcheck(
        torch.ops.openvid.temporal_attention_packed_bwd.default, (torch.randn_like(out), qkv, out, lse, T, 0.25, backend)
    )
    out, lse = torch.ops.openvid.temporal_attention_fwd(q, k, v, 0.25, backend)
    torch.library.opcheck(
        torch.ops.openvid.temporal_attention_bwd.default, (torch.randn_like(out), q, k, v, out, lse, 0.25, backend)
    )


def temporal_block(x, weight_qkv, weight_out, frames, heads, packed, backend):
    """A temporal attention sub-layer as in STDiT: qkv projection, attention over frames, output projection."""
    qkv = (x @ weight_qkv).unflatten(-1, (3, heads, -1))
    if packed:
        out = ok.temporal_attention_packed(qkv, frames, backend=backend)
    else:
        q, k, v = qkv.unflatten(1, (frames, -1)).unbind(3)
        out = ok.temporal_attention(q, k, v, backend=backend).flatten(1, 2)
    return out.flatten(-2) @ weight_out


@pytest.mark.parametrize("device,backend,dtype", FIRST_CPU_AND_GPU)
@pytest.mark.parametrize("frames", [3, 16, 17])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "separate"])
def test_torch_compile_fullgraph_forward_and_backward(device, backend, dtype, frames, packed):
    torch.manual_seed(10 + frames)
    factory = dict(device=device, dtype=dtype)
    heads, C = 2, 144  # head dim 72
    inputs = [torch.randn(B, frames * S, C, **factory), torch.randn(C, 3 * C, **factory) / C**0.5,
              torch.randn(C, C, **factory) / C**0.5]
    names = ("x", "weight_qkv", "weight_out")
    check_compiled_block(temporal_block, inputs, names, (frames, heads, packed), backend, dtype)


def test_reference_backend_and_cpu_default_are_sdpa_over_frames():
    torch.manual_seed(11)
    qkv = torch.randn(2, 4 * 3, 3, 2, 8, dtype=torch.float64)
    q, k, v = qkv.unflatten(1, (4, 3)).unbind(3)  # [B, T, S, H, D]
    scores = torch.einsum("btshd,bushd->bshtu", q, k) * 8**-0.5
    expected = torch.einsum("bshtu,bushd->btshd", scores.softmax(-1), v).flatten(1, 2)
    torch.testing.assert_close(ok.temporal_attention_packed(qkv, 4, backend="reference"), expected)
    torch.testing.assert_close(ok.temporal_attention_packed(qkv, 4), expected)  # CPU tensors: reference


def test_empty_batch():
    qkv = torch.randn(0, 12, 3, 2, 8)
    assert ok.temporal_attention_packed(qkv, 4).shape == (0, 12, 2, 8)


@pytest.mark.parametrize(
    "args,error,message",
    [
        (((2, 12, 3, 2, 8), 5), ValueError, "not a multiple of num_frames = 5"),
        (((2, 12, 2, 2, 8), 4), ValueError, r"qkv must be 5-D \[B, T\*S, 3, H, D\]"),
        (((2, 12, 3, 8), 4), ValueError, r"qkv must be 5-D"),
        (((2, 12, 3, 2, 8), 0), ValueError, "num_frames must be a positive int"),
        (((2, 12, 3, 2, 8), 4.0), ValueError, "num_frames must be a positive int"),
    ],
)
def test_bad_packed_arguments_are_named(args, error, message):
    shape, frames = args
    with pytest.raises(error, match=message):
        ok.temporal_attention_packed(torch.randn(shape), frames)


def test_bad_separate_arguments_are_named():
    q = torch.randn(2, 4, 3, 2, 8)
    with pytest.raises(ValueError, match=r"k has shape \[2, 4, 3, 2, 16\] but q has \[2, 4, 3, 2, 8\]"):
        ok.temporal_attention(q, torch.randn(2, 4, 3, 2, 16), q)
    with pytest.raises(TypeError, match="v has dtype torch.float16 but q has torch.float32"):
        ok.temporal_attention(q, q, q.half())
    with pytest.raises(ValueError, match="k is on meta but q is on cpu"):
        ok.temporal_attention(q, q.to("meta"), q)
    with pytest.raises(TypeError, match="q must be a floating-point tensor"):
        ok.temporal_attention(q.long(), q.long(), q.long())
    with pytest.raises(ValueError, match=r"q, k, v must be 5-D \[B, T, S, H, D\] or 4-D"):
        ok.temporal_attention(q[0, 0], q[0, 0], q[0, 0])
    for scale in (-1.0, 0.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="softmax_scale must be a positive finite number"):
            ok.temporal_attention(q, q, q, softmax_scale=scale)


@pytest.mark.skipif(not ta.backends.TRITON_INTERPRET, reason="needs the Triton interpreter")
def test_kernel_limits_are_named():
    with pytest.raises(ValueError, match=r"qkv has head dim D = 12; the kernels take a multiple of 8"):
        ok.temporal_attention_packed(torch.randn(1, 4, 3, 1, 12), 2, backend="triton")
    with pytest.raises(ValueError, match=r"qkv has head dim D = 136"):
        ok.temporal_attention_packed(torch.randn(1, 4, 3, 1, 136), 2, backend="triton")
    with pytest.raises(ValueError, match=r"qkv has T = 129 frames; the short-sequence kernels take T <= 128"):
        ok.temporal_attention_packed(torch.randn(1, 129, 3, 1, 8), 129, backend="triton")
    with pytest.raises(TypeError, match="qkv has dtype torch.float64; the kernels take"):
        ok.temporal_attention_packed(torch.randn(1, 4, 3, 1, 8, dtype=torch.float64), 2, backend="triton")
    q = torch.randn(1, 4, 1, 1, 16)
    with pytest.raises(ValueError, match=r"k must have a contiguous head dim \(stride\(-1\) == 1\)"):
        ok.temporal_attention(q, torch.randn(1, 4, 1, 1, 32)[..., ::2], q, backend="triton")

@pytest.mark.gpu
def test_auto_runs_long_sequences_through_sdpa():
    torch.manual_seed(12)
    qkv = torch.randn(1, 200 * 3, 3, 2, 72, device="cuda", dtype=torch.bfloat16)
    out = ok.temporal_attention_packed(qkv, 200)
    assert_close_to_reference(out, ta.temporal_attention_packed_reference(qkv.double(), 200), torch.bfloat16, "T=200")
    with pytest.raises(ValueError, match="T = 200 frames"):
        ok.temporal_attention_packed(qkv, 200, backend="triton")


@pytest.mark.gpu
def test_auto_choice_and_cuda_backend_limits(monkeypatch):
    """auto: Triton up to T = 64, the CUDA forward beyond when it takes the layout; backend='cuda' says why not."""
    calls = []
    original = ta.triton_temporal.forward
    monkeypatch.setattr(ta.triton_temporal, "forward", lambda *a: calls.append("triton") or original(*a))
    factory = dict(device="cuda", dtype=torch.bfloat16)
    aligned = torch.randn(2, 128 * 5, 3, 2, 72, **factory)
    unaligned = torch.randn(2, 128 * 5, 3, 2, 76, **factory)[..., :72]  # head stride 76: not a multiple of 8
    for qkv, frames in ((aligned, 16), (aligned, 128), (unaligned, 128)):
        out = ok.temporal_attention_packed(qkv, frames)
        reference = ta.temporal_attention_packed_reference(qkv.double(), frames)
        assert_close_to_reference(out, reference, torch.bfloat16, f"auto T={frames}")
    assert calls == (["triton", "triton"] if ok.cuda_extension_available() else ["triton"] * 3)
    if ok.cuda_extension_available():
        with pytest.raises(ValueError, match="not multiples of 8 elements"):
            ok.temporal_attention_packed(unaligned, 16, backend="cuda")
        with pytest.raises(ValueError, match="the CUDA kernels take float16 and bfloat16"):
            ok.temporal_attention_packed(aligned.float(), 16, backend="cuda")
