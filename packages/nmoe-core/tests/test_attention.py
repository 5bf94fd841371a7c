"""Attention kinds against a naive softmax attention written with explicit loops over positions."""

from __future__ import annotations

import math

import pytest
import torch

from nmoe_core.attention import (
    KVCache,
    MultiHeadAttention,
    MultiHeadLatentAttention,
    attend,
)
from nmoe_core.config import AttentionConfig
from nmoe_core.rope import RotaryEmbedding


def naive_attention(q, k, v, q_start=0, window=None, scale=None):
    """q [B,H,S,D], k [B,G,L,D], v [B,G,L,E] in float64, one query at a time."""
    batch, heads, num_q, dim = q.shape
    groups = k.shape[1]
    scale = scale if scale is not None else dim**-0.5
    out = torch.zeros(batch, heads, num_q, v.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            g = h // (heads // groups)
            for i in range(num_q):
                pos = q_start + i
                lo = 0 if window is None else max(0, pos - window + 1)
                keys = k[b, g, lo : pos + 1]
                weights = torch.softmax((keys @ q[b, h, i]) * scale, dim=0)
                out[b, h, i] = weights @ v[b, g, lo : pos + 1]
    return out


@pytest.fixture
def seed():
    s = torch.seed()
    torch.manual_seed(s)
    return s


@pytest.mark.parametrize("window", [None, 1, 5, 64])
@pytest.mark.parametrize("groups", [4, 2, 1])
def test_attend_matches_naive(seed, window, groups):
    q = torch.randn(2, 4, 13, 16, dtype=torch.float64)
    k = torch.randn(2, groups, 13, 16, dtype=torch.float64)
    v = torch.randn(2, groups, 13, 8, dtype=torch.float64)
    got = attend(q, k, v, window=window)
    want = naive_attention(q, k, v, window=window)
    assert torch.allclose(got, want, atol=1e-10), f"seed {seed}"


@pytest.mark.parametrize("window", [None, 3])
def test_attend_with_offset_queries(seed, window):
    """Queries at positions 9..12 against keys 0..12 (the decoding case)."""
    q = torch.randn(1, 2, 4, 8, dtype=torch.float64)
    k = torch.randn(1, 2, 13, 8, dtype=torch.float64)
    v = torch.randn(1, 2, 13, 8, dtype=torch.float64)
    got = attend(q, k, v, q_start=9, window=window, scale=0.3)
    want = naive_attention(q, k, v, q_start=9, window=window, scale=0.3)
    assert torch.allclose(got, want, atol=1e-10), f"seed {seed}"


def test_rope_preserves_norm_and_is_relative(seed):
    rope = RotaryEmbedding(16, 64, theta=10000.0).double()
    rope.cos, rope.sin = rope.cos.double(), rope.sin.double()
    q = torch.randn(1, 1, 1, 16, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 16, dtype=torch.float64)
    assert torch.allclose(rope(q, 7).norm(), q.norm(), atol=1e-12)
    # <R_m q, R_n k> depends only on m - n
    a = (rope(q, 10) * rope(k, 4)).sum()
    b = (rope(q, 30) * rope(k, 24)).sum()
    assert torch.allclose(a, b, atol=1e-10), f"seed {seed}"


def _mha_reference(module: MultiHeadAttention, x):
    """Recompute MHA/SWA with naive attention from the module's own weights (float64)."""
    batch, seq, _ = x.shape
    h, g, d = module.n_heads, module.n_kv_heads, module.head_dim
    q = (x @ module.wq.weight.T).view(batch, seq, h, d)
    k = (x @ module.wk.weight.T).view(batch, seq, g, d)
    v = (x @ module.wv.weight.T).view(batch, seq, g, d)
    q, k = module.rope(q), module.rope(k)
    out = naive_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                          window=module.window)
    return out.transpose(1, 2).reshape(batch, seq, h * d) @ module.wo.weight.T


@pytest.mark.parametrize("window,kv_heads", [(None, None), (None, 2), (4, None)])
def test_mha_and_swa_modules(seed, window, kv_heads):
    cfg = AttentionConfig(n_heads=4, n_kv_heads=kv_heads, max_position_embeddings=64)
    module = MultiHeadAttention(32, cfg, head_dim=8, window=window).double()
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    got = module(x)
    want = _mha_reference(module, x)
    assert torch.allclose(got, want, atol=1e-9), f"seed {seed}"


@pytest.mark.parametrize("q_lora_rank", [0, 24])
def test_mla_matches_naive(seed, q_lora_rank):
    cfg = AttentionConfig(
        n_heads=3, q_lora_rank=q_lora_rank, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=6, max_position_embeddings=64,
    )
    module = MultiHeadLatentAttention(32, cfg).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    got = module(x)
    # Naive: expand the latent per head by hand and run per-position softmax attention.
    batch, seq = 2, 9
    if q_lora_rank:
        q = module.wq_b(module.q_norm(module.wq_a(x)))
    else:
        q = module.wq(x)
    q = q.view(batch, seq, 3, 12)
    q = torch.cat([q[..., :8], module.rope(q[..., 8:])], dim=-1)
    kv_a = x @ module.wkv_a.weight.T
    latent = module.kv_norm(kv_a[..., :16])
    k_pe = module.rope(kv_a[..., 16:].unsqueeze(2))
    kv = (latent @ module.wkv_b.weight.T).view(batch, seq, 3, 14)
    k = torch.cat([kv[..., :8], k_pe.expand(-1, -1, 3, -1)], dim=-1)
    out = naive_attention(q.transpose(1, 2), k.transpose(1, 2), kv[..., 8:].transpose(1, 2),
                          scale=1 / math.sqrt(12))
    want = out.transpose(1, 2).reshape(batch, seq, 18) @ module.wo.weight.T
    assert torch.allclose(got, want, atol=1e-9), f"seed {seed}"


@pytest.mark.parametrize("kind", ["sdpa", "swa", "mla"])
def test_incremental_decoding_equals_full_forward(seed, kind):
    cfg = AttentionConfig(n_heads=2, q_lora_rank=0, kv_lora_rank=8, qk_nope_head_dim=4,
                          qk_rope_head_dim=4, v_head_dim=4, max_position_embeddings=64)
    if kind == "mla":
        module = MultiHeadLatentAttention(16, cfg, window=None).double()
    else:
        module = MultiHeadAttention(16, cfg, head_dim=8, window=3 if kind == "swa" else None)
        module = module.double()
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    full = module(x)
    cache = KVCache(1, max_len=16)
    pieces = [module(x[:, :6], 0, cache.layers[0])]
    for pos in range(6, 10):
        pieces.append(module(x[:, pos : pos + 1], pos, cache.layers[0]))
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-10), f"seed {seed}"
