"""Host time per call of each op, launched from Python at tiny shapes (the GPU work is negligible), for the
"Host overhead" note of BENCHMARKS.md: what a model pays per call outside CUDA graphs / torch.compile.

    python benchmarks/host_overhead.py
"""

import time

import torch
import torch.nn.functional as F

import openvid_kernels as ok

CALLS = 2000


def per_call_us(fn) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(CALLS):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / CALLS * 1e6


def main() -> None:
    dev = dict(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, 64, 1152, **dev, requires_grad=True)
    shift, scale, *_ = torch.randn(1, 6, 1152, **dev).chunk(6, dim=1)
    qkv = torch.randn(1, 16 * 4, 3, 16, 72, **dev, requires_grad=True)
    cases = {
        "layer_norm (torch, for scale)": lambda: F.layer_norm(x, (1152,)),
        "layernorm_modulate fwd": lambda: ok.layernorm_modulate(x, shift, scale),
        "layernorm_modulate fwd+bwd": lambda: ok.layernorm_modulate(x, shift, scale).sum().backward(),
        "temporal_attention_packed fwd": lambda: ok.temporal_attention_packed(qkv, 16),
        "temporal_attention_packed fwd+bwd": lambda: ok.temporal_attention_packed(qkv, 16).sum().backward(),
    }
    for backend in ("cuda", "triton"):
        if backend == "cuda" and not ok.cuda_extension_available():
            continue
        with ok.use_backend(backend):
            for name, fn in cases.items():
                print(f"{backend:6s} {name}: {per_call_us(fn):.1f} us per call")


if __name__ == "__main__":
    main()
