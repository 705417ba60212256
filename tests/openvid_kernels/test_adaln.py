"""Fused adaLN modulation: every output and gradient against the float64 reference, on every backend."""

import pytest
import torch

import openvid_kernels as ok
from openvid_kernels import adaln
from tests.utils import KERNEL_CONFIGS, assert_close_to_reference, leaves

# (B, N, C, modulation form). Odd token counts, channels that are not powers of two, all broadcast forms.
SHAPES = [
    (2, 17, 40, "per_sample"),
    (3, 9, 72, "per_sample_2d"),
    (2, 12, 24, "per_frame"),   # T = 4 frames of S = 3 tokens
    (2, 7, 48, "per_token"),
    (1, 5, 1152, "per_sample"),
    (2, 6, 37, "per_sample"),   # C not a multiple of 8: the CUDA extension hands this to Triton
    (1, 3, 8192, "per_token"),
]
FRAMES = 4


def make_modulation(kind: str, B: int, N: int, C: int, count: int, **factory):
    """``count`` modulation tensors of one form, as the model makes them (chunks of one tensor)."""
    if kind == "per_sample":
        return torch.randn(B, 2 * count, C, **factory).chunk(2 * count, dim=1)[:count]
    if kind == "per_sample_2d":
        return torch.randn(B, count, C, **factory).unbind(1)
    if kind == "per_frame":
        return torch.randn(B, FRAMES, 1, count * C, **factory).chunk(count, dim=-1)
    return torch.randn(B, N, count, C, **factory).unbind(2)


def skip_if_cuda_cannot_take(backend: str, C: int) -> None:
    if backend == "cuda" and C % 8:
        pytest.skip("the CUDA kernels take C % 8 == 0 (test_auto_prefers_cuda_extension_and_falls_back_to_triton)")


def run_with_grads(fn, inputs, grad_outputs):
    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    grads = torch.autograd.grad(outputs, inputs, grad_outputs)
    return outputs, grads


def check_against_reference(op, reference, inputs, grad_outputs, dtype, names):
    kernel_inputs = leaves(*inputs)
    outputs, grads = run_with_grads(op, kernel_inputs, grad_outputs)
    ref_inputs = leaves(*(t.double() for t in inputs))
    ref_outputs, ref_grads = run_with_grads(reference, ref_inputs, [g.double() for g in grad_outputs])
    for i, (out, ref) in enumerate(zip(outputs, ref_outputs)):
        assert out.dtype == dtype and out.is_contiguous()
        assert_close_to_reference(out, ref, dtype, f"output {i}")
    for name, grad, ref in zip(names, grads, ref_grads):
        assert_close_to_reference(grad, ref, dtype, f"grad of {name}")


@pytest.mark.parametrize("device,backend,dtype", KERNEL_CONFIGS)
@pytest.mark.parametrize("B,N,C,kind", SHAPES)
def test_layernorm_modulate_matches_reference(device, backend, dtype, B, N, C, kind):
    skip_if_cuda_cannot_take(backend, C)
    torch.manual_seed(0)
    factory = dict(device=device, dtype=dtype)
    x = torch.randn(B, N, C, **factory) * 2 + 0.5
    shift, scale = make_modulation(kind, B, N, C, 2, **factory)
    grad_h = torch.randn(B, N, C, **factory)
    check_against_reference(
        lambda *t: ok.layernorm_modulate(*t, backend=backend),
        adaln.layernorm_modulate_reference,
        (x, shift, scale), (grad_h,), dtype, ("x", "shift", "scale"),
    )


