"""PixArt-alpha / PixArt-sigma (text-to-image, diffusers' PixArtTransformer2DModel) on openvid_kernels' attention.

    python examples/diffusers_pixart.py --model PixArt-alpha/PixArt-XL-2-1024-MS     # a short sampling run
    python examples/diffusers_pixart.py --model PixArt-alpha/PixArt-XL-2-1024-MS --transformer-only  # one forward
    python examples/diffusers_pixart.py --tiny                                        # a tiny random transformer

``--model`` takes a hub id or a local directory. The script patches the transformer with
``patch_diffusers_model`` (self-attention on spatial_attention, the masked caption cross-attention on
cross_attention with the caption mask as key lengths), prints the report, runs the same call with the stock
processors and with ours, and prints the largest difference.
"""

from __future__ import annotations

import torch

from common import compare_stock_and_ours, example_parser, load, parse  # examples/common.py

TINY_CONFIG = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
                   sample_size=8, patch_size=2, caption_channels=24, cross_attention_dim=32,
                   norm_type="ada_norm_single", activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                   attention_bias=True, norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False)


def random_inputs(transformer, text_tokens: int, device, dtype, seed: int) -> dict:
    """A CFG-sized batch (2) of latents, timesteps and padded captions (the second shorter), in the
    transformer's sizes."""
    config = transformer.config
    generator = torch.Generator().manual_seed(seed)
    side = config.sample_size
    mask = torch.ones(2, text_tokens)
    mask[1, text_tokens // 3:] = 0
    inputs = dict(hidden_states=torch.randn(2, config.in_channels, side, side, generator=generator),
                  timestep=torch.tensor([999, 500]),
                  encoder_hidden_states=torch.randn(2, text_tokens, config.caption_channels, generator=generator),
                  encoder_attention_mask=mask)
    inputs = {name: t.to(device, dtype) if t.is_floating_point() else t.to(device) for name, t in inputs.items()}
    if transformer.use_additional_conditions:  # PixArt-alpha 1024px: image size and aspect ratio
        pixels = float(side * 8)
        inputs["added_cond_kwargs"] = dict(resolution=torch.tensor([[pixels, pixels]] * 2, device=device, dtype=dtype),
                                           aspect_ratio=torch.tensor([[1.0]] * 2, device=device, dtype=dtype))
    return inputs


def main() -> None:
    parser = example_parser(__doc__.splitlines()[0], "a PixArt",
                            prompt="a small cactus with a happy face in the Sahara desert")
    args = parse(parser)
    from diffusers import DiffusionPipeline, PixArtTransformer2DModel  # noqa: PLC0415

    pipe, transformer = load(args, PixArtTransformer2DModel, DiffusionPipeline, TINY_CONFIG)
    text_tokens = 10 if args.tiny else 120  # T5 captions: 120 tokens (PixArt-sigma: 300)
    compare_stock_and_ours(args, pipe, transformer,
                           lambda: random_inputs(transformer, text_tokens, args.device, args.dtype, args.seed))


if __name__ == "__main__":
    main()
