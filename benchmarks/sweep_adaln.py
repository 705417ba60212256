"""Sweep the adaLN kernels' launch parameters on a GPU and print TB/s per variant (for tuning, not reporting).

    python benchmarks/sweep_adaln.py

Times with CUDA events (triton.testing.do_bench, median). Bytes: forward reads x (and y) and writes h (and
x_out); backward reads grad_h, the LayerNorm input (and grad_x_out, y) and writes grad_x (and grad_y).
"""

import itertools

import torch
from triton.testing import do_bench

from openvid_kernels import adaln, backends
from openvid_kernels.triton_kernels import adaln as triton_adaln

SHAPES = [(16, 4096, 1152), (2, 16384, 1152)]


def tbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e12


def main() -> None:
    torch.manual_seed(0)
    dev = dict(device="cuda", dtype=torch.bfloat16)
    big = torch.randn(2**28, device="cuda", dtype=torch.bfloat16)
    print(f"copy ceiling: {tbps(2 * big.numel() * 2, do_bench(lambda: big.clone(), return_mode='median')):.2f} TB/s")
    ext = backends.cuda_extension
    for B, N, C in SHAPES:
        x, y, grad = (torch.randn(B, N, C, **dev) for _ in range(3))
        gate, shift, scale, *_ = torch.randn(B, 6, C, **dev).chunk(6, dim=1)
        h, x_out = torch.empty_like(x), torch.empty_like(x)
        mean, rstd = (torch.empty(B * N, device="cuda") for _ in range(2))
        nbytes = x.numel() * x.element_size()
        for residual in (False, True):
            res = (y, gate, x_out) if residual else (None, None, None)
            args = (x, res[0], res[1], shift, scale, h, res[2], mean, rstd, 1e-6)
            moved = nbytes * (4 if residual else 2)
            label = f"{'residual' if residual else 'plain':8s} fwd {B}x{N}x{C}"
            if ext is not None:
                print(f"{label} cuda: {tbps(moved, do_bench(lambda: ext.adaln_forward(*args), return_mode='median')):.2f} TB/s")
            for rows, warps in itertools.product((1, 2, 4), (1, 2, 4, 8)):
                ms = do_bench(lambda: triton_adaln.forward(*args, block_rows=rows, num_warps=warps), return_mode="median")
                print(f"{label} triton rows={rows} warps={warps}: {tbps(moved, ms):.2f} TB/s")
            # Backward, through the same launcher the op uses (partials and their reduction included).
            grad_x_out = grad if residual else None
            x_ln = x_out if residual else x
            moved = nbytes * (6 if residual else 3)
            for name in (["cuda"] if ext is not None else []) + ["triton"]:
                ms = do_bench(
                    lambda: adaln._backward(grad, grad_x_out, x_ln, mean, rstd, scale, res[0], res[1], name),
                    return_mode="median",
                )
                print(f"{label.replace('fwd', 'bwd')} {name} (with reduction): {tbps(moved, ms):.2f} TB/s, {ms * 1e3:.0f} us")
            for warps in (2, 4, 8):
                ms = do_bench(lambda: _triton_backward(grad, grad_x_out, x_ln, mean, rstd, scale, res, warps), return_mode="median")
                print(f"{label.replace('fwd', 'bwd')} triton kernel warps={warps}: {tbps(moved, ms):.2f} TB/s")


def _triton_backward(grad, grad_x_out, x_ln, mean, rstd, scale, res, warps):
    B, N, C = x_ln.shape
    K = adaln._chunks_per_group(B, 1, N, x_ln.device)
    partials = torch.empty(3, B, 1, K, C, device="cuda")
    grad_x = torch.empty_like(x_ln)
    grad_y = torch.empty_like(x_ln) if res[0] is not None else None
    triton_adaln.backward(grad, grad_x_out, x_ln, mean, rstd, scale, res[0], res[1], grad_x, grad_y,
                          partials[0], partials[1], partials[2] if res[0] is not None else None, num_warps=warps)


if __name__ == "__main__":
    main()
