"""Shared test helpers: error metrics against a float64 reference and per-dtype tolerances."""

import os
import sys

import pytest
import torch

from openvid_kernels.backends import TRITON_INTERPRET

# Relative error (Frobenius norm) allowed against a float64 reference, per dtype of the kernel's tensors.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


INTERPRETER_MAX_TOKENS = 40  # the CPU interpreter runs small sequences only


def skip_large_on_cpu(device, *lengths) -> None:
    if device == "cpu" and max(lengths) > INTERPRETER_MAX_TOKENS:
        pytest.skip("the Triton interpreter runs small sequences only")


def skip_unswept_gpu_dtype(device, dtype, head_dim) -> None:
    """On the GPU, bf16 is swept over every head dim; fp16 and fp32 at D = 72 only."""
    if device == "cuda" and dtype != torch.bfloat16 and head_dim != 72:
        pytest.skip("on the GPU, fp16 and fp32 are swept at D = 72 only")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    assert not torch.isnan(actual).any(), "NaN in result"
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = relative_error(actual, expected)
    assert error <= TOLERANCE[dtype], f"{what}: relative error {error:.3g} > {TOLERANCE[dtype]:.3g} ({dtype})"


# (device, backend, dtype) triples: the CPU runs Triton in its interpreter (fp32/fp16: the interpreter gets
# bf16 dots wrong); the GPU runs both kernel backends in every dtype.
_gpu = [pytest.mark.gpu]
_interpreter = [pytest.mark.skipif(not TRITON_INTERPRET, reason="Triton on CPU tensors needs TRITON_INTERPRET=1")]
KERNEL_CONFIGS = [
    pytest.param("cpu", "triton", torch.float32, id="cpu-triton-fp32", marks=_interpreter),
    pytest.param("cpu", "triton", torch.float16, id="cpu-triton-fp16", marks=_interpreter),
    *[
        pytest.param("cuda", backend, dtype, id=f"cuda-{backend}-{str(dtype)[6:]}", marks=_gpu)
        for backend in ("cuda", "triton")
        for dtype in (torch.bfloat16, torch.float16, torch.float32)
    ],
]


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def check_against_reference(op, reference, inputs, dtype, names):
    """op(*inputs) and its gradients (for a random output gradient) against reference(*inputs in fp64)."""
    kernel_inputs = leaves(*inputs)
    out = op(*kernel_inputs)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, kernel_inputs, grad_out)
    ref_inputs = leaves(*(t.double() for t in inputs))
    ref_out = reference(*ref_inputs)
    ref_grads = torch.autograd.grad(ref_out, ref_inputs, grad_out.double())
    assert out.dtype == dtype and out.is_contiguous()
    assert_close_to_reference(out, ref_out, dtype, "output")
    # A gradient that is exactly zero (dq and dk with one key) is measured against all gradients together.
    scale = torch.cat([ref.flatten() for ref in ref_grads]).norm()
    for name, grad, ref in zip(names, grads, ref_grads):
        if ref.norm() > 1e-6 * scale:
            assert_close_to_reference(grad, ref, dtype, f"grad of {name}")
        else:
            assert (grad.double() - ref).norm() <= TOLERANCE[dtype] * scale, f"grad of {name} should be zero"


def check_compiled_block(block, inputs, names, static_args, backend, dtype):
    """torch.compile(block, fullgraph=True)(*inputs, *static_args, backend) and the gradients of its sum against
    the uncompiled block on the reference backend in fp64."""
    compiled = torch.compile(block, fullgraph=True)
    kernel_inputs = leaves(*inputs)
    out = compiled(*kernel_inputs, *static_args, backend)
    grads = torch.autograd.grad(out.sum(), kernel_inputs)
    ref_inputs = leaves(*(t.double() for t in inputs))
    ref_out = block(*ref_inputs, *static_args, "reference")
    ref_grads = torch.autograd.grad(ref_out.sum(), ref_inputs)
    assert_close_to_reference(out, ref_out, dtype, "compiled output")
    for name, grad, ref in zip(names, grads, ref_grads):
        assert_close_to_reference(grad, ref, dtype, f"compiled grad of {name}")


def run_on_gloo_ranks(worker, world_size: int, *args) -> None:
    """Run ``worker(rank, world_size, *args)`` in ``world_size`` fresh processes joined in a gloo group (CPU);
    a failure on any rank fails the caller. The worker must be a module-level function (it is pickled)."""
    import tempfile

    import torch.multiprocessing as mp

    # A file store, not TCP: no free port to race for, and no store server thread in rank 0 to tear down.
    with tempfile.TemporaryDirectory() as folder:
        store = os.path.join(folder, "store")
        mp.spawn(_gloo_rank, args=(world_size, store, worker, args), nprocs=world_size, join=True)


def _gloo_rank(rank: int, world_size: int, store: str, worker, args) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)  # ranks share the machine's cores
        worker(rank, world_size, *args)
        # Every rank done communicating before any tears its group down: a gloo rank whose peer closed the
        # connections mid-exchange was seen to abort ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # A rank that passed skips interpreter teardown, where gloo threads still holding tensors can take the GIL
    # of a dying interpreter: CI saw a rank abort (SIGABRT, "terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
