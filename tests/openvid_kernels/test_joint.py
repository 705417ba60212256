"""MVDiT joint attention: both outputs and both gradients against the float64 reference."""

import pytest
import torch

import openvid_kernels as ok
from openvid_kernels import joint as ja
from tests.openvid_kernels.test_cross import CONFIGS, FIRST_CPU_AND_GPU, MAX_TEXT, random_lengths
from tests.utils import (assert_close_to_reference, check_against_reference, check_compiled_block, relative_error,
                         skip_large_on_cpu, skip_unswept_gpu_dtype)


def streams(device, dtype, batch, frames, video_tokens, text_tokens, head_dim=72, heads=2, seed=0):
    torch.manual_seed(seed)
    factory = dict(device=device, dtype=dtype)
    return (torch.randn(batch, frames, video_tokens, 3, heads, head_dim, **factory),
            torch.randn(batch, frames, text_tokens, 3, heads, head_dim, **factory))


def check_joint(video_qkv, text_qkv, lens, dtype, backend, softmax_scale=None):
    """Both outputs (flattened into one) and both gradients."""

    def flat(op):
        return lambda v, t: torch.cat([out.flatten() for out in op(v, t)])

    check_against_reference(
        flat(lambda v, t: ok.joint_attention(v, t, lens, softmax_scale, backend=backend)),
        flat(lambda v, t: ja.joint_attention_reference(v, t, lens, softmax_scale)),
        (video_qkv, text_qkv), dtype, ("video_qkv", "text_qkv"),
    )


@pytest.mark.parametrize("device,backend,dtype", CONFIGS)
@pytest.mark.parametrize("head_dim", [64, 72, 128])
@pytest.mark.parametrize("video_tokens", [1, 21, 256, 1000])
def test_matches_reference(device, backend, dtype, video_tokens, head_dim):
    skip_large_on_cpu(device, video_tokens)
    skip_unswept_gpu_dtype(device, dtype, head_dim)
    frames = 2 if device == "cuda" and video_tokens <= 256 else 1
    video_qkv, text_qkv = streams(device, dtype, 3, frames, video_tokens, MAX_TEXT, head_dim, seed=video_tokens)
    lens = random_lengths(3, torch.Generator().manual_seed(head_dim))
    check_joint(video_qkv, text_qkv, lens, dtype, backend)


@pytest.mark.parametrize("device,backend,dtype", CONFIGS)
def test_lengths_per_frame_and_strided_streams(device, backend, dtype):
    """[B, T] lengths (0 included: the video tokens still attend), and q, k, v views of wider projections."""
    video_qkv, text_qkv = streams(device, dtype, 2, 3, 19, 23, head_dim=88, seed=1)
    video_qkv, text_qkv = video_qkv[..., 8:], text_qkv[..., :80]  # head rows 88 wide, offset 8 / 0
    lens = torch.tensor([[0, 23, 5], [1, 16, 17]])
    check_joint(video_qkv, text_qkv, lens, dtype, backend, softmax_scale=0.2)


@pytest.mark.parametrize("device,backend,dtype", FIRST_CPU_AND_GPU)
def test_one_sample_of_many_frames(device, backend, dtype):
    """B = 1: the sample's text length is broadcast over its frames."""
    video_qkv, text_qkv = streams(device, dtype, 1, 3, 24, 30, seed=7)
    check_joint(video_qkv, text_qkv, torch.tensor([11]), dtype, backend)


