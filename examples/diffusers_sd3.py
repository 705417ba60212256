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

import argparse
import time

import torch

from openvid_kernels.diffusers_processors import patch_diffusers_model, unpatch_diffusers_model

TINY_CONFIG = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=16,
                   out_channels=4, pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="hub id or local directory of an SD3 pipeline")
    source.add_argument("--tiny", action="store_true", help="a tiny randomly initialised transformer (no download)")
    parser.add_argument("--transformer-only", action="store_true",
                        help="load only the model's transformer and run one forward on random inputs")
    parser.add_argument("--subfolder", default="transformer",
                        help="the transformer's subfolder with --transformer-only ('' for a transformer directory)")
    parser.add_argument("--prompt", default="a photo of a cat holding a sign that says hello world")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps of the pipeline run")
    parser.add_argument("--backend", default=None, choices=["auto", "cuda", "triton", "reference"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    return args


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
    from diffusers import DiffusionPipeline, SD3Transformer2DModel  # noqa: PLC0415

    pipe = None
    if args.tiny:
        torch.manual_seed(args.seed)
        transformer = SD3Transformer2DModel(**TINY_CONFIG)
        if args.dtype != torch.float32:
            transformer = transformer.to(args.dtype)
    elif args.transformer_only:
        transformer = SD3Transformer2DModel.from_pretrained(args.model, subfolder=args.subfolder or None,
                                                              torch_dtype=args.dtype)
    else:
        pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=args.dtype).to(args.device)
        transformer = pipe.transformer
    transformer = transformer.to(args.device).eval()

    if pipe is None:
        text_tokens = 9 if args.tiny else 333  # 77 CLIP + 256 T5 tokens
        inputs = random_inputs(transformer, text_tokens, args.device, args.dtype, args.seed)
        with torch.no_grad():
            run = lambda: transformer(**inputs).sample  # noqa: E731
            stock, stock_s = timed(run, warm_up=True)
            report = patch_diffusers_model(transformer, backend=args.backend)
            print(report)
            ours, ours_s = timed(run, warm_up=True)
        what = "transformer forward"
    else:
        def run():
            generator = torch.Generator(args.device).manual_seed(args.seed)
            return pipe(args.prompt, num_inference_steps=args.steps, generator=generator, output_type="latent").images

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
