"""Log-likelihood scoring of token spans, batched, without building ``[tokens, vocab]`` logits.

Letters: N scored positions, D model width, V vocabulary, B rows of a batch, L padded length.

A `ScoreRequest` is one token sequence and the span ``[start, end)`` of it whose tokens are scored:
token ``i`` of the span is predicted from the hidden state at position ``i - 1``. For every request
`score_requests` returns the summed negative log-likelihood of the span (natural log, float64 sum
of float32 terms), its length, and whether greedy decoding (argmax at every position) reproduces
the span exactly.

Log-probabilities come from `chunked_logsumexp`: the vocabulary is walked in chunks of
``chunk_size`` rows of the head, each chunk's float32 logits ``h @ W_chunk^T`` are folded into a
running log-sum-exp and a running argmax, so memory is ``N * chunk_size`` floats whatever V is.
Only the scored positions go through the head.

Batches are rows of right-padded sequences (padding after a sequence cannot change its causal
hidden states) grouped by length under a token budget. ``sync`` lets ranks that evaluate in
lockstep agree on a number of forwards: ranks with fewer batches run one-token dummy forwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "ScoreRequest",
    "ScoreResult",
    "chunked_logsumexp",
    "plan_batches",
    "score_requests",
    "token_log_probs",
]


@dataclass(frozen=True)
class ScoreRequest:
    """Score tokens ``tokens[start:end]`` given everything before them.

    Attributes:
        tokens: the whole sequence (``1 <= start < end <= len(tokens)``).
        start, end: the scored span.
    """

    tokens: tuple[int, ...]
    start: int
    end: int

    def __post_init__(self) -> None:
        if not 1 <= self.start < self.end <= len(self.tokens):
            raise ValueError(
                f"ScoreRequest span [{self.start}, {self.end}) is invalid for {len(self.tokens)} "
                f"tokens: need 1 <= start < end <= len(tokens) (token 0 has no prediction)"
            )


@dataclass(frozen=True)
class ScoreResult:
    """What `score_requests` returns per request.

    Attributes:
        nll: summed negative log-likelihood of the span (nats).
        num_tokens: ``end - start``.
        greedy: True when the argmax at every scored position equals the span's token.
    """

    nll: float
    num_tokens: int
    greedy: bool

    @property
    def mean_nll(self) -> float:
        return self.nll / self.num_tokens


def chunked_logsumexp(
    hidden_ND: torch.Tensor, weight_VD: torch.Tensor, chunk_size: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """``logsumexp`` and ``argmax`` over the vocabulary of ``hidden @ weight.T``, chunk by chunk.

    Args:
        hidden_ND: ``[N, D]`` hidden states (any float dtype; computed in float32).
        weight_VD: ``[V, D]`` head weight (any float dtype; each chunk is cast to float32).
        chunk_size: head rows per chunk (>= 1).

    Returns:
        ``(lse_N, argmax_N)``: float32 ``[N]`` log-sum-exp of the logits and int64 ``[N]`` index
        of the largest logit (the first one on ties, as ``torch.argmax``).
    """
    if hidden_ND.dim() != 2 or weight_VD.dim() != 2 or hidden_ND.shape[1] != weight_VD.shape[1]:
        raise ValueError(f"hidden_ND {tuple(hidden_ND.shape)} and weight_VD "
                         f"{tuple(weight_VD.shape)} must be [N, D] and [V, D]")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    h = hidden_ND.float()
    n = h.shape[0]
    lse = torch.full((n,), float("-inf"), dtype=torch.float32, device=h.device)
    best = torch.full((n,), float("-inf"), dtype=torch.float32, device=h.device)
    best_id = torch.zeros(n, dtype=torch.int64, device=h.device)
    for lo in range(0, weight_VD.shape[0], chunk_size):
        logits = h @ weight_VD[lo : lo + chunk_size].float().T  # [N, chunk]
        lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
        value, index = logits.max(dim=1)
        better = value > best  # strict: an earlier chunk keeps ties
        best = torch.where(better, value, best)
        best_id = torch.where(better, index + lo, best_id)
    return lse, best_id


def token_log_probs(
    hidden_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor,
    chunk_size: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log p(targets)`` (float32 ``[N]``) and the argmax ids (int64 ``[N]``) under the head."""
    lse, argmax = chunked_logsumexp(hidden_ND, weight_VD, chunk_size)
    target_logit = (hidden_ND.float() * weight_VD[targets_N].float()).sum(dim=1)
    return target_logit - lse, argmax


