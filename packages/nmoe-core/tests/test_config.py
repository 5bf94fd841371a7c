"""Configs: unknown keys, invalid combinations, overrides, presets."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from nmoe_core.config import (
    AttentionConfig,
    ConfigKeyError,
    ModelConfig,
    MoEConfig,
    apply_overrides,
)
from nmoe_core.presets import PRESET_NAMES, model_preset, optimizer_preset


def test_unknown_key_is_an_error_naming_it():
    with pytest.raises(ValidationError, match="n_experts"):
        MoEConfig(n_routed_experts=8, n_activated_experts=2, moe_inter_dim=4, n_experts=3)


def test_invalid_combinations_name_the_field():
    with pytest.raises(ValidationError, match="n_activated_experts"):
        MoEConfig(n_routed_experts=4, n_activated_experts=5, moe_inter_dim=8)
    with pytest.raises(ValidationError, match="n_kv_heads"):
        AttentionConfig(n_heads=6, n_kv_heads=4)
    cfg = model_preset("tiny").model_dump()
    cfg["vocab_size"] = 1000
    with pytest.raises(ValidationError, match="vocab_size=1000"):
        ModelConfig.model_validate(cfg)
    cfg = model_preset("tiny").model_dump()
    cfg["moe"]["n_dense_layers"] = 9
    with pytest.raises(ValidationError, match="n_dense_layers"):
        ModelConfig.model_validate(cfg)


def test_overrides_are_typed_and_validated():
    cfg = apply_overrides(model_preset("tiny"), {"moe.n_routed_experts": "16", "dim": 192,
                                                 "attention.kind": "mla"})
    assert cfg.moe.n_routed_experts == 16 and cfg.dim == 192 and cfg.attention.kind == "mla"
    with pytest.raises(ConfigKeyError, match="moe.n_routed_experts"):
        apply_overrides(cfg, {"moe.n_routed_expert": "4"})
    with pytest.raises(ConfigKeyError, match="did you mean moe.n_routed_experts"):
        apply_overrides(cfg, {"n_routed_experts": "4"})
    with pytest.raises(ValueError, match="moe.n_activated_experts"):
        apply_overrides(cfg, {"moe.n_activated_experts": "32"})
    with pytest.raises(ValueError, match=r"dim: Input should be a valid integer.*, got 'wide'$"):
        apply_overrides(cfg, {"dim": "wide"})  # the field, the rule and the value given


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_presets_validate(name):
    cfg = model_preset(name)
    assert ModelConfig.model_validate(cfg.model_dump()) == cfg
    opt = optimizer_preset(name)
    assert opt.decay_floor <= opt.lr_dense


def test_super_preset_matches_the_issue():
    cfg = model_preset("super")
    assert (cfg.dim, cfg.n_layers, cfg.attention.n_heads) == (768, 12, 12)
    assert (cfg.moe.n_routed_experts, cfg.moe.n_activated_experts, cfg.moe.n_shared_experts) == (
        256, 7, 1)
    assert cfg.moe.moe_inter_dim == 384 and cfg.vocab_size == 50304
    assert model_preset("ultra").moe.n_routed_experts == 4096
    with pytest.raises(ValueError, match="known presets"):
        model_preset("huge")


def test_global_local_rule():
    att = AttentionConfig(kind="mla", local_kind="swa", global_every=6, n_heads=2)
    kinds = [att.kind_of(i, 12) for i in range(12)]
    assert kinds == ["swa"] * 5 + ["mla"] + ["swa"] * 5 + ["mla"]
    att = AttentionConfig(kind="mla", local_kind="swa", global_every=4, n_heads=2)
    assert [att.is_global(i, 6) for i in range(6)] == [False, False, False, True, False, True]
