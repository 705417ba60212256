"""What the diffusers examples share: their command line, loading, and the stock-versus-ours comparison."""

from __future__ import annotations

import argparse
import time

import torch

from openvid_kernels.diffusers_processors import patch_diffusers_model, unpatch_diffusers_model


def example_parser(description: str, pipeline: str, prompt: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help=f"hub id or local directory of {pipeline} pipeline")
    source.add_argument("--tiny", action="store_true", help="a tiny randomly initialised transformer (no download)")
    parser.add_argument("--transformer-only", action="store_true",
                        help="load only the model's transformer and run one forward on random inputs")
    parser.add_argument("--subfolder", default="transformer",
                        help="the transformer's subfolder with --transformer-only ('' for a transformer directory)")
    parser.add_argument("--prompt", default=prompt)
    parser.add_argument("--steps", type=int, default=4, help="sampling steps of the pipeline run")
    parser.add_argument("--backend", default=None, choices=["auto", "cuda", "triton", "reference"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def parse(parser: argparse.ArgumentParser) -> argparse.Namespace:
    args = parser.parse_args()
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    return args


def load(args, transformer_class, pipeline_class, tiny_config: dict):
    """(pipeline or None, transformer on the device in eval mode) as the arguments ask."""
    pipe = None
    if args.tiny:
        torch.manual_seed(args.seed)
        transformer = transformer_class(**tiny_config).to(args.dtype)
    elif args.transformer_only:
        transformer = transformer_class.from_pretrained(args.model, subfolder=args.subfolder or None,
                                                        torch_dtype=args.dtype)
    else:
        pipe = pipeline_class.from_pretrained(args.model, torch_dtype=args.dtype).to(args.device)
        transformer = pipe.transformer
    return pipe, transformer.to(args.device).eval()


def timed(fn, warm_up):
    """fn()'s result and seconds; ``warm_up`` (a function) runs first, so that Triton's compiles on first calls
    are not timed."""
    warm_up()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def compare_stock_and_ours(args, pipe, transformer, random_inputs) -> None:
    """Run the pipeline (or, without one, a transformer forward on ``random_inputs()``) on the stock processors,
    patch the transformer, run it again, print the report, the largest difference and the times, and restore
    the stock processors."""
    if pipe is None:
        inputs = random_inputs()

        def run(steps=None):  # one forward: no steps
            with torch.no_grad():
                return transformer(**inputs).sample
        what = "transformer forward"
    else:
        def run(steps=args.steps):
            generator = torch.Generator(args.device).manual_seed(args.seed)
            # A tuple's first item: the latents under every pipeline's output class (Latte's holds `frames`).
            return pipe(args.prompt, num_inference_steps=steps, generator=generator, output_type="latent",
                        return_dict=False)[0]
        what = f"{args.steps}-step sampling run (latents)"

    def warm_up():
        run(steps=1)  # one step (or one forward) on the processors in place compiles what they launch

    stock, stock_s = timed(run, warm_up)
    print(patch_diffusers_model(transformer, backend=args.backend))
    ours, ours_s = timed(run, warm_up)
    difference = (ours.float() - stock.float()).abs().max().item()
    scale = stock.float().abs().max().item()
    print(f"{what}: max |ours - stock| = {difference:.3g} (largest |stock| {scale:.3g}; low-precision dtypes "
          "differ by their rounding)")
    print(f"time: stock {stock_s:.3f} s, ours {ours_s:.3f} s")
    unpatch_diffusers_model(transformer)  # the originals are kept; this restores them
