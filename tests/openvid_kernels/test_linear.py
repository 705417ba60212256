"""Linear + gated residual: the fused CUDA GEMM and the unfused paths against the float64 reference."""

import pytest
import torch

import openvid_kernels as ok
from openvid_kernels import linear
from tests.openvid_kernels.test_adaln import FRAMES, make_modulation
from tests.utils import TOLERANCE, assert_close_to_reference, leaves, relative_error

requires_extension = pytest.mark.skipif(not ok.cuda_extension_available(), reason="needs the CUDA extension")


def make_inputs(B, N, C, K, kind, dtype, device, bias=True):
    """x, input, weight, bias (or None), gate (a modulation of form ``kind``; None for ``"none"``)."""
    factory = dict(dtype=dtype, device=device)
    x = torch.randn(B, N, C, **factory)
    hidden = torch.randn(B, N, K, **factory)
    weight = torch.randn(C, K, **factory) / K**0.5
    bias_ = torch.randn(C, **factory) if bias else None
    gate = None if kind == "none" else make_modulation(kind, B, N, C, 1, **factory)[0]
    return x, hidden, weight, bias_, gate


def reference64(*inputs):
    return linear.linear_gated_residual_reference(*(None if t is None else t.double() for t in inputs))


# ---------------------------------------------------------------------------------------------------------
# CPU: the op's paths, autograd, compile and argument checks
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["per_sample", "per_sample_2d", "per_frame", "per_token", "none"])
@pytest.mark.parametrize("bias", [True, False])
def test_op_matches_reference_forward_and_backward(kind, bias):
    """The custom op (its unfused fallback on the CPU) and its autograd formula, which recomputes the projection."""
    B, N, C, K = 2, 12, 24, 40
    inputs = make_inputs(B, N, C, K, kind, torch.float64, "cpu", bias)
    present = [i for i, t in enumerate(inputs) if t is not None]

    def full(tensors):  # the five arguments, with None where bias or gate is absent
        args = [None] * 5
        for i, t in zip(present, tensors):
            args[i] = t
        return args

    def op(*tensors):
        x, hidden, weight, b, gate = full(tensors)
        gate = None if gate is None else linear._grouped(gate, x, "gate")
        return torch.ops.openvid.linear_gated_residual(x, hidden, weight, b, gate, "reference")

    def ref(*tensors):
        return linear.linear_gated_residual_reference(*full(tensors))

    grad_out = torch.randn(B, N, C, dtype=torch.float64)
    kernel_in, ref_in = leaves(*(inputs[i] for i in present)), leaves(*(inputs[i] for i in present))
    out, ref_out = op(*kernel_in), ref(*ref_in)
    torch.testing.assert_close(out, ref_out)
    grads = torch.autograd.grad(out, kernel_in, grad_out)
    ref_grads = torch.autograd.grad(ref_out, ref_in, grad_out)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad)


def test_public_function_uses_the_reference_on_cpu_and_is_differentiable():
    x, hidden, weight, bias, gate = make_inputs(2, 9, 16, 24, "per_sample", torch.float64, "cpu")
    out = ok.linear_gated_residual(x, hidden, weight, bias, gate)
    expected = x + gate * (hidden @ weight.t() + bias)  # gate [B, 1, C]
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(ok.linear_gated_residual(x, hidden, weight, bias, None), x + hidden @ weight.t() + bias)
    inputs = leaves(x, hidden, weight, bias, gate)
    assert torch.autograd.gradcheck(lambda *t: ok.linear_gated_residual(*t), inputs)


def test_compiles_fullgraph():
    x, hidden, weight, bias, gate = make_inputs(2, 8, 16, 24, "per_sample", torch.float32, "cpu")
    gate3 = linear._grouped(gate, x, "gate")

    def fn(x, hidden, weight, bias, gate3):
        return torch.ops.openvid.linear_gated_residual(x, hidden, weight, bias, gate3, "reference") * 2

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, hidden, weight, bias, gate3), fn(x, hidden, weight, bias, gate3))
    torch.library.opcheck(torch.ops.openvid.linear_gated_residual, (x, hidden, weight, bias, gate3, "reference"))


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(hidden=torch.randn(2, 8, 24)[:, :7]), "input must be"),
        (dict(weight=torch.randn(16, 25)), "weight must be"),
        (dict(bias=torch.randn(15)), "bias must be"),
        (dict(weight=torch.randn(16, 24, dtype=torch.float64)), "weight must be a tensor of x's dtype"),
        (dict(gate=torch.randn(3, 16)), "gate must have shape"),
    ],
)
def test_bad_inputs_name_the_argument(change, message):
    x, hidden, weight, bias, gate = make_inputs(2, 8, 16, 24, "per_sample_2d", torch.float32, "cpu")
    args = dict(x=x, hidden=hidden, weight=weight, bias=bias, gate=gate) | change
    with pytest.raises((ValueError, TypeError), match=message):
        ok.linear_gated_residual(args["x"], args["hidden"], args["weight"], args["bias"], args["gate"])


