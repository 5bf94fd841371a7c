"""Host side of the CuTeDSL launches: the call path, and lookups cached across calls.

A grouped GEMM launch from Python pays for every step it repeats. On one H100 the public BF16
ops took 45-90 us of host time per call against torch._grouped_mm's 20-30 us
(`bench/launch_overhead.py`, `bench/results/launch_overhead_H100.txt`); CuTeDSL's default call
into a compiled function, its arguments built beforehand, was 18 us of that.

**TVM FFI.** Where the ``apache-tvm-ffi`` package is installed (a dependency of nmoe-kernels on
Linux), the kernels are compiled with CuTeDSL's TVM FFI option and called through the
`tvm_ffi.Function` it returns, with plain integers for the device addresses, sizes and stream: no
per-call argument objects and no Python-side argument binding. That brought the host time per
call to 19-36 us for the BF16 ops and 23-34 us for the FP8 ones, against 52-89 and 69-127 us
the default way in the same runs (one H100). Without the package, or with ``NMOE_TVM_FFI=0`` in
the environment, they are compiled and called the CuTeDSL default way. Both paths launch the
same kernel, and the GPU tests pass on both.

The device's compute capability and a `cuda.bindings` stream object per stream handle do not
change from call to call, so they are looked up once here.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.cache
def use_tvm_ffi() -> bool:
    """Compile and call through TVM FFI: ``tvm_ffi`` importable and ``NMOE_TVM_FFI`` not 0.
    Read once per process (kernels compiled one way are called that way)."""
    if os.environ.get("NMOE_TVM_FFI", "1").strip() == "0":
        return False
    return importlib.util.find_spec("tvm_ffi") is not None


_FFI_FUNCTIONS: dict[int, tuple[object, object]] = {}  # id(compiled) -> (compiled, function)


def ffi_function(compiled):
    """The `tvm_ffi.Function` behind a kernel compiled with the TVM FFI option, or None for
    one compiled the default way. Called with integer addresses, it skips CuTeDSL's argument
    conversion (which maps pointer objects to the same integers)."""
    hit = _FFI_FUNCTIONS.get(id(compiled))
    if hit is not None and hit[0] is compiled:
        return hit[1]
    get = getattr(compiled, "__tvm_ffi_object__", None)
    function = get() if get is not None else None
    if function is None and use_tvm_ffi():
        import tvm_ffi

        if isinstance(compiled, tvm_ffi.Function):  # the positional-only variant
            function = functools.partial(tvm_ffi.Function.__call__, compiled)
    _FFI_FUNCTIONS[id(compiled)] = (compiled, function)  # holds compiled: its id stays unique
    return function


@functools.cache
def capability(index: int) -> tuple[int, int]:
    """(major, minor) compute capability of CUDA device ``index`` (fixed for the process)."""
    return torch.cuda.get_device_capability(index)


def device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


_STREAMS: dict[int, object] = {}


def cu_stream(handle: int):
    """The `cuda.bindings.driver.CUstream` of a raw stream handle, built once per handle (a
    handle names one stream for as long as it exists; a reused handle is the same kind of
    object, so a cached wrapper of it stays valid)."""
    stream = _STREAMS.get(handle)
    if stream is None:
        from cuda.bindings import driver

        if len(_STREAMS) > 4096:  # many short-lived streams: start over rather than grow
            _STREAMS.clear()
        stream = _STREAMS[handle] = driver.CUstream(handle)
    return stream