@pytest.mark.parametrize("device,backend,dtype", FIRST_CPU_AND_GPU)
def test_padded_text_tokens_never_change_any_output(device, backend, dtype):
    video_qkv, text_qkv = streams(device, dtype, 2, 2, 33, 40, seed=2)
    lens = torch.tensor([3, 40])
    leaves = [t.clone().requires_grad_() for t in (video_qkv, text_qkv)]
    video_out, text_out = ok.joint_attention(*leaves, lens, backend=backend)
    loss = (video_out.float() * torch.randn_like(video_out).float()).sum() + text_out.float().square().sum()
    _, dtext = torch.autograd.grad(loss, leaves)
    changed = text_qkv.clone()
    changed[0, :, 3:] = float("nan")
    video_out2, text_out2 = ok.joint_attention(video_qkv, changed, lens, backend=backend)
    torch.testing.assert_close(video_out2, video_out.detach(), rtol=0, atol=0)
    torch.testing.assert_close(text_out2, text_out.detach(), rtol=0, atol=0)
    assert (text_out[0, :, 3:] == 0).all() and (dtext[0, :, 3:] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_bf16_error_at_most_twice_pytorch_bf16(backend):
    video_qkv, text_qkv = streams("cuda", torch.bfloat16, 2, 2, 1024, MAX_TEXT, heads=4, seed=3)
    lens = torch.tensor([1, 120])
    grads = [torch.randn_like(t[:, :, :, 0]) for t in (video_qkv, text_qkv)]

    def run(op, tensors):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        outs = op(*leaves)
        loss = sum((out * g.to(out.dtype)).sum() for out, g in zip(outs, grads))
        return torch.cat([out.flatten() for out in outs]), torch.autograd.grad(loss, leaves)

    ref_out, ref_grads = run(lambda *t: ja.joint_attention_reference(*t, lens),
                             [t.double() for t in (video_qkv, text_qkv)])
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        torch_out, torch_grads = run(lambda *t: ja.joint_attention_reference(*t, lens), (video_qkv, text_qkv))
    our_out, our_grads = run(lambda *t: ok.joint_attention(*t, lens, backend=backend), (video_qkv, text_qkv))
    pairs = [("output", our_out, torch_out, ref_out)]
    pairs += list(zip(("dvideo_qkv", "dtext_qkv"), our_grads, torch_grads, ref_grads))
    for what, ours, theirs, ref in pairs:
        error, torch_error = relative_error(ours, ref), relative_error(theirs, ref)
        assert error <= 2 * torch_error, f"{what}: our bf16 error {error:.3g} > 2 x PyTorch's {torch_error:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "reference"])
def test_lengths_on_the_gpu_are_clamped_not_read_back(backend):
    # No pass checks or clamps GPU lengths before the launch: the kernels clamp what they load.
    video_qkv, text_qkv = (t.requires_grad_() for t in streams("cuda", torch.float16, 2, 2, 40, 7, seed=5))
    douts = [torch.randn_like(t[:, :, :, 0]) for t in (video_qkv, text_qkv)]
    results = []
    for lens in (torch.tensor([-2, 50], device="cuda"), [0, 7]):
        outs = ok.joint_attention(video_qkv, text_qkv, lens, backend=backend)
        results.append((*outs, *torch.autograd.grad(outs, (video_qkv, text_qkv), douts)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("device,backend,dtype", FIRST_CPU_AND_GPU)
def test_opcheck(device, backend, dtype):
    video_qkv, text_qkv = (t.requires_grad_() for t in streams(device, dtype, 2, 2, 9, 7, head_dim=24, seed=4))
    lens = torch.tensor([7, 7, 2, 0], device=device, dtype=torch.int32)
    torch.library.opcheck(torch.ops.openvid.joint_attention_fwd.default, (video_qkv, text_qkv, lens, 0.25, backend))
    video_qkv, text_qkv = video_qkv.detach(), text_qkv.detach()
    outputs = torch.ops.openvid.joint_attention_fwd(video_qkv, text_qkv, lens, 0.25, backend)
    torch.library.opcheck(
        torch.ops.openvid.joint_attention_bwd.default,
        (torch.randn_like(outputs[0]), torch.randn_like(outputs[1]), video_qkv, text_qkv, lens, *outputs, 0.25,
         backend),
    )


def joint_block(x, y, weight_qkv, weight_qkv_y, frames, heads, lens, backend):
    """MVDiT's joint spatial attention: qkv projections of both streams, attention, outputs summed per stream."""
    B = x.shape[0]
    video_qkv = (x @ weight_qkv).view(B, frames, -1, 3, heads, x.shape[-1] // heads)
    text_qkv = (y @ weight_qkv_y).view(B, frames, -1, 3, heads, x.shape[-1] // heads)
    video_out, text_out = ok.joint_attention(video_qkv, text_qkv, lens, backend=backend)
    return video_out.flatten(-2).flatten(1, 2) + text_out.flatten(-2).flatten(1, 2).mean(1, keepdim=True)


@pytest.mark.parametrize("device,backend,dtype", FIRST_CPU_AND_GPU)
def test_torch_compile_fullgraph_forward_and_backward(device, backend, dtype):
    torch.manual_seed(5)
    factory = dict(device=device, dtype=dtype)
    frames, C, heads = 2, 144, 2  # head dim 72
    inputs = [torch.randn(2, frames * 13, C, **factory), torch.randn(2, frames * 9, C, **factory),
              torch.randn(C, 3 * C, **factory) / C**0.5, torch.randn(C, 3 * C, **factory) / C**0.5]
    lens = torch.tensor([9, 4])

    def block(x, y, weight_qkv, weight_qkv_y, backend):
        return joint_block(x, y, weight_qkv, weight_qkv_y, frames, heads, lens, backend)

    check_compiled_block(block, inputs, ("x", "y", "weight_qkv", "weight_qkv_y"), (), backend, dtype)


def test_reference_is_attention_over_the_concatenation_with_padded_keys_masked():
    torch.manual_seed(6)
    video_qkv, text_qkv = streams("cpu", torch.float64, 2, 2, 5, 4, head_dim=8)
    lens = torch.tensor([2, 4])
    q, k, v = torch.cat([video_qkv, text_qkv], dim=2).unbind(3)  # [B, T, 9, H, D]
    scores = torch.einsum("btshd,btuhd->bthsu", q, k) * 8**-0.5
    padded_key = torch.arange(9)[None, :] >= 5 + lens[:, None]  # [B, 9]
    scores = scores.masked_fill(padded_key[:, None, None, None, :], float("-inf"))
    expected = torch.einsum("bthsu,btuhd->btshd", scores.softmax(-1), v)
    expected = expected * ~padded_key[:, None, :, None, None]  # padded text tokens' outputs are zero
    video_out, text_out = ok.joint_attention(video_qkv, text_qkv, lens)  # CPU tensors: reference
    torch.testing.assert_close(video_out, expected[:, :, :5])
    torch.testing.assert_close(text_out, expected[:, :, 5:])


@pytest.mark.parametrize(
    "change,error,message",
    [
        (dict(lens=[1, 9]), ValueError, r"text_lens\[1\] = 9 is outside \[0, 4\]"),
        (dict(lens=torch.ones(2, 2, dtype=torch.long)), ValueError, r"text_lens must have shape \[B\] = \[2\] or"),
        (dict(text=torch.randn(2, 2, 4, 3, 2, 16)), ValueError, r"text_qkv must be \[B, T, L, 3, H, D\]"),
        (dict(text=torch.randn(2, 3, 0, 3, 2, 8)), ValueError, "need at least one token"),
        (dict(video=torch.randn(2, 3, 5, 2, 2, 8)), ValueError, r"video_qkv must be 6-D \[B, T, tokens, 3, H, D\]"),
        (dict(text=torch.randn(2, 3, 4, 3, 2, 8).half()), TypeError, "text_qkv has dtype torch.float16"),
    ],
)
def test_bad_arguments_are_named(change, error, message):
    video, text = torch.randn(2, 3, 5, 3, 2, 8), torch.randn(2, 3, 4, 3, 2, 8)
    with pytest.raises(error, match=message):
        ok.joint_attention(change.get("video", video), change.get("text", text), change.get("lens", [1, 2]))
