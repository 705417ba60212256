"""Which implementation runs an op: our CUDA extension, our Triton kernels, or the plain-PyTorch reference.

Every op takes ``backend=None | "auto" | "cuda" | "triton" | "reference"``. ``None`` means the current
default: the innermost :func:`use_backend` block, else the ``OPENVID_BACKEND`` environment variable read at
import, else ``"auto"``. ``"auto"`` picks, per call, the CUDA extension when it is built and supports the
call's layout, then Triton, on CUDA tensors; and the reference on CPU tensors (the Triton interpreter is for
tests, not speed). The reference is the spec and the fallback.

The default is a module global, not a ContextVar, so that ``torch.compile`` can read it while tracing (and
guard on it) without a graph break.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "cuda", "triton", "reference")
ENV_VAR = "OPENVID_BACKEND"

# Triton decides at decoration time whether kernels run in its CPU interpreter.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    from openvid_kernels import _C as cuda_extension  # built by setup.py where CUDA is present
except ImportError:
    cuda_extension = None


def _checked(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


_default_backend = _checked(os.environ.get(ENV_VAR, "auto"), f"environment variable {ENV_VAR}")


def cuda_extension_available() -> bool:
    """True when the compiled CUDA extension (``openvid_kernels._C``) was built and imports."""
    return cuda_extension is not None


def default_backend() -> str:
    return _default_backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the block on backend ``name`` unless a call names its own."""
    global _default_backend
    previous = _default_backend
    _default_backend = _checked(name, "use_backend(name)")
    try:
        yield
    finally:
        _default_backend = previous


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """Turn the caller's request into ``"reference"``, ``"cuda"``, ``"triton"`` or ``"auto"``.

    ``"auto"`` is only returned for CUDA tensors; the op then decides between the CUDA extension and
    Triton at run time, where it can see pointers and strides (a traced call cannot).
    """
    name = _default_backend if backend is None else _checked(backend, "backend")
    if name == "reference" or (name == "auto" and device.type != "cuda"):
        return "reference"
    if name == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
        if cuda_extension is None:
            raise RuntimeError(
                "backend='cuda' requested but the CUDA extension openvid_kernels._C is not built; "
                "reinstall with CUDA torch and nvcc present (pip install -e . --no-build-isolation)"
            )
    if name == "triton" and device.type != "cuda" and not TRITON_INTERPRET:
        raise ValueError(
            f"backend='triton' needs CUDA tensors, got tensors on {device}; to run Triton kernels on the "
            "CPU set TRITON_INTERPRET=1 before importing openvid_kernels"
        )
    return name


_sm_counts: dict[int, int] = {}


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached); a small stand-in for the CPU interpreter."""
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_counts[index]
