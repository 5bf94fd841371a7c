"""Attention: multi-head (``sdpa``), sliding-window (``swa``) and multi-head latent (``mla``).

Letters: B batch, S new positions (queries), L key positions (cache length after this step),
H heads, G key-value heads, Dh head size.

All kinds go through `attend`, which calls `torch.nn.functional.scaled_dot_product_attention`
with the causal (and, for a window, banded) mask. Every module accepts a `LayerCache` for
incremental decoding: keys/values of earlier positions are kept, new queries attend to them, and
the result equals a full re-forward of the whole prefix.

Batched decoding of prompts of different lengths uses left padding: a `KVCache` built with
``pad_lengths_B`` knows that row ``b``'s first ``pad_lengths_B[b]`` slots are padding. Slot ``s``
of row ``b`` then holds position ``s - pad_lengths_B[b]`` (RoPE rotates by that position), and no
query attends to a padding key, so each row computes exactly what it would compute alone. A
padding query attends only to itself (a row with no allowed key would give NaN, which would then
leak through the padding keys' projections into later layers' masked-out scores).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nmoe_core.config import AttentionConfig
from nmoe_core.norm import RMSNorm
from nmoe_core.rope import RotaryEmbedding


class LayerCache:
    """Keys/values (or MLA latents) of one layer for slots ``0 .. length-1``.

    Tensors are stored ``[B, max_len, ...]`` and allocated on the first `update`.
    ``pad_lengths_B`` (int64 ``[B]`` or None) is the left padding of each row, shared with the
    owning `KVCache`.
    """

    def __init__(self, max_len: int, pad_lengths_B: torch.Tensor | None = None):
        self.max_len = max_len
        self.pad_lengths_B = pad_lengths_B
        self.tensors: dict[str, torch.Tensor] = {}

    def positions(self, start_pos: int, num_new: int) -> torch.Tensor | None:
        """int64 ``[B, num_new]`` RoPE positions of slots ``start_pos ..`` (padding slots get 0),
        or None without left padding (positions equal slots)."""
        if self.pad_lengths_B is None:
            return None
        slots = torch.arange(start_pos, start_pos + num_new, device=self.pad_lengths_B.device)
        return (slots.unsqueeze(0) - self.pad_lengths_B.unsqueeze(1)).clamp_min(0)

    def update(self, name: str, new_BSX: torch.Tensor, start_pos: int) -> torch.Tensor:
        """Write ``new_BSX`` at ``start_pos`` and return positions ``0 .. start_pos + S - 1``."""
        end = start_pos + new_BSX.shape[1]
        if end > self.max_len:
            raise ValueError(f"cache holds {self.max_len} positions; position {end} was asked for")
        buf = self.tensors.get(name)
        if buf is None or buf.shape[0] != new_BSX.shape[0] or buf.dtype != new_BSX.dtype:
            shape = (new_BSX.shape[0], self.max_len, *new_BSX.shape[2:])
            buf = torch.zeros(shape, dtype=new_BSX.dtype, device=new_BSX.device)
            self.tensors[name] = buf
        buf[:, start_pos:end] = new_BSX
        return buf[:, :end]


class KVCache:
    """Per-layer caches for a whole model (main blocks only; MTP is not cached).

    Args:
        n_layers: number of blocks (``len(model.layers)``).
        max_len: slots per row (prompt slots, padding included, plus tokens to generate).
        pad_lengths_B: optional int64 ``[B]`` left padding of each row, on the model's device;
            each value in ``[0, max_len)``. With it, ``start_pos`` of `Transformer.forward` counts
            slots (padding included) and row ``b``'s real tokens sit at positions
            ``slot - pad_lengths_B[b]`` (module docstring).
    """

    def __init__(self, n_layers: int, max_len: int, pad_lengths_B: torch.Tensor | None = None):
        if pad_lengths_B is not None:
            if pad_lengths_B.dim() != 1 or pad_lengths_B.dtype != torch.int64:
                raise ValueError(
                    f"pad_lengths_B must be int64 [B], got {pad_lengths_B.dtype} "
                    f"{tuple(pad_lengths_B.shape)}"
                )
            if pad_lengths_B.numel() and not (
                0 <= int(pad_lengths_B.min()) and int(pad_lengths_B.max()) < max_len
            ):
                raise ValueError(f"pad_lengths_B values must lie in [0, max_len={max_len})")
        self.max_len = max_len
        self.pad_lengths_B = pad_lengths_B
        self.layers = [LayerCache(max_len, pad_lengths_B) for _ in range(n_layers)]


def attention_mask(
    num_queries: int,
    num_keys: int,
    q_start: int,
    window: int | None,
    device: torch.device,
    pad_lengths_B: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean mask: query at slot ``q_start + i`` sees key ``j`` when ``j <= q_start + i`` and,
    with a window, ``j > q_start + i - window``. Shape ``[S, L]``; with ``pad_lengths_B`` (int64
    ``[B]`` left padding) ``[B, 1, S, L]``, where keys ``j < pad_lengths_B[b]`` are hidden too and a
    padding query sees only itself (module docstring)."""
    q_pos = torch.arange(q_start, q_start + num_queries, device=device).unsqueeze(1)
    k_pos = torch.arange(num_keys, device=device).unsqueeze(0)
    allowed = k_pos <= q_pos
    if window is not None:
        allowed = allowed & (k_pos > q_pos - window)
    if pad_lengths_B is None:
        return allowed
    real_key = k_pos.unsqueeze(0) >= pad_lengths_B.view(-1, 1, 1)  # [B, 1, L]
    allowed = (allowed.unsqueeze(0) & real_key) | (k_pos == q_pos).unsqueeze(0)
    return allowed.unsqueeze(1)


