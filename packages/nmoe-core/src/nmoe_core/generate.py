"""Token generation with a KV cache: greedy and sampled decoding, batched over prompts.

Letters: B batch (prompts), P longest prompt, V vocabulary.

`generate` left-pads the prompts to a common length ``P``, runs one prefill forward over ``[B, P]``
into a left-padded `KVCache`, then one forward per new token with every row at the same cache
slot. RoPE positions and the causal mask are per row (`nmoe_core.attention`): slot ``s`` of a row
with ``p`` padding slots holds position ``s - p`` and padding keys are never attended, so each row
gets exactly the tokens it would get decoded alone. In float32, greedy decoding with the cache
equals full re-forward decoding (the whole sequence through the model for every new token) token
for token (``tests/test_generate.py``). MTP heads are not used.

Logits are computed in float32 (``hidden.float() @ head.weight.float().T``) whatever the autocast
state, for the last position of each row only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from nmoe_core.attention import KVCache

__all__ = ["filter_logits", "generate", "sample_next"]


def filter_logits(
    logits_BV: torch.Tensor, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Set every logit outside the top-k / top-p (nucleus) set to ``-inf``; returns a new tensor.

    Args:
        logits_BV: float ``[B, V]`` logits (already divided by the temperature).
        top_k: keep the ``k`` largest logits of each row (ties with the k-th largest are kept
            too); None or ``>= V`` keeps all. Must be >= 1.
        top_p: keep, in order of decreasing probability, the smallest set of tokens whose total
            probability reaches ``top_p`` (the most likely token is always kept); None or 1.0
            keeps all. Must be in ``(0, 1]``.
    """
    if logits_BV.dim() != 2:
        raise ValueError(f"logits_BV must be [B, V], got {tuple(logits_BV.shape)}")
    out = logits_BV.clone()
    vocab = out.shape[1]
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1 (or None), got {top_k}")
        if top_k < vocab:
            kth = torch.topk(out, top_k, dim=1).values[:, -1:]
            out = out.masked_fill(out < kth, float("-inf"))
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (or None), got {top_p}")
        if top_p < 1.0:
            sorted_logits, order = torch.sort(out, dim=1, descending=True)
            probs = torch.softmax(sorted_logits.float(), dim=1)
            mass_before = torch.cumsum(probs, dim=1) - probs  # probability of strictly better ones
            drop_sorted = mass_before >= top_p
            drop_sorted[:, 0] = False
            drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
            out = out.masked_fill(drop, float("-inf"))
    return out


