"""Generation: left-padded KV-cache decoding against full re-forward decoding, sampling filters
against hand computations, seeded sampling."""

from __future__ import annotations

import math
import random

import pytest
import torch

from nmoe_core.attention import KVCache
from nmoe_core.config import AttentionConfig, ModelConfig, MoEConfig
from nmoe_core.generate import filter_logits, generate, sample_next
from nmoe_core.model import Transformer

VOCAB = 96


def make_model(kind: str, local_kind: str, seed: int, dtype=torch.float32) -> Transformer:
    att = AttentionConfig(kind=kind, local_kind=local_kind, global_every=2, local_window=3,
                          n_heads=2, q_lora_rank=8, kv_lora_rank=8, qk_nope_head_dim=4,
                          qk_rope_head_dim=4, v_head_dim=4, max_position_embeddings=64)
    cfg = ModelConfig(
        vocab_size=VOCAB, dim=32, n_layers=3, inter_dim=48, attention=att,
        moe=MoEConfig(n_routed_experts=6, n_activated_experts=2, n_shared_experts=1,
                      moe_inter_dim=16, n_dense_layers=1),
        tokenizer="custom", eos_token_id=0,
    )
    return Transformer(cfg, seed=seed).to(dtype).eval()


@pytest.fixture
def seed():
    s = torch.seed() % (2**31)
    torch.manual_seed(s)
    return s


def reforward_greedy(model, prompt, max_new, stops=()):
    """Reference: the whole sequence through the model (no cache) for every new token."""
    seq, out = list(prompt), []
    for _ in range(max_new):
        with torch.no_grad():
            hidden = model(torch.tensor([seq])).hidden[:, -1]
        token = int((hidden.float() @ model.head.weight.float().T).argmax())
        if token in stops:
            break
        out.append(token)
        seq.append(token)
    return out


KINDS = [("sdpa", "swa"), ("swa", "swa"), ("mla", "mla"), ("mla", "swa")]


@pytest.mark.parametrize("kinds", KINDS)
def test_cached_greedy_decoding_equals_reforward_decoding(seed, kinds):
    model = make_model(*kinds, seed=seed % 997)
    rng = random.Random(seed)
    # Different lengths force left padding; the window (3) is shorter than every sequence.
    prompts = [[rng.randrange(1, VOCAB) for _ in range(n)] for n in (1, 6, 11, 4)]
    want = [reforward_greedy(model, p, 12) for p in prompts]
    got = generate(model, prompts, 12)
    assert got == want, f"seed {seed}"
    # Each row alone (no padding) gives the same tokens too.
    assert [generate(model, [p], 12)[0] for p in prompts] == want, f"seed {seed}"


def test_stop_tokens_end_each_row_independently(seed):
    model = make_model("sdpa", "swa", seed=seed % 997)
    rng = random.Random(seed)
    prompts = [[rng.randrange(1, VOCAB) for _ in range(n)] for n in (3, 7)]
    free = [reforward_greedy(model, p, 10) for p in prompts]
    stop = free[0][4]  # row 0 stops at its 5th token (or earlier if that id appears earlier)
    want = [reforward_greedy(model, p, 10, stops={stop}) for p in prompts]
    got = generate(model, prompts, 10, stop_token_ids=[stop])
    assert got == want, f"seed {seed}"
    assert len(got[0]) == free[0].index(stop)
    got_eos = generate(model, prompts, 10, eos_token_id=stop)
    assert got_eos == want, f"seed {seed}"
    # run_all_steps decodes the same tokens (it only keeps the forwards going).
    assert generate(model, prompts, 10, stop_token_ids=[stop], run_all_steps=True) == want


def test_left_padded_cache_forward_matches_unpadded_rows(seed):
    """Hidden states of a left-padded batch equal each row run alone (float64)."""
    model = make_model("mla", "swa", seed=seed % 997, dtype=torch.float64)
    lengths = [2, 7, 5]
    rows = [torch.randint(1, VOCAB, (n,)) for n in lengths]
    longest = max(lengths)
    pads = torch.tensor([longest - n for n in lengths])
    tokens = torch.stack([torch.cat([torch.zeros(longest - len(r), dtype=torch.int64), r])
                          for r in rows])
    cache = KVCache(len(model.layers), longest + 3, pads)
    hidden = model(tokens, cache=cache).hidden
    nxt = torch.randint(1, VOCAB, (3, 1))
    step = model(nxt, start_pos=longest, cache=cache).hidden
    for b, r in enumerate(rows):
        alone = model(torch.cat([r, nxt[b]]).unsqueeze(0)).hidden[0]
        assert torch.allclose(hidden[b, pads[b]:], alone[:-1], atol=1e-10), f"seed {seed}"
        assert torch.allclose(step[b, 0], alone[-1], atol=1e-10), f"seed {seed}"


