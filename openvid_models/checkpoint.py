"""Loading weights from the files users download, without unpickling code."""

from __future__ import annotations

from pathlib import Path

import torch


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a ``.pt`` / ``.pth`` file read with ``weights_only=True`` (plain
    tensors and containers only: a file that needs code to unpickle is refused). A training checkpoint that
    wraps the weights (``{"model": ...}``, ``{"state_dict": ...}``) is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # noqa: PLC0415  (only this format needs it)

        return load_file(path)
    if path.suffix not in (".pt", ".pth", ".bin"):
        raise ValueError(f"{path}: expected a .safetensors, .pt, .pth or .bin file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict (name -> tensor)")
    return state
