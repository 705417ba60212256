"""MVDiT (OpenVid-1M's MVDiT-XL/2) on openvid_kernels ops, loading the released checkpoints unchanged.

STDiT's trunk with a second stream of text tokens: the caption, repeated for every frame, runs through every
block next to the video tokens, with its own modulation tables (``scale_shift_table_y``, ``_temp``,
``_y_temp``, from ``t_block_y``, ``t_block_temp``, ``t_block_y_temp``) and its own MLP. A block:

    x_s, y_s = JointAttention(LN(x) * (1 + scale) + shift, LN(y) * (1 + scale_y) + shift_y)   # per frame,
    x = x + gate * x_s;  y = y + gate_y * y_s                                # [video; text], text keys masked
    x_t, y_t = TemporalAttention(LN(x) modulated by the _temp table [+ temporal position embedding], same for y)
    x = x + gate_temp * x_t;  y = y + gate_y_temp * y_t                      # across frames, each stream alone
    x = x + CrossAttention(x, y)                                             # per frame: video to its text
    x = x + gate_mlp * MLP(LN(x) * ...);  y = y + gate_mlp_y * MLP_y(LN(y) * ...)

Padded text tokens never reach a real one (joint and cross attention mask them as keys; the temporal attention
of a text position only sees that position in other frames). Our kernels give them zero joint-attention
outputs, so the text stream differs from upstream at padded positions only, and the video output not at all.
A caption without real tokens gets a zero cross-attention output; upstream's -1e9 bias averages the padded
tokens there instead (T5 always emits at least the end token, so captions are never empty in practice).
"""

from __future__ import annotations

import torch
from torch import nn

import openvid_kernels as ok
from openvid_kernels.modules import CrossAttention, SelfAttention, modulation
from openvid_models.layers import Mlp
from openvid_models.stdit import STDiT, add_temporal_pos_embed, caption_lengths


class JointAttention(nn.Module):
    """One qkv projection and one output projection for both streams; attention per frame over [video; text]."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x, y, y_lens, num_frames: int):
        """x ``[B, T*S, C]``, y ``[B, T*L, C]`` (both frame-major), y_lens ``[B]`` -> the two streams' outputs."""
        video_qkv, text_qkv = (self.qkv(t).unflatten(1, (num_frames, -1)).unflatten(-1, (3, self.num_heads, -1))
                               for t in (x, y))
        video_out, text_out = ok.joint_attention(video_qkv, text_qkv, y_lens)
        return self.proj(video_out.flatten(-2).flatten(1, 2)), self.proj(text_out.flatten(-2).flatten(1, 2))


class MVDiTBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, num_frames: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.num_frames = num_frames
        self.attn = JointAttention(hidden_size, num_heads)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.mlp_y = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)
        self.scale_shift_table_y = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)
        self.scale_shift_table_temp = nn.Parameter(torch.randn(3, hidden_size) / hidden_size**0.5)
        self.scale_shift_table_y_temp = nn.Parameter(torch.randn(3, hidden_size) / hidden_size**0.5)
        self.attn_temp = SelfAttention(hidden_size, num_heads, "temporal")

    def forward(self, x, y, y_lens, t, t_y, t_temp, t_y_temp, temporal_pos_embed=None):
        """x ``[B, T*S, C]``, y ``[B, T*L, C]`` text stream, y_lens ``[B]``, the four modulation inputs
        ``[B, 6C]``, ``[B, 6C]``, ``[B, 3C]``, ``[B, 3C]``; temporal_pos_embed ``[1, T, C]`` or None."""
        T = self.num_frames
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = modulation(self.scale_shift_table, t)
        shift_y, scale_y, gate_y, shift_mlp_y, scale_mlp_y, gate_mlp_y = modulation(self.scale_shift_table_y, t_y)
        shift_temp, scale_temp, gate_temp = modulation(self.scale_shift_table_temp, t_temp)
        shift_y_temp, scale_y_temp, gate_y_temp = modulation(self.scale_shift_table_y_temp, t_y_temp)

        x_s, y_s = self.attn(ok.layernorm_modulate(x, shift, scale), ok.layernorm_modulate(y, shift_y, scale_y),
                             y_lens, T)
        x, x_t = ok.gated_residual_layernorm_modulate(x, x_s, gate, shift_temp, scale_temp)
        y, y_t = ok.gated_residual_layernorm_modulate(y, y_s, gate_y, shift_y_temp, scale_y_temp)
        # x = x + gate * sublayer(...), the residual step fused into the sub-layer's last linear
        x = self.attn_temp(add_temporal_pos_embed(x_t, temporal_pos_embed, T), T, residual=x, gate=gate_temp)
        y = self.attn_temp(add_temporal_pos_embed(y_t, temporal_pos_embed, T), T, residual=y, gate=gate_y_temp)

        B = x.shape[0]
        frame_lens = y_lens[:, None].expand(B, T).reshape(B * T)
        per_frame = [t.unflatten(1, (T, -1)).flatten(0, 1) for t in (x, y)]  # [B*T, S, C], [B*T, L, C]
        x = self.cross_attn(*per_frame, frame_lens, residual=per_frame[0]).unflatten(0, (B, T)).flatten(1, 2)
        x = self.mlp(ok.layernorm_modulate(x, shift_mlp, scale_mlp), residual=x, gate=gate_mlp)
        y = self.mlp_y(ok.layernorm_modulate(y, shift_mlp_y, scale_mlp_y), residual=y, gate=gate_mlp_y)
        return x, y


class MVDiT(STDiT):
    """``forward(x [B, C, T, H, W], timestep [B], y [B, 1, L, caption_channels], mask [B, L]) -> [B, 2C, T, H, W]``,
    float32; the constructor takes STDiT's arguments. Parameter names as upstream."""

    block_type = MVDiTBlock
    freeze_options = ("not_temporal", "text", "not_attn")

    def __init__(self, *args, **kwargs):
        freeze = kwargs.pop("freeze", None)
        super().__init__(*args, **kwargs)
        hidden_size = self.t_block[1].in_features
        self.t_block_y = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.t_block_temp = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 3 * hidden_size))
        self.t_block_y_temp = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 3 * hidden_size))
        self.initialize_weights()
        if freeze is not None:
            self.freeze(freeze)

    def timestep_blocks(self) -> list[nn.Linear]:
        blocks = [self.t_block, getattr(self, "t_block_y", None), getattr(self, "t_block_temp", None),
                  getattr(self, "t_block_y_temp", None)]
        return [block[1] for block in blocks if block is not None]  # the last three exist after STDiT's init

    def forward(self, x, timestep, y, mask=None, force_drop_ids=None):
        """As :meth:`STDiT.forward`; the caption becomes the text stream, repeated for every (local) frame."""
        x, t, y = self.embed(x, timestep, y, force_drop_ids)
        y_lens = caption_lengths(mask, y.squeeze(1))
        y = y.expand(-1, self.frames_per_rank, -1, -1).flatten(1, 2)  # [B, T*L, C], a copy per frame
        mods = [block(t) for block in (self.t_block, self.t_block_y, self.t_block_temp, self.t_block_y_temp)]
        for i, block in enumerate(self.blocks):
            x, y = self.run_block(i, block, x, y, y_lens, *mods, self.temporal_pos_embed() if i == 0 else None)
        return self.unpatchify(self.final_layer(x, t)).float()