def test_filter_logits_top_k_and_top_p_match_hand_computation(seed):
    rng = random.Random(seed)
    vocab = 12
    logits = torch.tensor([[rng.gauss(0, 2) for _ in range(vocab)] for _ in range(5)],
                          dtype=torch.float64)
    for top_k in (1, 3, 7, vocab):
        got = filter_logits(logits, top_k=top_k)
        for row, grow in zip(logits.tolist(), got.tolist(), strict=True):
            kth = sorted(row, reverse=True)[top_k - 1]
            for x, g in zip(row, grow, strict=True):
                assert (g == x) if x >= kth else (g == -math.inf), f"seed {seed}"
    for top_p in (0.05, 0.3, 0.5, 0.9, 0.999):
        got = filter_logits(logits, top_p=top_p)
        for row, grow in zip(logits.tolist(), got.tolist(), strict=True):
            total = sum(math.exp(x) for x in row)
            order = sorted(range(vocab), key=lambda i: -row[i])
            kept, mass = set(), 0.0
            for i in order:  # smallest prefix of the sorted tokens reaching top_p
                kept.add(i)
                mass += math.exp(row[i]) / total
                if mass >= top_p:
                    break
            got_kept = {i for i, g in enumerate(grow) if g != -math.inf}
            assert got_kept == kept, f"top_p {top_p}, seed {seed}"
    both = filter_logits(logits, top_k=4, top_p=0.5)
    assert torch.equal(both, filter_logits(filter_logits(logits, top_k=4), top_p=0.5))
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(logits, top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        filter_logits(logits, top_k=0)


def test_sampling_follows_the_filtered_distribution(seed):
    """Empirical frequencies of 40k draws against softmax(filter(logits / T)); 5 sigma bound."""
    logits = torch.randn(1, 8, dtype=torch.float64) * 1.5
    temperature, top_k = 0.7, 5
    probs = torch.softmax(filter_logits(logits / temperature, top_k=top_k), dim=1)[0]
    gen = torch.Generator().manual_seed(seed)
    draws = 40000
    counts = torch.zeros(8)
    for _ in range(draws // 1000):
        ids = sample_next(logits.expand(1000, -1), temperature, top_k=top_k, generator=gen)
        counts += torch.bincount(ids, minlength=8)
    freq = counts / draws
    sigma = (probs * (1 - probs) / draws).sqrt()
    assert torch.all((freq - probs).abs() <= 5 * sigma + 1e-12), f"{freq} vs {probs}, seed {seed}"
    assert torch.all(counts[probs == 0] == 0)


def test_seeded_sampling_is_reproducible(seed):
    model = make_model("sdpa", "swa", seed=seed % 997)
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    kwargs = dict(temperature=1.0, top_k=40, top_p=0.95, seed=seed)
    first = generate(model, prompts, 16, **kwargs)
    assert generate(model, prompts, 16, **kwargs) == first
    other = generate(model, prompts, 16, **{**kwargs, "seed": seed + 1})
    assert other != first, f"two seeds gave identical samples, seed {seed}"
    assert all(len(row) == 16 for row in first)


def test_vocab_size_limits_generated_ids(seed):
    model = make_model("sdpa", "swa", seed=seed % 997)
    with torch.no_grad():
        model.head.weight[50:] *= 50  # make the padded ids attractive
    out = generate(model, [[1, 2, 3]], 20, temperature=1.0, seed=seed, vocab_size=50)
    assert all(t < 50 for t in out[0])
    greedy = generate(model, [[1, 2, 3]], 20, vocab_size=50)
    assert all(t < 50 for t in greedy[0])


def test_bad_arguments_are_named():
    model = make_model("sdpa", "swa", seed=0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, [[1] * 60], 10)
    with pytest.raises(ValueError, match=r"prompt_ids\[1\] is empty"):
        generate(model, [[1], []], 3)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [[1]], 3, temperature=-1.0)
    assert generate(model, torch.tensor([[1, 2], [3, 4]]), 0) == [[], []]
    model.train()
    generate(model, [[1, 2]], 2)
    assert model.training, "generate must restore the training mode"
