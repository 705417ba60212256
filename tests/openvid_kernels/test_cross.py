"""Cross-attention to variable-length text: output and every gradient against the float64 reference."""

import pytest
import torch

import openvid_kernels as ok
from openvid_kernels import cross as ca
from openvid_kernels.triton_kernels import attention as triton_attention
from tests.utils import (KERNEL_CONFIGS, assert_close_to_reference, check_against_reference, check_compiled_block,
                         relative_error, skip_large_on_cpu, skip_unswept_gpu_dtype)

CONFIGS = [p for p in KERNEL_CONFIGS if p.id != "cuda-cuda-float32"]  # the CUDA kernels take fp16/bf16
FIRST_CPU_AND_GPU = KERNEL_CONFIGS[:1] + KERNEL_CONFIGS[2:3] + KERNEL_CONFIGS[5:6]
MAX_TEXT = 120  # T5 tokens per caption


def random_lengths(batch: int, generator: torch.Generator) -> torch.Tensor:
    """Lengths in 1..120 that always include both ends."""
    lens = torch.randint(1, MAX_TEXT + 1, (batch,), generator=generator)
    lens[0], lens[-1] = 1, MAX_TEXT
    return lens


def inputs(device, dtype, batch, queries, keys, head_dim=72, heads=2, seed=0):
    torch.manual_seed(seed)
    factory = dict(device=device, dtype=dtype)
    return (torch.randn(batch, queries, heads, head_dim, **factory),
            *(torch.randn(batch, keys, heads, head_dim, **factory) for _ in range(2)))


@pytest.mark.parametrize("device,backend,dtype", CONFIGS)
@pytest.mark.parametrize("head_dim", [64, 72, 128])
@pytest.mark.parametrize("queries", [1, 37, 1000, 4100])
def test_padded_keys_match_reference(device, backend, dtype, queries, head_dim):
    skip_large_on_cpu(device, queries)
    skip_unswept_gpu_dtype(device, dtype, head_dim)
    q, k, v = inputs(device, dtype, 3, queries, MAX_TEXT, head_dim, seed=queries + head_dim)
    lens = random_lengths(3, torch.Generator().manual_seed(queries))
    check_against_reference(
        lambda *t: ok.cross_attention(*t, lens, backend=backend),
        lambda *t: ca.cross_attention_reference(*t, lens),
        (q, k, v), dtype, ("q", "k", "v"),
    )


@pytest.mark.parametrize("device,backend,dtype", CONFIGS)
def test_packed_keys_match_reference(device, backend, dtype):
    """Keys packed as upstream STDiT passes them (all captions in one sequence, offsets cu_seqlens)."""
    q, _, _ = inputs(device, dtype, 3, 33, 1, seed=1)
    lens = [7, 120, 1]
    k, v = (torch.randn(sum(lens), 2, 72, device=device, dtype=dtype) for _ in range(2))
    cu_seqlens = torch.tensor([0, 7, 127, 128])
    if backend == "cuda":
        with pytest.raises(ValueError, match="padded keys"):
            ok.cross_attention(q, k, v, cu_seqlens_kv=cu_seqlens, backend=backend)
        backend = "auto"
    check_against_reference(
        lambda *t: ok.cross_attention(*t, cu_seqlens_kv=cu_seqlens, softmax_scale=0.2, backend=backend),
        lambda *t: ca.cross_attention_reference(*t, cu_seqlens_kv=cu_seqlens, softmax_scale=0.2),
        (q, k, v), dtype, ("q", "k", "v"),
    )


@pytest.mark.parametrize("device,backend,dtype", FIRST_CPU_AND_GPU)
def test_padded_keys_never_change_the_output_and_get_zero_gradients(device, backend, dtype):
    q, k, v = inputs(device, dtype, 2, 29, 40, seed=2)
    lens = torch.tensor([3, 17])
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = ok.cross_attention(*leaves, lens, backend=backend)
    _, dk, dv = torch.autograd.grad(out, leaves, torch.randn_like(out))
    padded = torch.arange(40, device=device)[None, :] >= lens.to(device)[:, None]
    k2, v2 = k.clone(), v.clone()
    k2[padded], v2[padded] = float("nan"), float("inf")
    torch.testing.assert_close(ok.cross_attention(q, k2, v2, lens, backend=backend), out.detach(), rtol=0, atol=0)
    assert (dk[padded] == 0).all() and (dv[padded] == 0).all()


@pytest.mark.parametrize("device,backend,dtype", FIRST_CPU_AND_GPU)
def test_a_sequence_without_text_gets_zeros_not_nan(device, backend, dtype):
    q, k, v = (t.requires_grad_() for t in inputs(device, dtype, 3, 21, 16, seed=3))
    lens = torch.tensor([0, 5, 0])
    out = ok.cross_attention(q, k, v, lens, backend=backend)
    grads = torch.autograd.grad(out.float().square().sum() + out.sum(), (q, k, v))
    assert (out[0] == 0).all() and (out[2] == 0).all() and out[1].abs().sum() > 0
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][0] == 0).all() and (grads[1][0] == 0).all()
    reference = ca.cross_attention_reference(*(t.detach().double() for t in (q, k, v)), lens)
    assert_close_to_reference(out, reference, dtype, "output")


