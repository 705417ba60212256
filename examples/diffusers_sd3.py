"""Stable Diffusion 3 / 3.5 (diffusers' SD3Transformer2DModel, joint text-image attention) on openvid_kernels.

    python examples/diffusers_sd3.py --model stabilityai/stable-diffusion-3-medium-diffusers   # a short sampling run
    python examples/diffusers_sd3.py --model stabilityai/stable-diffusion-3.5-medium --transformer-only  # one forward
    python examples/diffusers_sd3.py --tiny                                                  # a tiny random one

``--model`` takes a hub id or a local directory. The script patches the transformer with
``patch_diffusers_model`` (the joint attention of the image and text streams on spatial_attention over the
concatenated tokens; SD3.5's second, image-only attention on spatial_attention), prints the report, runs the
same call with the stock processors and with ours, and prints the largest difference.
"""

from __future__ import annotations

import torch

from common import compare_stock_and_ours, example_parser, load, parse  # examples/common.py

TINY_CONFIG = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=16,
                   out_channels=4, pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm")


def random_inputs(transformer, text_tokens: int, device, dtype, seed: int) -> dict:
    """A CFG-sized batch (2) of latents, timesteps, text tokens and pooled text embeddings, in the transformer's
    sizes."""
    config = transformer.config
    generator = torch.Generator().manual_seed(seed)
    side = config.sample_size
    inputs = dict(hidden_states=torch.randn(2, config.in_channels, side, side, generator=generator),
                  timestep=torch.tensor([999, 500]),
                  encoder_hidden_states=torch.randn(2, text_tokens, config.joint_attention_dim, generator=generator),
                  pooled_projections=torch.randn(2, config.pooled_projection_dim, generator=generator))
    return {name: t.to(device, dtype) if t.is_floating_point() else t.to(device) for name, t in inputs.items()}


def main() -> None:
    parser = example_parser(__doc__.splitlines()[0], "an SD3",
                            prompt="a photo of a cat holding a sign that says hello world")
    args = parse(parser)
    from diffusers import DiffusionPipeline, SD3Transformer2DModel  # noqa: PLC0415

    pipe, transformer = load(args, SD3Transformer2DModel, DiffusionPipeline, TINY_CONFIG)
    text_tokens = 9 if args.tiny else 333  # 77 CLIP + 256 T5 tokens
    compare_stock_and_ours(args, pipe, transformer,
                           lambda: random_inputs(transformer, text_tokens, args.device, args.dtype, args.seed))


if __name__ == "__main__":
    main()
