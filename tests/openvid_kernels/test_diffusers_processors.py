"""Drop-in diffusers processors: tiny random Latte, PixArt-alpha and SD3 transformers (and bare diffusers
``Attention`` modules with every option the processors mirror) on our ops, against stock diffusers.

Stock runs in float64 as the reference: our fp32 outputs must match it to 1e-5, and on the reference backend our
processors in float64 must match it to 1e-10 (any slip in the processors' logic shows there, not hidden by fp32
noise). fp64 rather than stock fp32 because for a caption whose keys are all masked stock fp32 is itself 2e-5 off:
its -10000 bias rounds the scores to multiples of 2**-10 (fp32's spacing at 10000), while our processors attend
to all keys without the bias, which is the exact value (both within 1e-6 of fp64 on every other sample).
"""

import copy
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import LatteTransformer3DModel, PixArtTransformer2DModel, SD3Transformer2DModel  # noqa: E402
from diffusers.models.attention_processor import (Attention, AttnProcessor, AttnProcessor2_0,  # noqa: E402
                                                  FusedAttnProcessor2_0, JointAttnProcessor2_0)

import openvid_kernels.diffusers_processors as dp  # noqa: E402
from openvid_kernels import backends  # noqa: E402
from tests.utils import TRITON_INTERPRET, relative_error  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
_interpreter = pytest.mark.skipif(not TRITON_INTERPRET, reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
CPU_BACKENDS = ["reference", pytest.param("triton", marks=_interpreter)]
FP32_TOLERANCE = 1e-5
FP64_TOLERANCE = 1e-10


# ---------------------------------------------------------------------------------------------------------
# Tiny models and their inputs (random weights, random inputs; nothing is loaded)
# ---------------------------------------------------------------------------------------------------------

def latte(head_dim=16, frames=4):
    torch.manual_seed(0)
    return LatteTransformer3DModel(
        num_attention_heads=2, attention_head_dim=head_dim, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, caption_channels=24, cross_attention_dim=2 * head_dim, video_length=frames,
        norm_type="ada_norm_single", activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        attention_bias=True, norm_elementwise_affine=False, norm_eps=1e-6)


def latte_inputs(dtype, device="cpu", batch=2, frames=4, side=8, text=7):
    generator = torch.Generator().manual_seed(1)
    factory = dict(dtype=dtype)
    return dict(hidden_states=torch.randn(batch, 4, frames, side, side, generator=generator, **factory),
                timestep=torch.tensor([10, 700][:batch]),
                encoder_hidden_states=torch.randn(batch, text, 24, generator=generator, **factory))


def pixart(head_dim=16):
    torch.manual_seed(0)
    return PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=head_dim, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, caption_channels=24, cross_attention_dim=2 * head_dim,
        norm_type="ada_norm_single", activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        attention_bias=True, norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False)


def caption_mask(text=10):
    """0/1 masks of 4 captions: all real, a prefix of 6, holes (not a prefix), none real."""
    mask = torch.ones(4, text)
    mask[1, 6:] = 0
    mask[2, ::3] = 0
    mask[3] = 0
    return mask


def pixart_inputs(dtype, mask=None, text=10):
    generator = torch.Generator().manual_seed(2)
    mask = caption_mask(text) if mask is None else mask
    return dict(hidden_states=torch.randn(4, 4, 8, 8, generator=generator, dtype=dtype),
                encoder_hidden_states=torch.randn(4, text, 24, generator=generator, dtype=dtype),
                timestep=torch.tensor([10, 300, 600, 999]), encoder_attention_mask=mask.to(dtype))


def sd3(head_dim=16):
    torch.manual_seed(0)
    # SD3.5-style: qk-norm everywhere, a second (self-)attention in the first block; the last block's context
    # stream is pre-only.
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=head_dim, num_attention_heads=2,
        joint_attention_dim=24, caption_projection_dim=2 * head_dim, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm")


def sd3_inputs(dtype):
    generator = torch.Generator().manual_seed(3)
    return dict(hidden_states=torch.randn(2, 4, 8, 8, generator=generator, dtype=dtype),
                encoder_hidden_states=torch.randn(2, 9, 24, generator=generator, dtype=dtype),
                pooled_projections=torch.randn(2, 16, generator=generator, dtype=dtype),
                timestep=torch.tensor([10, 700]))


