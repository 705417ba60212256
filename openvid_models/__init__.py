"""STDiT / MVDiT model code on openvid_kernels ops, loading the released OpenVid-1M checkpoints unchanged."""

from pathlib import Path

from openvid_models.checkpoint import load_state_dict
from openvid_models.configs import MODEL_SIZES
from openvid_models.stdit import STDiT, STDiTBlock


def from_pretrained(path: str | Path, size: str = "STDiT-XL/2", **overrides) -> STDiT:
    """A model of a named size (``MODEL_SIZES``, with ``overrides``) holding the weights of ``path``
    (``.safetensors`` / ``.pt`` / ``.pth``), loaded strictly: every name and shape must match."""
    kwargs = {**MODEL_SIZES[size], **overrides}
    model = STDiT(**kwargs)
    model.load_state_dict(load_state_dict(path), strict=True)
    return model


__all__ = ["MODEL_SIZES", "STDiT", "STDiTBlock", "from_pretrained", "load_state_dict"]
