"""Ulysses all-to-all over frames (openvid_kernels.sequence_parallel) on 2 and 4 gloo ranks: every rank's
output and gradients equal the matching slice of the single-process result."""

import pytest
import torch
import torch.distributed as dist

from openvid_kernels.sequence_parallel import all_to_all, gather_frames, shard_frames, temporal_attention_packed_sp
from openvid_kernels.temporal import temporal_attention_packed
from tests.utils import run_on_gloo_ranks


def _all_to_all_worker(rank, world):
    generator = torch.Generator().manual_seed(0)
    everyone = [torch.randn(3, 2 * world, 4 * world, generator=generator) for _ in range(world)]  # rank r's x
    x = everyone[rank].clone().requires_grad_()
    y = all_to_all(x, scatter_dim=2, gather_dim=1, group=None)
    expected = torch.cat([other.chunk(world, dim=2)[rank] for other in everyone], dim=1)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)

    # The backward is the reverse exchange: the gradient of sum(y * w) is w, sent back to where y came from.
    weights = [torch.randn(expected.shape, generator=generator) for _ in range(world)]  # rank r's w
    (y * weights[rank]).sum().backward()
    expected_grad = torch.cat([w.chunk(world, dim=1)[rank] for w in weights], dim=2)
    torch.testing.assert_close(x.grad, expected_grad, rtol=0, atol=0)

    torch.testing.assert_close(gather_frames(shard_frames(everyone[0], None, dim=1), None, dim=1), everyone[0])
    with pytest.raises(ValueError, match="multiple of the sequence-parallel group size"):
        all_to_all(torch.randn(2, 2 * world + 1), scatter_dim=1, gather_dim=0, group=None)


@pytest.mark.parametrize("world", [2, 4])
def test_all_to_all_exchanges_pieces_and_reverses_gradients(world):
    run_on_gloo_ranks(_all_to_all_worker, world)


def _temporal_worker(rank, world, backend, frames, heads, spatial):
    generator = torch.Generator().manual_seed(1)
    B, D = 2, 16
    qkv = torch.randn(B, frames * spatial, 3, heads, D, generator=generator)
    grad_out = torch.randn(B, frames * spatial, heads, D, generator=generator)
    full = qkv.clone().requires_grad_()
    expected = temporal_attention_packed(full, frames, backend="reference")
    expected.backward(grad_out)

    def local(tensor):  # this rank's frames of a [B, T*S, ...] tensor
        return shard_frames(tensor.unflatten(1, (frames, spatial)), None, dim=1).flatten(1, 2)

    mine = local(qkv).clone().requires_grad_()
    out = temporal_attention_packed_sp(mine, frames // world, None, backend=backend)
    out.backward(local(grad_out))
    torch.testing.assert_close(out, local(expected), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine.grad, local(full.grad), rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match="number of heads divisible"):
        temporal_attention_packed_sp(torch.randn(B, spatial, 3, world + 1, D), 1, None)


@pytest.mark.parametrize("world, frames, heads, spatial", [(2, 4, 2, 3), (4, 8, 4, 5), (4, 4, 8, 1)])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_temporal_attention_over_ranks_matches_one_process(world, frames, heads, spatial, backend):
    run_on_gloo_ranks(_temporal_worker, world, backend, frames, heads, spatial)


def test_shard_frames_needs_a_dividing_frame_count():
    run_on_gloo_ranks(_shard_error_worker, 2)


def _shard_error_worker(rank, world):
    with pytest.raises(ValueError, match="3 frames .* cannot be split over a sequence-parallel group of 2"):
        shard_frames(torch.randn(1, 3, 4), dist.group.WORLD, dim=1)
