"""Benchmark the multi-tensor AdamW step (`nmoe_kernels.adamw_step_`) against torch's fused AdamW.

    python packages/nmoe-kernels/bench/bench_adamw.py [--scale 1.0] [--json out.json]

The tensors are those of the `super` preset (2.84B float32 parameters in 147 tensors: 12 layers of
expert stacks [256, 768, 768] and [256, 384, 768], attention and dense matrices, norms, embedding
and head [50304, 768]), or ``--scale`` of each dimension-0 count. One optimizer step over all of
them, every variant with the gradient-clipping factor as a device scalar, as the trainer runs it:

- ``torch fused (fp32)``, the baseline: ``torch.optim.AdamW(fused=True)`` with ``grad_scale =
  1 / coef`` (how nmoe_core.optim hands it the clipping factor; the fused kernel then also writes
  the scaled gradients back: 32 bytes per parameter);
- ``torch fused (fp32), no clip``: the same without ``grad_scale`` (28 bytes per parameter);
- ``nmoe (fp32 moments)`` and ``nmoe (bf16 moments)``: `adamw_step_` with ``grad_coef`` (28 and
  20 bytes per parameter: every array read and written once, the gradients only read);
- ``nmoe (bf16), experts cast after`` and ``nmoe (bf16), expert copies``: the trainer's two ways
  to get the fused BF16 recipe's bf16 expert weights for the next step (``cache_expert_weights``):
  the bf16-moment step, then ``.to(torch.bfloat16)`` of every expert stack (6 more bytes per
  expert parameter), or the step writing them through ``param_copies`` (2 more).

GB/s counts those bytes. Times are medians of CUDA-event-timed steps after warm-up; the arrays
are far larger than L2. Each variant allocates its own tensors and frees them before the next
(the largest needs 16 bytes per parameter: 45 GB at scale 1).
"""

from __future__ import annotations

import argparse
import gc

import torch
from bench_common import finish_report, median_ms  # same directory

import nmoe_kernels

LR, BETAS, EPS, WD = 1.8e-3, (0.9, 0.95), 1e-8, 0.1


def super_shapes(scale: float) -> list[tuple[int, ...]]:
    """The `super` preset's parameter shapes (nmoe_core.presets, listed here: a kernels bench
    does not import nmoe-core), the leading dimension of each scaled by ``scale``."""
    layers = 12
    per_layer = ([(768, 768)] * 4 + [(768,)] * 2 + [(384, 768)] * 2 + [(256, 768)]
                 + [(256, 768, 768), (256, 384, 768), (768, 384)])
    shapes = per_layer * layers + [(768,), (50304, 768), (50304, 768)]

    def scaled(shape):
        return (max(1, round(shape[0] * scale)), *shape[1:])

    return [scaled(s) for s in shapes]


def _arrays(shapes, moments: torch.dtype | None):
    params = [torch.randn(s, device="cuda") for s in shapes]
    grads = [torch.randn(s, device="cuda") for s in shapes]
    if moments is None:
        return params, grads, None, None
    exp_avgs = [torch.zeros(s, device="cuda", dtype=moments) for s in shapes]
    exp_avg_sqs = [torch.zeros(s, device="cuda", dtype=moments) for s in shapes]
    return params, grads, exp_avgs, exp_avg_sqs


def bench_torch(shapes, clip: bool, iters: int) -> float:
    params, grads, _, _ = _arrays(shapes, None)
    params = [torch.nn.Parameter(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, fused=True)
    coef = torch.full((), 0.5, device="cuda")

    def step():
        if clip:
            opt.grad_scale = torch.reciprocal(coef)
        opt.step()
        if clip:
            del opt.grad_scale

    return median_ms(step, iters, 3)


def bench_nmoe(shapes, moments: torch.dtype, iters: int, experts: str | None = None) -> float:
    """``experts``: None, "cast" (cast the 3-D expert stacks to bf16 after the step) or "copies"
    (the step writes their bf16 copies)."""
    params, grads, exp_avgs, exp_avg_sqs = _arrays(shapes, moments)
    coef = torch.full((), 0.5, device="cuda")
    count = [0]
    copies = None
    if experts == "copies":
        copies = [torch.empty_like(p, dtype=torch.bfloat16) if p.dim() == 3 else None
                  for p in params]

    def step():
        count[0] += 1
        nmoe_kernels.adamw_step_(params, grads, exp_avgs, exp_avg_sqs, step=count[0], lr=LR,
                                 beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=WD,
                                 grad_coef=coef, param_copies=copies)
        if experts == "cast":
            return [p.to(torch.bfloat16) for p in params if p.dim() == 3]
        return None

    return median_ms(step, iters, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0,
                        help="fraction of each tensor's leading dimension (default 1: super)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--json", help="write result rows to this file")
    args = parser.parse_args()
    torch.manual_seed(0)
    shapes = super_shapes(args.scale)
    numel = sum(torch.Size(s).numel() for s in shapes)
    expert_share = sum(torch.Size(s).numel() for s in shapes if len(s) == 3) / numel
    variants = [
        ("torch fused (fp32)", 32, lambda: bench_torch(shapes, True, args.iters)),
        ("torch fused (fp32), no clip", 28, lambda: bench_torch(shapes, False, args.iters)),
        ("nmoe (fp32 moments)", 28, lambda: bench_nmoe(shapes, torch.float32, args.iters)),
        ("nmoe (bf16 moments)", 20, lambda: bench_nmoe(shapes, torch.bfloat16, args.iters)),
        ("nmoe (bf16), experts cast after", 20 + 6 * expert_share,
         lambda: bench_nmoe(shapes, torch.bfloat16, args.iters, "cast")),
        ("nmoe (bf16), expert copies", 20 + 2 * expert_share,
         lambda: bench_nmoe(shapes, torch.bfloat16, args.iters, "copies")),
    ]
    props = torch.cuda.get_device_properties(0)
    rows, base_ms = [], None
    header = f"{'variant':<34}{'ms':>9}{'GB/s':>8}{'x torch fused':>15}"
    print(f"{len(shapes)} tensors, {numel / 1e9:.3f}B float32 parameters")
    print(header)
    print("-" * len(header))
    for name, bytes_per_param, run in variants:
        ms = run()
        gc.collect()
        torch.cuda.empty_cache()
        base_ms = ms if base_ms is None else base_ms
        row = dict(variant=name, params=numel, tensors=len(shapes), time_ms=ms,
                   bytes_per_param=bytes_per_param, gb_per_s=numel * bytes_per_param / ms / 1e6,
                   baseline="torch fused AdamW with grad_scale, same GPU and run",
                   ratio=base_ms / ms, device=torch.cuda.get_device_name(),
                   compute_capability=f"{props.major}.{props.minor}", torch=torch.__version__,
                   cuda=torch.version.cuda)
        rows.append(row)
        print(f"{name:<34}{ms:>9.2f}{row['gb_per_s']:>8.0f}{row['ratio']:>15.2f}")
    finish_report(rows, args.json)


if __name__ == "__main__":
    main()
