"""Shared layers: the inference MLP (bias + GELU in the GEMM epilogue) against the plain one."""

import pytest
import torch

import openvid_kernels as ok
from openvid_models.layers import Mlp


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_inference_mlp_matches_the_differentiable_one(dtype, tolerance):
    torch.manual_seed(0)
    mlp = Mlp(72, 288).cuda().to(dtype)
    x = torch.randn(3, 37, 72, device="cuda", dtype=dtype) * 2  # GELU's curved region, where tanh and erf differ
    with torch.no_grad():
        fused = mlp(x)
        with ok.use_backend("reference"):
            plain = mlp(x)
    with torch.enable_grad():
        differentiable = mlp(x)
    torch.testing.assert_close(fused, plain, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(differentiable.detach(), plain, rtol=0, atol=0)
