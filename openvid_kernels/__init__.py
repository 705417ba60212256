"""openvid-kernels: fused CUDA and Triton kernels for text-to-video diffusion transformers (STDiT, MVDiT).

Every op is a ``torch.library`` custom op with autograd and ``torch.compile`` support, and takes
``backend=None | "auto" | "cuda" | "triton" | "reference"`` (see :mod:`openvid_kernels.backends`).
"""

from openvid_kernels.adaln import (add_position_embedding, gated_residual, gated_residual_layernorm_modulate,
                                   layernorm_modulate)
from openvid_kernels.backends import cuda_extension_available, default_backend, use_backend
from openvid_kernels.cross import cross_attention
from openvid_kernels.diffusers_processors import PatchReport, patch_diffusers_model, unpatch_diffusers_model
from openvid_kernels.joint import joint_attention
from openvid_kernels.linear import linear_gated_residual
from openvid_kernels.modules import AdaLNSingle, CrossAttention, SelfAttention, modulation
from openvid_kernels.spatial import spatial_attention, spatial_attention_packed
from openvid_kernels.temporal import temporal_attention, temporal_attention_packed

__version__ = "0.1.0"

__all__ = [
    "AdaLNSingle",
    "CrossAttention",
    "PatchReport",
    "SelfAttention",
    "add_position_embedding",
    "cross_attention",
    "cuda_extension_available",
    "default_backend",
    "gated_residual",
    "gated_residual_layernorm_modulate",
    "joint_attention",
    "layernorm_modulate",
    "linear_gated_residual",
    "modulation",
    "patch_diffusers_model",
    "spatial_attention",
    "spatial_attention_packed",
    "temporal_attention",
    "temporal_attention_packed",
    "unpatch_diffusers_model",
    "use_backend",
]
