"""Whole diffusers DiTs with our attention processors (``patch_diffusers_model``) against diffusers' stock
processors (``AttnProcessor2_0``: PyTorch's ``scaled_dot_product_attention``), the same model and weights.

Cases (bf16, random weights, batch 2 = one classifier-free-guidance pair, forward only, no grad):
  Latte-1 forward           LatteTransformer3DModel with Latte-1's config: 28 spatial + 28 temporal blocks,
                            16 heads x 72, 512px (64x64 latents, patch 2: S = 1024 tokens per frame), 16 frames,
                            120 caption tokens of 4096 channels, no caption mask (as LattePipeline calls it)
  PixArt-alpha 1024px fwd   PixArtTransformer2DModel, 28 blocks, 16 heads x 72, 128x128 latents (S = 4096),
                            120 caption tokens of 4096 channels with 120 and 37 real (a caption mask)

Providers: ``ours`` (every attention on openvid_kernels, backend "auto") and ``stock``; ``speedup_vs_stock`` is
the ratio. The PixArt mask is passed as the additive bias PixArt builds (``[B, 1, L]``, one tensor for every
call), so our processors check it once, in the warm-up, and the timed forward captures into a CUDA graph (a 2-D
0/1 mask is converted anew in every forward; checking it then costs one host sync per forward, and a CUDA graph
capture then runs the cross-attention on the stock processor).
FLOPs (estimated, dominant terms, ``_flops``): per token, 2 x 14 C^2 in the linear layers of a spatial block
(q, k, v, out; cross-attention q, out; MLP) and 2 x 12 C^2 of a temporal block, plus 4 C per attended key.
"""

from __future__ import annotations

import functools

import pytest
import torch

import harness

pytestmark = harness.requires_device()

DTYPE = torch.float32 if harness.smoke_mode() else torch.bfloat16  # the interpreter gets bf16 dots wrong
BATCH = 2
TEXT, REAL_TEXT = (7, 3) if harness.smoke_mode() else (120, 37)

LATTE_1 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
               sample_size=64, patch_size=2, caption_channels=4096, cross_attention_dim=1152, video_length=16,
               norm_type="ada_norm_single", activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
               attention_bias=True, norm_elementwise_affine=False, norm_eps=1e-6)
PIXART_ALPHA_1024 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                         num_layers=28, sample_size=128, patch_size=2, caption_channels=4096,
                         cross_attention_dim=1152, norm_type="ada_norm_single", activation_fn="gelu-approximate",
                         num_embeds_ada_norm=1000, attention_bias=True, norm_elementwise_affine=False, norm_eps=1e-6,
                         use_additional_conditions=True)
# CPU smoke mode: the same models, tiny.
_TINY = dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, sample_size=8, caption_channels=24,
             cross_attention_dim=32)
CONFIGS = {
    "Latte-1": {**LATTE_1, **(dict(_TINY, video_length=2) if harness.smoke_mode() else {})},
    "PixArt-alpha 1024px": {**PIXART_ALPHA_1024,
                            **(dict(_TINY, use_additional_conditions=False) if harness.smoke_mode() else {})},
}
PROVIDERS = ["ours", "stock"]


def _needs_diffusers() -> str | None:
    return harness._import_error("diffusers") or harness._import_error("openvid_kernels.diffusers_processors")


harness.register_provider("ours", lambda: _needs_diffusers() or harness.PROVIDER_PROBES["ours-triton"](),
                          baseline=False)
harness.register_provider("stock", lambda: _needs_diffusers() or harness.PROVIDER_PROBES["eager"]())


@functools.lru_cache(maxsize=1)  # one model at a time, shared by both providers (patched and restored)
def build(name: str):
    import diffusers  # noqa: PLC0415  (collection stays free of model imports)

    model_class = diffusers.LatteTransformer3DModel if name == "Latte-1" else diffusers.PixArtTransformer2DModel
    torch.manual_seed(0)
    with torch.device(harness.device()):  # random init on the device: seconds, not minutes
        model = model_class(**CONFIGS[name])
    return model.to(DTYPE).eval()


def inputs(name: str, config: dict, dev: torch.device) -> dict:
    generator = torch.Generator().manual_seed(1)
    side = config["sample_size"]
    latents = (BATCH, config["in_channels"], config["video_length"], side, side) if name == "Latte-1" else \
        (BATCH, config["in_channels"], side, side)
    args = dict(hidden_states=torch.randn(latents, generator=generator), timestep=torch.tensor([999, 500]),
                encoder_hidden_states=torch.randn(BATCH, TEXT, config["caption_channels"], generator=generator))
    if name != "Latte-1":
        keep = torch.ones(BATCH, 1, TEXT)
        keep[1, :, REAL_TEXT:] = 0
        args["encoder_attention_mask"] = (1 - keep) * -10000.0  # PixArt's bias, built once
    args = {k: v.to(dev, DTYPE) if v.is_floating_point() else v.to(dev) for k, v in args.items()}
    if config.get("use_additional_conditions"):
        pixels = float(side * 8)
        args["added_cond_kwargs"] = dict(resolution=torch.tensor([[pixels, pixels]] * BATCH, device=dev, dtype=DTYPE),
                                         aspect_ratio=torch.ones(BATCH, 1, device=dev, dtype=DTYPE))
    return args


def _flops(name: str, config: dict) -> int:
    """Dominant forward FLOPs: linear layers (2 per multiply-add) and attention (4 C per query per key)."""
    C = config["num_attention_heads"] * config["attention_head_dim"]
    side = config["sample_size"] // config["patch_size"]
    S = side * side
    T = config["video_length"] if name == "Latte-1" else 1
    tokens = BATCH * T * S
    # spatial block: q, k, v, out (4 C^2), cross-attention q and out (2 C^2), MLP (8 C^2); temporal block: 12 C^2
    linear = 14 + (12 if name == "Latte-1" else 0)
    keys = S + TEXT + (T if name == "Latte-1" else 0)
    per_token = 2 * linear * C * C + 4 * C * keys
    return int(config["num_layers"] * tokens * per_token)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_model(benchmark, name, provider):
    config = CONFIGS[name]
    side = config["sample_size"] * 8
    frames = f" {config['video_length']} frames" if name == "Latte-1" else ""
    case = f"diffusers {name} fwd {config['num_layers']} blocks {side}px{frames} batch {BATCH} {str(DTYPE)[6:]}"
    harness.require_provider(provider, case=case)
    from openvid_kernels.diffusers_processors import patch_diffusers_model, unpatch_diffusers_model  # noqa: PLC0415

    dev = harness.device()
    model = build(name)
    args = inputs(name, config, dev)
    unpatch_diffusers_model(model)

    def fn():
        return model(**args, return_dict=False)[0]

    with torch.no_grad():
        if provider == "ours":
            reference = fn()
            report = patch_diffusers_model(model, backend="auto")
            assert not report.left_alone, str(report)
            harness.check_close(fn(), reference, f"ours {name}")
        harness.bench(benchmark, fn, case=case, provider=provider, flops=_flops(name, config), model=name,
                      batch=BATCH, px=side, dtype=str(DTYPE)[6:])
    unpatch_diffusers_model(model)