@pytest.mark.parametrize("device,backend,dtype", CONFIGS)
@pytest.mark.parametrize("keys", [129, 300])
def test_longer_text_than_one_block_matches_reference(device, backend, dtype, keys):
    """More text keys than the short-keys kernels hold (SHORT_KEYS_MAX): the streaming kernels."""
    assert keys > triton_attention.SHORT_KEYS_MAX
    q, k, v = inputs(device, dtype, 2, 23 if device == "cpu" else 1000, keys, seed=keys)
    lens = torch.tensor([keys, keys // 3])
    check_against_reference(
        lambda *t: ok.cross_attention(*t, lens, backend=backend),
        lambda *t: ca.cross_attention_reference(*t, lens),
        (q, k, v), dtype, ("q", "k", "v"),
    )


@pytest.mark.parametrize("device,backend,dtype", [p for p in CONFIGS if "triton" in p.id])
@pytest.mark.parametrize("splits", [2, 5])
def test_split_query_backward_sums_partials(device, backend, dtype, splits):
    """The streaming dK/dV kernel's query split (fp32 partial sums), with more keys than the short-keys path."""
    q, k, v = inputs(device, dtype, 2, 77 if device == "cpu" else 3000, 150, seed=4)
    lens = torch.tensor([150, 9], device=device, dtype=torch.int32)
    out, lse = torch.empty_like(q), torch.empty(2, 2, q.shape[1], device=device)
    dout = torch.randn_like(q)
    text = triton_attention.TextTokens(lens, k, v)
    triton_attention.forward(q, None, None, out, lse, 0.3, text=text)
    dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    triton_attention.backward(dout, q, None, None, out, lse, dq, None, None, 0.3,
                              text=text._replace(dk=dk, dv=dv), query_splits=splits)

    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    reference = ca.cross_attention_reference(*leaves, lens, softmax_scale=0.3)
    ref_grads = torch.autograd.grad(reference, leaves, dout.double())
    assert_close_to_reference(out, reference, dtype, "output")
    for name, grad, ref in zip("qkv", (dq, dk, dv), ref_grads):
        assert_close_to_reference(grad, ref, dtype, f"grad of {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_bf16_error_at_most_twice_pytorch_bf16(backend):
    """Our bf16 output and gradients are within 2x of PyTorch's bf16 attention math, both against fp64."""
    q, k, v = inputs("cuda", torch.bfloat16, 2, 4096, MAX_TEXT, heads=4, seed=5)
    lens = torch.tensor([57, 120])
    dout = torch.randn_like(q)

    def run(op, tensors):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        out = op(*leaves)
        return out, torch.autograd.grad(out, leaves, dout.to(out.dtype))

    ref_out, ref_grads = run(lambda *t: ca.cross_attention_reference(*t, lens), [t.double() for t in (q, k, v)])
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        torch_out, torch_grads = run(lambda *t: ca.cross_attention_reference(*t, lens), (q, k, v))
    our_out, our_grads = run(lambda *t: ok.cross_attention(*t, lens, backend=backend), (q, k, v))
    pairs = [("output", our_out, torch_out, ref_out)] + list(zip(("dq", "dk", "dv"), our_grads, torch_grads, ref_grads))
    for what, ours, theirs, ref in pairs:
        error, torch_error = relative_error(ours, ref), relative_error(theirs, ref)
        assert error <= 2 * torch_error, f"{what}: our bf16 error {error:.3g} > 2 x PyTorch's {torch_error:.3g}"


@pytest.mark.parametrize("device,backend,dtype", FIRST_CPU_AND_GPU)
def test_opcheck(device, backend, dtype):
    q, k, v = (t.requires_grad_() for t in inputs(device, dtype, 2, 19, 12, head_dim=24, seed=6))
    lens = torch.tensor([12, 4], device=device, dtype=torch.int32)
    starts = torch.tensor([0, 12], device=device, dtype=torch.int32)
    packed_k, packed_v = (t.detach().flatten(0, 1).requires_grad_() for t in (k, v))
    torch.library.opcheck(torch.ops.openvid.cross_attention_fwd.default, (q, k, v, lens, None, 0.25, backend))
    torch.library.opcheck(torch.ops.openvid.cross_attention_fwd.default,
                          (q, packed_k, packed_v, lens, starts, 0.25, backend))
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse = torch.ops.openvid.cross_attention_fwd(q, k, v, lens, None, 0.25, backend)
    torch.library.opcheck(torch.ops.openvid.cross_attention_bwd.default,
                          (torch.randn_like(out), q, k, v, lens, None, out, lse, 0.25, backend))


def cross_block(x, text, lens, weight_q, weight_kv, heads, backend):
    """STDiT's cross-attention sub-layer: q from the video tokens, k, v from the caption tokens."""
    q = (x @ weight_q).unflatten(-1, (heads, -1))
    k, v = (text @ weight_kv).unflatten(-1, (2, heads, -1)).unbind(2)
    return ok.cross_attention(q, k, v, lens, backend=backend).flatten(-2)


@pytest.mark.parametrize("device,backend,dtype", FIRST_CPU_AND_GPU)
def test_torch_compile_fullgraph_forward_and_backward(device, backend, dtype):
    torch.manual_seed(7)
    factory = dict(device=device, dtype=dtype)
    C, heads = 144, 2  # head dim 72
    inputs_ = [torch.randn(2, 30, C, **factory), torch.randn(2, 11, C, **factory),
               torch.randn(C, C, **factory) / C**0.5, torch.randn(C, 2 * C, **factory) / C**0.5]
    lens = torch.tensor([11, 6], device=device)

    def block(x, text, weight_q, weight_kv, backend):
        return cross_block(x, text, lens, weight_q, weight_kv, heads, backend)

    check_compiled_block(block, inputs_, ("x", "text", "weight_q", "weight_kv"), (), backend, dtype)


def test_reference_is_dense_masked_softmax():
    torch.manual_seed(8)
    q, k, v = (torch.randn(2, n, 3, 8, dtype=torch.float64) for n in (5, 7, 7))
    lens = torch.tensor([7, 2])
    scores = torch.einsum("bshd,bthd->bhst", q, k) * 0.5
    scores = scores.masked_fill(torch.arange(7)[None, None, None, :] >= lens[:, None, None, None], float("-inf"))
    expected = torch.einsum("bhst,bthd->bshd", scores.softmax(-1), v)
    torch.testing.assert_close(ca.cross_attention_reference(q, k, v, lens, softmax_scale=0.5), expected)
    torch.testing.assert_close(ok.cross_attention(q, k, v, lens, softmax_scale=0.5), expected)  # CPU: reference


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "cuda", "triton", "reference"])
@pytest.mark.parametrize("keys", [8, 200])  # short-keys kernels, and the streaming ones
def test_lengths_on_the_gpu_are_clamped_not_read_back(backend, keys):
    # No pass checks or clamps GPU lengths before the launch: the kernels clamp what they load.
    q, k, v = (t.requires_grad_() for t in inputs("cuda", torch.float16, 2, 50, keys, seed=9))
    dout = torch.randn_like(q)
    results = []
    for lens in (torch.tensor([-3, keys + 99], device="cuda"), [0, keys]):
        out = ok.cross_attention(q, k, v, lens, backend=backend)
        results.append((out, *torch.autograd.grad(out, (q, k, v), dout)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda q, k: ok.cross_attention(q, k, k, [3, 9]), ValueError, r"kv_lens\[1\] = 9 is outside \[0, 8\]"),
        (lambda q, k: ok.cross_attention(q, k, k, [3]), ValueError, r"kv_lens must have shape \[2\]"),
        (lambda q, k: ok.cross_attention(q, k, k, torch.tensor([1.0, 2.0])), TypeError, "must hold integers"),
        (lambda q, k: ok.cross_attention(q, k[:, :, :1], k[:, :, :1], [1, 1]), ValueError,
         r"k must be \[B, L, H, D\] = \[2, L, 2, 16\]"),
        (lambda q, k: ok.cross_attention(q, k.half(), k.half(), [1, 1]), TypeError, "k has dtype torch.float16"),
        (lambda q, k: ok.cross_attention(q[0], k, k, [1, 1]), ValueError, r"q must be 4-D"),
        (lambda q, k: ok.cross_attention(q, k[:, :0], k[:, :0], [0, 0]), ValueError, "at least one row"),
        (lambda q, k: ok.cross_attention(q, k.flatten(0, 1), k.flatten(0, 1), cu_seqlens_kv=[0, 9, 15]),
         ValueError, r"cu_seqlens_kv must rise from 0 to the 16 packed keys"),
        (lambda q, k: ok.cross_attention(q, k.flatten(0, 1), k.flatten(0, 1), cu_seqlens_kv=[0, 16]),
         ValueError, r"cu_seqlens_kv must have shape \[B \+ 1\] = \[3\]"),
        (lambda q, k: ok.cross_attention(q, k.flatten(0, 1), k.flatten(0, 1), [1, 1], cu_seqlens_kv=[0, 8, 16]),
         ValueError, "not both"),
        (lambda q, k: ok.cross_attention(q, k, k, [1, 1], softmax_scale=-1.0), ValueError, "softmax_scale"),
    ],
)
def test_bad_arguments_are_named(call, error, message):
    q, k = torch.randn(2, 5, 2, 16), torch.randn(2, 8, 2, 16)
    with pytest.raises(error, match=message):
        call(q, k)
