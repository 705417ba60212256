"""MVDiT: the released checkpoint's names and shapes, and the upstream math."""

import torch
from einops import rearrange

from openvid_models import MVDiT
from tests.openvid_models.utils import (assert_matches_upstream, attention, layernorm_modulate,
                                        released_shape_mismatches, tiny_model)


def test_xl2_has_the_released_checkpoint_names_and_shapes():
    assert released_shape_mismatches(MVDiT, "MVDiT-XL/2", "MVDiT-XL/2 16x512x512") == dict(
        missing=[], unexpected=[], shapes={})


def upstream_mvdit_forward(model: MVDiT, x, timestep, y, mask):
    """The upstream forward restated with plain PyTorch: both streams concatenated per frame for the joint
    attention (padded text keys masked) and for the temporal attention; the spec the model must match."""
    T, S = model.num_temporal, model.num_spatial
    heads = model.blocks[0].attn.num_heads

    def project(module, tokens, key_mask=None):
        q, k, v = module.qkv(tokens).unflatten(-1, (3, heads, -1)).unbind(2)
        return module.proj(attention(q, k, v, key_mask))

    def mods(table, t):
        return (table[None] + t.reshape(t.shape[0], table.shape[0], -1)).chunk(table.shape[0], dim=1)

    x = model.x_embedder(x)
    x = rearrange(rearrange(x, "B (T S) C -> B T S C", T=T) + model.pos_embed, "B T S C -> B (T S) C")
    t = model.t_embedder(timestep, x.dtype)
    t0, t_y, t_temp, t_y_temp = (b(t) for b in (model.t_block, model.t_block_y, model.t_block_temp,
                                                model.t_block_y_temp))
    y = model.y_embedder(y, False).repeat(1, T, 1, 1)  # [B, T, L, C]
    L = y.shape[2]
    y = rearrange(y, "B T L C -> B (T L) C")
    mask = mask[:, None].repeat(1, T, 1).bool()  # [B, T, L]
    xy_mask = torch.cat([torch.ones(*mask.shape[:2], S, dtype=torch.bool), mask], dim=2).flatten(0, 1)
    for i, block in enumerate(model.blocks):
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = mods(block.scale_shift_table, t0)
        shift_y, scale_y, gate_y, shift_mlp_y, scale_mlp_y, gate_mlp_y = mods(block.scale_shift_table_y, t_y)
        shift_t, scale_t, gate_t = mods(block.scale_shift_table_temp, t_temp)
        shift_yt, scale_yt, gate_yt = mods(block.scale_shift_table_y_temp, t_y_temp)
        xy = torch.cat([rearrange(layernorm_modulate(x, shift, scale), "B (T S) C -> B T S C", T=T),
                        rearrange(layernorm_modulate(y, shift_y, scale_y), "B (T L) C -> B T L C", T=T)], dim=2)
        xy = rearrange(project(block.attn, xy.flatten(0, 1), xy_mask), "(B T) N C -> B T N C", T=T)
        x = x + gate * rearrange(xy[:, :, :S], "B T S C -> B (T S) C")
        y = y + gate_y * rearrange(xy[:, :, S:], "B T L C -> B (T L) C")
        xy = torch.cat([rearrange(layernorm_modulate(x, shift_t, scale_t), "B (T S) C -> B T S C", T=T),
                        rearrange(layernorm_modulate(y, shift_yt, scale_yt), "B (T L) C -> B T L C", T=T)], dim=2)
        xy = rearrange(xy, "B T N C -> (B N) T C")
        if i == 0:
            xy = xy + model.pos_embed_temporal
        xy = rearrange(project(block.attn_temp, xy), "(B N) T C -> B T N C", N=S + L)
        x = x + gate_t * rearrange(xy[:, :, :S], "B T S C -> B (T S) C")
        y = y + gate_yt * rearrange(xy[:, :, S:], "B T L C -> B (T L) C")
        x_f, y_f = rearrange(x, "B (T S) C -> (B T) S C", T=T), rearrange(y, "B (T L) C -> (B T) L C", T=T)
        q = block.cross_attn.q_linear(x_f).unflatten(-1, (heads, -1))
        k, v = block.cross_attn.kv_linear(y_f).unflatten(-1, (2, heads, -1)).unbind(2)
        x = x + rearrange(block.cross_attn.proj(attention(q, k, v, mask.flatten(0, 1))), "(B T) S C -> B (T S) C", T=T)
        x = x + gate_mlp * block.mlp(layernorm_modulate(x, shift_mlp, scale_mlp))
        y = y + gate_mlp_y * block.mlp_y(layernorm_modulate(y, shift_mlp_y, scale_mlp_y))
    shift, scale = (model.final_layer.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
    return model.unpatchify(model.final_layer.linear(layernorm_modulate(x, shift, scale)))


def test_matches_the_upstream_math_in_float64():
    assert_matches_upstream(tiny_model(MVDiT), upstream_mvdit_forward)


def test_freeze_not_attn_trains_the_joint_attention_only():
    model = tiny_model(MVDiT, freeze="not_attn")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".attn." in name for name in trainable)