@pytest.mark.parametrize("device,backend,dtype", KERNEL_CONFIGS)
@pytest.mark.parametrize("B,N,C,kind", SHAPES)
def test_gated_residual_layernorm_modulate_matches_reference(device, backend, dtype, B, N, C, kind):
    skip_if_cuda_cannot_take(backend, C)
    torch.manual_seed(1)
    factory = dict(device=device, dtype=dtype)
    x, y = torch.randn(B, N, C, **factory), torch.randn(B, N, C, **factory)
    gate, shift, scale = make_modulation(kind, B, N, C, 3, **factory)
    grad_x_new, grad_h = torch.randn(B, N, C, **factory), torch.randn(B, N, C, **factory)
    # h is normalised from x_new as stored, so the float64 reference sees the inputs rounded the same way:
    # compare h through the kernel's own x_new to keep the check at the dtype's tolerance.
    check_against_reference(
        lambda *t: ok.gated_residual_layernorm_modulate(*t, backend=backend),
        adaln.gated_residual_layernorm_modulate_reference,
        (x, y, gate, shift, scale), (grad_x_new, grad_h), dtype, ("x", "y", "gate", "shift", "scale"),
    )


@pytest.mark.parametrize("device,backend,dtype", KERNEL_CONFIGS)
@pytest.mark.parametrize("B,N,C,kind", SHAPES[:5])
def test_gated_residual_matches_reference(device, backend, dtype, B, N, C, kind):
    torch.manual_seed(2)
    factory = dict(device=device, dtype=dtype)
    x, y = torch.randn(B, N, C, **factory), torch.randn(B, N, C, **factory)
    (gate,) = make_modulation(kind, B, N, C, 1, **factory)
    check_against_reference(
        lambda *t: ok.gated_residual(*t, backend=backend), adaln.gated_residual_reference,
        (x, y, gate), (torch.randn(B, N, C, **factory),), dtype, ("x", "y", "gate"),
    )


def test_gated_residual_rejects_mismatched_shapes():
    x = torch.randn(2, 6, 8)
    with pytest.raises(ValueError, match="y must have x's shape"):
        ok.gated_residual(x, torch.randn(2, 5, 8), torch.randn(2, 1, 8))
    with pytest.raises(ValueError, match="gate must have shape"):
        ok.gated_residual(x, torch.randn(2, 6, 8), torch.randn(2, 4, 1, 8))


# (B, N, C, embedding shape, tokens_per_row): spatial ([S, C], [1, S, C]), temporal ([T, C] over S tokens each),
# per sample, a single row, odd sizes.
EMBEDDINGS = [
    (2, 12, 40, (3, 40), 1),
    (2, 15, 72, (1, 5, 72), 1),
    (3, 12, 24, (4, 24), 3),
    (2, 18, 37, (2, 3, 37), 2),
    (1, 7, 1152, (1, 1152), 7),
    (2, 8, 16, (2, 16), 1),  # rows cycling within each frame of 2 tokens: 4 frames
]


@pytest.mark.parametrize("device,backend,dtype", KERNEL_CONFIGS)
@pytest.mark.parametrize("B,N,C,shape,tokens_per_row", EMBEDDINGS)
@pytest.mark.parametrize("embedding_dtype", ["x", "float32"])
def test_add_position_embedding_matches_reference(device, backend, dtype, B, N, C, shape, tokens_per_row,
                                                  embedding_dtype):
    torch.manual_seed(6)
    x = torch.randn(B, N, C, device=device, dtype=dtype)
    embedding = torch.randn(shape, device=device, dtype=dtype if embedding_dtype == "x" else torch.float32)
    check_against_reference(
        lambda *t: ok.add_position_embedding(*t, tokens_per_row=tokens_per_row, backend=backend),
        lambda *t: adaln.add_position_embedding_reference(*t, tokens_per_row=tokens_per_row),
        (x, embedding), (torch.randn(B, N, C, device=device, dtype=dtype),), dtype, ("x", "embedding"),
    )


