"""Build openvid-kernels: the Python packages, plus the CUDA extension ``openvid_kernels._C`` where possible.

The extension is built (with ninja) when torch has CUDA, nvcc is found and OPENVID_SKIP_CUDA_BUILD is not 1;
otherwise one line says why and only the Triton and reference paths are installed.
OPENVID_CUDA_ARCHS lists the architectures, e.g. "90a;80" (the default): Hopper's own instructions (wgmma,
setmaxnreg) need the "a" target; the highest plain architecture also gets PTX so newer GPUs can JIT it.
"""

import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "90a;80"


def gencode_flags(archs: str) -> list[str]:
    entries = [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in entries]
    plain = [a for a in entries if a.isdigit()]
    if plain:
        top = max(plain, key=int)
        flags.append(f"-gencode=arch=compute_{top},code=compute_{top}")
    return flags


def cutlass_include_dirs() -> list[str]:
    try:
        import cutlass_library
    except ImportError:
        return []
    include = Path(cutlass_library.__file__).parent / "source" / "include"
    return [str(include)] if include.is_dir() else []


def cuda_extension():
    """(ext_modules, cmdclass) for the CUDA extension, or empty ones with a one-line notice."""
    reason = None
    if os.environ.get("OPENVID_SKIP_CUDA_BUILD", "0") == "1":
        reason = "OPENVID_SKIP_CUDA_BUILD=1"
    else:
        try:
            import torch
            from torch.utils import cpp_extension
        except ImportError:
            reason = "torch is not installed; install it first and use --no-build-isolation"
        else:
            if torch.version.cuda is None:
                reason = f"torch {torch.__version__} has no CUDA"
            elif cpp_extension.CUDA_HOME is None:
                reason = "nvcc / CUDA_HOME not found"
    if reason is not None:
        print(f"openvid-kernels: building without the CUDA extension ({reason}); Triton and reference paths only")
        return [], {}

    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu")) + ["csrc/bindings.cpp"]
    archs = os.environ.get("OPENVID_CUDA_ARCHS", DEFAULT_ARCHS)
    extension = cpp_extension.CUDAExtension(
        name="openvid_kernels._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc"), *cutlass_include_dirs()],
        extra_compile_args={
            "cxx": ["-O3"],  # torch picks the C++ standard its headers need
            "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", *gencode_flags(archs)],
        },
    )
    return [extension], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extension()

setup(
    name="openvid-kernels",
    version="0.1.0",
    description="Fused CUDA and Triton kernels for text-to-video diffusion transformers (STDiT, MVDiT)",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["openvid_kernels*", "openvid_models*"]),
    install_requires=["torch>=2.11", "triton>=3.6", "einops", "nvidia-cutlass", "safetensors"],
    # The models' VAE and T5 wrappers (diffusers' AutoencoderKL; transformers' T5 with the training-time caption
    # cleaning of ftfy and BeautifulSoup) and video reading/writing (PyAV); the kernels need none of them.
    extras_require={
        "models": ["diffusers", "transformers", "sentencepiece", "ftfy", "beautifulsoup4", "av", "tqdm"],
        "test": ["pytest", "pytest-benchmark", "numpy", "diffusers", "transformers", "ftfy", "beautifulsoup4", "av",
                 "tqdm"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
