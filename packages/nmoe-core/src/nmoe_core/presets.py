"""Named model and optimizer presets, as code (inventory sections 2.7 and 7.2).

| preset    | dim  | layers | heads | experts/top-k/shared | F    | dense | attention | tokenizer |
|-----------|------|--------|-------|----------------------|------|-------|-----------|-----------|
| tiny      | 128  | 4      | 4     | 8 / 2 / 1            | 128  | 1     | sdpa+swa  | gpt2      |
| super     | 768  | 12     | 12    | 256 / 7 / 1          | 384  | 0     | sdpa      | gpt2      |
| ultra     | 768  | 12     | 12    | 4096 / 7 / 1         | 384  | 0     | sdpa      | gpt2      |
| moonlet   | 2048 | 12     | 16    | 64 / 6 / 2           | 1408 | 1     | mla       | o200k_harm |
| moonlight | 2048 | 27     | 16    | 64 / 6 / 2           | 1408 | 1     | mla       | o200k_harm |

(F: expert hidden size; dense: leading dense-MLP layers; o200k_harm = o200k_harmony.)
``tiny`` is sized to train on a 2-core CPU in minutes; the others follow the original's configs.
Each returns a fresh, validated config; change it with `nmoe_core.config.apply_overrides`.
"""

from __future__ import annotations

from collections.abc import Callable

from nmoe_core.config import AttentionConfig, ModelConfig, MoEConfig
from nmoe_core.optim.config import OptimizerConfig

GPT2_VOCAB_PADDED = 50304  # 50257 rounded up to a multiple of 128
O200K_HARMONY_VOCAB = 201088


def _tiny() -> ModelConfig:
    return ModelConfig(
        vocab_size=GPT2_VOCAB_PADDED,
        dim=128,
        n_layers=4,
        inter_dim=512,
        attention=AttentionConfig(
            kind="sdpa", local_kind="swa", global_every=2, local_window=64, n_heads=4,
            max_position_embeddings=1024,
        ),
        moe=MoEConfig(
            n_routed_experts=8, n_activated_experts=2, n_shared_experts=1, moe_inter_dim=128,
            n_dense_layers=1, router_bias_update_rate=1e-3,
        ),
        tokenizer="gpt2",
        eos_token_id=50256,
        loss_chunk_size=2048,
    )


def _super(num_experts: int = 256) -> ModelConfig:
    return ModelConfig(
        vocab_size=GPT2_VOCAB_PADDED,
        dim=768,
        n_layers=12,
        inter_dim=3072,
        attention=AttentionConfig(kind="sdpa", global_every=1, n_heads=12),
        moe=MoEConfig(
            n_routed_experts=num_experts, n_activated_experts=7, n_shared_experts=1,
            moe_inter_dim=384, n_dense_layers=0, router_bias_update_rate=1e-3,
            aux_loss_alpha=0.001,
        ),
        tokenizer="gpt2",
        eos_token_id=50256,
    )


def _moonlet(n_layers: int = 12) -> ModelConfig:
    return ModelConfig(
        vocab_size=O200K_HARMONY_VOCAB,
        dim=2048,
        n_layers=n_layers,
        inter_dim=11264,
        attention=AttentionConfig(kind="mla", global_every=1, n_heads=16),
        moe=MoEConfig(
            n_routed_experts=64, n_activated_experts=6, n_shared_experts=2, moe_inter_dim=1408,
            n_dense_layers=1, routed_scaling_factor=2.446, router_bias_update_rate=1e-4,
        ),
        tokenizer="o200k_harmony",
        eos_token_id=199999,
        loss_mask_eos=True,
    )


_MODEL_PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "tiny": _tiny,
    "super": _super,
    "ultra": lambda: _super(num_experts=4096),
    "moonlet": _moonlet,
    "moonlight": lambda: _moonlet(n_layers=27),
}


def _speedrun_optimizer() -> OptimizerConfig:
    # The original's speedrun `super` recipe (inventory 7.2): lr 1.8e-3 everywhere, AdamW.
    return OptimizerConfig(
        lr_dense=1.8e-3, lr_expert=1.8e-3, lr_router=1.8e-3, lr_muon=1.8e-3,
        weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_beta2_expert=0.99,
        use_muon=False, warmup_steps=880, hold_tokens=int(13.51e9), decay_tokens=int(3.69e9),
        decay_floor=1e-6,
    )


def _tiny_optimizer() -> OptimizerConfig:
    # Tuned for the CPU speedrun: ~300 steps of 4096 tokens; cosine decay over the last 700k.
    return OptimizerConfig(
        lr_dense=3e-3, lr_expert=3e-3, lr_router=3e-3, lr_muon=0.02, weight_decay=0.1,
        use_muon=True, warmup_steps=20, hold_tokens=500_000, decay_tokens=700_000,
        decay_floor=1e-4,
    )


def _moonlet_optimizer() -> OptimizerConfig:
    return OptimizerConfig(
        lr_dense=3e-3, lr_expert=3e-3, lr_router=3e-3, lr_muon=3e-3, weight_decay=0.1,
        use_muon=True, warmup_steps=500, hold_tokens=int(10e9), decay_tokens=int(40e9),
        decay_floor=3e-5,
    )


_OPTIMIZER_PRESETS: dict[str, Callable[[], OptimizerConfig]] = {
    "tiny": _tiny_optimizer,
    "super": _speedrun_optimizer,
    "ultra": _speedrun_optimizer,
    "moonlet": _moonlet_optimizer,
    "moonlight": _moonlet_optimizer,
}

PRESET_NAMES: tuple[str, ...] = tuple(_MODEL_PRESETS)


def _lookup(table: dict, name: str):
    if name not in table:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(table)}")
    return table[name]()


def model_preset(name: str) -> ModelConfig:
    """A fresh `ModelConfig` for preset ``name`` (one of `PRESET_NAMES`)."""
    return _lookup(_MODEL_PRESETS, name)


def optimizer_preset(name: str) -> OptimizerConfig:
    """A fresh `OptimizerConfig` for preset ``name``."""
    return _lookup(_OPTIMIZER_PRESETS, name)
