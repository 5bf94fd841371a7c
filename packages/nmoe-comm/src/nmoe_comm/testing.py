"""Helpers for testing dispatcher backends: random routing and bitwise comparison.

Shared by this package's tests and by the GPU backends' tests, so that every backend is checked
against `nmoe_comm.reference` with the same inputs. Letters as in `nmoe_comm.dispatcher`.
"""

from __future__ import annotations

import torch


def random_routing(
    num_tokens: int,
    top_k: int,
    num_experts: int,
    *,
    generator: torch.Generator,
    distinct: bool = True,
    allowed_experts: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random router output.

    Args:
        num_tokens: ``T`` (may be 0).
        top_k: ``K``.
        num_experts: ``E``.
        generator: a CPU generator; values are drawn on the CPU and then moved to ``device``.
        distinct: each token names K different experts (needs ``K <= E``, or ``K <=`` the number
            of allowed experts); otherwise slots are drawn independently, so a token may name
            one expert in several slots.
        allowed_experts: int64 ``[E']`` ids to draw from (default: all ``E``).
        device: where the results go.

    Returns:
        ``(expert_ids_TK, gates_TK)``: int64 ``[T, K]`` and float32 ``[T, K]`` gates in (0, 1].
    """
    pool = torch.arange(num_experts) if allowed_experts is None else allowed_experts.cpu()
    if distinct:
        if top_k > pool.numel():
            raise ValueError(f"distinct routing needs top_k <= {pool.numel()} experts, got {top_k}")
        scores = torch.rand(num_tokens, pool.numel(), generator=generator)
        choice_TK = torch.argsort(scores, dim=1)[:, :top_k]
    else:
        choice_TK = torch.randint(pool.numel(), (num_tokens, top_k), generator=generator)
    gates_TK = 1.0 - torch.rand(num_tokens, top_k, generator=generator)
    return pool[choice_TK].to(device), gates_TK.to(device)


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Raise AssertionError unless the tensors have equal shape, dtype and bits.

    Bits, not values: -0.0 differs from 0.0 and NaNs compare by payload. The message gives the
    number of differing elements, the first differing coordinate and the largest difference.
    """
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        raise AssertionError(
            f"{what}: got shape {tuple(actual.shape)} {actual.dtype}, expected "
            f"{tuple(expected.shape)} {expected.dtype}"
        )
    a, e = actual.detach().cpu().contiguous(), expected.detach().cpu().contiguous()
    if a.is_floating_point():
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        differ = a.view(bits) != e.view(bits)
    else:
        differ = a != e
    if not bool(differ.any()):
        return
    first = tuple(int(i) for i in torch.nonzero(differ)[0])
    message = (
        f"{what}: {int(differ.sum())} of {a.numel()} elements differ; first at {first}: "
        f"got {a[first].item()!r}, expected {e[first].item()!r}"
    )
    if a.is_floating_point():
        diff = (a.double() - e.double()).abs()
        message += f"; max abs diff {diff.max().item():.3e}"
    raise AssertionError(message)
