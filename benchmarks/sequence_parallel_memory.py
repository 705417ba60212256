"""Memory and step time per rank of STDiT/MVDiT-XL/2 training steps with the frames split over the ranks.

Measures, on this rank, for one sample of ``frames x size x size`` pixels (latents 8x smaller, patch 2):
- the activations one block saves for its backward (bytes of the distinct tensors autograd keeps, parameters
  excluded), which sets the memory without activation checkpointing;
- the peak memory of a forward + backward of the whole model in bf16 (parameters and gradients included, no
  optimiser state), with or without activation checkpointing, and the median step time.

    python benchmarks/sequence_parallel_memory.py --model STDiT-XL/2 --frames 16 --size 1024
    torchrun --nproc_per_node=4 benchmarks/sequence_parallel_memory.py --frames 16 --size 1024   # sp = 4

Prints one JSON object per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

from openvid_models import MODEL_SIZES, MVDiT, STDiT


def saved_activation_bytes(block, inputs) -> int:
    """Bytes of the distinct storages autograd saves in one forward of ``block`` (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = block(*inputs)
    del out
    return sum(storages.values())


def block_inputs(model, batch: int, device, dtype):
    """Random inputs of one block at this rank's tokens: x, (the text stream,) caption, lengths, modulation."""
    C = model.t_block[1].in_features
    tokens = model.frames_per_rank * model.num_spatial
    L = model.y_embedder.y_embedding.shape[0]
    make = dict(device=device, dtype=dtype)
    x = torch.randn(batch, tokens, C, **make, requires_grad=True)
    lens = torch.full((batch,), L, dtype=torch.int32, device=device)
    if isinstance(model, MVDiT):
        y = torch.randn(batch, model.frames_per_rank * L, C, **make, requires_grad=True)
        mods = [torch.randn(batch, n * C, **make) for n in (6, 6, 3, 3)]
        return x, y, lens, *mods
    return x, torch.randn(batch, L, C, **make), lens, torch.randn(batch, 6 * C, **make)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="STDiT-XL/2", choices=[n for n in MODEL_SIZES if "XL" in n])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=1024, help="pixels (height = width)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--depth", type=int, help="blocks (default: the model's 28)")
    parser.add_argument("--no-checkpointing", action="store_true", help="keep every block's activations")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)

    world = int(os.environ.get("WORLD_SIZE", 1))
    group = None
    if world > 1:
        dist.init_process_group("nccl")
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        group = dist.group.WORLD
    device, dtype = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
    size = dict(MODEL_SIZES[args.model], input_size=(args.frames, args.size // 8, args.size // 8))
    if args.depth is not None:
        size["depth"] = args.depth
    model_class = MVDiT if args.model.startswith("MVDiT") else STDiT
    torch.manual_seed(0)
    model = model_class(**size).to(device, dtype).train()
    model.set_sequence_parallel(group)
    model.grad_checkpointing = not args.no_checkpointing
    params_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9

    per_block = saved_activation_bytes(model.blocks[0], block_inputs(model, args.batch, device, dtype))
    C, L = model.t_block[1].in_features, model.y_embedder.y_embedding.shape[0]
    x = torch.randn(args.batch, model.in_channels, model.frames_per_rank, args.size // 8, args.size // 8,
                    device=device, dtype=dtype)
    timestep = torch.randint(0, 1000, (args.batch,), device=device)
    y = torch.randn(args.batch, 1, L, model.y_embedder.y_proj.fc1.in_features, device=device, dtype=dtype)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        model(x, timestep, y).float().square().mean().backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    tokens = model.frames_per_rank * model.num_spatial * args.batch
    result = dict(model=args.model, video=f"{args.frames}x{args.size}x{args.size}", batch=args.batch,
                  depth=len(model.blocks), sp_size=world, rank=dist.get_rank() if group else 0,
                  checkpointing=model.grad_checkpointing, tokens_per_rank=tokens, params_gb=round(params_gb, 2),
                  block_saved_gb=round(per_block / 1e9, 3),
                  block_saved_units=round(per_block / (tokens * C * 2), 2),  # in [tokens, C] bf16 tensors
                  peak_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2),
                  step_s=round(sorted(times)[len(times) // 2], 3),
                  device=torch.cuda.get_device_name(), torch=torch.__version__)
    print(json.dumps(result), flush=True)
    if group is not None:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
