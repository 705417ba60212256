"""Spatial attention: output and every gradient against the float64 reference, on every backend and layout."""

import pytest
import torch
import torch.nn.functional as F

import openvid_kernels as ok
from openvid_kernels import spatial as sa
from tests.utils import (KERNEL_CONFIGS, assert_close_to_reference, check_against_reference, check_compiled_block,
                         relative_error, skip_large_on_cpu)

# The CUDA kernels take fp16/bf16 only (fp32 goes to Triton under "auto"; test_auto_choice_and_cuda_backend_limits).
CONFIGS = [p for p in KERNEL_CONFIGS if p.id != "cuda-cuda-float32"]
FIRST_CPU_AND_GPU = KERNEL_CONFIGS[:1] + KERNEL_CONFIGS[2:3] + KERNEL_CONFIGS[5:6]  # CPU Triton fp32; GPU bf16 on both

HEAD_DIMS = [64, 72, 128]
SEQUENCE_LENGTHS = [1, 17, 40, 256, 1000, 1024, 4096]


@pytest.mark.parametrize("device,backend,dtype", CONFIGS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("tokens", SEQUENCE_LENGTHS)
def test_packed_qkv_matches_reference(device, backend, dtype, tokens, head_dim):
    skip_large_on_cpu(device, tokens)
    torch.manual_seed(tokens * 1000 + head_dim)
    frames, heads = (3, 2) if tokens <= 256 else (1, 2)
    qkv = torch.randn(2, frames * tokens, 3, heads, head_dim, device=device, dtype=dtype)
    check_against_reference(
        lambda t: ok.spatial_attention_packed(t, frames, backend=backend),
        lambda t: sa.spatial_attention_packed_reference(t, frames),
        (qkv,), dtype, ("qkv",),
    )


@pytest.mark.parametrize("device,backend,dtype", CONFIGS)
@pytest.mark.parametrize("head_dim", [8, 40, 72, 96])
@pytest.mark.parametrize("query_tokens,key_tokens", [(33, 17), (16, 40), (300, 77)])
def test_separate_qkv_of_different_lengths_match_reference(device, backend, dtype, query_tokens, key_tokens, head_dim):
    skip_large_on_cpu(device, query_tokens, key_tokens)
    torch.manual_seed(query_tokens * key_tokens + head_dim)
    factory = dict(device=device, dtype=dtype)
    q = torch.randn(2, query_tokens, 3, head_dim, **factory)
    k, v = (torch.randn(2, key_tokens, 3, head_dim, **factory) for _ in range(2))
    check_against_reference(
        lambda *t: ok.spatial_attention(*t, softmax_scale=0.3, backend=backend),
        lambda *t: sa.spatial_attention_reference(*t, softmax_scale=0.3),
        (q, k, v), dtype, ("q", "k", "v"),
    )


@pytest.mark.parametrize("device,backend,dtype", CONFIGS)
def test_other_layouts_are_read_in_place(device, backend, dtype):
    """q, k, v with three different stride patterns, and a packed qkv whose batch and token dims cannot merge."""
    torch.manual_seed(7)
    factory = dict(device=device, dtype=dtype)
    S, H, D = 37, 3, 72
    q = torch.randn(2, H, S, D, **factory).transpose(1, 2)                    # heads before positions
    k = torch.randn(2, S, H, D + 16, **factory)[..., 8:8 + D]                  # head rows padded, offset 8
    v = torch.randn(S, 2, H, D, **factory).transpose(0, 1)                     # sequence-major
    check_against_reference(
        lambda *t: ok.spatial_attention(*t, backend=backend),
        sa.spatial_attention_reference,
        (q, k, v), dtype, ("q", "k", "v"),
    )
    qkv = torch.randn(2 * S * 2, 3, H, D, **factory).unflatten(0, (2 * S, 2)).transpose(0, 1)  # [2, 2*S, ...]
    check_against_reference(
        lambda t: ok.spatial_attention_packed(t, 2, backend=backend),
        lambda t: sa.spatial_attention_packed_reference(t, 2),
        (qkv,), dtype, ("qkv",),
    )


@pytest.mark.parametrize("device,backend,dtype", [p for p in CONFIGS if "triton" in p.id])
@pytest.mark.parametrize("config", [(16, 32, 1, 1), (32, 16, 2, 2), (64, 64, 4, 2)])
@pytest.mark.parametrize("fused_dq", [False, True], ids=["dq-kernel", "fused-dq"])
def test_triton_block_shapes(device, backend, dtype, config, fused_dq):
    """Non-default tiles: key and query blocks of different sizes, several full blocks and a partial one; dQ
    from its own kernel and added atomically by the dK/dV kernel (where partial key blocks must add nothing)."""
    torch.manual_seed(sum(config))
    B, S, H, D = 2, 37 if device == "cpu" else 301, 2, 72
    qkv = torch.randn(B, S, 3, H, D, device=device, dtype=dtype)
    q, k, v = qkv.unbind(2)
    out, lse = torch.empty_like(q), torch.empty(B, H, S, device=device)
    sa.triton_attention.forward(q, k, v, out, lse, 0.2, config=config)
    dout, dqkv = torch.randn_like(out), torch.empty_like(qkv)
    sa.triton_attention.backward(dout, q, k, v, out, lse, *dqkv.unbind(2), 0.2, dkdv_config=config, dq_config=config,
                                 fused_dq=fused_dq)

    ref_qkv = qkv.double().requires_grad_()
    ref = sa.spatial_attention_reference(*ref_qkv.unbind(2), softmax_scale=0.2)
    (ref_grad,) = torch.autograd.grad(ref, ref_qkv, dout.double())
    ref_lse = torch.logsumexp(0.2 * torch.einsum("bshd,bthd->bhst", *ref_qkv.detach().unbind(2)[:2]), dim=-1)
    assert_close_to_reference(out, ref, dtype, "output")
    assert_close_to_reference(lse, ref_lse, torch.float32 if dtype == torch.float32 else dtype, "lse")
    assert_close_to_reference(dqkv, ref_grad, dtype, "packed gradient")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("tokens", [256, 1024, 4096])
def test_bf16_error_at_most_twice_pytorch_bf16(backend, tokens):
    """Our bf16 output and gradients are within 2x of PyTorch's own bf16 attention math, both against fp64."""
    torch.manual_seed(tokens)
    heads, D = 4, 72
    qkv = torch.randn(2, tokens, 3, heads, D, device="cuda", dtype=torch.bfloat16)
    dout = torch.randn(2, tokens, heads, D, device="cuda", dtype=torch.bfloat16)

    def run(op, x):
        x = x.detach().clone().requires_grad_()
        out = op(x)
        return out, torch.autograd.grad(out, x, dout.to(out.dtype))[0]

    ref_out, ref_grad = run(lambda t: sa.spatial_attention_packed_reference(t, 1), qkv.double())
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        torch_out, torch_grad = run(lambda t: sa.spatial_attention_packed_reference(t, 1), qkv)
    our_out, our_grad = run(lambda t: ok.spatial_attention_packed(t, 1, backend=backend), qkv)
    for what, ours, theirs, ref in (("output", our_out, torch_out, ref_out), ("grad", our_grad, torch_grad, ref_grad)):
        error, torch_error = relative_error(ours, ref), relative_error(theirs, ref)
        assert error <= 2 * torch_error, f"{what}: our bf16 error {error:.3g} > 2 x PyTorch's {torch_error:.3g}"


@pytest.mark.parametrize("device,backend,dtype", FIRST_CPU_AND_GPU)
def test_large_scores_and_a_single_key_give_no_nan(device, backend, dtype):
    torch.manual_seed(8)
    qkv = torch.randn(2, 1, 3, 2, 16, device=device, dtype=dtype) * 30
    out = ok.spatial_attention_packed(qkv, 1, backend=backend)
    # One key: attention returns v unchanged.
    torch.testing.assert_close(out, qkv[:, :, 2], rtol=0, atol=0)
    qkv = (torch.randn(1, 2 * 33, 3, 2, 16, device=device, dtype=dtype) * 30).requires_grad_()
    out = ok.spatial_attention_packed(qkv, 2, backend=backend)
    (grad,) = torch.autograd.grad(out.float().square().sum(), qkv)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("device,backend,dtype", FIRST_CPU_AND_GPU)
def test_opcheck(device, backend, dtype):
    torch.manual_seed(9)
    factory = dict(device=device, dtype=dtype)
    T, S, D = 2, 19, 24
    qkv = torch.randn(2, T * S, 3, 2, D, **factory, requires_grad=True)
    q = torch.randn(2, S, 2, D, **factory, requires_grad=True)
    k, v = (torch.randn(2, S, 2, D, **factory, requires_grad=True) for _ in range(2))
    torch.library.opcheck(torch.ops.openvid.spatial_attention_packed_fwd.default, (qkv, T, 0.25, backend))
    torch.library.opcheck(torch.ops.openvid.spatial_attention_fwd.default, (q, k, v, 0.25, backend))
    # Backward ops have no autograd formula of their own (no double backward): check them on plain tensors.
    qkv, q, k, v = (t.detach() for t in (qkv, q, k, v))
    out, lse = torch.ops.openvid.spatial_attention_packed_fwd(qkv, T, 0.25, backend)
    torch.library.opcheck(
        torch.ops.openvid.spatial_attention_packed_bwd.default, (torch.randn_like(out), qkv, out, lse, T, 0.25, backend)
    )
    out, lse = torch.ops.openvid.spatial_attention_fwd(q, k, v, 0.25, backend)
    torch.library.opcheck(
        torch.ops.openvid.spatial_attention_bwd.default, (torch.randn_like(out), q, k, v, out, lse, 0.25, backend)
    )


def spatial_block(x, weight_qkv, weight_out, frames, heads, packed, backend):
    """A spatial attention sub-layer as in STDiT: qkv projection, attention within frames, output projection."""
    qkv = (x @ weight_qkv).unflatten(-1, (3, heads, -1))
    if packed:
        out = ok.spatial_attention_packed(qkv, frames, backend=backend)
    else:
        q, k, v = qkv.flatten(0, 1).unflatten(0, (-1, x.shape[1] // frames)).unbind(2)
        out = ok.spatial_attention(q, k, v, backend=backend).reshape(x.shape[0], x.shape[1], heads, -1)
    return out.flatten(-2) @ weight_out


@pytest.mark.parametrize("device,backend,dtype", FIRST_CPU_AND_GPU)
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "separate"])
def test_torch_compile_fullgraph_forward_and_backward(device, backend, dtype, packed):
    torch.manual_seed(10)
    factory = dict(device=device, dtype=dtype)
    frames, tokens, heads, C = 2, 21, 2, 144  # head dim 72
    inputs = [torch.randn(2, frames * tokens, C, **factory), torch.randn(C, 3 * C, **factory) / C**0.5,
              torch.randn(C, C, **factory) / C**0.5]
    names = ("x", "weight_qkv", "weight_out")
    check_compiled_block(spatial_block, inputs, names, (frames, heads, packed), backend, dtype)


def test_reference_backend_and_cpu_default_are_attention_within_frames():
    torch.manual_seed(11)
    qkv = torch.randn(2, 3 * 5, 3, 2, 8, dtype=torch.float64)
    q, k, v = qkv.unflatten(1, (3, 5)).unbind(3)  # [B, T, S, H, D]
    scores = torch.einsum("btshd,btuhd->bthsu", q, k) * 8**-0.5
    expected = torch.einsum("bthsu,btuhd->btshd", scores.softmax(-1), v).flatten(1, 2)
    torch.testing.assert_close(ok.spatial_attention_packed(qkv, 3, backend="reference"), expected)
    torch.testing.assert_close(ok.spatial_attention_packed(qkv, 3), expected)  # CPU tensors: reference


def test_empty_batch():
    qkv = torch.randn(0, 12, 3, 2, 8)
    assert ok.spatial_attention_packed(qkv, 4).shape == (0, 12, 2, 8)


@pytest.mark.parametrize(
    "shape,frames,error,message",
    [
        ((2, 12, 3, 2, 8), 5, ValueError, "not a positive multiple of num_frames = 5"),
        ((2, 0, 3, 2, 8), 1, ValueError, "not a positive multiple of num_frames = 1"),
        ((2, 12, 2, 2, 8), 4, ValueError, r"qkv must be 5-D \[B, T\*S, 3, H, D\]"),
        ((2, 12, 3, 8), 4, ValueError, r"qkv must be 5-D"),
        ((2, 12, 3, 2, 8), 0, ValueError, "num_frames must be a positive int"),
        ((2, 12, 3, 2, 8), True, ValueError, "num_frames must be a positive int"),
    ],
)
def test_bad_packed_arguments_are_named(shape, frames, error, message):
    with pytest.raises(error, match=message):
        ok.spatial_attention_packed(torch.randn(shape), frames)


def test_bad_separate_arguments_are_named():
    q = torch.randn(2, 5, 3, 8)
    with pytest.raises(ValueError, match=r"v has shape \[2, 6, 3, 8\] but k has \[2, 5, 3, 8\]"):
        ok.spatial_attention(q, q, torch.randn(2, 6, 3, 8))
    with pytest.raises(ValueError, match=r"they must agree in B, H and D"):
        ok.spatial_attention(q, torch.randn(2, 5, 4, 8), torch.randn(2, 5, 4, 8))
    with pytest.raises(TypeError, match="k has dtype torch.float16 but q has torch.float32"):
        ok.spatial_attention(q, q.half(), q.half())
    with pytest.raises(ValueError, match="k is on meta but q is on cpu"):
        ok.spatial_attention(q, q.to("meta"), q.to("meta"))
    with pytest.raises(TypeError, match="q must be a floating-point tensor"):
        ok.spatial_attention(q.long(), q, q)
    with pytest.raises(ValueError, match=r"q must be 4-D \[B, S, H, D\]"):
        ok.spatial_attention(q[0], q, q)
    with pytest.raises(ValueError, match="need at least one token"):
        ok.spatial_attention(q, q[:, :0], q[:, :0])
    for scale in (-1.0, 0.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="softmax_scale must be a positive finite number"):
            ok.spatial_attention(q, q, q, softmax_scale=scale)


@pytest.mark.skipif(not sa.backends.TRITON_INTERPRET, reason="needs the Triton interpreter")
def test_kernel_limits_are_named():
    with pytest.raises(ValueError, match=r"qkv has head dim D = 12; the kernels take a multiple of 8"):
        ok.spatial_attention_packed(torch.randn(1, 4, 3, 1, 12), 2, backend="triton")
    with pytest.raises(ValueError, match=r"qkv has head dim D = 136"):
        ok.spatial_attention_packed(torch.randn(1, 4, 3, 1, 136), 2, backend="triton")
    with pytest.raises(TypeError, match="qkv has dtype torch.float64; the kernels take"):
        ok.spatial_attention_packed(torch.randn(1, 4, 3, 1, 8, dtype=torch.float64), 2, backend="triton")
    q = torch.randn(1, 4, 1, 16)
    with pytest.raises(ValueError, match=r"k must have a contiguous head dim \(stride\(-1\) == 1\)"):
        ok.spatial_attention(q, torch.randn(1, 4, 1, 32)[..., ::2], q, backend="triton")


@pytest.mark.gpu
def test_auto_choice_and_cuda_backend_limits(monkeypatch):
    """auto runs the kernel the dispatch table names and falls back to Triton for layouts CUDA cannot take;
    backend='cuda' says why it cannot."""
    calls = []
    original = sa.triton_attention.forward
    monkeypatch.setattr(sa.triton_attention, "forward", lambda *a: calls.append("triton") or original(*a))
    factory = dict(device="cuda", dtype=torch.bfloat16)
    aligned = torch.randn(2, 2 * 300, 3, 2, 72, **factory)
    unaligned = torch.randn(2, 2 * 300, 3, 2, 76, **factory)[..., :72]  # head stride 76: not a multiple of 8
    for qkv in (aligned, unaligned):
        out = ok.spatial_attention_packed(qkv, 2)
        reference = sa.spatial_attention_packed_reference(qkv.double(), 2)
        assert_close_to_reference(out, reference, torch.bfloat16, "auto")
    cuda_forward = sa.cuda_kernel("forward") is not None
    assert calls == (["triton"] if cuda_forward else ["triton", "triton"])
    if cuda_forward:
        with pytest.raises(ValueError, match="not multiples of 8 elements"):
            ok.spatial_attention_packed(unaligned, 2, backend="cuda")
        with pytest.raises(ValueError, match="the CUDA kernels take float16 and bfloat16"):
            ok.spatial_attention_packed(aligned.float(), 2, backend="cuda")


def test_sdpa_reference_agrees_with_explicit_softmax():
    torch.manual_seed(12)
    q, k, v = (torch.randn(2, n, 3, 8, dtype=torch.float64) for n in (5, 7, 7))
    scores = torch.einsum("bshd,bthd->bhst", q, k) * 0.5
    expected = torch.einsum("bhst,bthd->bshd", F.softmax(scores, -1), v)
    torch.testing.assert_close(sa.spatial_attention_reference(q, k, v, 0.5), expected)