MODELS = {"latte": (latte, latte_inputs), "pixart": (pixart, pixart_inputs), "sd3": (sd3, sd3_inputs)}


def cast(inputs: dict, dtype, device="cpu") -> dict:
    return {name: t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
            for name, t in inputs.items()}


def forward(model, inputs):
    return model(**inputs).sample


def stock_fp64(model, inputs):
    return forward(copy.deepcopy(model).double(), cast(inputs, torch.float64))


def patched(model, backend):
    model = copy.deepcopy(model)
    dp.patch_diffusers_model(model, backend=backend)
    return model


def assert_matches(actual, expected, tolerance, what):
    """Elementwise within ``tolerance`` relative, and absolute on the output's scale (values near 0 of an output
    of magnitude 30 carry that magnitude's rounding)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tolerance, atol=tolerance * scale,
                               msg=lambda message: f"{what}: {message}")


# ---------------------------------------------------------------------------------------------------------
# Whole models against stock diffusers
# ---------------------------------------------------------------------------------------------------------

def test_auto_runs_the_reference_on_cpu():
    assert backends.resolve_backend("auto", torch.device("cpu")) == "reference"


def test_the_comparisons_can_fail():
    """The tiny models' outputs depend on what the attention computes: on the caption mask and on Latte's
    temporal attention, far beyond the tolerances used here."""
    model = pixart()
    inputs = pixart_inputs(torch.float32)
    unmasked = dict(inputs, encoder_attention_mask=None)
    with torch.no_grad():
        assert (forward(model, inputs) - forward(model, unmasked)).abs().max() > 1e-2
        model = latte()
        inputs = latte_inputs(torch.float32)
        without = forward(model, dict(inputs, enable_temporal_attentions=False))
        assert (forward(model, inputs) - without).abs().max() > 1e-2


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(MODELS))
def test_model_matches_stock(name, backend):
    build, make_inputs = MODELS[name]
    model, inputs = build(), make_inputs(torch.float32)
    with torch.no_grad():
        expected = stock_fp64(model, inputs)
        ours = patched(model, backend)
        assert_matches(forward(ours, inputs), expected, FP32_TOLERANCE, f"{name} fp32 on {backend}")
        if backend == "reference":  # the processors' own math, free of fp32 noise
            assert_matches(forward(ours.double(), cast(inputs, torch.float64)), expected, FP64_TOLERANCE,
                           f"{name} fp64 on {backend}")


@pytest.mark.parametrize("name,expected", [
    ("latte", dict(spatial_attention=2, temporal_attention=2, cross_attention=2)),
    ("pixart", dict(spatial_attention=2, cross_attention=2)),
    ("sd3", dict(spatial_attention=3)),
])
def test_every_block_runs_on_the_op_the_report_names(name, expected, monkeypatch):
    calls = {}
    for op in ("spatial_attention", "temporal_attention", "cross_attention"):
        original = getattr(dp, op)
        monkeypatch.setattr(dp, op, lambda *a, _op=op, _original=original, **k: calls.update(
            {_op: calls.get(_op, 0) + 1}) or _original(*a, **k))
    build, make_inputs = MODELS[name]
    with torch.no_grad():
        forward(patched(build(), "reference"), make_inputs(torch.float32))
    assert calls == expected


@pytest.mark.parametrize("name", list(MODELS))
def test_gradients_match_stock(name):
    """Gradients of a random projection of the output w.r.t. the inputs and every parameter (the Triton
    backward of every op: spatial, temporal, masked cross-attention with gathered keys, SD3's joint tokens)."""
    if not TRITON_INTERPRET:
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    build, make_inputs = MODELS[name]
    model, inputs = build(), make_inputs(torch.float32)
    differentiable = [n for n in ("hidden_states", "encoder_hidden_states") if n in inputs]

    def grads(model, inputs):
        inputs = {n: t.clone().requires_grad_() if n in differentiable else t for n, t in inputs.items()}
        out = forward(model, inputs)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        leaves = [inputs[n] for n in differentiable] + list(model.parameters())
        return torch.autograd.grad((out * weights.to(out.dtype)).sum(), leaves, allow_unused=True)

    expected = grads(copy.deepcopy(model).double(), cast(inputs, torch.float64))
    actual = grads(patched(model, "triton"), inputs)
    names = differentiable + [n for n, _ in model.named_parameters()]
    scale = max(g.abs().max().item() for g in expected if g is not None)
    for what, ours, reference in zip(names, actual, expected):
        if reference is None:
            assert ours is None, f"{what}: gradient where stock has none"
            continue
        torch.testing.assert_close(ours.double(), reference, rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda message, what=what: f"grad of {what}: {message}")


# ---------------------------------------------------------------------------------------------------------
# Patch report, restore, unsupported modules
# ---------------------------------------------------------------------------------------------------------

def test_report_names_every_module_and_unpatch_restores_the_originals():
    model = latte()
    originals = {name: m.processor for name, m in model.named_modules() if isinstance(m, Attention)}
    report = dp.patch_diffusers_model(model, backend="reference")
    assert report.model == "LatteTransformer3DModel" and report.backend == "reference"
    assert report.left_alone == {}
    assert report.replaced == {
        **{f"transformer_blocks.{i}.attn1": "self-attention -> spatial_attention" for i in range(2)},
        **{f"transformer_blocks.{i}.attn2": "cross-attention -> cross_attention (masks as key lengths)"
           for i in range(2)},
        **{f"temporal_transformer_blocks.{i}.attn1": "temporal self-attention -> temporal_attention"
           for i in range(2)},
    }
    text = str(report)
    assert "6 of 6 attention modules" in text
    assert "temporal_transformer_blocks.*.attn1 (2)  temporal self-attention -> temporal_attention" in text
    processors = {name: m.processor for name, m in model.named_modules() if isinstance(m, Attention)}
    assert all(isinstance(p, dp.OpenVidAttnProcessor) and p.original is originals[n] for n, p in processors.items())
    assert processors["temporal_transformer_blocks.0.attn1"].temporal
    assert not processors["transformer_blocks.0.attn1"].temporal

    again = dp.patch_diffusers_model(model, backend="auto")  # a new backend, the same originals
    assert again.replaced == report.replaced
    assert all(m.processor.backend == "auto" and m.processor.original is originals[n]
               for n, m in model.named_modules() if isinstance(m, Attention))
    assert dp.unpatch_diffusers_model(model) == 6
    assert all(m.processor is originals[n] for n, m in model.named_modules() if isinstance(m, Attention))


def test_sd3_report():
    model = sd3()
    report = dp.patch_diffusers_model(model, backend="reference")
    assert report.replaced == {
        "transformer_blocks.0.attn": "joint image-text attention -> spatial_attention on [image; text]",
        "transformer_blocks.0.attn2": "self-attention -> spatial_attention",
        "transformer_blocks.1.attn": "joint image-text attention -> spatial_attention on [image; text]",
    }
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    assert all(isinstance(m.processor, dp.OpenVidJointAttnProcessor) for m in attentions)
    assert all(type(m.processor.original) is JointAttnProcessor2_0 for m in attentions)
    assert dp.unpatch_diffusers_model(model) == 3
    assert all(type(m.processor) is JointAttnProcessor2_0 for m in attentions)


def test_unsupported_head_dim_is_left_alone_with_a_warning():
    model = pixart(head_dim=12)
    inputs = pixart_inputs(torch.float32)
    with torch.no_grad():
        expected = forward(model, inputs)
        with pytest.warns(UserWarning, match="4 attention modules of PixArtTransformer2DModel keep .* head dim 12"):
            report = dp.patch_diffusers_model(model, backend="reference")
        assert report.replaced == {}
        assert set(report.left_alone) == {f"transformer_blocks.{i}.attn{j}" for i in range(2) for j in (1, 2)}
        assert all("head dim 12: the kernels take multiples of 8 up to 128" == r for r in report.left_alone.values())
        assert "left on their original processor" in str(report) and "0 of 4" in str(report)
        assert all(type(m.processor) is AttnProcessor2_0 for m in model.modules() if isinstance(m, Attention))
        assert torch.equal(forward(model, inputs), expected)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="backend must be None or one of"):
        dp.patch_diffusers_model(latte(), backend="fast")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        dp.patch_diffusers_model("pipe")
    with pytest.raises(ValueError, match="original must be one of diffusers' JointAttnProcessor2_0"):
        dp.OpenVidJointAttnProcessor(original=AttnProcessor2_0())