def plan_batches(
    lengths: Sequence[int], max_batch_tokens: int, max_rows: int = 256
) -> list[list[int]]:
    """Group sequence indices into batches: longest first, each batch's ``rows * longest`` at most
    ``max_batch_tokens`` (a longer single sequence gets a batch of its own) and at most
    ``max_rows`` rows. Deterministic for given lengths."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and ((len(current) + 1) * longest > max_batch_tokens
                        or len(current) >= max_rows):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def _forward_hidden(model: torch.nn.Module, tokens_BL: torch.Tensor,
                    autocast_dtype: torch.dtype | None) -> torch.Tensor:
    ctx = (torch.autocast(tokens_BL.device.type, dtype=autocast_dtype)
           if autocast_dtype is not None else contextlib.nullcontext())
    with ctx:
        return model(tokens_BL).hidden


def _score_batch(model, requests: list[ScoreRequest], pad_id: int, device, chunk_size: int,
                 autocast_dtype) -> list[ScoreResult]:
    longest = max(len(r.tokens) for r in requests)
    tokens = torch.full((len(requests), longest), pad_id, dtype=torch.int64)
    rows, cols, targets, owner = [], [], [], []
    for b, r in enumerate(requests):
        tokens[b, : len(r.tokens)] = torch.tensor(r.tokens, dtype=torch.int64)
        span = range(r.start, r.end)
        rows += [b] * len(span)
        cols += [p - 1 for p in span]
        targets += [r.tokens[p] for p in span]
        owner += [b] * len(span)
    tokens = tokens.to(device)
    hidden = _forward_hidden(model, tokens, autocast_dtype)
    picked = hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
    target_t = torch.tensor(targets, dtype=torch.int64, device=device)
    logp, argmax = token_log_probs(picked, model.head.weight, target_t, chunk_size)
    hit = (argmax == target_t).cpu().tolist()
    logp = logp.double().cpu().tolist()
    nll = [0.0] * len(requests)
    greedy = [True] * len(requests)
    for b, lp, h in zip(owner, logp, hit, strict=True):
        nll[b] -= lp
        greedy[b] = greedy[b] and bool(h)
    return [ScoreResult(nll[b], r.end - r.start, greedy[b]) for b, r in enumerate(requests)]


@torch.no_grad()
def score_requests(
    model: torch.nn.Module,
    requests: Sequence[ScoreRequest],
    *,
    pad_id: int,
    device: torch.device | str,
    max_batch_tokens: int = 8192,
    max_rows: int = 256,
    chunk_size: int = 4096,
    autocast_dtype: torch.dtype | None = None,
    sync: Callable[[int], int] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[ScoreResult]:
    """Score every request with the model (see the module docstring).

    Args:
        model: a `nmoe_core.model.Transformer` in eval mode (``forward(tokens).hidden`` and
            ``head.weight``).
        requests: the requests, any lengths.
        pad_id: id written after shorter rows (its value never matters).
        device: where the forwards run.
        max_batch_tokens: padded tokens per forward at most (``rows * longest``); a longer
            single sequence still runs alone.
        max_rows: rows per forward at most.
        chunk_size: head rows per chunk of the log-sum-exp.
        autocast_dtype: e.g. ``torch.bfloat16`` to run the forwards under autocast; the head
            and the log-sum-exp stay float32.
        sync: called once with this rank's number of batches, returns the number every rank
            must run (their maximum); missing batches become one-token dummy forwards.
        on_batch: called after each real batch with its number of requests (progress bars).

    Returns:
        One `ScoreResult` per request, in request order.
    """
    results: list[ScoreResult | None] = [None] * len(requests)
    batches = plan_batches([len(r.tokens) for r in requests], max_batch_tokens, max_rows)
    total = sync(len(batches)) if sync is not None else len(batches)
    for batch in batches:
        scored = _score_batch(model, [requests[i] for i in batch], pad_id, device, chunk_size,
                              autocast_dtype)
        for i, res in zip(batch, scored, strict=True):
            results[i] = res
        if on_batch is not None:
            on_batch(len(batch))
    dummy = torch.full((1, 1), pad_id, dtype=torch.int64, device=device)
    for _ in range(total - len(batches)):
        _forward_hidden(model, dummy, autocast_dtype)
    return results  # type: ignore[return-value]

