"""Sweep the spatial-attention Triton kernels' tiles on a GPU and print TFLOP/s per variant, next to SDPA's
cuDNN and flash back-ends (for tuning, not reporting; the numbers we report come from
``pytest benchmarks/test_spatial.py``).

    python benchmarks/sweep_spatial.py               # packed qkv, bf16, H = 16, D = 72 and the other tuned dims
    python benchmarks/sweep_spatial.py 72            # one head dim

Times with CUDA events (triton.testing.do_bench, median). FLOPs count the real head dim: forward
4 * B * H * S^2 * D, backward 2.5 times that.
"""

import subprocess
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from openvid_kernels import backends
from openvid_kernels.triton_kernels import attention as triton_attention

HEADS = 16
# (sequences, tokens): forward targets 32 x 1024 and 32 x 4096, forward+backward 256 x 256 and 64 x 1024.
SHAPES = {"fwd": [(32, 1024), (32, 4096)], "bwd": [(256, 256), (64, 1024)]}
FORWARD = [(128, 64, 4, 3), (128, 64, 4, 4), (128, 64, 4, 2), (128, 128, 4, 3), (128, 128, 4, 2), (128, 32, 4, 4),
           (64, 64, 4, 3), (256, 64, 8, 3), (256, 128, 8, 2), (128, 128, 8, 3)]
DKDV = [(64, 64, 4, 3), (64, 64, 4, 4), (32, 64, 4, 3), (32, 64, 2, 3), (64, 32, 4, 3), (64, 128, 8, 3),
        (128, 64, 8, 3), (32, 128, 4, 3)]
DQ = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 3), (128, 32, 4, 3), (128, 64, 4, 2), (32, 64, 4, 3),
      (64, 64, 8, 3), (128, 64, 8, 3)]
FUSED = [(64, 64, 4, 3), (64, 64, 4, 2), (64, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3), (32, 128, 4, 2)]


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def time_ms(fn) -> float:
    return do_bench(fn, warmup=50, rep=200, return_mode="median")


def try_time(label: str, flops: float, fn) -> float | None:
    try:
        ms = time_ms(fn)
    except Exception as exc:  # out of shared memory / registers for this variant
        print(f"{label}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
        return None
    print(f"{label}: {ms * 1e3:9.1f} us {tflops(flops, ms):6.1f} TFLOP/s", flush=True)
    return ms


def sweep(direction: str, head_dim: int) -> None:
    torch.manual_seed(0)
    for sequences, tokens in SHAPES[direction]:
        qkv = torch.randn(sequences, tokens, 3, HEADS, head_dim, device="cuda", dtype=torch.bfloat16)
        q, k, v = qkv.unbind(2)
        out, lse = torch.empty_like(q), torch.empty(sequences, HEADS, tokens, device="cuda")
        dout, dqkv = torch.randn_like(out), torch.empty_like(qkv)
        fwd_flops = 4 * sequences * HEADS * tokens**2 * head_dim
        scale = head_dim**-0.5
        label = f"D={head_dim} {sequences}x{tokens}"
        sdpa_in = [t.transpose(1, 2) for t in (q, k, v)]
        for name, sdpa_backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            with sdpa_kernel(sdpa_backend):
                if direction == "fwd":
                    try_time(f"{label} fwd {name}", fwd_flops,
                             lambda: torch.nn.functional.scaled_dot_product_attention(*sdpa_in))
                else:
                    leaves = [t.detach().requires_grad_() for t in sdpa_in]
                    def fwd_bwd():
                        o = torch.nn.functional.scaled_dot_product_attention(*leaves)
                        torch.autograd.grad(o, leaves, dout.transpose(1, 2))
                    try_time(f"{label} fwd+bwd {name}", 3.5 * fwd_flops, fwd_bwd)
        if direction == "fwd":
            if backends.cuda_extension is not None and hasattr(backends.cuda_extension, "spatial_attention_forward"):
                launch = backends.cuda_extension.spatial_attention_forward
                try_time(f"{label} fwd cuda", fwd_flops, lambda: launch(q, k, v, out, lse, scale))
            for config in FORWARD:
                try_time(f"{label} fwd triton {config}", fwd_flops,
                         lambda: triton_attention.forward(q, k, v, out, lse, scale, config=config))
        else:
            triton_attention.forward(q, k, v, out, lse, scale)
            grads = dqkv.unbind(2)
            best = {}
            for kind, configs in (("dkdv", DKDV), ("dq", DQ), ("fused", FUSED)):
                for config in configs:  # the dK/dV kernel with the dQ one, or adding dQ itself ("fused")
                    kwargs = {"dkdv_config" if kind == "fused" else f"{kind}_config": config,
                              "fused_dq": kind == "fused"}
                    ms = try_time(f"{label} bwd triton {kind}={config}", 2.5 * fwd_flops,
                                  lambda: triton_attention.backward(dout, q, k, v, out, lse, *grads, scale, **kwargs))
                    if ms is not None and ms < best.get(kind, (1e9,))[0]:
                        best[kind] = (ms, config)
            if "dkdv" in best and "dq" in best:
                fwd_ms = time_ms(lambda: triton_attention.forward(q, k, v, out, lse, scale))
                ms = try_time(f"{label} bwd triton best dkdv={best['dkdv'][1]} dq={best['dq'][1]}", 2.5 * fwd_flops,
                              lambda: triton_attention.backward(dout, q, k, v, out, lse, *grads, scale,
                                                              dkdv_config=best["dkdv"][1], dq_config=best["dq"][1],
                                                              fused_dq=False))
                if ms is not None:
                    print(f"{label} fwd+bwd triton (default fwd + best bwd): {(fwd_ms + ms) * 1e3:.1f} us "
                          f"{tflops(3.5 * fwd_flops, fwd_ms + ms):.1f} TFLOP/s", flush=True)


def main() -> None:
    if len(sys.argv) == 3:  # one (direction, head dim) in this process
        sweep(sys.argv[1], int(sys.argv[2]))
        return
    head_dims = [int(a) for a in sys.argv[1:]] or [72, 64, 128]
    # A variant that faults takes its process's CUDA context with it: one process per direction and head dim.
    for head_dim in head_dims:
        for direction in ("fwd", "bwd"):
            done = subprocess.run([sys.executable, __file__, direction, str(head_dim)], check=False)
            if done.returncode:
                print(f"D={head_dim} {direction}: process failed (exit {done.returncode})", flush=True)


if __name__ == "__main__":
    main()