# ---------------------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------------------

def test_mask_is_checked_once_per_forward_and_again_after_an_in_place_change(monkeypatch):
    calls = []
    check = dp._check_mask
    monkeypatch.setattr(dp, "_check_mask", lambda *a: calls.append(1) or check(*a))
    model = pixart()
    ours = patched(model, "reference")
    inputs = pixart_inputs(torch.float32)
    bias = (1 - inputs.pop("encoder_attention_mask")[:, None]) * -10000.0  # as PixArt converts it: [B, 1, L]
    with torch.no_grad():
        forward(ours, dict(inputs, encoder_attention_mask=bias))
        assert len(calls) == 1  # two cross-attention layers, one check
        forward(ours, dict(inputs, encoder_attention_mask=bias))
        assert len(calls) == 1  # the same tensor next step: cached
        bias[0, 0, :4] = -10000.0  # in place: a new version
        out = forward(ours, dict(inputs, encoder_attention_mask=bias))
        assert len(calls) == 2
        expected = stock_fp64(model, dict(inputs, encoder_attention_mask=bias))
        assert_matches(out, expected, FP32_TOLERANCE, "after the in-place change")
        with torch.inference_mode():  # inference tensors keep no version: checked on every call, still right
            inference_bias = bias.clone()
            out = forward(ours, dict(inputs, encoder_attention_mask=inference_bias))
        assert len(calls) == 4
        assert_matches(out, expected, FP32_TOLERANCE, "inference-mode mask")


