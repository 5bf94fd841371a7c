"""`OptimizerConfig`: the typed configuration of Muon, the AdamW groups and the WSD schedule.

Defaults follow the original nmoe (inventory §2.1, §4): every peak lr 3.4e-4 (Moonlight reuses the
AdamW lr for Muon), weight decay 0.1, Adam betas (0.9, 0.95) for dense groups and (0.9, 0.99) for
experts, Muon momentum 0.95 with update RMS 0.2, and a WSD schedule with 500 warmup steps, a 10B
token hold, a 40B token cosine decay and an absolute floor of 3e-5. One deliberate difference:
``use_muon`` defaults to True here (it was False in the original).

Unknown keys are errors (``extra="forbid"``), and every check names the field and the fix.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from nmoe_core.optim.adamw import BF16_STATE_MAX_BETA

__all__ = ["OptimizerConfig"]

_PEAK_LR_FIELDS = ("lr_dense", "lr_expert", "lr_router", "lr_muon")


class OptimizerConfig(BaseModel):
    """Hyperparameters of the optimizers (`nmoe_core.optim.build_optimizer`) and the schedule."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # Peak learning rates per parameter kind.
    lr_dense: float = Field(3.4e-4, gt=0, description="AdamW lr: dense matrices (without Muon), "
                            "embedding, head, vectors")
    lr_expert: float = Field(3.4e-4, gt=0, description="lr of the routed expert weights "
                             "(AdamW or Muon)")
    lr_router: float = Field(3.4e-4, gt=0, description="AdamW lr of the router gates")
    lr_muon: float = Field(3.4e-4, gt=0, description="Muon lr of the 2D hidden matrices")

    # AdamW.
    weight_decay: float = Field(0.1, ge=0, description="decoupled wd of AdamW `dense` and "
                                "`expert` groups (and of expert Muon)")
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.95, ge=0, lt=1)
    adam_beta2_expert: float = Field(0.99, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0)
    adamw_state_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype of AdamW's two moments. float32: torch's AdamW (fused on "
        "CUDA). bfloat16: nmoe's AdamW, half the optimizer state (4 instead of 8 bytes per "
        "parameter; DeepSeek-V3's recipe), float32 arithmetic; needs every beta <= 0.99")

    # Muon (Moonlight recipe, inventory §4.2).
    use_muon: bool = Field(True, description="Muon for the 2D hidden matrices (else AdamW `dense`)")
    expert_optimizer: Literal["adamw", "muon"] = "adamw"
    muon_momentum: float = Field(0.95, ge=0, lt=1)
    muon_weight_decay: float = Field(0.1, ge=0)
    muon_update_rms: float = Field(0.2, gt=0)
    muon_ns_steps: int = Field(5, ge=1, le=20)

    # Gradient clipping (applied by the trainer); None disables it.
    grad_clip: float | None = Field(1.0, description="max global grad norm; None disables")

    # WSD schedule (inventory §4.5).
    warmup_steps: int = Field(500, ge=0)
    hold_tokens: float = Field(10e9, ge=0)
    decay_tokens: float = Field(40e9, ge=0)
    decay_floor: float = Field(3e-5, gt=0, description="absolute lr the decay ends at")

    @model_validator(mode="after")
    def _check_combinations(self) -> OptimizerConfig:
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(
                f"grad_clip must be > 0 (got {self.grad_clip}); set grad_clip=None to disable "
                "clipping"
            )
        if self.adamw_state_dtype == "bfloat16":
            for name in ("adam_beta1", "adam_beta2", "adam_beta2_expert"):
                beta = getattr(self, name)
                if beta > BF16_STATE_MAX_BETA:
                    raise ValueError(
                        f"{name}={beta:g} with adamw_state_dtype=bfloat16: a moment moves by "
                        f"(1 - beta) = {1 - beta:.3g} of its gap per step, below what bfloat16 "
                        f"resolves, so updates would round away; lower {name} to <= "
                        f"{BF16_STATE_MAX_BETA} or set adamw_state_dtype=float32"
                    )
        for name in self.peak_lr_fields():
            peak = getattr(self, name)
            if self.decay_floor > peak:
                raise ValueError(
                    f"decay_floor ({self.decay_floor:g}) exceeds {name} ({peak:g}); the floor is "
                    f"an absolute lr and must be <= every peak lr: lower decay_floor to <= "
                    f"{peak:g} or raise {name}"
                )
        return self

    def peak_lr_fields(self) -> tuple[str, ...]:
        """The peak-lr fields in use (``lr_muon`` only when Muon runs the hidden matrices)."""
        return tuple(f for f in _PEAK_LR_FIELDS if f != "lr_muon" or self.use_muon)
