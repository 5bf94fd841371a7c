"""The launch helpers (CPU): stream and TVM FFI caches, the TVM FFI switch, and a kernel compiled
both ways (no launch; a CUstream wraps any handle value without a GPU)."""

from __future__ import annotations

import os
import random

import pytest

from nmoe_kernels import _launch


def test_cu_stream_is_built_once_per_handle():
    handles = random.sample(range(1, 1 << 40), 3)
    first = [_launch.cu_stream(h) for h in handles]
    again = [_launch.cu_stream(h) for h in handles]
    assert all(a is b for a, b in zip(first, again, strict=True))
    assert [int(s) for s in first] == handles
    assert len({id(s) for s in first}) == 3


def test_cu_stream_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(_launch, "_STREAMS", {})
    for h in range(1, 4200):
        _launch.cu_stream(h)
    assert len(_launch._STREAMS) <= 4097
    assert int(_launch.cu_stream(4199)) == 4199


def test_tvm_ffi_switch_follows_the_environment(monkeypatch):
    import importlib.util

    installed = importlib.util.find_spec("tvm_ffi") is not None
    for value, want in (("0", False), ("1", installed), (" 0 ", False)):
        monkeypatch.setenv("NMOE_TVM_FFI", value)
        _launch.use_tvm_ffi.cache_clear()
        assert _launch.use_tvm_ffi() is want
    monkeypatch.delenv("NMOE_TVM_FFI")
    _launch.use_tvm_ffi.cache_clear()
    assert _launch.use_tvm_ffi() is installed
    _launch.use_tvm_ffi.cache_clear()


def test_ffi_function_is_none_for_a_default_compiled_callable():
    class Compiled:  # no __tvm_ffi_object__, not a tvm_ffi.Function
        pass

    c = Compiled()
    assert _launch.ffi_function(c) is None
    assert _launch.ffi_function(c) is None  # cached


def test_bf16_kernel_compiled_both_ways():
    """With tvm_ffi installed the kernel compiles with the TVM FFI option and exposes the
    function the launch calls with integers; with NMOE_TVM_FFI=0 it compiles the default way."""
    pytest.importorskip("cutlass", reason="needs nvidia-cutlass-dsl")
    pytest.importorskip("tvm_ffi", reason="needs apache-tvm-ffi (nmoe-kernels[tvm-ffi])")
    import tvm_ffi

    from nmoe_kernels.cute.grouped_gemm_bf16 import compile_kernel

    k, n = random.choice(((256, 256), (512, 768)))
    try:
        for env, want_ffi in (("1", True), ("0", False)):
            os.environ["NMOE_TVM_FFI"] = env
            _launch.use_tvm_ffi.cache_clear()
            compiled = compile_kernel("dgrad", k, n, "sm_90a")
            function = _launch.ffi_function(compiled)
            assert (function is not None) is want_ffi
            if want_ffi:
                assert isinstance(function, tvm_ffi.Function)
    finally:
        os.environ.pop("NMOE_TVM_FFI", None)
        _launch.use_tvm_ffi.cache_clear()
