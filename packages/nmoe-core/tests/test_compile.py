"""`Transformer.compile_regions`: the compiled model against the same model in eager mode, on the
CPU (float32): losses and gradients, one compiled graph per region kind (not per block), the
cached decoding path left eager, the state dict untouched."""

from __future__ import annotations

import time

import torch
from torch._dynamo.utils import counters

from nmoe_core.attention import KVCache
from nmoe_core.config import AttentionConfig, ModelConfig, MoEConfig
from nmoe_core.model import Transformer


def _cfg() -> ModelConfig:
    # Five blocks: global sdpa and local swa attention, one dense block, MoE blocks with a shared
    # expert, and an MTP block.
    return ModelConfig(
        vocab_size=96, dim=32, n_layers=5, inter_dim=48, mtp_depth=1,
        attention=AttentionConfig(kind="sdpa", local_kind="swa", global_every=2, local_window=4,
                                  n_heads=4, max_position_embeddings=64),
        moe=MoEConfig(n_routed_experts=6, n_activated_experts=2, n_shared_experts=1,
                      moe_inter_dim=16, n_dense_layers=1),
        tokenizer="custom", eos_token_id=0, loss_chunk_size=7,
    )


def test_compiled_regions_match_eager():
    seed = torch.seed() % 2**31
    torch.manual_seed(seed)
    torch._dynamo.reset()
    cfg = _cfg()
    eager, compiled = Transformer(cfg, seed=seed % 97), Transformer(cfg, seed=seed % 97)
    keys = list(compiled.state_dict())
    names = compiled.compile_regions()
    assert list(compiled.state_dict()) == keys
    # 6 blocks (5 + MTP) with an attention half each; MLPs: 1 dense, 4 shared, 1 MTP; 4 routers.
    assert len(names) == 6 + 6 + 4, names
    graphs_before = counters["stats"]["unique_graphs"]
    t0 = time.perf_counter()
    for step in range(2):  # the second step runs the cached graphs
        tokens = torch.randint(0, cfg.vocab_size, (2, 24))
        targets = torch.randint(0, cfg.vocab_size, (2, 24))
        outs = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            out = model(tokens, targets)
            out.loss.backward()
            outs.append(out)
        want, got = outs
        assert torch.allclose(got.loss, want.loss, rtol=1e-5, atol=0), (seed, step)
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
            if p.grad is None:
                assert q.grad is None, name
                continue
            # Fused float32 arithmetic reorders a few roundings: relative to the gradient's size.
            err = (p.grad - q.grad).abs().max().item()
            assert err <= 1e-4 * p.grad.abs().max().item() + 1e-7, (seed, step, name, err)
    graphs = counters["stats"]["unique_graphs"] - graphs_before
    # A graph per region kind and shape: attention halves (global sdpa, local swa, the MTP
    # block's input), MLPs (dense and shared-expert widths), routers; the blocks of one kind
    # share it (a compile per block would give 16). 7 measured.
    assert graphs <= 8, f"{graphs} graphs for {len(names)} regions"
    print(f"compile + 2 steps: {time.perf_counter() - t0:.1f} s, {graphs} graphs")

    # Decoding with a cache takes the eager path and still equals the compiled full forward.
    compiled.eval()
    with torch.no_grad():
        tokens = torch.randint(0, cfg.vocab_size, (2, 9))
        full = compiled(tokens).hidden
        cache = KVCache(len(compiled.layers), max_len=16)
        steps = [compiled(tokens[:, :5], cache=cache).hidden]
        for pos in range(5, 9):
            steps.append(compiled(tokens[:, pos:pos + 1], start_pos=pos, cache=cache).hidden)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5), seed
