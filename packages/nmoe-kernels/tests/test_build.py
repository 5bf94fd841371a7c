"""The compiled module `nmoe_kernels._C`: build info, argument errors, and the no-nvcc build."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.dlpack import to_dlpack

import nmoe_kernels
import nmoe_kernels._C as C

PACKAGE_DIR = Path(__file__).resolve().parents[1]


def test_build_info():
    assert isinstance(C.ABI_VERSION, int) and C.ABI_VERSION >= 1
    assert nmoe_kernels.compiled_abi_version() == C.ABI_VERSION
    assert isinstance(C.WITH_CUDA, bool) and isinstance(C.CUDA_ARCHS, str)
    # The CUDA ops are compiled exactly when archs were recorded; nvcc is present on every
    # machine this suite targets unless the build was forced off.
    assert C.WITH_CUDA == (C.CUDA_ARCHS != "")
    if shutil.which("nvcc") and os.environ.get("NMOE_KERNELS_WITH_CUDA", "ON") != "OFF":
        assert C.WITH_CUDA, "nvcc is on PATH but _C was built without CUDA ops; rebuild"
        assert "90a" in C.CUDA_ARCHS.split(",") or os.environ.get("NMOE_CUDA_ARCHS")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_cuda_op_without_gpu_points_to_reference():
    x = torch.randn(4, 256)
    with pytest.raises(RuntimeError) as err:
        nmoe_kernels.quantize_fp8_1x128(x)
    message = str(err.value)
    assert "no CUDA GPU is visible" in message
    assert "use nmoe_kernels.reference.quantize_fp8_1x128 on CPU" in message
    x_fp8 = torch.zeros(4, 256, dtype=torch.float8_e4m3fn)
    with pytest.raises(RuntimeError, match="reference.dequantize_fp8_1x128 on CPU"):
        nmoe_kernels.dequantize_fp8_1x128(x_fp8, torch.ones(4, 2))


def test_binding_rejects_cpu_tensors_naming_the_argument():
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    x_fp8 = torch.empty(4, 256, dtype=torch.float8_e4m3fn)
    scales = torch.empty(4, 2)
    if not C.WITH_CUDA:
        pytest.skip("_C was built without CUDA ops")
    cpu_error = r"^x: expected a CUDA tensor, got bfloat16\[4, 256\] on cpu"
    with pytest.raises(ValueError, match=cpu_error):
        C.quantize_fp8_1x128(to_dlpack(x), to_dlpack(x_fp8), to_dlpack(scales), False, False, 0)
    with pytest.raises(ValueError, match=r"^x: expected dtype bfloat16 or float32, got int32"):
        C.quantize_fp8_1x128(
            to_dlpack(x.int()), to_dlpack(x_fp8), to_dlpack(scales), False, False, 0
        )
    with pytest.raises(ValueError, match="x: expected a DLPack capsule"):
        C.quantize_fp8_1x128(x, to_dlpack(x_fp8), to_dlpack(scales), False, False, 0)
    with pytest.raises(ValueError, match=r"^x_fp8: expected a CUDA tensor, got float8_e4m3fn"):
        C.dequantize_fp8_1x128(to_dlpack(x_fp8), to_dlpack(scales), to_dlpack(x), 0)


def _cmake() -> str | None:
    local = Path(sys.executable).with_name("cmake")
    return str(local) if local.exists() else shutil.which("cmake")


def test_no_cuda_build_raises_built_without_nvcc(tmp_path):
    """Configure and build _C with -DNMOE_KERNELS_WITH_CUDA=OFF (~10 s on 2 cores), import it."""
    cmake = _cmake()
    if cmake is None or shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("needs cmake and a C++ compiler")
    build = tmp_path / "build"
    configure = [
        cmake,
        "-S",
        str(PACKAGE_DIR),
        "-B",
        str(build),
        "-DNMOE_KERNELS_WITH_CUDA=OFF",
        f"-DPython_EXECUTABLE={sys.executable}",
        "-DCMAKE_BUILD_TYPE=Debug",
        "-DCMAKE_CXX_FLAGS_DEBUG=-O0",
    ]
    if shutil.which("ninja") or Path(sys.executable).with_name("ninja").exists():
        configure += ["-G", "Ninja"]
    for command in (configure, [cmake, "--build", str(build), "-j", "2"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    (library,) = build.glob("_C*.so")
    # A name other than the installed nmoe_kernels._C, or Python hands back the loaded module.
    spec = importlib.util.spec_from_file_location("_C", library)
    module = importlib.util.module_from_spec(spec)  # not placed in sys.modules
    spec.loader.exec_module(module)
    assert module.WITH_CUDA is False and module.CUDA_ARCHS == ""
    assert module.ABI_VERSION == C.ABI_VERSION
    x = torch.randn(2, 128)
    for call in (
        lambda: module.quantize_fp8_1x128(to_dlpack(x), None, None, False, False, 0),
        lambda: module.dequantize_fp8_1x128(None, None, None, 0),
    ):
        with pytest.raises(RuntimeError) as err:
            call()
        message = str(err.value)
        assert "built without nvcc" in message
        assert "CUDA toolkit >= 12.8" in message
        assert "pip install --no-build-isolation -e packages/nmoe-kernels" in message
