"""Benchmark the fused cross-entropy rows op (`nmoe_kernels.cross_entropy_rows`) on the GPU.

    python packages/nmoe-kernels/bench/bench_cross_entropy.py [--json out.json] [--quick]

Two rows per shape [N, V] (N = one loss chunk of 8192 tokens, V = o200k 201088 and gpt2 50257):

- ``cross_entropy_rows``: the op alone on bf16 logits. Baseline: the elementwise part of the
  chunked cross-entropy's torch path (nmoe_core.loss at the time of writing, copied here since a
  kernels bench may not import nmoe-core): forward upcast, gather of the target logit, in-place
  softmax with its log-sum-exp, the loss sum; backward exp(logits - lse) from the bf16 logits, the
  -1 at the target, the scale, the cast to bf16. GB/s counts the bytes the op must move once
  (read and write N x V bf16).
- ``chunk fwd+bwd (D=768)``: a whole chunk of the loss with its GEMMs: fused = logits GEMM, the
  op, g @ W and g^T @ h into a float32 accumulator; baseline = the torch path's forward GEMM and
  softmax, then its backward (logits GEMM recomputed, elementwise, the same two GEMMs).

Times are medians over CUDA-event-timed calls after warm-up; the logits are larger than L2.
Prints a table and optionally writes JSON rows (op, shape, dtype, time, GB/s, baseline, ratio,
device, torch and CUDA versions).
"""

from __future__ import annotations

import argparse

import torch
from bench_common import finish_report, median_ms  # same directory

import nmoe_kernels

IGNORE = -100


def torch_forward(logits_bf16, targets, valid):
    """The torch path's forward elementwise passes of one chunk: (loss sum, lse)."""
    safe = torch.where(valid, targets, 0)
    logits = logits_bf16.to(torch.float32)
    target_logit = logits.gather(1, safe[:, None]).squeeze(1)
    row_max = logits.amax(dim=-1, keepdim=True)
    probs = logits.sub_(row_max).exp_()
    total = probs.sum(dim=-1, keepdim=True)
    probs.div_(total)
    lse = (total.log_() + row_max).squeeze(1)
    return ((lse - target_logit) * valid).sum(), lse


def torch_backward(logits_bf16, lse, targets, valid, grad_scale):
    """The torch path's backward elementwise passes of one chunk: the bf16 logits gradient."""
    rows = torch.arange(logits_bf16.shape[0], device=logits_bf16.device)
    probs = (logits_bf16.to(torch.float32) - lse[:, None]).exp_()
    probs[rows, torch.where(valid, targets, 0)] -= 1.0
    probs *= (valid.to(torch.float32) * grad_scale)[:, None]
    return probs.to(torch.bfloat16)


def torch_elementwise(logits_bf16, targets, valid, grad_scale):
    """Forward and backward elementwise passes of the torch path for one chunk (baseline)."""
    loss, lse = torch_forward(logits_bf16, targets, valid)
    return loss, torch_backward(logits_bf16, lse, targets, valid, grad_scale)


def torch_chunk(h, w, targets, valid, grad_w):
    """The torch path's forward and backward of one chunk, GEMMs included (baseline)."""
    _, lse = torch_forward(h @ w.t(), targets, valid)
    g = torch_backward(h @ w.t(), lse, targets, valid, 1.0)  # the backward recomputes the GEMM
    grad_h = g @ w
    grad_w += (g.t() @ h).to(torch.float32)
    return grad_h


def fused_chunk(h, w, targets, grad_w):
    logits = h @ w.t()
    nmoe_kernels.cross_entropy_rows(logits, targets, IGNORE)
    grad_h = logits @ w
    grad_w += (logits.t() @ h).to(torch.float32)
    return grad_h


def row(op, shape, nbytes, ms, base_ms, baseline):
    props = torch.cuda.get_device_properties(0)
    return dict(
        op=op, shape=shape, dtype="bfloat16", time_us=ms * 1e3,
        gb_per_s=nbytes / ms / 1e6 if nbytes else None, bytes=nbytes, baseline=baseline,
        baseline_us=base_ms * 1e3, ratio=base_ms / ms, device=torch.cuda.get_device_name(),
        compute_capability=f"{props.major}.{props.minor}", torch=torch.__version__,
        cuda=torch.version.cuda,
    )


def bench_op(shape: str, targets: torch.Tensor, valid: torch.Tensor, vocab: int) -> dict:
    """The op alone against the torch path's elementwise passes (inputs freed on return)."""
    num_rows = targets.shape[0]
    logits = (torch.randn(num_rows, vocab, device="cuda") * 2).to(torch.bfloat16)
    work = logits.clone()  # overwritten by every call; the op's work does not depend on values
    ms = median_ms(lambda: nmoe_kernels.cross_entropy_rows(work, targets, IGNORE), 20, 3)
    base = median_ms(lambda: torch_elementwise(logits, targets, valid, 1.0), 10, 2)
    return row("cross_entropy_rows", shape, 2 * num_rows * vocab * 2, ms, base,
               "torch path elementwise passes (fwd + bwd), same GPU")


def bench_shape(num_rows: int, vocab: int, dim: int) -> list[dict]:
    """The op row and the whole-chunk row of one [N, V]."""
    shape = f"N={num_rows} V={vocab}"
    targets = torch.randint(0, vocab, (num_rows,), device="cuda")
    targets[torch.rand(num_rows, device="cuda") < 0.05] = IGNORE
    valid = targets != IGNORE
    rows = [bench_op(shape, targets, valid, vocab)]
    torch.cuda.empty_cache()
    h = torch.randn(num_rows, dim, device="cuda").to(torch.bfloat16)
    w = (torch.randn(vocab, dim, device="cuda") * 0.05).to(torch.bfloat16)
    grad_w = torch.zeros(vocab, dim, device="cuda")
    ms = median_ms(lambda: fused_chunk(h, w, targets, grad_w), 10, 2)
    base = median_ms(lambda: torch_chunk(h, w, targets, valid, grad_w), 10, 2)
    rows.append(row(f"chunk fwd+bwd (D={dim})", shape, 0, ms, base,
                    "torch path chunk (fwd GEMM + softmax, bwd GEMM recompute + elementwise + "
                    "2 GEMMs), same GPU"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write result rows to this file")
    parser.add_argument("--quick", action="store_true", help="one small shape (a smoke run)")
    args = parser.parse_args()
    torch.manual_seed(0)
    shapes = [(8192, 201088), (8192, 50257)] if not args.quick else [(1024, 50257)]
    results = []
    header = f"{'op':<26}{'shape':>16}{'us':>11}{'GB/s':>8}{'torch us':>11}{'x torch':>8}"
    print(header)
    print("-" * len(header))
    for num_rows, vocab in shapes:
        rows = bench_shape(num_rows, vocab, dim=768)
        torch.cuda.empty_cache()
        for r in rows:
            gbs = f"{r['gb_per_s']:>8.0f}" if r["gb_per_s"] else f"{'':>8}"
            print(f"{r['op']:<26}{r['shape']:>16}{r['time_us']:>11.1f}{gbs}"
                  f"{r['baseline_us']:>11.1f}{r['ratio']:>8.2f}")
        results += rows
    finish_report(results, args.json)


if __name__ == "__main__":
    main()