def sample_next(
    logits_BV: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row: int64 ``[B]``.

    Args:
        logits_BV: float ``[B, V]`` logits.
        temperature: 0 picks the argmax (greedy; ``top_k``/``top_p`` are then irrelevant);
            otherwise tokens are drawn from ``softmax(filter_logits(logits / temperature))``.
        top_k, top_p: see `filter_logits`.
        generator: the random generator for sampling (on the logits' device); None uses torch's
            global one.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits_BV.argmax(dim=1)
    scaled = filter_logits(logits_BV.float() / temperature, top_k, top_p)
    probs = torch.softmax(scaled, dim=1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _as_prompt_lists(prompt_ids: Sequence[Sequence[int]] | torch.Tensor) -> list[list[int]]:
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() != 2:
            raise ValueError(
                f"prompt_ids as a tensor must be [B, P] (equal-length prompts), got "
                f"{tuple(prompt_ids.shape)}; pass a list of lists for different lengths"
            )
        return [[int(t) for t in row] for row in prompt_ids.tolist()]
    prompts = [list(map(int, p)) for p in prompt_ids]
    if not prompts:
        raise ValueError("prompt_ids is empty; pass at least one prompt")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt_ids[{i}] is empty; every prompt needs at least one token "
                             f"(e.g. the eos/bos id)")
    return prompts


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]] | torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_token_ids: Sequence[int] = (),
    seed: int | None = None,
    eos_token_id: int | None = None,
    vocab_size: int | None = None,
    run_all_steps: bool = False,
) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens.

    Args:
        model: a `nmoe_core.model.Transformer` (anything with ``layers``, ``head``, ``cfg`` and
            its ``forward(tokens, start_pos=, cache=)``). It is put in eval mode for the call
            and restored afterwards. Wrap the call in ``torch.autocast`` for bf16 compute.
        prompt_ids: B prompts of token ids: a list of non-empty int lists (any lengths) or an
            int64 ``[B, P]`` tensor of equal-length prompts.
        max_new_tokens: tokens to generate per row at most (>= 0). ``P + max_new_tokens`` must
            not exceed ``model.cfg.attention.max_position_embeddings``.
        temperature: 0 = greedy (argmax); > 0 samples (see `sample_next`).
        top_k, top_p: sampling filters (`filter_logits`); ignored when greedy.
        stop_token_ids: a row stops after producing any of these ids.
        seed: seeds a private `torch.Generator` so that sampling is reproducible (the same
            prompts, model and seed give the same tokens); None uses torch's global RNG.
        eos_token_id: also a stop token when given.
        vocab_size: when given, only ids ``< vocab_size`` can be produced (a model's vocabulary
            is padded past the tokenizer's, e.g. 50304 rows for GPT-2's 50257 tokens).
        run_all_steps: run all ``max_new_tokens`` decode forwards even once every row has
            stopped (ranks of an expert-parallel model must make the same number of forwards).

    Returns:
        For each prompt, the generated ids, ending before the first stop token (which is not
        included) or after ``max_new_tokens`` tokens.
    """
    prompts = _as_prompt_lists(prompt_ids)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    device = model.head.weight.device
    batch = len(prompts)
    longest = max(len(p) for p in prompts)
    max_len = longest + max_new_tokens
    limit = model.cfg.attention.max_position_embeddings
    if max_len > limit:
        raise ValueError(
            f"longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = {max_len} "
            f"exceeds the model's max_position_embeddings ({limit}); shorten the prompts or "
            f"generate fewer tokens"
        )
    stops = sorted({*map(int, stop_token_ids), *([] if eos_token_id is None else [eos_token_id])})
    pad_id = stops[0] if stops else 0
    pad_lengths = [longest - len(p) for p in prompts]
    tokens_BP = torch.tensor([[pad_id] * n + p for n, p in zip(pad_lengths, prompts, strict=True)],
                             dtype=torch.int64, device=device)
    pad_B = torch.tensor(pad_lengths, dtype=torch.int64, device=device)
    stop_ids = torch.tensor(stops, dtype=torch.int64, device=device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    head_weight = model.head.weight

    def next_token(hidden_BD: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden_BD.float(), head_weight.float())
        if vocab_size is not None and vocab_size < logits.shape[1]:
            logits[:, vocab_size:] = float("-inf")
        return sample_next(logits, temperature, top_k, top_p, generator)

    was_training = model.training
    model.eval()
    try:
        cache = KVCache(len(model.layers), max_len, pad_B if any(pad_lengths) else None)
        hidden = model(tokens_BP, cache=cache).hidden[:, -1]
        out_BT = torch.full((batch, max_new_tokens), pad_id, dtype=torch.int64, device=device)
        done_B = torch.zeros(batch, dtype=torch.bool, device=device)
        length_B = torch.zeros(batch, dtype=torch.int64, device=device)
        for step in range(max_new_tokens):
            token_B = next_token(hidden)
            token_B = torch.where(done_B, pad_id, token_B)
            out_BT[:, step] = token_B
            length_B += (~done_B).long()
            done_B |= torch.isin(token_B, stop_ids)
            if step == max_new_tokens - 1 or (not run_all_steps and bool(done_B.all())):
                break
            out = model(token_B.unsqueeze(1), start_pos=longest + step, cache=cache)
            hidden = out.hidden[:, -1]
    finally:
        model.train(was_training)
    rows = out_BT.tolist()
    result = []
    for row, n in zip(rows, length_B.tolist(), strict=True):
        row = row[:n]
        if row and row[-1] in stops:
            row = row[:-1]
        result.append(row)
    return result