def test_add_position_embedding_rows():
    # Spatial: token t * S + s gets row s; temporal: every token of frame t gets row t.
    x = torch.zeros(1, 6, 2)
    rows = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]])
    assert ok.add_position_embedding(x, rows)[0, :, 0].tolist() == [1, 2, 3, 1, 2, 3]
    assert ok.add_position_embedding(x, rows[:2], tokens_per_row=3)[0, :, 1].tolist() == [10, 10, 10, 20, 20, 20]


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda x: ok.add_position_embedding(x, torch.randn(4, 8)), ValueError, r"N = 6 tokens must be a multiple"),
        (lambda x: ok.add_position_embedding(x, torch.randn(3, 8), tokens_per_row=4), ValueError,
         "multiple of the embedding's R = 3 rows times tokens_per_row = 4"),
        (lambda x: ok.add_position_embedding(x, torch.randn(3, 7)), ValueError, r"embedding must be \[R, C\]"),
        (lambda x: ok.add_position_embedding(x, torch.randn(3, 3, 8)), ValueError, r"\[B, R, C\] with C = 8"),
        (lambda x: ok.add_position_embedding(x[0], torch.randn(3, 8)), ValueError, "x must be 3-D"),
        (lambda x: ok.add_position_embedding(x, torch.randn(3, 8), tokens_per_row=0), ValueError,
         "tokens_per_row must be an int >= 1"),
        (lambda x: ok.add_position_embedding(x, torch.ones(3, 8, dtype=torch.long)), TypeError,
         "embedding must be a floating-point tensor"),
    ],
)
def test_add_position_embedding_bad_inputs_name_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call(torch.randn(2, 6, 8))


@pytest.mark.parametrize("device,backend,dtype", KERNEL_CONFIGS[:1] + KERNEL_CONFIGS[2:3])
def test_gated_residual_with_only_h_used(device, backend, dtype):
    torch.manual_seed(2)
    factory = dict(device=device, dtype=dtype)
    B, N, C = 2, 10, 64
    x, y = torch.randn(B, N, C, **factory), torch.randn(B, N, C, **factory)
    gate, shift, scale = make_modulation("per_sample", B, N, C, 3, **factory)
    grad_h = torch.randn(B, N, C, **factory)
    check_against_reference(
        lambda *t: ok.gated_residual_layernorm_modulate(*t, backend=backend)[1],
        lambda *t: adaln.gated_residual_layernorm_modulate_reference(*t)[1],
        (x, y, gate, shift, scale), (grad_h,), dtype, ("x", "y", "gate", "shift", "scale"),
    )


@pytest.mark.parametrize("device,backend,dtype", KERNEL_CONFIGS[:1] + KERNEL_CONFIGS[2:3])
def test_strided_inputs_are_read_in_place_or_copied(device, backend, dtype):
    torch.manual_seed(3)
    factory = dict(device=device, dtype=dtype)
    B, N, C = 2, 9, 32
    x = torch.randn(B, 2 * N, C + 8, **factory)[:, ::2, :C]          # token stride 2 * (C + 8)
    y = torch.randn(B, C, N, **factory).transpose(1, 2)              # channel stride N: copied
    gate, shift, scale = make_modulation("per_sample", B, N, C, 3, **factory)
    x_new, h = ok.gated_residual_layernorm_modulate(x, y, gate, shift, scale, backend=backend)
    x_ref, h_ref = adaln.gated_residual_layernorm_modulate_reference(*(t.double() for t in (x, y, gate, shift, scale)))
    assert_close_to_reference(x_new, x_ref, dtype, "x_new")
    assert_close_to_reference(h, h_ref, dtype, "h")


def test_reference_backend_is_plain_pytorch_in_the_input_dtype():
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    shift, scale = torch.randn(2, 1, 16, dtype=torch.float64), torch.randn(2, 1, 16, dtype=torch.float64)
    expected = torch.nn.functional.layer_norm(x, (16,), eps=1e-6) * (1 + scale) + shift
    torch.testing.assert_close(ok.layernorm_modulate(x, shift, scale, backend="reference"), expected)
    # CPU tensors default to the reference.
    torch.testing.assert_close(ok.layernorm_modulate(x, shift, scale), expected)


def test_empty_token_dimension():
    x = torch.randn(2, 0, 16)
    shift, scale = torch.randn(2, 1, 16), torch.randn(2, 1, 16)
    assert ok.layernorm_modulate(x, shift, scale).shape == (2, 0, 16)


