"""Sweep the temporal-attention kernels' launch parameters on a GPU and print TB/s per variant (for tuning,
not reporting; the numbers we report come from ``pytest benchmarks/test_temporal.py``).

    python benchmarks/sweep_temporal.py            # packed qkv, bf16, H = 16, D = 72 and a few other shapes

Times with CUDA events (triton.testing.do_bench, median). Bytes: forward reads q, k, v and writes o; backward
reads q, k, v, o, do and writes dq, dk, dv.
"""

import itertools
import subprocess
import sys

import torch
from triton.testing import do_bench

from openvid_kernels import backends, temporal
from openvid_kernels.triton_kernels import temporal_attention as triton_temporal

# (B, T, S, D): about 32k tokens of 16 heads each.
SHAPES = [(2, 16, 1024, 72), (2, 64, 256, 72), (2, 128, 128, 72), (2, 16, 1024, 128), (2, 16, 1024, 64)]
FORWARD_ROWS, BACKWARD_ROWS, WARPS = (16, 32, 64, 128), (16, 32, 64, 128), (1, 2, 4, 8)
HEADS = 16


def tbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e12


def sweep(case: int, direction: str) -> None:
    B, T, S, D = SHAPES[case]
    torch.manual_seed(0)
    qkv = torch.randn(B, T * S, 3, HEADS, D, device="cuda", dtype=torch.bfloat16)
    q, k, v = temporal._unpack(qkv, T)
    out, lse = torch.empty_like(q), torch.empty(B, S, HEADS, T, device="cuda")
    dout, dqkv = torch.randn_like(out), torch.empty_like(qkv)
    numel = q.numel() * q.element_size()
    label = f"B={B} T={T} S={S} D={D} {direction}"
    if direction == "fwd":
        args, moved, rows_options = (q, k, v, out, lse, D**-0.5), 4 * numel, FORWARD_ROWS
        cuda_fn, triton_fn = "temporal_attention_forward", triton_temporal.forward
    else:
        triton_temporal.forward(q, k, v, out, lse, D**-0.5)
        args = (dout, q, k, v, out, lse, *temporal._unpack(dqkv, T), D**-0.5)
        moved, rows_options = 8 * numel, BACKWARD_ROWS
        cuda_fn, triton_fn = "temporal_attention_backward", triton_temporal.backward
    if backends.cuda_extension is not None:
        launch = getattr(backends.cuda_extension, cuda_fn)
        ms = do_bench(lambda: launch(*args), return_mode="median")
        print(f"{label} cuda: {tbps(moved, ms):.2f} TB/s {ms * 1e3:.1f} us", flush=True)
    for rows, warps in itertools.product(rows_options, WARPS):
        if rows < max(T, 16) or (direction == "bwd" and rows > max(T, 64)):
            continue
        try:
            ms = do_bench(lambda: triton_fn(*args, block_rows=rows, num_warps=warps), return_mode="median")
        except Exception as exc:  # out of shared memory / registers for this variant
            print(f"{label} triton rows={rows} warps={warps}: {type(exc).__name__}", flush=True)
            continue
        print(f"{label} triton rows={rows} warps={warps}: {tbps(moved, ms):.2f} TB/s {ms * 1e3:.1f} us", flush=True)


def main() -> None:
    if len(sys.argv) == 3:  # one (shape, direction) in this process
        sweep(int(sys.argv[1]), sys.argv[2])
        return
    big = torch.randn(2**28, device="cuda", dtype=torch.bfloat16)
    print(f"copy ceiling: {tbps(2 * big.numel() * 2, do_bench(lambda: big.clone(), return_mode='median')):.2f} TB/s")
    del big
    # A variant that faults takes its process's CUDA context with it: one process per shape and direction.
    for case in range(len(SHAPES)):
        for direction in ("fwd", "bwd"):
            done = subprocess.run([sys.executable, __file__, str(case), direction], check=False)
            if done.returncode:
                print(f"{SHAPES[case]} {direction}: process failed (exit {done.returncode})", flush=True)


if __name__ == "__main__":
    main()
