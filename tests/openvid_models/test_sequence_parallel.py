"""STDiT and MVDiT with their frames split over 2 and 4 gloo ranks equal the single-process model: every
rank's output is its frames of the full output, and the parameter gradients summed over the ranks (what
FSDP's reduction does) are the full model's."""

import pytest
import torch
import torch.distributed as dist

import openvid_kernels as ok
from openvid_models import MVDiT, STDiT
from tests.openvid_models.utils import tiny_inputs, tiny_model
from tests.utils import run_on_gloo_ranks

FRAMES, HEADS = 4, 4  # divisible by both group sizes


def _inputs():
    x, timestep, y, mask = tiny_inputs(lens=(2, 7))
    x = torch.randn(x.shape[0], x.shape[1], FRAMES, *x.shape[3:], generator=torch.Generator().manual_seed(5))
    return x, timestep, y, mask


def _model_worker(rank, world, model_class):
    ok.use_backend("reference")  # the ops are checked elsewhere; this checks the sharding
    x, timestep, y, mask = _inputs()
    model = tiny_model(model_class, input_size=(FRAMES, 6, 10), num_heads=HEADS).double()
    x, y = x.double(), y.double()
    expected = model(x, timestep, y, mask)
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(6), dtype=expected.dtype)
    (expected * weights).sum().backward()
    # (MVDiT's last text-stream MLP reaches no output, so it has no gradient.)
    full_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    model.set_sequence_parallel(dist.group.WORLD)
    frames = slice(rank * FRAMES // world, (rank + 1) * FRAMES // world)
    out = model(x[:, :, frames], timestep, y, mask)
    torch.testing.assert_close(out, expected[:, :, frames], rtol=1e-10, atol=1e-10)
    (out * weights[:, :, frames]).sum().backward()
    assert {name for name, p in model.named_parameters() if p.grad is not None} == set(full_grads)
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        dist.all_reduce(param.grad)
        torch.testing.assert_close(param.grad, full_grads[name], rtol=1e-9, atol=1e-10, msg=name)

    with pytest.raises(ValueError, match=rf"x must be \[B, 4, {FRAMES // world}, H, W\] \(this rank's share"):
        model(x, timestep, y, mask)
    model.set_sequence_parallel(None)
    torch.testing.assert_close(model(x, timestep, y, mask), expected)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("model_class", [STDiT, MVDiT])
def test_frames_split_over_ranks_match_one_process(model_class, world):
    run_on_gloo_ranks(_model_worker, world, model_class)


def _error_worker(rank, world):
    with pytest.raises(ValueError, match="frame count divisible by 2; this model has 3 latent frames"):
        tiny_model(STDiT, input_size=(3, 6, 10), num_heads=2).set_sequence_parallel(dist.group.WORLD)
    with pytest.raises(ValueError, match="head count divisible by 2; this model has 1 heads"):
        tiny_model(MVDiT, input_size=(4, 6, 10), num_heads=1).set_sequence_parallel(dist.group.WORLD)


def test_frames_and_heads_must_divide_over_the_group():
    run_on_gloo_ranks(_error_worker, 2)