@pytest.mark.parametrize("device,backend,dtype", KERNEL_CONFIGS[:1] + KERNEL_CONFIGS[2:3])
def test_opcheck(device, backend, dtype):
    torch.manual_seed(4)
    factory = dict(device=device, dtype=dtype)
    B, N, C = 2, 6, 24
    x, y = torch.randn(B, N, C, **factory), torch.randn(B, N, C, **factory)
    gate, shift, scale = (m.requires_grad_() for m in torch.randn(3, B, 1, C, **factory))
    x.requires_grad_(), y.requires_grad_()
    torch.library.opcheck(torch.ops.openvid.layernorm_modulate_fwd.default, (x, shift, scale, 1e-6, backend))
    torch.library.opcheck(
        torch.ops.openvid.gated_residual_layernorm_modulate_fwd.default, (x, y, gate, shift, scale, 1e-6, backend)
    )
    torch.library.opcheck(torch.ops.openvid.gated_residual_fwd.default, (x, y, gate))
    rows = torch.randn(1, 3, C, device=device, dtype=torch.float32).expand(B, 3, C).requires_grad_()
    torch.library.opcheck(torch.ops.openvid.add_position_embedding.default, (x, rows, 1))
    # Backward ops have no autograd formula of their own (no double backward): check them on plain tensors.
    x, y, gate, shift, scale = (t.detach() for t in (x, y, gate, shift, scale))
    x_new, h, mean, rstd = torch.ops.openvid.gated_residual_layernorm_modulate_fwd(
        x, y, gate, shift, scale, 1e-6, backend
    )
    grad = torch.randn_like(h)
    torch.library.opcheck(torch.ops.openvid.layernorm_modulate_bwd.default, (grad, x_new, mean, rstd, scale, backend))
    for grad_x_new in (grad, None):
        torch.library.opcheck(
            torch.ops.openvid.gated_residual_layernorm_modulate_bwd.default,
            (grad, grad_x_new, x_new, mean, rstd, scale, y, gate, backend),
        )


def two_sublayers(x, y, mods, backend):
    """A modulated LayerNorm, a stand-in sub-layer, then the fused residual step, as in an STDiT block."""
    shift1, scale1, gate1, shift2, scale2, gate2 = mods.chunk(6, dim=1)
    h = ok.layernorm_modulate(x, shift1, scale1, backend=backend)
    x, h = ok.gated_residual_layernorm_modulate(x, h * y, gate1, shift2, scale2, backend=backend)
    x = ok.add_position_embedding(x, shift1[:1, 0], backend=backend)  # one row, for every token
    return ok.gated_residual(x, h, gate2, backend=backend)


@pytest.mark.parametrize("device,backend,dtype", KERNEL_CONFIGS[:1] + KERNEL_CONFIGS[2:3])
def test_torch_compile_fullgraph_forward_and_backward(device, backend, dtype):
    torch.manual_seed(5)
    factory = dict(device=device, dtype=dtype)
    B, N, C = 2, 8, 32
    inputs = [torch.randn(B, N, C, **factory), torch.randn(B, N, C, **factory), torch.randn(B, 6, C, **factory)]
    compiled = torch.compile(two_sublayers, fullgraph=True)
    kernel_inputs = leaves(*inputs)
    out = compiled(*kernel_inputs, backend)
    grads = torch.autograd.grad(out.sum(), kernel_inputs)

    ref_inputs = leaves(*(t.double() for t in inputs))
    ref_out = two_sublayers(*ref_inputs, "reference")
    ref_grads = torch.autograd.grad(ref_out.sum(), ref_inputs)
    assert_close_to_reference(out, ref_out, dtype, "compiled output")
    for name, grad, ref in zip(("x", "y", "mods"), grads, ref_grads):
        assert_close_to_reference(grad, ref, dtype, f"compiled grad of {name}")


GOOD = dict(x=(2, 8, 16), shift=(2, 1, 16), scale=(2, 1, 16))


