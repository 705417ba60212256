"""Shared test helpers: error metrics against a float64 reference and per-dtype tolerances."""

import pytest
import torch

from openvid_kernels.backends import TRITON_INTERPRET

# Relative error (Frobenius norm) allowed against a float64 reference, per dtype of the kernel's tensors.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


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