def test_a_new_mask_at_a_recycled_address_is_checked_again():
    """Python reuses a freed tensor's id (and a new tensor's version is 0 again): the cache must not hand a new
    mask the old one's lengths."""
    model = pixart()
    ours = patched(model, "reference")
    inputs = pixart_inputs(torch.float32)
    del inputs["encoder_attention_mask"]
    seen, recycled = set(), False
    with torch.no_grad():
        for real in range(1, 10):
            bias = torch.zeros(4, 1, 10)
            bias[:, :, real:] = -10000.0
            recycled |= id(bias) in seen
            seen.add(id(bias))
            expected = forward(model, dict(inputs, encoder_attention_mask=bias))
            assert_matches(forward(ours, dict(inputs, encoder_attention_mask=bias)), expected, FP32_TOLERANCE,
                           f"{real} real tokens")
            del bias
    assert recycled, "no tensor id was reused: the test did not exercise the cache's identity check"


def test_boolean_and_minus_inf_masks_match_stock():
    """Boolean (True: keep) and -inf masks, passed as biases PixArt leaves alone ([B, 1, L]); a caption with no
    real token gets zeros from both, as PyTorch's SDPA gives for fully masked rows."""
    model = pixart()
    inputs = pixart_inputs(torch.float32)
    keep = inputs.pop("encoder_attention_mask").bool()[:, None]
    minus_inf = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    ours = patched(model, "reference")
    with torch.no_grad():
        for mask in (keep, minus_inf):
            expected = forward(model, dict(inputs, encoder_attention_mask=mask))
            assert_matches(forward(ours, dict(inputs, encoder_attention_mask=mask)), expected, FP32_TOLERANCE,
                           f"{mask.dtype} mask")


