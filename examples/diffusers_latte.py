"""Latte (text-to-video, diffusers' LatteTransformer3DModel) on openvid_kernels' attention, in one line.

    python examples/diffusers_latte.py --model maxin-cn/Latte-1            # a pipeline: a short sampling run
    python examples/diffusers_latte.py --model maxin-cn/Latte-1 --transformer-only   # one forward, random inputs
    python examples/diffusers_latte.py --tiny                               # a tiny random transformer

``--model`` takes a hub id or a local directory. The script patches the transformer with
``patch_diffusers_model`` (spatial self-attention on spatial_attention, the temporal blocks on
temporal_attention, cross-attention on cross_attention), prints the report, runs the same call with the
stock processors and with ours, and prints the largest difference.
"""

from __future__ import annotations

import torch

from common import compare_stock_and_ours, example_parser, load, parse  # examples/common.py

TINY_CONFIG = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
                   sample_size=8, patch_size=2, caption_channels=24, cross_attention_dim=32, video_length=4,
                   norm_type="ada_norm_single", activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                   attention_bias=True, norm_elementwise_affine=False, norm_eps=1e-6)


def random_inputs(transformer, frames: int | None, text_tokens: int, device, dtype, seed: int) -> dict:
    """A CFG-sized batch (2) of latents, timesteps and captions, in the transformer's sizes."""
    config = transformer.config
    generator = torch.Generator().manual_seed(seed)
    frames = frames or config.video_length
    side = config.sample_size
    inputs = dict(hidden_states=torch.randn(2, config.in_channels, frames, side, side, generator=generator),
                  timestep=torch.tensor([999, 500]),
                  encoder_hidden_states=torch.randn(2, text_tokens, config.caption_channels, generator=generator))
    return {name: t.to(device, dtype) if t.is_floating_point() else t.to(device) for name, t in inputs.items()}


def main() -> None:
    parser = example_parser(__doc__.splitlines()[0], "a Latte",
                            prompt="a cat wearing sunglasses and working as a lifeguard at a pool")
    parser.add_argument("--frames", type=int, default=None, help="frames (default: the model's video_length)")
    args = parse(parser)
    from diffusers import LattePipeline, LatteTransformer3DModel  # noqa: PLC0415

    pipe, transformer = load(args, LatteTransformer3DModel, LattePipeline, TINY_CONFIG)
    text_tokens = 7 if args.tiny else 120  # T5 captions: 120 tokens
    compare_stock_and_ours(args, pipe, transformer,
                           lambda: random_inputs(transformer, args.frames, text_tokens, args.device, args.dtype,
                                                 args.seed))


if __name__ == "__main__":
    main()
