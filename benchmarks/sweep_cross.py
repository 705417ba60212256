"""Sweep the short-keys (cross-attention) Triton kernels' launch settings on a GPU and print time and TFLOP/s
per variant, next to SDPA's cuDNN with a key mask (for tuning, not reporting; the numbers we report come from
``pytest benchmarks/test_cross.py``).

    python benchmarks/sweep_cross.py            # forward at 512px batch 2, forward+backward at 256px batch 8
    python benchmarks/sweep_cross.py fwd        # one direction

Each variant's call is captured ``CALLS`` times in one CUDA graph, so launch overhead is left out as in the
benchmark suite; times are medians of triton.testing.do_bench over replays, divided by ``CALLS``. FLOPs count
the real keys: forward 4 * B * H * N * L * D, forward+backward 3.5 times that.
"""

import sys

import torch
from triton.testing import do_bench

import openvid_kernels as ok
from openvid_kernels.triton_kernels import attention as triton_attention

HEADS, HEAD_DIM, TEXT = 16, 72, 120
CALLS = 10
# direction: (batch, video tokens per sample)
SHAPES = {"fwd": (2, 16 * 1024), "fwd+bwd": (8, 16 * 256)}
# (BLOCK_M, num_warps, num_stages, programs per multiprocessor[, heads fastest in the grid])
FORWARD = [(64, 4, 3, 8, True), (64, 4, 3, 8, False), (64, 4, 4, 8, True), (64, 4, 2, 8, True),
           (64, 4, 3, 6, True), (64, 4, 3, 12, True), (64, 4, 3, 16, True), (64, 4, 4, 12, True),
           (128, 8, 3, 4, True), (64, 8, 3, 8, True)]
BACKWARD = [(128, 8, 2, 2), (128, 8, 2, 3), (128, 8, 3, 2), (64, 4, 2, 2), (64, 4, 2, 4), (64, 4, 3, 4)]


def graphed(fn):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn()
    torch.cuda.synchronize()
    return graph.replay


def report(label: str, flops: float, fn) -> None:
    try:
        us = do_bench(graphed(fn), warmup=50, rep=300, return_mode="median") * 1e3 / CALLS
    except Exception as exc:  # out of shared memory / registers for this variant
        print(f"{label}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
        return
    print(f"{label}: {us:8.1f} us {flops / us / 1e6:6.1f} TFLOP/s", flush=True)


def sweep(direction: str) -> None:
    batch, queries = SHAPES[direction]
    backward = direction == "fwd+bwd"
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(batch, queries, HEADS, HEAD_DIM, generator=gen, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(batch, TEXT, 2, HEADS, HEAD_DIM, generator=gen, device="cuda", dtype=torch.bfloat16)
    q.requires_grad_(backward)
    kv.requires_grad_(backward)
    k, v = kv.unbind(2)
    lens = torch.full((batch,), TEXT, device="cuda", dtype=torch.int32)
    dout = torch.randn_like(q)
    flops = 4 * batch * HEADS * queries * TEXT * HEAD_DIM * (3.5 if backward else 1)
    label = f"cross {direction} {batch}x({queries} q, {TEXT} kv)"

    def run(call):
        if not backward:
            return call
        return lambda: torch.autograd.grad(call(), (q, kv), dout)

    mask = torch.arange(TEXT, device="cuda")[None, :] < lens[:, None]
    sdpa = [t.transpose(1, 2) for t in (q, k, v)]
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
        report(f"{label} cudnn", flops, run(lambda: torch.nn.functional.scaled_dot_product_attention(
            *sdpa, attn_mask=mask[:, None, None]).transpose(1, 2)))
    report(f"{label} ours auto (committed settings)", flops, run(lambda: ok.cross_attention(q, k, v, lens)))

    kind = "short_backward" if backward else "short_forward"
    saved = (dict(triton_attention._CONFIGS[kind]), triton_attention._SHORT_KEYS_PROGRAMS_PER_SM[kind],
             triton_attention.SHORT_KEYS_HEADS_FASTEST)
    try:
        for block_m, warps, stages, per_sm, *order in BACKWARD if backward else FORWARD:
            triton_attention._CONFIGS[kind] = dict.fromkeys(saved[0], (block_m, 0, warps, stages))
            triton_attention._SHORT_KEYS_PROGRAMS_PER_SM[kind] = per_sm
            triton_attention.SHORT_KEYS_HEADS_FASTEST = order[0] if order else saved[2]
            report(f"{label} {kind} BLOCK_M={block_m} warps={warps} stages={stages} programs/SM={per_sm}"
                   f"{f' heads fastest={order[0]}' if order else ''}", flops,
                   run(lambda: ok.cross_attention(q, k, v, lens, backend="triton")))
    finally:
        (triton_attention._CONFIGS[kind], triton_attention._SHORT_KEYS_PROGRAMS_PER_SM[kind],
         triton_attention.SHORT_KEYS_HEADS_FASTEST) = saved


if __name__ == "__main__":
    for direction in sys.argv[1:] or list(SHAPES):
        sweep(direction)