def test_bf16_pixart_mask_keys_are_found():
    """bf16 holds -10000 as -9984: PixArt's bf16 bias still counts as masked (no fallback)."""
    model = pixart().to(torch.bfloat16)
    inputs = cast(pixart_inputs(torch.float32), torch.bfloat16)
    bias = (1 - inputs["encoder_attention_mask"][:, None]) * -10000.0
    assert bias.min().item() == -9984.0
    with torch.no_grad():
        padding = dp._key_padding(model.transformer_blocks[0].attn2, bias, 4, 16, 10, torch.device("cpu"))
    assert isinstance(padding, dp._KeyPadding)
    assert padding.kv_lens.tolist() == [10, 6, 6, 10]  # the all-masked caption attends to all keys
    assert padding.order[2, :6].tolist() == [1, 2, 4, 5, 7, 8]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_unrepresentable_masks_fall_back_with_a_warning_and_match_stock(backend):
    model = pixart()
    inputs = pixart_inputs(torch.float32)
    soft = inputs.pop("encoder_attention_mask")[:, None] * 0 - 1.0  # a soft bias of -1 on some keys
    soft[:, :, :3] = 0
    ours = patched(model, backend)
    with torch.no_grad():
        expected = forward(model, dict(inputs, encoder_attention_mask=soft))
        with pytest.warns(UserWarning, match="values other than 0 .* runs on diffusers' AttnProcessor2_0") as record:
            out = forward(ours, dict(inputs, encoder_attention_mask=soft))
        assert len(record) == 2  # once per processor (two cross-attention layers)
        assert_matches(out, expected, FP32_TOLERANCE, "soft mask")
        with warnings.catch_warnings():  # warned once per processor, not per call
            warnings.simplefilter("error")
            forward(ours, dict(inputs, encoder_attention_mask=soft))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_caption_dropped_by_a_bias_too_low_to_cancel_falls_back(backend):
    """Every key of a caption at -1e9: fp32 rounds the scores away and stock averages the values uniformly,
    which no key length expresses, so that call runs on the stock processor; at -10000 the bias cancels and
    the call stays on ours (all keys attended with their scores, as stock)."""
    model = pixart()
    inputs = pixart_inputs(torch.float32)
    bias = (1 - inputs.pop("encoder_attention_mask")[:, None]) * -10000.0
    bias[1] = -10000.0  # caption 1: every key dropped by one bias
    ours = patched(model, backend)
    with torch.no_grad():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # -10000: no fallback
            out = forward(ours, dict(inputs, encoder_attention_mask=bias))
        assert_matches(out, forward(model, dict(inputs, encoder_attention_mask=bias)), FP32_TOLERANCE, "-1e4 row")
        bias[1] = -1e9
        expected = forward(model, dict(inputs, encoder_attention_mask=bias))
        with pytest.warns(UserWarning, match="one value below -100000"):
            out = forward(ours, dict(inputs, encoder_attention_mask=bias))
        assert_matches(out, expected, FP32_TOLERANCE, "-1e9 row")


def attention_modules():
    """Bare diffusers Attention modules with the options the processors mirror."""
    torch.manual_seed(5)
    modules = torch.nn.ModuleDict(dict(
        # a VAE-style block: 4-D input, group norm, residual connection, output rescale
        image=Attention(32, heads=2, dim_head=16, norm_num_groups=8, residual_connection=True,
                        rescale_output_factor=2.0, bias=True),
        # MoVQ-style spatial norm conditioned on temb
        spatial_norm=Attention(32, heads=2, dim_head=16, spatial_norm_dim=6, bias=True),
        cross=Attention(32, cross_attention_dim=20, heads=2, dim_head=16, cross_attention_norm="layer_norm",
                        qk_norm="layer_norm", bias=True),
        classic=Attention(32, heads=2, dim_head=16, scale_qk=False),  # diffusers picks AttnProcessor: scale 1
        fused=Attention(32, heads=2, dim_head=16, bias=True),
        fused_cross=Attention(32, cross_attention_dim=20, heads=2, dim_head=16),
        odd_head_dim=Attention(24, heads=2, dim_head=12),
    ))
    for module in (modules["fused"], modules["fused_cross"]):
        module.fuse_projections()
        module.set_processor(FusedAttnProcessor2_0())
    for parameter in modules.parameters():  # no zero-initialised norms or biases
        parameter.data.normal_(0, 0.5)
    assert type(modules["classic"].processor) is AttnProcessor
    return modules