@pytest.mark.parametrize(
    "change,error,message",
    [
        (dict(x=(2, 8)), ValueError, "x must be 3-D"),
        (dict(shift=(2, 3, 16)), ValueError, "shift must have shape"),
        (dict(scale=(3, 1, 16)), ValueError, "scale must have shape"),
        (dict(shift=(2, 1, 15), scale=(2, 1, 15)), ValueError, "shift must have shape"),
        (dict(shift=(2, 4, 1, 16), scale=(2, 2, 1, 16)), ValueError, "share one shape"),
        (dict(shift=(2, 3, 1, 16), scale=(2, 3, 1, 16)), ValueError, "shift must have shape"),  # 8 % 3 frames
    ],
)
def test_bad_shapes_name_the_argument(change, error, message):
    shapes = {**GOOD, **change}
    with pytest.raises(error, match=message):
        ok.layernorm_modulate(*(torch.randn(shapes[name]) for name in ("x", "shift", "scale")))


def test_bad_dtypes_devices_and_types_name_the_argument():
    x, shift, scale = (torch.randn(shape) for shape in GOOD.values())
    with pytest.raises(TypeError, match="scale has dtype torch.float16"):
        ok.layernorm_modulate(x, shift, scale.half())
    with pytest.raises(TypeError, match="x must be a floating-point"):
        ok.layernorm_modulate(x.long(), shift, scale)
    with pytest.raises(TypeError, match="shift must be a torch.Tensor"):
        ok.layernorm_modulate(x, 0.5, scale)
    with pytest.raises(ValueError, match="y must have x's shape"):
        ok.gated_residual_layernorm_modulate(x, x[:, :4], shift, shift, scale)
    with pytest.raises(ValueError, match="shift is on meta"):
        ok.layernorm_modulate(x, shift.to("meta"), scale)


@pytest.mark.skipif(not adaln.backends.TRITON_INTERPRET, reason="needs the Triton interpreter")
def test_kernel_limits_name_the_argument():
    x = torch.randn(1, 2, adaln.MAX_CHANNELS + 8)
    mods = torch.randn(2, 1, 1, adaln.MAX_CHANNELS + 8)
    with pytest.raises(ValueError, match=r"x has C = 8200 channels; the kernels take at most 8192"):
        ok.layernorm_modulate(x, mods[0], mods[1], backend="triton")
    with pytest.raises(TypeError, match="x has dtype torch.float64"):
        ok.layernorm_modulate(x[..., :8].double(), mods[0, ..., :8].double(), mods[1, ..., :8].double(), backend="triton")


def test_backend_choice():
    x, shift, scale = (torch.randn(shape) for shape in GOOD.values())
    assert ok.default_backend() == "auto"
    with pytest.raises(ValueError, match="backend must be one of"):
        ok.layernorm_modulate(x, shift, scale, backend="cudnn")
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        ok.layernorm_modulate(x, shift, scale, backend="cuda")
    with ok.use_backend("reference"):
        assert ok.default_backend() == "reference"
        with ok.use_backend("triton"):
            assert ok.default_backend() == "triton"
        assert ok.default_backend() == "reference"
    assert ok.default_backend() == "auto"
    with pytest.raises(ValueError, match="use_backend"):
        with ok.use_backend("fast"):
            pass


@pytest.mark.gpu
def test_auto_prefers_cuda_extension_and_falls_back_to_triton(monkeypatch):
    calls = []
    monkeypatch.setattr(adaln.triton_adaln, "forward", lambda *a, _f=adaln.triton_adaln.forward: calls.append("triton") or _f(*a))
    factory = dict(device="cuda", dtype=torch.bfloat16)
    for C in (64, 36):
        x = torch.randn(2, 8, C, **factory)
        shift, scale = torch.randn(2, 2, 1, C, **factory).unbind(1)
        ok.layernorm_modulate(x, shift, scale)
    assert calls == (["triton"] if ok.cuda_extension_available() else ["triton", "triton"])
    if ok.cuda_extension_available():
        with pytest.raises(ValueError, match="not a multiple of 8"):
            ok.layernorm_modulate(x, shift, scale, backend="cuda")
