"""Typed configuration of the model: attention, MoE and the transformer around them.

Every config is a pydantic model with ``extra="forbid"``: an unknown key is an error that names it,
and invalid combinations are rejected with a message naming the field and the fix. Presets live in
`nmoe_core.presets`; one override path (``key=value`` with dotted keys) is `apply_overrides`.
"""

from __future__ import annotations

import difflib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

AttentionKind = Literal["mla", "sdpa", "swa"]

# Tokenizer name -> (n_vocab of the encoding, end-of-text id). The model's vocab_size must cover it.
KNOWN_TOKENIZERS: dict[str, tuple[int, int]] = {
    "gpt2": (50257, 50256),
    "o200k_base": (200019, 199999),
    "o200k_harmony": (201088, 199999),
}


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class AttentionConfig(_Config):
    """Attention of every block, mixed by the global/local rule.

    A layer ``i`` of ``n`` is *global* (uses `kind`) when ``global_every == 1``, or
    ``(i + 1) % global_every == 0``, or it is the last layer; otherwise it is *local* and uses
    `local_kind` with a sliding window of `local_window` tokens.
    """

    kind: AttentionKind = "sdpa"
    local_kind: AttentionKind = "swa"
    global_every: int = Field(1, ge=1)
    local_window: int = Field(128, ge=1)
    n_heads: int = Field(..., ge=1)
    n_kv_heads: int | None = Field(None, ge=1, description="sdpa/swa key-value heads (GQA)")
    head_dim: int | None = Field(None, ge=2, description="sdpa/swa head size; dim // n_heads")
    # MLA (DeepSeek-V2/V3 latent attention); q_lora_rank 0 means an uncompressed query.
    q_lora_rank: int = Field(1536, ge=0)
    kv_lora_rank: int = Field(512, ge=1)
    qk_nope_head_dim: int = Field(128, ge=0)
    qk_rope_head_dim: int = Field(64, ge=2)
    v_head_dim: int = Field(128, ge=1)
    # RoPE (half-split rotation; YaRN when rope_scaling_factor > 1)
    rope_theta: float = Field(50000.0, gt=0)
    max_position_embeddings: int = Field(8192, ge=1)
    rope_scaling_factor: float = Field(1.0, ge=1.0)
    rope_ntk_alpha: float = Field(1.0, gt=0)
    rope_ntk_beta: float = Field(32.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> AttentionConfig:
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv != 0:
            raise ValueError(
                f"attention.n_kv_heads={kv} must divide attention.n_heads={self.n_heads}"
            )
        if self.qk_rope_head_dim % 2:
            raise ValueError(
                f"attention.qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE rotates "
                f"pairs)"
            )
        return self

    def is_global(self, layer_id: int, n_layers: int) -> bool:
        """True when layer ``layer_id`` uses the global attention `kind`."""
        return (
            self.global_every == 1
            or (layer_id + 1) % self.global_every == 0
            or layer_id == n_layers - 1
        )

    def kind_of(self, layer_id: int, n_layers: int) -> AttentionKind:
        return self.kind if self.is_global(layer_id, n_layers) else self.local_kind


class MoEConfig(_Config):
    """Routed experts, their router and the shared experts (inventory section 2.3)."""

    n_routed_experts: int = Field(..., ge=1)
    n_activated_experts: int = Field(..., ge=1, description="top-k routed experts per token")
    n_shared_experts: int = Field(1, ge=0)
    moe_inter_dim: int = Field(..., ge=1)
    n_dense_layers: int = Field(1, ge=0, description="the first N layers use a dense MLP")
    routed_scaling_factor: float = Field(1.0, gt=0)
    router_bias_update_rate: float = Field(1e-3, ge=0, description="loss-free balancing gamma")
    router_bias_clamp: float = Field(16.0, gt=0)
    aux_loss_alpha: float = Field(0.0, ge=0, description="Switch-style aux loss weight (0 = off)")
    backend: Literal["auto", "torch", "fused"] = Field(
        "auto",
        description="expert compute: 'torch' (plain PyTorch, any device), 'fused' (nmoe-kernels"
        " grouped GEMMs with fused SwiGLU and recomputing autograd; Hopper GPUs) or 'auto' "
        "(fused for bf16 rows on an sm_90 GPU whose nmoe-kernels build has the fused kernels, "
        "torch elsewhere; `nmoe_core.moe.resolve_backend` decides per call and the trainer's "
        "start-up line names the choice and why)",
    )
    recipe: Literal["bf16", "fp8"] = Field(
        "bf16",
        description="fused-path precision of the routed experts (router, attention, shared "
        "experts and everything outside the experts are unaffected). 'bf16': all six expert GEMMs "
        "(W13 and W2 forward, their dgrads and wgrads) in BF16 with float32 accumulation; gates "
        "applied in the float32 combine. 'fp8': the four forward and dgrad GEMMs (x@W13, a@W2, "
        "dz@W2^T, dH@W13^T) in FP8 E4M3 blockscaled: their activation operands x, a, dz, dH "
        "quantized with one float32 scale per 1x128 block along the reduction dim, the weights "
        "with one per 128x128 block (copies refreshed once per optimizer step); the recomputed h, "
        "the GEMM outputs, the two wgrads (BF16 GEMMs on BF16 x, dz, gate*a, dH), the combine and "
        "the master weights stay BF16/float32. Needs model.dim and moe_inter_dim multiples of "
        "128",
    )

    @model_validator(mode="after")
    def _check(self) -> MoEConfig:
        if self.recipe == "fp8" and self.backend == "torch":
            raise ValueError(
                "moe.recipe='fp8' needs moe.backend='fused' or 'auto' (the torch backend runs "
                "BF16/FP32)"
            )
        if self.n_activated_experts > self.n_routed_experts:
            raise ValueError(
                f"moe.n_activated_experts={self.n_activated_experts} exceeds "
                f"moe.n_routed_experts={self.n_routed_experts}; top-k cannot pick more experts "
                f"than exist"
            )
        return self


class ModelConfig(_Config):
    """The MoE transformer (inventory section 2)."""

    vocab_size: int = Field(..., ge=2)
    dim: int = Field(..., ge=2)
    n_layers: int = Field(..., ge=1)
    inter_dim: int = Field(..., ge=1, description="dense MLP (and MTP block) hidden size")
    attention: AttentionConfig
    moe: MoEConfig
    rms_norm_eps: float = Field(1e-5, gt=0)
    tokenizer: str = "gpt2"
    eos_token_id: int = Field(50256, ge=0)
    loss_mask_eos: bool = Field(False, description="exclude targets equal to eos from the loss")
    loss_chunk_size: int = Field(8192, ge=1, description="rows per chunk of the chunked CE")
    init_std: float = Field(0.02, gt=0)
    # Multi-token prediction (DeepSeek-V3 style); depth 0 disables it.
    mtp_depth: int = Field(0, ge=0)
    mtp_lambda: float = Field(0.3, ge=0)
    mtp_lambda_late: float = Field(0.1, ge=0)
    mtp_lambda_step_tokens: int = Field(0, ge=0, description="switch to mtp_lambda_late here")

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        att = self.attention
        if self.moe.n_dense_layers > self.n_layers:
            raise ValueError(
                f"moe.n_dense_layers={self.moe.n_dense_layers} exceeds n_layers={self.n_layers}"
            )
        kinds = {att.kind_of(i, self.n_layers) for i in range(self.n_layers)}
        if self.mtp_depth:
            kinds.add(att.kind)
        if kinds & {"sdpa", "swa"}:
            head_dim = att.head_dim or self.dim // att.n_heads
            if att.head_dim is None and self.dim % att.n_heads:
                raise ValueError(
                    f"dim={self.dim} is not divisible by attention.n_heads={att.n_heads}; set "
                    f"attention.head_dim explicitly"
                )
            if head_dim % 2:
                raise ValueError(f"attention head_dim={head_dim} must be even for RoPE")
        if self.tokenizer in KNOWN_TOKENIZERS:
            n_vocab, _ = KNOWN_TOKENIZERS[self.tokenizer]
            if self.vocab_size < n_vocab:
                raise ValueError(
                    f"vocab_size={self.vocab_size} is smaller than tokenizer {self.tokenizer!r} "
                    f"({n_vocab} ids); use vocab_size >= {n_vocab}"
                )
        if self.eos_token_id >= self.vocab_size:
            raise ValueError(f"eos_token_id={self.eos_token_id} >= vocab_size={self.vocab_size}")
        return self

    @property
    def head_dim(self) -> int:
        return self.attention.head_dim or self.dim // self.attention.n_heads

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.moe.n_dense_layers

    def mtp_weight(self, tokens_seen: int) -> float:
        """The MTP loss weight lambda at ``tokens_seen`` (switches once, inventory 2.6)."""
        if self.mtp_lambda_step_tokens and tokens_seen >= self.mtp_lambda_step_tokens:
            return self.mtp_lambda_late
        return self.mtp_lambda


# --------------------------------------------------------------------------------------------
# Overrides: one path from `key=value` strings to a validated config.


class ConfigKeyError(KeyError):
    """An override names a key that does not exist; the message suggests the nearest ones."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0])


def config_keys(model: BaseModel, prefix: str = "") -> list[str]:
    """All dotted leaf keys of a config, e.g. ``moe.n_routed_experts``."""
    keys: list[str] = []
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        dotted = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            keys.extend(config_keys(value, dotted + "."))
        else:
            keys.append(dotted)
        del field
    return keys


def _parse_value(raw: str) -> Any:
    """Parse an override value: JSON when it parses (numbers, true/false, null, lists), else str."""
    lowered = raw.strip()
    if lowered in ("True", "False"):
        return lowered == "True"
    if lowered.lower() in ("none", "null"):
        return None
    try:
        return json.loads(lowered)
    except json.JSONDecodeError:
        return raw


def apply_overrides(model: BaseModel, overrides: dict[str, Any]) -> BaseModel:
    """Return a copy of ``model`` with dotted-key overrides applied and re-validated.

    Values may be strings (parsed as JSON where possible, so ``"64"`` becomes an int and the
    model's field types then validate it) or already-typed values. An unknown key raises
    `ConfigKeyError` suggesting the nearest valid keys; a bad value raises a ValueError naming the
    key and the reason.
    """
    data = model.model_dump()
    valid = config_keys(model)
    for key, raw in overrides.items():
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
            leaf = key.rsplit(".", 1)[-1]
            close += [k for k in valid if k.endswith("." + leaf) and k not in close]
            hint = f"; did you mean {', '.join(close[:3])}?" if close else ""
            raise ConfigKeyError(f"unknown config key {key!r}{hint}")
        value = _parse_value(raw) if isinstance(raw, str) else raw
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    try:
        return type(model).model_validate(data)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(config)'}: {e['msg']}"
            + ("" if isinstance(e.get("input"), dict | list) else f", got {e.get('input')!r}")
            for e in err.errors()
        )
        raise ValueError(f"invalid config after overrides: {problems}") from None