def attention_calls(dtype=torch.float32):
    """(module name, keyword arguments) of calls covering every path: 4-D inputs, spatial norm, cross-attention
    unmasked and with boolean / additive key masks (holes, and a sample with every key masked), masked
    self-attention, the classic processor's scale, fused projections."""
    generator = torch.Generator().manual_seed(6)
    randn = lambda *shape: torch.randn(*shape, generator=generator, dtype=dtype)  # noqa: E731
    tokens, context = randn(3, 11, 32), randn(3, 5, 20)
    holes = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    self_holes = torch.rand(3, 11, generator=generator) > 0.4
    self_holes[:, 0] = True
    self_bias = (~self_holes).to(dtype)[:, None] * -10000.0
    return [
        ("image", dict(hidden_states=randn(3, 32, 4, 5))),
        ("image", dict(hidden_states=tokens, attention_mask=self_bias)),
        ("spatial_norm", dict(hidden_states=randn(3, 32, 4, 4), temb=randn(3, 6, 2, 2))),
        ("cross", dict(hidden_states=tokens, encoder_hidden_states=context)),
        ("cross", dict(hidden_states=tokens, encoder_hidden_states=context, attention_mask=holes[:, None])),
        ("cross", dict(hidden_states=tokens, encoder_hidden_states=context,
                       attention_mask=(~holes).to(dtype)[:, None] * -10000.0)),
        ("classic", dict(hidden_states=tokens, attention_mask=self_bias)),
        ("fused", dict(hidden_states=tokens)),
        ("fused", dict(hidden_states=tokens, attention_mask=self_holes[:, None])),
        ("fused_cross", dict(hidden_states=tokens, encoder_hidden_states=context)),
        ("odd_head_dim", dict(hidden_states=randn(3, 11, 24))),
    ]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_attention_options_match_stock(backend):
    stock = attention_modules().double()
    with torch.no_grad():
        expected = [stock[name](**cast(call, torch.float64)) for name, call in attention_calls()]
    modules = attention_modules()
    with pytest.warns(UserWarning, match="1 attention modules of ModuleDict keep .* head dim 12"):
        report = dp.patch_diffusers_model(modules, backend=backend)
    assert list(report.left_alone) == ["odd_head_dim"]
    with torch.no_grad():
        for (name, call), reference in zip(attention_calls(), expected):
            assert_matches(modules[name](**call), reference, FP32_TOLERANCE, f"{name} {sorted(call)}")


def test_per_query_and_per_head_masks_fall_back():
    modules = attention_modules()
    cross = modules["cross"]
    generator = torch.Generator().manual_seed(7)
    tokens, context = torch.randn(3, 11, 32, generator=generator), torch.randn(3, 5, 20, generator=generator)
    per_query = torch.zeros(3, 11, 5)
    per_query[:, ::2, 1] = -10000.0
    per_head = torch.zeros(3 * 2, 1, 5)  # stock reads [B * heads, 1, L] as a mask per (sample, head)
    per_head[::2, :, 2] = -10000.0
    same_per_head = torch.zeros(3 * 2, 1, 5)
    same_per_head[:, :, 2] = -10000.0
    with torch.no_grad():
        expected = [cross(tokens, context, mask) for mask in (per_query, per_head, same_per_head)]
        with pytest.warns(UserWarning, match="head dim 12"):
            dp.patch_diffusers_model(modules, backend="reference")
        for mask, reference, reason in zip((per_query, per_head), expected, ("queries", "heads")):
            with pytest.warns(UserWarning, match="differs between queries or heads"):
                assert_matches(cross(tokens, context, mask), reference, FP32_TOLERANCE, f"per-{reason} mask")
            cross.processor._warned.clear()
        assert_matches(cross(tokens, context, same_per_head), expected[2], FP32_TOLERANCE, "same mask per head")


