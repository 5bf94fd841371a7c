"""Host-side occupancy query for clustered persistent kernels: how many clusters of N one-CTA-per-SM
blocks a Hopper GPU runs at once (clusters of 4 do not tile every GPC of a 132-SM H100/H200, so a
persistent grid sized by SM count alone would run its excess clusters in a second wave).
"""

from __future__ import annotations

# An empty kernel whose occupancy stands in for this kernel's: one CTA per SM (its shared memory
# use), 384 threads, clustered.
_PROBE_PTX = b""".version 8.0
.target sm_90a
.address_size 64
.visible .entry nmoe_cluster_probe()
{
    ret;
}
\0"""
_PROBE_SMEM_BYTES = 200 * 1024  # > half of an SM's shared memory: one CTA per SM, as ours
_probe_error: str | None = None  # why the last occupancy query failed (reported by the bench)
_resident_clusters: dict[tuple[int, int], int] = {}  # (cluster size, device) -> clusters


def max_active_clusters(cluster_size: int, device: int) -> int | None:
    """Clusters of ``cluster_size`` one-CTA-per-SM blocks that CUDA device ``device`` (the
    current one) runs at once, or None if the driver's occupancy query fails (then every SM is
    assumed usable). Successful answers are cached.

    Clusters of 4 do not tile every GPC of a 132-SM Hopper; a persistent grid of more clusters
    than fit would run the excess clusters in a second wave.
    """
    global _probe_error
    if (cluster_size, device) in _resident_clusters:
        return _resident_clusters[(cluster_size, device)]
    from cuda.bindings import driver

    def check(result):
        err, *values = result
        if err != driver.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"{err}")
        return values[0] if values else None

    try:
        context = check(driver.cuCtxGetCurrent())
        if context is None or int(context) == 0:
            # no context bound to this thread yet: bind the device's primary context (torch's)
            dev = check(driver.cuDeviceGet(device))
            check(driver.cuCtxSetCurrent(check(driver.cuDevicePrimaryCtxRetain(dev))))
        module = check(driver.cuModuleLoadData(_PROBE_PTX))
        func = check(driver.cuModuleGetFunction(module, b"nmoe_cluster_probe"))
        check(
            driver.cuFuncSetAttribute(
                func,
                driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                _PROBE_SMEM_BYTES,
            )
        )
        config = driver.CUlaunchConfig()
        config.gridDimX, config.gridDimY, config.gridDimZ = cluster_size, 1, 1
        config.blockDimX, config.blockDimY, config.blockDimZ = 384, 1, 1
        config.sharedMemBytes = _PROBE_SMEM_BYTES
        value = driver.CUlaunchAttributeValue()
        value.clusterDim.x, value.clusterDim.y, value.clusterDim.z = cluster_size, 1, 1
        attr = driver.CUlaunchAttribute()
        attr.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
        attr.value = value
        config.attrs = [attr]
        config.numAttrs = 1
        clusters = int(check(driver.cuOccupancyMaxActiveClusters(func, config)))
        check(driver.cuModuleUnload(module))
        _resident_clusters[(cluster_size, device)] = clusters
        return clusters
    except Exception as err:  # an optimization aid, never a reason to fail a GEMM
        _probe_error = f"{type(err).__name__}: {err}"
        return None
