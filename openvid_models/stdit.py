"""STDiT (Open-Sora 1.0; OpenVid-1M's STDiT-XL/2) on openvid_kernels ops, loading the released checkpoints unchanged.

A block, with the six modulation vectors (shift, scale, gate for attention; shift, scale, gate for the MLP) from
the block's ``scale_shift_table`` plus the timestep embedding ``t_block(t)`` (adaLN-single, PixArt-alpha):

    x = x + gate_msa * SpatialAttention(LN(x) * (1 + scale_msa) + shift_msa)    # within each frame
    x = x + gate_msa * TemporalAttention(x [+ temporal position embedding])      # across frames, same gate
    x = x + CrossAttention(x, caption)                                           # no gate
    x = x + gate_mlp * MLP(LN(x) * (1 + scale_mlp) + shift_mlp)

The temporal attention takes x unmodulated, reuses the spatial gate, and gets the temporal position embedding
in the first block only: upstream's quirks, kept so that the released weights mean what they meant.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

import openvid_kernels as ok
from openvid_kernels.modules import CrossAttention, SelfAttention, modulation
from openvid_kernels.sequence_parallel import shard_frames
from openvid_models.checkpoint import load_state_dict
from openvid_models.layers import (CaptionEmbedder, Mlp, PatchEmbed3D, T2IFinalLayer, TimestepEmbedder, sincos_2d,
                                   sincos_temporal)


def add_temporal_pos_embed(x: torch.Tensor, pos_embed: torch.Tensor | None, num_frames: int) -> torch.Tensor:
    """``x [B, T*N, C]`` plus ``pos_embed [1, T, C]`` on every token of a frame (None: x)."""
    if pos_embed is None:
        return x
    return ok.add_position_embedding(x, pos_embed, tokens_per_row=x.shape[1] // num_frames)


class STDiTBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, num_frames: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.num_frames = num_frames
        self.attn = SelfAttention(hidden_size, num_heads, "spatial")
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)
        self.attn_temp = SelfAttention(hidden_size, num_heads, "temporal")

    def forward(self, x, y, y_lens, t, temporal_pos_embed=None):
        """x ``[B, T*S, C]`` (frame-major), y ``[B, L, C]`` caption tokens of which ``y_lens[b]`` are real,
        t ``[B, 6C]``; temporal_pos_embed ``[1, T, C]`` or None."""
        T = self.num_frames
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation(self.scale_shift_table, t)
        # x = x + gate * sublayer(...), the residual step fused into the sub-layer's last linear
        x = self.attn(ok.layernorm_modulate(x, shift_msa, scale_msa), T, residual=x, gate=gate_msa)
        x = self.attn_temp(add_temporal_pos_embed(x, temporal_pos_embed, T), T, residual=x, gate=gate_msa)
        x = self.cross_attn(x, y, y_lens, residual=x)  # no gate (upstream)
        return self.mlp(ok.layernorm_modulate(x, shift_mlp, scale_mlp), residual=x, gate=gate_mlp)


class STDiT(nn.Module):
    """``forward(x [B, C, T, H, W], timestep [B], y [B, 1, L, caption_channels], mask [B, L]) -> [B, 2C, T, H, W]``
    (``C`` out channels without ``pred_sigma``), float32. Arguments and parameter names as upstream."""

    block_type = STDiTBlock
    freeze_options = ("not_temporal", "text")

    def __init__(
        self,
        input_size: tuple[int, int, int] = (1, 32, 32),
        in_channels: int = 4,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        pred_sigma: bool = True,
        caption_channels: int = 4096,
        model_max_length: int = 120,
        space_scale: float = 1.0,
        time_scale: float = 1.0,
        freeze: str | None = None,
    ):
        super().__init__()
        self.input_size, self.patch_size = tuple(input_size), tuple(patch_size)
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if pred_sigma else in_channels
        self.grid = tuple(size // patch for size, patch in zip(self.input_size, self.patch_size))  # T, H, W
        self.num_temporal = self.grid[0]
        self.num_spatial = self.grid[1] * self.grid[2]
        self.grad_checkpointing = False  # activation checkpointing per block, in training ...
        self.checkpointed_blocks: int | None = None  # ... of the first N blocks only (None: all): memory for speed
        self.sequence_parallel = None  # a process group over which the frames are split (set_sequence_parallel)
        self.frames_per_rank = self.num_temporal

        pos_embed = sincos_2d(hidden_size, self.grid[1], self.grid[2], space_scale)
        self.register_buffer("pos_embed", pos_embed.float()[None])
        self.register_buffer("pos_embed_temporal", sincos_temporal(hidden_size, self.grid[0], time_scale).float()[None])
        self.x_embedder = PatchEmbed3D(self.patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, class_dropout_prob, model_max_length)
        self.blocks = nn.ModuleList(
            self.block_type(hidden_size, num_heads, self.num_temporal, mlp_ratio) for _ in range(depth)
        )
        self.final_layer = T2IFinalLayer(hidden_size, math.prod(self.patch_size), self.out_channels)
        self.initialize_weights()
        if freeze is not None:
            self.freeze(freeze)

    # -----------------------------------------------------------------------------------------------------
    # Weights
    # -----------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        """The model built with ``kwargs`` (e.g. ``**MODEL_SIZES["STDiT-XL/2"]``) holding the weights of ``path``
        (``.safetensors`` / ``.pt`` / ``.pth``, read without unpickling code), loaded strictly: every name and
        shape must match."""
        model = cls(**kwargs)
        model.load_state_dict(load_state_dict(path), strict=True)
        return model

    def initialize_weights(self) -> None:
        """Upstream's initialisation: xavier linears, zero biases, small-normal embedder MLPs, zero output layers
        (cross-attention projections, the final linear, and the temporal attention's projection, so that a
        model grown from an image checkpoint starts as that image model)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        weight = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        for linear in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], *self.timestep_blocks(),
                       self.y_embedder.y_proj.fc1, self.y_embedder.y_proj.fc2):
            nn.init.normal_(linear.weight, std=0.02)
        zero = [self.final_layer.linear]
        zero += [linear for block in self.blocks for linear in (block.cross_attn.proj, block.attn_temp.proj)]
        for linear in zero:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def init_from_image_model(self, state: dict[str, torch.Tensor]) -> None:
        """Start from a PixArt-alpha (image) checkpoint, as upstream does: every weight the image model has (its
        2-D patch embedding becomes a one-frame 3-D one), position embeddings recomputed for this model's size,
        and the temporal attention's output projection zeroed, so that frames start out independent: the model
        computes the image model on every frame. Names other than these are an error."""
        state = dict(state)
        state.pop("pos_embed", None)
        patch = state.get("x_embedder.proj.weight")
        if patch is not None and patch.dim() == 4:
            state["x_embedder.proj.weight"] = patch.unsqueeze(2)
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [name for name in missing if not name.startswith("pos_embed") and ".attn_temp." not in name]
        if missing or unexpected:
            raise ValueError(f"not an image checkpoint of this model: missing {missing}, unexpected {unexpected}")
        for block in self.blocks:
            nn.init.zeros_(block.attn_temp.proj.weight)
            nn.init.zeros_(block.attn_temp.proj.bias)

    def timestep_blocks(self) -> list[nn.Linear]:
        """The linears that turn the timestep embedding into modulation vectors."""
        return [self.t_block[1]]

    def freeze(self, what: str) -> None:
        """``"not_temporal"``: train only the temporal attention; ``"text"``: freeze the cross-attention;
        ``"not_attn"`` (MVDiT): train only the spatial (joint) attention."""
        if what not in self.freeze_options:
            raise ValueError(f"freeze must be None or one of {self.freeze_options}, got {what!r}")
        for name, param in self.named_parameters():
            spatial_attention = ".attn." in name
            if ((what == "not_temporal" and "attn_temp" not in name) or (what == "text" and "cross_attn" in name)
                    or (what == "not_attn" and not spatial_attention)):
                param.requires_grad_(False)

    def set_sequence_parallel(self, group) -> None:
        """Split every sample's frames over the ranks of ``group`` (None: no split). Rank p then holds latent
        frames ``p*T/P .. (p+1)*T/P - 1``: :meth:`forward` takes and returns those frames only, everything but
        temporal attention stays local, and temporal attention exchanges heads with two all-to-alls
        (``openvid_kernels.sequence_parallel``). The caption, timestep and mask are the whole sample's on every
        rank. The frames (after temporal patching) and the heads must be multiples of P."""
        size = 1 if group is None else dist.get_world_size(group)
        heads = self.blocks[0].attn.num_heads
        if self.num_temporal % size:
            raise ValueError(f"sequence parallelism over {size} ranks needs a frame count divisible by {size}; this "
                             f"model has {self.num_temporal} latent frames (input_size {self.input_size}, patch "
                             f"{self.patch_size})")
        if heads % size:
            raise ValueError(f"sequence parallelism over {size} ranks needs a head count divisible by {size}; this "
                             f"model has {heads} heads")
        self.sequence_parallel = group if size > 1 else None
        self.frames_per_rank = self.num_temporal // size
        for block in self.blocks:
            block.num_frames = self.frames_per_rank
            block.attn_temp.sequence_parallel = self.sequence_parallel

    # -----------------------------------------------------------------------------------------------------
    # Forward
    # -----------------------------------------------------------------------------------------------------

    def forward(self, x, timestep, y, mask=None, force_drop_ids=None):
        """``mask [B, L]`` marks the real caption tokens (T5's attention mask: a prefix of ones); None: all
        real. A mask of fewer rows than y (classifier-free guidance batches) is repeated, as upstream.
        ``force_drop_ids [B]``: 1 replaces that caption by the null caption. With sequence parallelism, x and
        the output hold this rank's frames (:meth:`set_sequence_parallel`)."""
        x, t, y = self.embed(x, timestep, y, force_drop_ids)
        y = y.squeeze(1)  # [B, L, C]
        y_lens = caption_lengths(mask, y)
        t_mod = self.t_block(t)
        for i, block in enumerate(self.blocks):
            x = self.run_block(i, block, x, y, y_lens, t_mod, self.temporal_pos_embed() if i == 0 else None)
        return self.unpatchify(self.final_layer(x, t)).float()

    def temporal_pos_embed(self) -> torch.Tensor:
        """``[1, T, C]``, the entries of this rank's frames under sequence parallelism."""
        if self.sequence_parallel is None:
            return self.pos_embed_temporal
        return shard_frames(self.pos_embed_temporal, self.sequence_parallel, dim=1)

    def embed(self, x, timestep, y, force_drop_ids):
        """Tokens ``[B, T*S, C]`` with the spatial position embedding, the timestep embedding ``[B, C]`` and the
        caption tokens ``[B, 1, L, C]``, in the weights' dtype."""
        if self.sequence_parallel is None:
            frames, share = self.input_size[0], ""
        else:  # this rank's consecutive frames
            frames = self.frames_per_rank * self.patch_size[0]
            share = f" (this rank's share of {self.input_size[0]} frames)"
        if x.dim() != 5 or x.shape[1:3] != (self.in_channels, frames):
            raise ValueError(f"x must be [B, {self.in_channels}, {frames}, H, W]{share}; got {tuple(x.shape)}")
        dtype = self.x_embedder.proj.weight.dtype
        x = self.x_embedder(x.to(dtype))
        x = ok.add_position_embedding(x, self.pos_embed)  # row s for token t * S + s
        return x, self.t_embedder(timestep, dtype), self.y_embedder(y.to(dtype), self.training, force_drop_ids)

    def run_block(self, index: int, block, *args):
        recompute = self.grad_checkpointing and (self.checkpointed_blocks is None or index < self.checkpointed_blocks)
        if recompute and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T*S, prod(patch) * C_out]`` tokens to ``[B, C_out, T, H, W]``."""
        (_, nh, nw), (pt, ph, pw) = self.grid, self.patch_size
        nt = self.frames_per_rank
        return rearrange(x, "B (nt nh nw) (pt ph pw c) -> B c (nt pt) (nh ph) (nw pw)",
                         nt=nt, nh=nh, nw=nw, pt=pt, ph=ph, pw=pw)


def caption_lengths(mask: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """Real caption tokens per sample, int32 ``[B]`` on y's device, from T5's mask ``[B, L]`` (or ``[B, 1, 1, L]``)."""
    B, L = y.shape[0], y.shape[-2]
    if mask is None:
        return torch.full((B,), L, dtype=torch.int32, device=y.device)
    mask = mask.reshape(mask.shape[0], -1)
    if mask.shape[0] != B:
        mask = mask.repeat(B // mask.shape[0], 1)
    return mask.to(y.device).sum(1, dtype=torch.int32)