def test_attention_modules_residual_forms_are_the_residual_sums():
    torch.manual_seed(0)
    attention, cross = ok.SelfAttention(32, 4, "spatial").double(), ok.CrossAttention(32, 4).double()
    x, h = torch.randn(2, 2 * 6, 32, dtype=torch.float64), torch.randn(2, 2 * 6, 32, dtype=torch.float64)
    gate = torch.randn(2, 1, 32, dtype=torch.float64)
    torch.testing.assert_close(attention(h, 2, residual=x, gate=gate), x + gate * attention(h, 2))
    y, lens = torch.randn(2, 5, 32, dtype=torch.float64), torch.tensor([3, 5])
    torch.testing.assert_close(cross(h, y, lens, residual=x), x + cross(h, y, lens))


# ---------------------------------------------------------------------------------------------------------
# GPU: the fused CUTLASS kernel
# ---------------------------------------------------------------------------------------------------------

# (B, N, C, K, gate form): the STDiT sizes (C = 1152; K = 1152 projections, 4608 for fc2), odd token counts
# (partial tiles), channels that are not multiples of the 128-wide tile, per-frame gates (one GEMM batch
# entry per frame).
GPU_SHAPES = [
    (2, 4096, 1152, 1152, "per_sample"),
    (1, 1000, 1152, 4608, "per_sample_2d"),
    (3, 257, 72, 200, "per_sample"),
    (2, FRAMES * 300, 1152, 1152, "per_frame"),
    (1, 131, 8, 8, "per_sample"),
    (2, 1024, 1152, 1152, "none"),  # the cross-attention's plain residual
]


@pytest.mark.gpu
@requires_extension
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("B,N,C,K,kind", GPU_SHAPES)
def test_fused_kernel_matches_reference(B, N, C, K, kind, bias, dtype):
    torch.manual_seed(0)
    inputs = make_inputs(B, N, C, K, kind, dtype, "cuda", bias)
    expected = reference64(*inputs)
    with torch.no_grad():
        out = ok.linear_gated_residual(*inputs, backend="cuda")
        unfused = linear.linear_gated_residual_reference(*inputs)  # PyTorch's own math in this dtype
    assert out.dtype == dtype and out.is_contiguous()
    error, torch_error = relative_error(out, expected), relative_error(unfused, expected)
    assert error <= max(2 * torch_error, TOLERANCE[dtype] / 8), f"fused {error:.3g} vs PyTorch {torch_error:.3g}"
    # A wrong projection could hide under the residual in the sum: its part is checked on its own too.
    projection = out.double() - inputs[0].double()
    expected_projection = expected - inputs[0].double()
    assert_close_to_reference(projection, expected_projection, dtype, "gate * projection")


@pytest.mark.gpu
@requires_extension
def test_auto_falls_back_where_the_kernel_cannot_run_and_cuda_says_why():
    torch.manual_seed(0)
    # 4 tokens per gate row (per token gates would be 1): shorter than a tile, so unfused.
    inputs = make_inputs(2, 16, 64, 64, "per_frame", torch.bfloat16, "cuda")
    with torch.no_grad():
        out = ok.linear_gated_residual(*inputs)
        assert_close_to_reference(out, reference64(*inputs), torch.bfloat16, "fallback")
        with pytest.raises(ValueError, match="backend='cuda' cannot take this call"):
            ok.linear_gated_residual(*inputs, backend="cuda")
        fp32 = make_inputs(2, 256, 64, 64, "per_sample", torch.float32, "cuda")
        assert_close_to_reference(ok.linear_gated_residual(*fp32), reference64(*fp32), torch.float32, "fp32")


@pytest.mark.gpu
@requires_extension
def test_training_runs_unfused_with_gradients():
    torch.manual_seed(0)
    inputs = make_inputs(2, 512, 256, 128, "per_sample", torch.bfloat16, "cuda")
    grad_out = torch.randn_like(inputs[0])
    kernel_in = leaves(*inputs)
    out = ok.linear_gated_residual(*kernel_in)
    grads = torch.autograd.grad(out, kernel_in, grad_out)
    ref_in = leaves(*(t.double() for t in inputs))
    ref_grads = torch.autograd.grad(linear.linear_gated_residual_reference(*ref_in), ref_in, grad_out.double())
    for name, grad, ref in zip(("x", "input", "weight", "bias", "gate"), grads, ref_grads):
        assert_close_to_reference(grad, ref, torch.bfloat16, f"grad of {name}")


@pytest.mark.gpu
@requires_extension
def test_fused_kernel_compiles_and_captures():
    torch.manual_seed(0)
    inputs = make_inputs(2, 1024, 1152, 1152, "per_sample", torch.bfloat16, "cuda")
    with torch.no_grad():
        eager = ok.linear_gated_residual(*inputs, backend="cuda")
        compiled = torch.compile(lambda *t: ok.linear_gated_residual(*t), fullgraph=True)
        torch.testing.assert_close(compiled(*inputs), eager)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = ok.linear_gated_residual(*inputs, backend="cuda")
        inputs[0].normal_()
        graph.replay()
        torch.testing.assert_close(captured, ok.linear_gated_residual(*inputs, backend="cuda"))
