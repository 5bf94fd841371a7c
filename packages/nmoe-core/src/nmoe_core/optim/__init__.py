"""Optimizers of nmoe-core: Muon (Moonlight recipe), the AdamW groups and the WSD schedule.

`build_optimizer(model.param_kinds(), OptimizerConfig(...))` returns an `Optimizers` that steps,
schedules, summarizes and saves both optimizers as one.
"""

from nmoe_core.optim.builder import PARAM_KINDS, Optimizers, build_optimizer
from nmoe_core.optim.config import OptimizerConfig
from nmoe_core.optim.muon import Muon, muon_update, newton_schulz_orthogonalize
from nmoe_core.optim.schedule import wsd_lr, wsd_scale

__all__ = [
    "PARAM_KINDS",
    "Muon",
    "OptimizerConfig",
    "Optimizers",
    "build_optimizer",
    "muon_update",
    "newton_schulz_orthogonalize",
    "wsd_lr",
    "wsd_scale",
]
