"""STDiT: the released checkpoint's names and shapes, and the upstream math."""

import pytest
import torch
from einops import rearrange

from openvid_models import STDiT
from tests.openvid_models.utils import (assert_matches_upstream, attention, layernorm_modulate,
                                        released_shape_mismatches, tiny_inputs, tiny_model)


def test_xl2_has_the_released_checkpoint_names_and_shapes():
    assert released_shape_mismatches(STDiT, "STDiT-XL/2", "STDiT-XL/2 16x512x512") == dict(
        missing=[], unexpected=[], shapes={})


def upstream_stdit_forward(model: STDiT, x, timestep, y, mask):
    """The upstream forward restated with plain PyTorch (rearranges, explicit softmax attention, the caption
    masked by lengths): the spec the model must match, quirks included."""
    T, S = model.num_temporal, model.num_spatial
    heads = model.blocks[0].attn.num_heads

    def self_attention(module, tokens):
        q, k, v = module.qkv(tokens).unflatten(-1, (3, heads, -1)).unbind(2)
        return module.proj(attention(q, k, v))

    modulate = layernorm_modulate

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
    assert_matches_upstream(tiny_model(STDiT), upstream_stdit_forward)


def test_freeze_not_temporal_trains_the_temporal_attention_only():
    model = tiny_model(STDiT, freeze="not_temporal")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("attn_temp" in name for name in trainable)


def test_init_from_an_image_checkpoint_makes_frames_independent():
    image_model = tiny_model(STDiT)
    state = {name: t for name, t in image_model.state_dict().items() if ".attn_temp." not in name}
    state["x_embedder.proj.weight"] = state["x_embedder.proj.weight"].squeeze(2)  # PixArt's Conv2d
    state["pos_embed"] = torch.randn(1, 99, 64)  # another image size: recomputed, not loaded
    model = tiny_model(STDiT, seed=3)
    model.init_from_image_model(state)
    assert torch.equal(model.blocks[1].attn.qkv.weight, image_model.blocks[1].attn.qkv.weight)
    assert not model.blocks[0].attn_temp.proj.weight.any()
    x, timestep, y, mask = tiny_inputs()
    changed = x.clone()
    changed[:, :, 0] += 1.0  # the first frame only
    with torch.no_grad():
        out, out_changed = model(x, timestep, y, mask), model(changed, timestep, y, mask)
    assert not torch.allclose(out[:, :, 0], out_changed[:, :, 0])
    torch.testing.assert_close(out[:, :, 1:], out_changed[:, :, 1:], rtol=0, atol=0)
    with pytest.raises(ValueError, match="not an image checkpoint of this model"):
        model.init_from_image_model({**state, "head.weight": torch.zeros(1)})