def attend(
    q_BHSD: torch.Tensor,
    k_BGLD: torch.Tensor,
    v_BGLE: torch.Tensor,
    *,
    q_start: int = 0,
    window: int | None = None,
    scale: float | None = None,
    pad_lengths_B: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal (optionally windowed) softmax attention; returns ``[B, H, S, E]``.

    ``G`` may divide ``H`` (grouped-query attention). Queries are at slots
    ``q_start .. q_start + S - 1``; keys at ``0 .. L - 1``. ``pad_lengths_B`` (int64 ``[B]``)
    hides each row's left padding (`attention_mask`).
    """
    num_q, num_k = q_BHSD.shape[2], k_BGLD.shape[2]
    gqa = q_BHSD.shape[1] != k_BGLD.shape[1]
    if window is None and q_start == 0 and num_q == num_k and pad_lengths_B is None:
        return F.scaled_dot_product_attention(
            q_BHSD, k_BGLD, v_BGLE, is_causal=True, scale=scale, enable_gqa=gqa
        )
    mask = attention_mask(num_q, num_k, q_start, window, q_BHSD.device, pad_lengths_B)
    return F.scaled_dot_product_attention(
        q_BHSD, k_BGLD, v_BGLE, attn_mask=mask, scale=scale, enable_gqa=gqa
    )


class MultiHeadAttention(nn.Module):
    """``sdpa`` (full causal) or ``swa`` (sliding window) multi-head attention with RoPE and GQA.

    Args:
        dim: model width.
        cfg: the attention config (heads, kv heads, head size, RoPE).
        head_dim: per-head size.
        window: None for full causal attention, else the sliding window in tokens.
    """

    def __init__(self, dim: int, cfg: AttentionConfig, head_dim: int, window: int | None = None):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = head_dim
        self.window = window
        self.wq = nn.Linear(dim, self.n_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, self.n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, self.n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * head_dim, dim, bias=False)
        self.rope = RotaryEmbedding(
            head_dim,
            cfg.max_position_embeddings,
            cfg.rope_theta,
            cfg.rope_scaling_factor,
            cfg.rope_ntk_alpha,
            cfg.rope_ntk_beta,
        )

    def output_projections(self) -> list[nn.Linear]:
        return [self.wo]

    def forward(
        self, x_BSD: torch.Tensor, start_pos: int = 0, cache: LayerCache | None = None
    ) -> torch.Tensor:
        batch, seq, _ = x_BSD.shape
        q = self.wq(x_BSD).view(batch, seq, self.n_heads, self.head_dim)
        k = self.wk(x_BSD).view(batch, seq, self.n_kv_heads, self.head_dim)
        v = self.wv(x_BSD).view(batch, seq, self.n_kv_heads, self.head_dim)
        positions = cache.positions(start_pos, seq) if cache is not None else None
        q = self.rope(q, start_pos, positions)
        k = self.rope(k, start_pos, positions)
        if cache is not None:
            k = cache.update("k", k, start_pos)
            v = cache.update("v", v, start_pos)
        out = attend(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            q_start=start_pos,
            window=self.window,
            pad_lengths_B=cache.pad_lengths_B if cache is not None else None,
        )
        return self.wo(out.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim))


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek-V2/V3 multi-head latent attention (inventory 2.4), non-absorbed form.

    Queries: ``x -> wq_a -> q_norm -> wq_b`` (or ``wq`` when ``q_lora_rank == 0``) giving per head
    ``qk_nope_head_dim`` plain dims and ``qk_rope_head_dim`` rotary dims. Keys/values:
    ``x -> wkv_a`` gives a ``kv_lora_rank`` latent (normalised by ``kv_norm``) and one rotary key
    shared by all heads; ``wkv_b`` expands the latent to per-head ``k_nope`` and ``v``. The cache
    stores only the latent and the rotary key (``kv_lora_rank + qk_rope_head_dim`` values per
    position).
    """

    def __init__(
        self, dim: int, cfg: AttentionConfig, window: int | None = None, eps: float = 1e-5
    ):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.nope = cfg.qk_nope_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.window = window
        qk_dim = self.nope + self.rope_dim
        if cfg.q_lora_rank > 0:
            self.wq_a = nn.Linear(dim, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * qk_dim, bias=False)
        else:
            self.wq = nn.Linear(dim, self.n_heads * qk_dim, bias=False)
        self.wkv_a = nn.Linear(dim, cfg.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, eps)
        kv_out = self.n_heads * (self.nope + self.v_dim)
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, kv_out, bias=False)
        self.wo = nn.Linear(self.n_heads * self.v_dim, dim, bias=False)
        self.scale = qk_dim**-0.5
        self.rope = RotaryEmbedding(
            self.rope_dim,
            cfg.max_position_embeddings,
            cfg.rope_theta,
            cfg.rope_scaling_factor,
            cfg.rope_ntk_alpha,
            cfg.rope_ntk_beta,
        )

    def output_projections(self) -> list[nn.Linear]:
        return [self.wo]

    def forward(
        self, x_BSD: torch.Tensor, start_pos: int = 0, cache: LayerCache | None = None
    ) -> torch.Tensor:
        batch, seq, _ = x_BSD.shape
        heads = self.n_heads
        if hasattr(self, "wq_a"):
            q = self.wq_b(self.q_norm(self.wq_a(x_BSD)))
        else:
            q = self.wq(x_BSD)
        q = q.view(batch, seq, heads, self.nope + self.rope_dim)
        q_nope, q_pe = q.split([self.nope, self.rope_dim], dim=-1)
        positions = cache.positions(start_pos, seq) if cache is not None else None
        q = torch.cat([q_nope, self.rope(q_pe, start_pos, positions)], dim=-1)

        latent, k_pe = self.wkv_a(x_BSD).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_norm(latent)
        k_pe = self.rope(k_pe.unsqueeze(2), start_pos, positions)
        if cache is not None:
            latent = cache.update("latent", latent, start_pos)
            k_pe = cache.update("k_pe", k_pe, start_pos)
        length = latent.shape[1]
        kv = self.wkv_b(latent).view(batch, length, heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(-1, -1, heads, -1)], dim=-1)
        out = attend(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            q_start=start_pos,
            window=self.window,
            scale=self.scale,
            pad_lengths_B=cache.pad_lengths_B if cache is not None else None,
        )
        return self.wo(out.transpose(1, 2).reshape(batch, seq, heads * self.v_dim))


def build_attention(
    kind: str, dim: int, cfg: AttentionConfig, head_dim: int, window: int | None, eps: float
) -> nn.Module:
    """The attention module of one block. ``window`` applies to local layers (and to ``swa``)."""
    if kind == "mla":
        return MultiHeadLatentAttention(dim, cfg, window=window, eps=eps)
    if kind == "sdpa":
        return MultiHeadAttention(dim, cfg, head_dim, window=window)
    if kind == "swa":
        return MultiHeadAttention(dim, cfg, head_dim, window=window or cfg.local_window)
    raise ValueError(f"unknown attention kind {kind!r}; expected one of mla, sdpa, swa")
