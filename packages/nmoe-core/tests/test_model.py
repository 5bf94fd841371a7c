"""The transformer: loss definitions, MTP, initialisation, expert-parallel slicing, decoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nmoe_core.attention import KVCache
from nmoe_core.config import AttentionConfig, ModelConfig, MoEConfig
from nmoe_core.loss import chunked_cross_entropy
from nmoe_core.model import Transformer


def small_cfg(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=96, dim=32, n_layers=3, inter_dim=48,
        attention=AttentionConfig(kind="sdpa", local_kind="swa", global_every=2, local_window=4,
                                  n_heads=4, max_position_embeddings=64),
        moe=MoEConfig(n_routed_experts=6, n_activated_experts=2, n_shared_experts=1,
                      moe_inter_dim=16, n_dense_layers=1),
        tokenizer="custom", eos_token_id=0, loss_chunk_size=7,
    )
    base.update(overrides)
    return ModelConfig(**base)


@pytest.fixture
def seed():
    s = torch.seed()
    torch.manual_seed(s)
    return s


@pytest.mark.parametrize("keep_bytes", [0, 2**20])
def test_chunked_cross_entropy_matches_full_logits(seed, keep_bytes):
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    targets[::5] = -100
    loss_sum, count = chunked_cross_entropy(hidden, weight, targets, chunk_size=8,
                                            keep_bytes=keep_bytes)
    want = F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100, reduction="sum")
    assert count == (targets != -100).sum()
    assert torch.allclose(loss_sum, want, atol=1e-10), f"seed {seed}"
    g_fast = torch.autograd.grad(loss_sum * 1.7, [hidden, weight])
    g_ref = torch.autograd.grad(want * 1.7, [hidden, weight])
    for a, b in zip(g_fast, g_ref, strict=True):
        assert torch.allclose(a, b, atol=1e-10), f"seed {seed}"


def test_lm_loss_equals_cross_entropy_of_logits(seed):
    model = Transformer(small_cfg(), seed=seed % 1000).double()
    tokens = torch.randint(0, 96, (2, 12))
    targets = torch.randint(0, 96, (2, 12))
    out = model(tokens, targets)
    logits = model.logits(out.hidden)
    want = F.cross_entropy(logits.reshape(-1, 96), targets.reshape(-1))
    assert torch.allclose(out.lm_loss, want, atol=1e-10), f"seed {seed}"
    assert torch.allclose(out.loss, out.lm_loss)


def test_loss_mask_eos_excludes_eos_targets(seed):
    model = Transformer(small_cfg(loss_mask_eos=True, eos_token_id=5), seed=1).double()
    tokens = torch.randint(0, 96, (2, 10))
    targets = torch.randint(0, 96, (2, 10))
    targets[0, :4] = 5
    out = model(tokens, targets)
    logits = model.logits(out.hidden).reshape(-1, 96)
    want = F.cross_entropy(logits, targets.reshape(-1), ignore_index=5)
    assert out.num_targets == (targets != 5).sum()
    assert torch.allclose(out.lm_loss, want, atol=1e-10), f"seed {seed}"


def test_mtp_loss_hand_checked(seed):
    """MTP depth 2 on B=1, S=5: depth k predicts token i+2+k from h_k[i] and embed(token i+1+k)."""
    cfg = small_cfg(mtp_depth=2, mtp_lambda=0.3)
    model = Transformer(cfg, seed=3).double()
    tokens = torch.randint(0, 96, (1, 5))
    targets = torch.randint(0, 96, (1, 5))
    out = model(tokens, targets)
    # Recompute by hand: main hidden BEFORE the final norm.
    h = model.embed(tokens)
    for block in model.layers:
        h = block(h)
    per_depth = []
    for depth, module in enumerate(model.mtp):
        length = 5 - depth - 1
        h = module(h[:, :length], model.embed(targets[:, depth : depth + length]))
        logits = model.head(module.norm(h))[0]
        nll = sum(
            -torch.log_softmax(logits[i], -1)[targets[0, depth + 1 + i]] for i in range(length)
        )
        per_depth.append(nll / 5)  # divided by B*T, not by the depth's length (eq. 24)
    want_mtp = (per_depth[0] + per_depth[1]) / 2
    assert torch.allclose(out.mtp_loss, want_mtp, atol=1e-10), f"seed {seed}"
    assert torch.allclose(out.loss, out.lm_loss + 0.3 * want_mtp, atol=1e-10)
    out2 = model(tokens, targets, mtp_weight=0.1)
    assert torch.allclose(out2.loss, out.lm_loss + 0.1 * want_mtp, atol=1e-10)
    assert cfg.mtp_weight(0) == 0.3
    cfg2 = small_cfg(mtp_depth=1, mtp_lambda_step_tokens=100)
    assert cfg2.mtp_weight(99) == 0.3 and cfg2.mtp_weight(100) == 0.1


def test_init_depends_only_on_seed_and_expert_parallel_slices(seed):
    cfg = small_cfg()
    torch.manual_seed(seed)
    full = Transformer(cfg, seed=7)
    torch.manual_seed(seed + 1)  # a different global RNG state must not matter
    again = Transformer(cfg, seed=7)
    for (name, a), (_, b) in zip(full.state_dict().items(), again.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name
    other = Transformer(cfg, seed=8)
    assert not torch.equal(full.embed.weight, other.embed.weight)
    full_sd = full.state_dict()
    for rank in range(3):
        part = Transformer(cfg, seed=7, ep_rank=rank, ep_world_size=3)
        for name, tensor in part.state_dict().items():
            if ".experts." in name:
                assert torch.equal(tensor, full_sd[name][2 * rank : 2 * rank + 2]), name
            else:
                assert torch.equal(tensor, full_sd[name]), name


def test_init_is_the_same_on_any_number_of_threads():
    # The seeded initialisation runs on a thread pool (`parallel_init`); each tensor draws from
    # its own generator, so 1 thread (a plain loop) and several must give the same bits.
    cfg = small_cfg()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = Transformer(cfg, seed=3).state_dict()
        torch.set_num_threads(4)
        pooled = Transformer(cfg, seed=3).state_dict()
    finally:
        torch.set_num_threads(threads)
    for name, tensor in serial.items():
        assert torch.equal(tensor, pooled[name]), name


def test_init_statistics():
    cfg = small_cfg(dim=64, inter_dim=256, vocab_size=4096)
    model = Transformer(cfg, seed=0)
    assert abs(model.embed.weight.std().item() - 0.02) < 0.002
    assert abs(model.head.weight.std().item() - 64**-0.5 * 0.88) < 0.02  # truncated at 2 std
    wo_std = model.layers[2].attn.wo.weight.std().item()
    assert abs(wo_std - 0.02 / 6**0.5 * 0.88) < 0.002
    assert torch.all(model.layers[0].attn_norm.weight == 1)


def test_param_kinds_cover_every_parameter_once():
    model = Transformer(small_cfg(mtp_depth=1), seed=0)
    kinds = model.param_kinds()
    names = [n for group in kinds.values() for n, _ in group]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert {n for n, _ in kinds["expert"]} == {
        f"layers.{i}.ffn.experts.{w}" for i in (1, 2) for w in ("w13", "w2")
    }
    assert [n for n, _ in kinds["router"]] == ["layers.1.ffn.router.weight",
                                               "layers.2.ffn.router.weight"]
    assert all(p.dim() == 2 for _, p in kinds["matrix"])
    assert all(p.dim() == 1 for _, p in kinds["vector"])
    assert kinds["embedding"][0][0] == "embed.weight" and kinds["head"][0][0] == "head.weight"


def test_num_params_counts_active_experts():
    cfg = small_cfg()
    model = Transformer(cfg, seed=0)
    counts = model.num_params()
    expert = 2 * 6 * (32 * 32 + 16 * 32)  # 2 MoE layers x 6 experts x (w13 + w2)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["active"] == counts["total"] - expert + expert * 2 // 6
    sharded = Transformer(cfg, seed=0, ep_rank=1, ep_world_size=2).num_params()
    assert sharded == counts


def test_tiny_model_loss_falls_on_fixed_batch(seed):
    from nmoe_core.optim import build_optimizer
    from nmoe_core.optim.config import OptimizerConfig

    model = Transformer(small_cfg(), seed=0)
    opt = build_optimizer(model.param_kinds(), OptimizerConfig(
        lr_dense=3e-3, lr_expert=3e-3, lr_router=3e-3, lr_muon=0.02, warmup_steps=1,
        hold_tokens=10**9, decay_tokens=10**9, decay_floor=1e-5))
    tokens = torch.randint(0, 96, (4, 16))
    targets = torch.roll(tokens, -1, dims=1)
    losses = []
    for step in range(40):
        opt.set_lr(step, step * 64)
        out = model(tokens, targets)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        model.update_router_biases(model.router_loads(), 1e-3)
        losses.append(out.loss.item())
    assert losses[-1] < 0.5 * losses[0], f"losses {losses[0]:.3f} -> {losses[-1]:.3f}, seed {seed}"


@pytest.mark.parametrize("kinds", [("sdpa", "swa"), ("mla", "mla"), ("mla", "swa")])
def test_model_decoding_with_cache_equals_full_forward(seed, kinds):
    att = AttentionConfig(kind=kinds[0], local_kind=kinds[1], global_every=2, local_window=3,
                          n_heads=2, q_lora_rank=8, kv_lora_rank=8, qk_nope_head_dim=4,
                          qk_rope_head_dim=4, v_head_dim=4, max_position_embeddings=64)
    model = Transformer(small_cfg(attention=att), seed=seed % 97).double().eval()
    tokens = torch.randint(0, 96, (2, 9))
    full = model(tokens).hidden
    cache = KVCache(len(model.layers), max_len=16)
    steps = [model(tokens[:, :5], cache=cache).hidden]
    for pos in range(5, 9):
        steps.append(model(tokens[:, pos : pos + 1], start_pos=pos, cache=cache).hidden)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-10), f"seed {seed}"
