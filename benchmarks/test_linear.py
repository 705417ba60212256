"""Linear + gated residual, ``x + gate * (input @ weight^T + bias)``, at inference (no autograd).

The STDiT-XL/2 sub-layers at 512px batch 2 (16 frames of 32 x 32 tokens): the attention output projection
(K = 1152) and the MLP's fc2 (K = 4608), per-sample gates as chunks of one [B, 6, C] tensor.

Providers: ``ours-cuda`` (the fused CUTLASS GEMM), ``ours-triton`` (what runs unfused: the cuBLAS linear, then
the Triton gated-residual pass), ``eager`` (upstream's ``x + gate * linear(input)``), ``compile``
(``torch.compile`` of that expression, default mode). TFLOP/s counts the GEMM, 2 * tokens * C * K.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import harness

pytestmark = harness.requires_device()

DTYPE = torch.bfloat16
CASES = harness.pick_shapes(
    full=[("proj", 2, 16384, 1152, 1152), ("fc2", 2, 16384, 1152, 4608)],
    smoke=[("proj", 2, 256, 128, 128)],
)
PROVIDERS = ["ours-cuda", "ours-triton", "eager", "compile"]


def eager(x, hidden, weight, bias, gate):
    return x + gate * F.linear(hidden, weight, bias)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("layer,B,N,C,K", CASES, ids=lambda v: str(v))
def test_linear_gated_residual(benchmark, layer, B, N, C, K, provider):
    case = f"linear_gated_residual {layer} [{B},{N},{C}] K={K} bf16"
    harness.require_provider(provider, case=case)
    dev = harness.device()
    gen = torch.Generator(device=dev).manual_seed(0)
    randn = lambda *s: torch.randn(*s, generator=gen, device=dev, dtype=DTYPE)  # noqa: E731
    x, hidden = randn(B, N, C), randn(B, N, K)
    weight, bias = randn(C, K) / K**0.5, randn(C)
    gate = randn(B, 6, C).chunk(6, dim=1)[2]
    if provider in ("eager", "compile"):
        fn_of_inputs = harness.compile_fn(eager) if provider == "compile" else eager
    else:
        op = harness.openvid_attr("linear_gated_residual", "linear")
        backend = "cuda" if provider == "ours-cuda" else "triton"
        fn_of_inputs = lambda *args: op(*args, backend=backend)  # noqa: E731
    args = (x, hidden, weight, bias, gate)
    with torch.no_grad():
        if provider != "eager":
            harness.check_close((fn_of_inputs(*args),), (eager(*args),), f"{provider} linear_gated_residual")
        harness.bench(benchmark, lambda: fn_of_inputs(*args), case=case, provider=provider,
                      flops=2 * B * N * C * K, layer=layer, shape=[B, N, C, K], dtype="bf16")
