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

import argparse
import time

import torch

from openvid_kernels.diffusers_processors import patch_diffusers_model, unpatch_diffusers_model

TINY_CONFIG = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
                   sample_size=8, patch_size=2, caption_channels=24, cross_attention_dim=32, video_length=4,
                   norm_type="ada_norm_single", activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                   attention_bias=True, norm_elementwise_affine=False, norm_eps=1e-6)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="hub id or local directory of a Latte pipeline")
    source.add_argument("--tiny", action="store_true", help="a tiny randomly initialised transformer (no download)")
    parser.add_argument("--transformer-only", action="store_true",
                        help="load only the model's transformer and run one forward on random inputs")
    parser.add_argument("--subfolder", default="transformer",
                        help="the transformer's subfolder with --transformer-only ('' for a transformer directory)")
    parser.add_argument("--prompt", default="a cat wearing sunglasses and working as a lifeguard at a pool")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps of the pipeline run")
    parser.add_argument("--frames", type=int, default=None, help="frames (default: the model's video_length)")
    parser.add_argument("--backend", default=None, choices=["auto", "cuda", "triton", "reference"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    return args


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


def compare(name: str, stock: torch.Tensor, ours: torch.Tensor) -> None:
    difference = (ours.float() - stock.float()).abs().max().item()
    scale = stock.float().abs().max().item()
    print(f"{name}: max |ours - stock| = {difference:.3g} (largest |stock| {scale:.3g}; low-precision dtypes "
          "differ by their rounding)")


def timed(fn, warm_up: bool):
    """fn()'s result and seconds; ``warm_up`` runs it once first (Triton compiles on the first call)."""
    if warm_up:
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    args = parse_args()
    from diffusers import LattePipeline, LatteTransformer3DModel  # noqa: PLC0415

    pipe = None
    if args.tiny:
        torch.manual_seed(args.seed)
        transformer = LatteTransformer3DModel(**TINY_CONFIG)
        if args.dtype != torch.float32:
            transformer = transformer.to(args.dtype)
    elif args.transformer_only:
        transformer = LatteTransformer3DModel.from_pretrained(args.model, subfolder=args.subfolder or None,
                                                              torch_dtype=args.dtype)
    else:
        pipe = LattePipeline.from_pretrained(args.model, torch_dtype=args.dtype).to(args.device)
        transformer = pipe.transformer
    transformer = transformer.to(args.device).eval()

    if pipe is None:
        text_tokens = 7 if args.tiny else 120  # T5 captions: 120 tokens
        inputs = random_inputs(transformer, args.frames, text_tokens, args.device, args.dtype, args.seed)
        with torch.no_grad():
            run = lambda: transformer(**inputs).sample  # noqa: E731
            stock, stock_s = timed(run, warm_up=True)
            report = patch_diffusers_model(transformer, backend=args.backend)
            print(report)
            ours, ours_s = timed(run, warm_up=True)
        what = "transformer forward"
    else:
        frames = args.frames or transformer.config.video_length

        def run():
            generator = torch.Generator(args.device).manual_seed(args.seed)
            return pipe(args.prompt, num_inference_steps=args.steps, video_length=frames, generator=generator,
                        output_type="latent").frames

        stock, stock_s = timed(run, warm_up=False)
        report = patch_diffusers_model(transformer, backend=args.backend)
        print(report)
        ours, ours_s = timed(run, warm_up=False)
        what = f"{args.steps}-step sampling run (latents)"
    compare(what, stock, ours)
    print(f"time: stock {stock_s:.3f} s, ours {ours_s:.3f} s")
    unpatch_diffusers_model(transformer)  # the originals are kept; this restores them


if __name__ == "__main__":
    main()
