"""Spatial attention (STDiT's attention over the S tokens of each frame), forward and forward+backward.

Cases (bf16, H = 16, D = 72, "sequences x length" as in ../shared/reference/anchors.md):
  fwd      32 x 1024  (512px, batch 2: B*T = 32 frames)
  fwd      32 x 4096  (1024px, batch 2)
  fwd+bwd  256 x 256  (256px, batch 16)
  fwd+bwd  64 x 1024  (512px, batch 4)

Providers:
  ours-cuda / ours-triton  ``spatial_attention_packed`` on the packed qkv ``[B, T*S, 3, H, D]`` in the model's
                           token order (``ours-cuda`` runs the CUDA forward and, having no CUDA backward yet, the
                           Triton backward).
  flash / cudnn            ``scaled_dot_product_attention`` with that back-end on ``[B*T, H, S, D]`` views of
                           the same packed qkv (no copies: both back-ends read these strides, and upstream STDiT
                           pays a permute copy on top).
  flash-attn               the flash-attn package's ``flash_attn_qkvpacked_func`` where it is installed.

FLOPs count the real head dim: forward 4 * B*T * H * S^2 * D, backward 2.5 times that (5 products, not 2).
Targets the project reports (computed, not asserted): forward >= 1.15x faster than cuDNN at 32 x 1024 and
32 x 4096; forward+backward >= 1.1x faster than cuDNN at 256 x 256 and 64 x 1024.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import harness

pytestmark = harness.requires_device()

# The CPU smoke run uses fp32: Triton's interpreter gets bf16 dots wrong.
DTYPE = torch.float32 if harness.smoke_mode() else torch.bfloat16
HEADS, HEAD_DIM = 16, 72
# (direction, sequences, S)
CASES = harness.pick_shapes(
    full=[("fwd", 32, 1024), ("fwd", 32, 4096), ("fwd+bwd", 256, 256), ("fwd+bwd", 64, 1024)],
    smoke=[("fwd", 2, 24), ("fwd+bwd", 2, 24)],
)
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
PROVIDERS = ["ours-cuda", "ours-triton", *SDPA_BACKENDS, "flash-attn"]
BACKEND_OF = {"ours-cuda": "cuda", "ours-triton": "triton"}


def _probe_sdpa() -> str | None:
    return None if harness.device().type == "cuda" else "SDPA back-ends need CUDA"


def _probe_flash_attn() -> str | None:
    if harness.device().type != "cuda":
        return "flash-attn needs CUDA"
    try:
        import flash_attn  # noqa: F401
    except ImportError as exc:
        return f"flash-attn is not installed ({exc})"
    return None


for _name in SDPA_BACKENDS:
    harness.register_provider(_name, _probe_sdpa)
harness.register_provider("flash-attn", _probe_flash_attn)


def case_name(direction, sequences, S) -> str:
    return f"spatial {direction} {sequences}x{S} (H={HEADS}, D={HEAD_DIM}) {str(DTYPE)[6:]}"


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("direction,sequences,S", CASES, ids=lambda v: str(v))
def test_spatial_attention(benchmark, direction, sequences, S, provider):
    case = case_name(direction, sequences, S)
    harness.require_provider(provider, case=case)
    dev = harness.device()
    gen = torch.Generator(device=dev).manual_seed(0)
    backward = direction == "fwd+bwd"
    flops = 4 * sequences * HEADS * S * S * HEAD_DIM * (3.5 if backward else 1)
    info = dict(direction=direction, sequences=sequences, S=S, H=HEADS, D=HEAD_DIM, dtype=str(DTYPE)[6:])

    # One frame per sequence: [sequences, S, 3, H, D] is the packed qkv of B = sequences, T = 1 (the kernels see
    # the same [B*T, S, ...] views either way).
    qkv = torch.randn(sequences, S, 3, HEADS, HEAD_DIM, generator=gen, device=dev, dtype=DTYPE)
    qkv.requires_grad_(backward)
    ok = harness.openvid() if provider.startswith("ours") else None
    if provider.startswith("ours"):
        backend = BACKEND_OF[provider]

        def forward():
            return ok.spatial_attention_packed(qkv, 1, backend=backend)
    elif provider == "flash-attn":
        from flash_attn import flash_attn_qkvpacked_func

        def forward():
            return flash_attn_qkvpacked_func(qkv)
    else:
        sdpa_backend = SDPA_BACKENDS[provider]

        def forward():
            with sdpa_kernel(sdpa_backend):
                out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in qkv.unbind(2)))
            return out.transpose(1, 2)

    with torch.set_grad_enabled(backward):
        if ok:
            reference = ok.spatial_attention_packed(qkv.detach(), 1, backend="reference")
            harness.check_close((forward(),), (reference,), f"{provider} spatial attention")
        if backward:
            grad_out = torch.randn(qkv.shape[:2] + qkv.shape[3:], generator=gen, device=dev, dtype=DTYPE)

            def fn():
                return torch.autograd.grad(forward(), (qkv,), grad_out)
        else:
            fn = forward

        harness.bench(benchmark, fn, case=case, provider=provider, flops=int(flops), **info)
