"""`nmoe_train.step_profile`: kernel categories, the per-category GPU time and idle time of a
profiled step, and the chrome-trace parsing, on synthetic events with known totals."""

from __future__ import annotations

import random

import pytest

from nmoe_train.step_profile import (
    CATEGORIES,
    RANGES,
    KernelEvent,
    busy_union_us,
    categorize,
    format_breakdown,
    gpu_time_breakdown,
    kernel_events_from_chrome_trace,
)

FWD, BWD, OPT = RANGES.forward, RANGES.backward, RANGES.optimizer

# (kernel name, enclosing ranges, expected category): real kernel names as profiled on H100.
CASES = [
    ("kernel_cutlass_kernel_nmoe_kernelscutegrouped_gemm_bf16GroupedGemmKernel_0", (FWD,),
     "expert_gemm"),
    ("void cutlass::device_kernel<at::cuda::detail::enable_3x_kernel_for_sm9x<cutlass::gemm::"
     "kernel::GemmUniversal<cutlass::gemm::GroupProblemShape<...>>>>", (BWD,), "expert_gemm"),
    ("nvjet_tst_192x192_64x3_1x2_h_bz_coopB_TNT", (FWD, RANGES.experts), "expert_gemm"),
    ("void vectorized_elementwise_kernel<4, silu_kernel>", (BWD, RANGES.experts),
     "expert_other"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128>>", (FWD,),
     "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16", (BWD,), "attention"),
    ("void at::native::(anonymous)::indexSelectLargeIndex<c10::BFloat16>", (FWD, RANGES.dispatch),
     "dispatch_combine"),
    ("void at::native::_scatter_gather_elementwise_kernel", (BWD, RANGES.combine),
     "dispatch_combine"),
    ("nmoe_comm::rdep_dispatch_kernel", (FWD,), "dispatch_combine"),
    ("void at::native::sbtopk::gatherTopK<float>", (FWD, RANGES.router), "router"),
    ("nvjet_tst_64x8_64x16_4x1_v_bz_TNN", (FWD, RANGES.router), "router"),
    ("void at::native::reduce_kernel<512, 1, MaxOps>", (FWD, RANGES.loss), "loss"),
    ("nvjet_tst_256x128_64x4_2x1_v_bz_coopA_TNN", (BWD, RANGES.loss), "loss"),
    ("nvjet_tst_256x128_64x4_2x1_v_bz_coopA_TNN", (FWD,), "dense_gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", (BWD,), "dense_gemm"),
    ("void at::native::vectorized_elementwise_kernel<4, AddFunctor>", (OPT,), "optimizer"),
    ("nvjet_tst_128x64_64x8_2x1_v_bz_TNT", (OPT,), "optimizer"),
    ("void at::native::vectorized_elementwise_kernel<4, AddFunctor>", (FWD,),
     "elementwise_other"),
    ("Memset (Device)", (), "elementwise_other"),
]


@pytest.mark.parametrize(("name", "ranges", "category"), CASES)
def test_categorize(name, ranges, category):
    assert categorize(name, (RANGES.step, *ranges)) == category


def test_busy_union_counts_overlaps_once():
    assert busy_union_us([(0, 10), (5, 15), (20, 25), (21, 22), (30, 30)]) == 20
    assert busy_union_us([]) == 0


def test_breakdown_totals_and_idle_match_a_direct_sum():
    """Random kernels (some overlapping, some crossing the window edges) in random ranges: each
    category's total equals the sum of its clipped durations, and idle equals wall minus a
    brute-force busy time on a 1 us grid."""
    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)
    window = (100, 1100)
    events, expected = [], dict.fromkeys(CATEGORIES, 0)
    covered = [False] * 1400
    for _ in range(200):
        name, ranges, category = rng.choice(CASES)
        start = rng.randrange(0, 1300)
        duration = rng.randrange(0, 40)
        events.append(KernelEvent(name, float(start), float(duration), (RANGES.step, *ranges)))
        lo, hi = max(start, window[0]), min(start + duration, window[1])
        if hi > lo:
            expected[category] += hi - lo
            for t in range(lo, hi):
                covered[t] = True
    totals = gpu_time_breakdown(events, *window)
    for category in CATEGORIES:
        assert totals[category] == expected[category], (seed, category)
    busy = sum(covered)
    assert totals["busy"] == busy and totals["wall"] == 1000, seed
    assert totals["idle"] == 1000 - busy, seed
    table = format_breakdown("step", totals)
    assert f"{totals['idle'] / 1000:.3f}" in table.splitlines()[-2]


def test_breakdown_rejects_a_reversed_window():
    with pytest.raises(ValueError, match="window ends"):
        gpu_time_breakdown([], 10.0, 5.0)


def _x(cat, name, ts, dur, tid=1, correlation=None):
    ev = {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "pid": 1}
    if correlation is not None:
        ev["args"] = {"correlation": correlation}
    return ev


def test_chrome_trace_kernels_get_the_ranges_around_their_launch():
    """Kernels run later on the GPU than their launch; the ranges come from the launch time.
    The backward's launch happens on the autograd thread (tid 2) while the main thread sits in
    the backward range; a range entered on tid 2 (combine) nests inside it."""
    trace = {"traceEvents": [
        _x("user_annotation", RANGES.step, 0, 1000),
        _x("user_annotation", RANGES.forward, 10, 300),
        _x("user_annotation", RANGES.router, 20, 30),
        _x("user_annotation", RANGES.backward, 400, 400),
        _x("user_annotation", RANGES.combine, 500, 50, tid=2),
        _x("user_annotation", "ProfilerStep#1", 0, 1000),  # not ours: ignored
        _x("cuda_runtime", "cudaLaunchKernel", 25, 5, correlation=1),
        _x("cuda_driver", "cuLaunchKernelEx", 100, 5, correlation=2),
        _x("cuda_runtime", "cudaLaunchKernel", 510, 5, tid=2, correlation=3),
        _x("cuda_runtime", "cudaMemsetAsync", 700, 5, tid=2, correlation=4),
        _x("kernel", "gatherTopK", 40, 10, correlation=1),
        _x("kernel", "kernel_cutlass_grouped_gemm", 120, 100, correlation=2),
        _x("kernel", "scatter_kernel", 600, 30, correlation=3),
        _x("gpu_memset", "Memset (Device)", 720, 4, correlation=4),
        _x("kernel", "orphan", 900, 1, correlation=99),
        {"ph": "i", "name": "marker", "ts": 1},
    ]}
    events, ranges = kernel_events_from_chrome_trace(trace)
    got = {e.name: (e.start_us, e.duration_us, e.ranges) for e in events}
    assert got == {
        "gatherTopK": (40.0, 10.0, (RANGES.step, RANGES.forward, RANGES.router)),
        "kernel_cutlass_grouped_gemm": (120.0, 100.0, (RANGES.step, RANGES.forward)),
        "scatter_kernel": (600.0, 30.0, (RANGES.step, RANGES.backward, RANGES.combine)),
        "Memset (Device)": (720.0, 4.0, (RANGES.step, RANGES.backward)),
        "orphan": (900.0, 1.0, ()),
    }
    assert ranges[RANGES.step] == (0.0, 1000.0)
    assert ranges[RANGES.backward] == (400.0, 800.0)
    totals = gpu_time_breakdown(events, *ranges[RANGES.step])
    assert totals["router"] == 10 and totals["expert_gemm"] == 100
    assert totals["dispatch_combine"] == 30 and totals["elementwise_other"] == 5
    assert totals["idle"] == 1000 - 145
