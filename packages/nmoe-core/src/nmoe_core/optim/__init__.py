"""Optimizers of nmoe-core: Muon (Moonlight recipe), the AdamW groups (torch's AdamW, or nmoe's
with bfloat16 moments) and the WSD schedule.

`build_optimizer(model.param_kinds(), OptimizerConfig(...))` returns an `Optimizers` that steps,
schedules, summarizes and saves both optimizers as one.
"""

from nmoe_core.optim.adamw import AdamW
from nmoe_core.optim.builder import PARAM_KINDS, Optimizers, build_optimizer, make_adamw
from nmoe_core.optim.config import OptimizerConfig
from nmoe_core.optim.muon import Muon, muon_update, newton_schulz_orthogonalize
from nmoe_core.optim.schedule import wsd_lr, wsd_scale

__all__ = [
    "PARAM_KINDS",
    "AdamW",
    "Muon",
    "OptimizerConfig",
    "Optimizers",
    "build_optimizer",
    "make_adamw",
    "muon_update",
    "newton_schulz_orthogonalize",
    "wsd_lr",
    "wsd_scale",
]
