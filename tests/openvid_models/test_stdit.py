"""STDiT: the released checkpoint's names and shapes, the upstream math, and the kernel path against the reference."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

import openvid_kernels as ok
import openvid_models as om
from openvid_kernels.backends import TRITON_INTERPRET
from openvid_models.stdit import STDiT

# Every tensor name and shape of the released OpenVid-1M checkpoints (copied from the project's reference facts).
CHECKPOINT_KEYS = json.loads((Path(__file__).parent / "checkpoint_keys.json").read_text())
TINY = om.MODEL_SIZES["STDiT-tiny"]


def tiny_model(seed=0, **overrides) -> STDiT:
    torch.manual_seed(seed)
    model = STDiT(**{**TINY, **overrides}).eval()
    with torch.no_grad():  # upstream zero-initialises output layers; random weights make every path count
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model


def tiny_inputs(batch=2, seed=1, lens=(3, 7)):
    torch.manual_seed(seed)
    T, H, W = TINY["input_size"]
    x = torch.randn(batch, 4, T, H, W)
    timestep = torch.tensor([10.0, 700.0][:batch])
    y = torch.randn(batch, 1, TINY["model_max_length"], TINY["caption_channels"])
    mask = (torch.arange(TINY["model_max_length"])[None] < torch.tensor(lens)[:, None]).long()
    return x, timestep, y, mask


def test_xl2_has_the_released_checkpoint_names_and_shapes():
    with torch.device("meta"):
        model = STDiT(**om.MODEL_SIZES["STDiT-XL/2"])
    ours = {name: list(t.shape) for name, t in model.state_dict().items()}
    released = CHECKPOINT_KEYS["STDiT-XL/2 16x512x512"]
    assert sorted(set(released) - set(ours)) == [] and sorted(set(ours) - set(released)) == []
    assert {name: shape for name, shape in ours.items() if released[name] != shape} == {}


def test_weights_round_trip_through_files(tmp_path):
    model = tiny_model()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    torch.save({"model": model.state_dict()}, tmp_path / "trainer.pth")
    from safetensors.torch import save_file
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    inputs = tiny_inputs()
    expected = model(*inputs)
    for name in ("model.pt", "trainer.pth", "model.safetensors"):
        loaded = om.from_pretrained(tmp_path / name, "STDiT-tiny").eval()
        torch.testing.assert_close(loaded(*inputs), expected, rtol=0, atol=0)
    torch.save({"weights": [1, 2]}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        om.load_state_dict(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError):
        om.load_state_dict(tmp_path / "missing.pt")


def upstream_stdit_forward(model: STDiT, x, timestep, y, mask):
    """The upstream forward restated with plain PyTorch (rearranges, explicit softmax attention, the caption
    masked by lengths): the spec the model must match, quirks included."""
    T, S = model.num_temporal, model.num_spatial
    heads = model.blocks[0].attn.num_heads

    def attention(q, k, v, key_mask=None):  # [N, L, H, D]
        scores = torch.einsum("nqhd,nkhd->nhqk", q, k) * q.shape[-1] ** -0.5
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        return torch.einsum("nhqk,nkhd->nqhd", scores.softmax(-1), v).flatten(-2)

    def self_attention(module, tokens):
        q, k, v = module.qkv(tokens).unflatten(-1, (3, heads, -1)).unbind(2)
        return module.proj(attention(q, k, v))

    def modulate(tokens, shift, scale):
        return F.layer_norm(tokens, tokens.shape[-1:], eps=1e-6) * (1 + scale) + shift

    x = model.x_embedder(x)
    x = rearrange(rearrange(x, "B (T S) C -> B T S C", T=T) + model.pos_embed, "B T S C -> B (T S) C")
    t = model.t_embedder(timestep, x.dtype)
    t0 = model.t_block(t)
    y = model.y_embedder(y, False).squeeze(1)
    for i, block in enumerate(model.blocks):
        B = x.shape[0]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            block.scale_shift_table[None] + t0.reshape(B, 6, -1)).chunk(6, dim=1)
        x_s = rearrange(modulate(x, shift_msa, scale_msa), "B (T S) C -> (B T) S C", T=T)
        x = x + gate_msa * rearrange(self_attention(block.attn, x_s), "(B T) S C -> B (T S) C", T=T)
        x_t = rearrange(x, "B (T S) C -> (B S) T C", T=T)
        if i == 0:
            x_t = x_t + model.pos_embed_temporal
        x = x + gate_msa * rearrange(self_attention(block.attn_temp, x_t), "(B S) T C -> B (T S) C", S=S)
        q = block.cross_attn.q_linear(x).unflatten(-1, (heads, -1))
        k, v = block.cross_attn.kv_linear(y).unflatten(-1, (2, heads, -1)).unbind(2)
        x = x + block.cross_attn.proj(attention(q, k, v, mask.bool()))
        x = x + gate_mlp * block.mlp(modulate(x, shift_mlp, scale_mlp))
    shift, scale = (model.final_layer.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
    x = model.final_layer.linear(modulate(x, shift, scale))
    return model.unpatchify(x)


def test_matches_the_upstream_math_in_float64():
    model = tiny_model().double()
    x, timestep, y, mask = tiny_inputs()
    with torch.no_grad():
        out = model(x.double(), timestep, y.double(), mask)
        expected = upstream_stdit_forward(model, x.double(), timestep, y.double(), mask)
    assert out.shape == (2, 8, *TINY["input_size"]) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-5)


def test_padded_caption_tokens_never_change_the_output():
    model = tiny_model()
    x, timestep, y, mask = tiny_inputs()
    changed = y.clone()
    changed[0, :, 3:] = torch.randn_like(changed[0, :, 3:]) * 100
    with torch.no_grad():
        torch.testing.assert_close(model(x, timestep, changed, mask), model(x, timestep, y, mask), rtol=0, atol=0)


@pytest.mark.skipif(not TRITON_INTERPRET, reason="the kernel path on CPU tensors needs the Triton interpreter")
def test_kernel_path_matches_reference_path_forward_and_backward():
    model = tiny_model()
    inputs = tiny_inputs()

    def run(backend):
        model.zero_grad()
        with ok.use_backend(backend):
            out = model(*inputs)
            out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    ref_out, ref_grads = run("reference")
    out, grads = run("triton")
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    for (name, _), grad, ref in zip(model.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(grad, ref, rtol=1e-3, atol=1e-5, msg=lambda m, n=name: f"grad of {n}: {m}")


def test_activation_checkpointing_gives_the_same_gradients():
    model = tiny_model().train()
    inputs = tiny_inputs()
    results = []
    for checkpointing in (False, True):
        model.grad_checkpointing = checkpointing
        model.zero_grad()
        torch.manual_seed(5)  # the caption dropout draws
        model(*inputs).square().mean().backward()
        results.append([p.grad.clone() for p in model.parameters()])
    for plain, checkpointed in zip(*results):
        torch.testing.assert_close(checkpointed, plain)


def test_null_caption_dropout_and_classifier_free_guidance_batches():
    model = tiny_model()
    x, timestep, y, mask = tiny_inputs()
    null = model.y_embedder.y_embedding.expand_as(y)
    with torch.no_grad():
        dropped = model(x, timestep, y, mask, force_drop_ids=torch.tensor([1, 0]))
        torch.testing.assert_close(dropped[0], model(x, timestep, null, mask)[0])
        torch.testing.assert_close(dropped[1], model(x, timestep, y, mask)[1])
        # A CFG batch (conditional + unconditional) with the mask of the conditional half only, as upstream.
        both = model(x.repeat(2, 1, 1, 1, 1), timestep.repeat(2), torch.cat([y, null]), mask)
        torch.testing.assert_close(both[:2], model(x, timestep, y, mask))


def test_bf16_weights_run_and_return_float32():
    model = tiny_model().to(torch.bfloat16)
    with torch.no_grad():
        out = model(*tiny_inputs())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_freeze_and_bad_arguments():
    model = tiny_model(freeze="not_temporal")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("attn_temp" in name for name in trainable)
    with pytest.raises(ValueError, match="freeze must be"):
        tiny_model(freeze="everything")
