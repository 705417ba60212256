"""csrc/ builds on its own with CMake and nvcc (no torch): how CI compile-checks the CUDA kernels."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("cmake") is None, reason="needs nvcc and cmake")
def test_cuda_sources_compile_without_torch(tmp_path):
    build = tmp_path / "build"
    env = {**os.environ, "CUDACXX": shutil.which("nvcc")}
    for command in (
        ["cmake", "-S", str(ROOT), "-B", str(build)],
        ["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)],
    ):
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"


def test_cuda_sources_do_not_include_torch():
    for source in (ROOT / "csrc").glob("*.cu*"):
        text = source.read_text()
        for header in ("<torch/", "<ATen/", "<c10/", "<pybind11/"):
            assert header not in text, f"{source.name} includes {header}: only csrc/bindings.cpp may know torch"