@pytest.mark.skipif(not TRITON_INTERPRET, reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
def test_unsupported_dtype_runs_on_the_reference_ops_per_call():
    """float64 on the Triton backend: that call's attention runs on the reference ops, after the projections
    ran once (a forward hook on a projection sees one call per forward)."""
    model = sd3()
    inputs = cast(sd3_inputs(torch.float32), torch.float64)
    with torch.no_grad():
        expected = forward(copy.deepcopy(model).double(), inputs)
        ours = patched(model, "triton").double()
        calls = []
        ours.transformer_blocks[0].attn.to_q.register_forward_hook(lambda *_: calls.append(1))
        with pytest.warns(UserWarning, match="dtype torch.float64, which the kernels do not take; this call runs "
                                             "on the reference"):
            out = forward(ours, inputs)
    assert len(calls) == 1
    assert_matches(out, expected, FP32_TOLERANCE, "float64 on the reference ops")


# ---------------------------------------------------------------------------------------------------------
# Examples
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("example", ["diffusers_latte.py", "diffusers_pixart.py", "diffusers_sd3.py"])
def test_example_runs_tiny_on_cpu(example):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    args = [sys.executable, str(REPO / "examples" / example), "--tiny", "--device", "cpu", "--dtype", "float32"]
    if TRITON_INTERPRET:
        args += ["--backend", "triton"]
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "now run on openvid_kernels" in result.stdout
    assert "max |ours - stock|" in result.stdout


# ---------------------------------------------------------------------------------------------------------
# GPU: bf16 against fp64, next to stock bf16
# ---------------------------------------------------------------------------------------------------------

def gpu_case(name):
    """A somewhat larger model (head dim 72, the XL models' size) and its inputs, on the GPU."""
    if name == "latte":
        model = LatteTransformer3DModel(
            num_attention_heads=4, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=2,
            sample_size=32, patch_size=2, caption_channels=64, cross_attention_dim=288, video_length=8,
            norm_type="ada_norm_single", activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
            attention_bias=True, norm_elementwise_affine=False, norm_eps=1e-6)
        generator = torch.Generator().manual_seed(8)
        inputs = dict(hidden_states=torch.randn(2, 4, 8, 32, 32, generator=generator), timestep=torch.tensor([10, 700]),
                      encoder_hidden_states=torch.randn(2, 120, 64, generator=generator))
    elif name == "pixart":
        model = PixArtTransformer2DModel(
            num_attention_heads=4, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=2,
            sample_size=32, patch_size=2, caption_channels=64, cross_attention_dim=288, norm_type="ada_norm_single",
            activation_fn="gelu-approximate", num_embeds_ada_norm=1000, attention_bias=True,
            norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False)
        generator = torch.Generator().manual_seed(9)
        mask = caption_mask(120)
        inputs = dict(hidden_states=torch.randn(4, 4, 32, 32, generator=generator),
                      encoder_hidden_states=torch.randn(4, 120, 64, generator=generator),
                      timestep=torch.tensor([10, 300, 600, 999]), encoder_attention_mask=mask)
    else:
        model = SD3Transformer2DModel(
            sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=72, num_attention_heads=4,
            joint_attention_dim=64, caption_projection_dim=288, pooled_projection_dim=32, out_channels=4,
            pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm")
        generator = torch.Generator().manual_seed(10)
        inputs = dict(hidden_states=torch.randn(2, 4, 32, 32, generator=generator),
                      encoder_hidden_states=torch.randn(2, 154, 64, generator=generator),
                      pooled_projections=torch.randn(2, 32, generator=generator), timestep=torch.tensor([10, 700]))
    return model, inputs


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("name", list(MODELS))
def test_bf16_error_at_most_twice_stock_bf16(name, backend):
    torch.manual_seed(11)
    model, inputs = gpu_case(name)
    with torch.no_grad():
        reference = forward(copy.deepcopy(model).cuda().double(), cast(inputs, torch.float64, "cuda"))
        stock = copy.deepcopy(model).cuda().to(torch.bfloat16)
        bf16_inputs = cast(inputs, torch.bfloat16, "cuda")
        stock_error = relative_error(forward(stock, bf16_inputs), reference)
        dp.patch_diffusers_model(stock, backend=backend)
        our_error = relative_error(forward(stock, bf16_inputs), reference)
    assert our_error <= 2 * stock_error, f"{name}: our bf16 error {our_error:.3g} > 2 x stock's {stock_error:.3g}"


@pytest.mark.gpu
def test_cuda_graph_capture_with_a_validated_mask():
    """A mask tensor checked before capture (the same object every step) is read from the cache while a CUDA
    graph is captured, so the patched forward captures and replays; refilled in place with other lengths (the
    same structure), the replay follows it."""
    model, inputs = gpu_case("pixart")
    model = model.cuda().to(torch.bfloat16)
    inputs = cast(inputs, torch.bfloat16, "cuda")
    inputs["encoder_attention_mask"] = (1 - inputs["encoder_attention_mask"][:, None]) * -10000.0
    dp.patch_diffusers_model(model)
    with torch.no_grad():
        eager = forward(model, inputs)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            forward(model, inputs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = forward(model, inputs)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(captured, eager, rtol=0, atol=0)

        mask = inputs["encoder_attention_mask"]  # [B, 1, L]
        kept = mask[:, 0] == 0
        row = int(kept.sum(-1).argmax())
        mask[row, 0, int(kept[row].nonzero().max())] = -10000.0  # one real token fewer in that caption
        refilled = forward(model, inputs)
        assert not torch.equal(refilled, eager)
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(captured, refilled, rtol=0, atol=0)
