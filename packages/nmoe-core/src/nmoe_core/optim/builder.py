"""Partition a model's parameters into Muon and AdamW groups and drive them as one optimizer.

The model hands over ``model.param_kinds()``: a dict with the keys of `PARAM_KINDS`, each a list
of ``(name, parameter)``. The partition (inventory §4.1, with the decisions noted):

    kind       optimizer                          group           lr         wd            betas
    matrix     Muon if use_muon                   matrix          lr_muon    muon_wd       -
    matrix     AdamW otherwise                    dense           lr_dense   weight_decay  (b1, b2)
    expert     AdamW if expert_optimizer=adamw    expert          lr_expert  weight_decay  (b1, b2e)
    expert     Muon if expert_optimizer=muon      expert          lr_expert  weight_decay  -
    router     AdamW                              router          lr_router  0             (b1, b2)
    embedding  AdamW                              dense_no_decay  lr_dense   0             (b1, b2)
    head       AdamW                              dense_no_decay  lr_dense   0             (b1, b2)
    vector     AdamW                              vector          lr_dense   0             (b1, b2)

(muon_wd = muon_weight_decay, b1/b2/b2e = adam_beta1/adam_beta2/adam_beta2_expert.)

Embedding and head get no weight decay, as in the original (its "adam-only" names, embedding and
lm_head, went to ``dense_no_decay`` with wd 0) and as in modded-nanogpt / nanochat: decay would
pull rarely-seen token rows toward zero. Expert Muon uses ``lr_expert`` and ``weight_decay`` as the
original ``ExpertMuon`` did. Empty groups are left out.

Every group carries ``name``, ``peak_lr`` and ``floor_lr``; `Optimizers.set_lr` rewrites ``lr``
from the WSD schedule. Floors: ``decay_floor`` for every group, ``min(decay_floor, lr_router)`` for
the router and ``min(decay_floor, lr_muon)`` for Muon's matrices (the config already requires the
floor <= every peak, so the ``min`` only guards hand-built configs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from nmoe_core.optim.adamw import AdamW, compiled_adamw_step
from nmoe_core.optim.config import OptimizerConfig
from nmoe_core.optim.muon import Muon
from nmoe_core.optim.schedule import wsd_lr, wsd_scale

__all__ = ["PARAM_KINDS", "Optimizers", "build_optimizer"]

PARAM_KINDS = ("matrix", "expert", "router", "embedding", "head", "vector")
"""The keys of ``model.param_kinds()``."""

_EXPECTED_DIMS = {"matrix": (2,), "expert": (3,)}

ParamKinds = Mapping[str, Sequence[tuple[str, torch.nn.Parameter]]]


def _check_param_kinds(param_kinds: ParamKinds) -> None:
    unknown = sorted(set(param_kinds) - set(PARAM_KINDS))
    if unknown:
        raise ValueError(
            f"param_kinds has unknown kind(s) {unknown}; the kinds are {list(PARAM_KINDS)}"
        )
    seen: dict[int, str] = {}
    for kind, named in param_kinds.items():
        for name, p in named:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"param_kinds[{kind!r}] entry {name!r} is not a tensor")
            if id(p) in seen:
                raise ValueError(
                    f"parameter {name!r} appears twice in param_kinds (also as {seen[id(p)]}); "
                    "every parameter must belong to exactly one kind"
                )
            seen[id(p)] = f"{kind}/{name}"
            dims = _EXPECTED_DIMS.get(kind)
            if dims is not None and p.dim() not in dims:
                raise ValueError(
                    f"param_kinds[{kind!r}] entry {name!r} has shape {tuple(p.shape)}; kind "
                    f"{kind!r} holds {dims[0]}D tensors only"
                )


def _group(name: str, named: Sequence[tuple[str, torch.nn.Parameter]], lr: float, floor: float,
           weight_decay: float, **extra: Any) -> dict[str, Any]:
    return dict(
        params=[p for _, p in named],
        param_names=[n for n, _ in named],
        name=name,
        lr=lr,
        peak_lr=lr,
        floor_lr=min(floor, lr),
        weight_decay=weight_decay,
        **extra,
    )


def make_adamw(groups: list[dict[str, Any]], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """The AdamW over ``groups`` (each carrying its ``lr``, ``betas`` and ``weight_decay``) with
    the moments ``cfg.adamw_state_dtype`` asks for.

    `nmoe_core.optim.adamw.AdamW` with bfloat16 moments; with float32 moments, the same class
    when every parameter is a CUDA tensor and this build has the `nmoe_kernels.adamw_step_`
    kernel (28 bytes moved per parameter against the 32 of torch's fused AdamW with the
    clipping factor: 28.4 against 35.4 ms over `super`'s 2.84B parameters on an H100,
    ``nmoe-kernels/bench/results/adamw_H100.json``), else torch's AdamW (fused on CUDA).
    Either reads the other's state dict."""
    params = [p for g in groups for p in g["params"]]
    if cfg.adamw_state_dtype == "bfloat16":
        return AdamW(groups, lr=cfg.lr_dense, eps=cfg.adam_eps, state_dtype=torch.bfloat16)
    if params and all(p.is_cuda for p in params) and compiled_adamw_step() is not None:
        return AdamW(groups, lr=cfg.lr_dense, eps=cfg.adam_eps, state_dtype=torch.float32)
    return torch.optim.AdamW(groups, lr=cfg.lr_dense, eps=cfg.adam_eps, **_adamw_kwargs(params))


def _adamw_kwargs(params: list[torch.Tensor]) -> dict[str, Any]:
    """Fused AdamW when every parameter is a floating CUDA tensor, else torch's default pick."""
    if params and all(p.is_cuda and p.is_floating_point() for p in params):
        return {"fused": True}
    return {}


def _adamw_step(adamw: torch.optim.Optimizer, grad_coef: torch.Tensor | None,
                param_copies: Mapping[torch.Tensor, torch.Tensor] | None = None) -> None:
    """``adamw.step()`` with every gradient multiplied by ``grad_coef`` (see `Optimizers.step`);
    nmoe's `AdamW` also gets ``param_copies``."""
    if grad_coef is None:
        if isinstance(adamw, AdamW):
            adamw.step(param_copies=param_copies)
        else:
            adamw.step()
        return
    grads = [p.grad for g in adamw.param_groups for p in g["params"] if p.grad is not None]
    if not grads:
        adamw.step()
        return
    if not isinstance(grad_coef, torch.Tensor) or grad_coef.dim() != 0:
        raise ValueError("grad_coef must be a 0-dim tensor on the parameters' device (the "
                         "clipping coefficient), e.g. torch.tensor(c, device=...)")
    if not grad_coef.is_floating_point() or grad_coef.device != grads[0].device:
        raise ValueError(
            f"grad_coef must be a floating tensor on the gradients' device {grads[0].device}, "
            f"got {grad_coef.dtype} on {grad_coef.device}"
        )
    if isinstance(adamw, AdamW):  # takes the factor itself, gradients untouched
        adamw.step(grad_coef=grad_coef, param_copies=param_copies)
        return
    if all(g.get("fused") for g in adamw.param_groups):
        # torch's fused Adam(W) reads the optimizer attribute ``grad_scale`` (GradScaler's
        # protocol: torch/optim/adam.py passes getattr(self, "grad_scale", None) to the fused
        # kernel, which divides each gradient by it in float32 before using it). 1 / 1.0 is
        # exactly 1.0, and g / 1.0 == g, so an unclipped step is bitwise the plain one.
        if getattr(adamw, "grad_scale", None) is not None:
            raise RuntimeError("AdamW already carries a grad_scale (a GradScaler is stepping "
                               "it); clip through one mechanism only")
        adamw.grad_scale = torch.reciprocal(grad_coef).to(torch.float32)
        try:
            adamw.step()
        finally:
            del adamw.grad_scale
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for grad in grads:
        by_dtype.setdefault(grad.dtype, []).append(grad)
    for dtype, same in by_dtype.items():  # the scalar in the gradients' dtype: the fast kernel
        torch._foreach_mul_(same, grad_coef.to(dtype))
    adamw.step()


class Optimizers:
    """A Muon (may be None) and an AdamW (may be None) stepped, scheduled and saved as one.

    Build it with `build_optimizer`. ``groups`` lists ``(optimizer_name, group)`` for every param
    group, ``optimizer_name`` in {"muon", "adamw"}; group names are unique across both.
    """

    def __init__(self, muon: Muon | None, adamw: torch.optim.Optimizer | None,
                 cfg: OptimizerConfig) -> None:
        self.muon = muon
        self.adamw = adamw
        self.cfg = cfg
        names = [g["name"] for _, g in self.groups]
        if len(set(names)) != len(names):
            raise ValueError(f"param group names must be unique, got {names}")

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The non-empty optimizers by name ("muon", "adamw")."""
        return {k: v for k, v in (("muon", self.muon), ("adamw", self.adamw)) if v is not None}

    @property
    def groups(self) -> list[tuple[str, dict[str, Any]]]:
        return [(k, g) for k, opt in self.optimizers.items() for g in opt.param_groups]

    def step(self, grad_coef: torch.Tensor | None = None,
             param_copies: Mapping[torch.Tensor, torch.Tensor] | None = None) -> set[int]:
        """Step every optimizer (gradients must be reduced by the caller); returns the ``id`` of
        every parameter whose ``param_copies`` entry the update wrote.

        Args:
            grad_coef: optional 0-dim floating tensor on the parameters' device multiplying every
                gradient before it is used: the gradient-clipping coefficient, computed on the
                device so that clipping never reads the norm back to the host. None means 1; a
                coefficient of exactly 1.0 changes no bit of the update. Where it goes:

                - Muon: folded into its update where the gradient is read (`Muon.step`).
                - fused AdamW (CUDA): handed to torch's fused kernel as its ``grad_scale``, which
                  divides every gradient inside the kernel; we pass ``1 / grad_coef`` in float32
                  (the kernel's type), so clipping costs no pass of its own.
                - other torch AdamW implementations (CPU): one ``torch._foreach_mul_`` of the
                  AdamW gradients by the device scalar before the step.
                - nmoe's AdamW (``adamw_state_dtype=bfloat16``): multiplied inside its update.

                Afterwards torch AdamW's gradients hold the multiplied values, the others the
                original ones; zero them before the next backward as usual.
            param_copies: optional ``{param: bfloat16 tensor}``; nmoe's AdamW writes the listed
                parameters' updated values into them (`AdamW.step`). Muon and torch's AdamW do
                not: their parameters' copies are not in the returned set, and the caller casts.
        """
        if self.muon is not None:
            self.muon.step(grad_coef=grad_coef)
        if self.adamw is not None:
            _adamw_step(self.adamw, grad_coef, param_copies)
            if param_copies and isinstance(self.adamw, AdamW):
                return {id(p) for p in self.adamw.refreshed_copies}
        return set()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def set_lr(self, step: int, tokens_seen: float) -> dict[str, float]:
        """Set every group's lr from the WSD schedule (`nmoe_core.optim.schedule`).

        Args:
            step: 0-based index of the step about to run.
            tokens_seen: tokens consumed before this step.

        Returns:
            ``{group_name: lr}`` for every group, plus ``"router_lr_scale"``: the schedule scale in
            [0, 1], equal to ``(lr_router_now - floor) / (peak - floor)``, by which the caller
            scales the router-bias update rate (inventory §2.3).
        """
        c = self.cfg
        sched = (c.warmup_steps, c.hold_tokens, c.decay_tokens)
        lrs: dict[str, float] = {}
        for _, group in self.groups:
            group["lr"] = wsd_lr(group["peak_lr"], group["floor_lr"], step, tokens_seen, *sched)
            lrs[group["name"]] = group["lr"]
        lrs["router_lr_scale"] = wsd_scale(step, tokens_seen, *sched)
        return lrs

    def state_dict(self) -> dict[str, Any]:
        """``{"muon": ..., "adamw": ...}`` (torch optimizer state dicts; Muon momentum included)."""
        return {k: opt.state_dict() for k, opt in self.optimizers.items()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore optimizer state (moments, steps, Muon momentum) saved by `state_dict`.

        The hyperparameters of each group (peak lr, floor, wd, betas, ...) stay those of the
        current config, so a resumed run may change them; the group structure (optimizers, group
        names and sizes) must match the checkpoint exactly.
        """
        if set(state_dict) != set(self.optimizers):
            raise ValueError(
                f"optimizer state has optimizers {sorted(state_dict)} but this run builds "
                f"{sorted(self.optimizers)}; check use_muon / expert_optimizer against the "
                "checkpoint's config"
            )
        for key, opt in self.optimizers.items():
            saved_groups = state_dict[key]["param_groups"]
            current = [(g.get("name"), len(g["params"])) for g in opt.param_groups]
            saved = [(g.get("name"), len(g["params"])) for g in saved_groups]
            if current != saved:
                raise ValueError(
                    f"{key} param groups (name, #tensors) differ: checkpoint {saved}, this run "
                    f"{current}; the model or the optimizer partition changed"
                )
            for group, saved_group in zip(opt.param_groups, saved_groups):
                names, saved_names = group.get("param_names"), saved_group.get("param_names")
                if names is not None and saved_names is not None and names != saved_names:
                    diff = next(f"{a!r} != {b!r}" for a, b in zip(names, saved_names) if a != b)
                    raise ValueError(
                        f"{key} group {group['name']!r}: parameter names differ from the "
                        f"checkpoint ({diff}); the model changed"
                    )
            hyper = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
            opt.load_state_dict(state_dict[key])
            for group, values in zip(opt.param_groups, hyper):
                group.update(values)

    def state_bytes(self) -> dict[str, int]:
        """Bytes of optimizer state once every parameter has stepped, per optimizer: Muon's
        momentum (one tensor like the parameter), AdamW's two moments (the parameter's dtype for
        torch's AdamW, ``state_dtype`` for nmoe's). Computed from the groups, so it is known
        before the first step; the per-parameter ``step`` counters (a few bytes) are not
        counted."""
        out = {}
        for key, opt in self.optimizers.items():
            total = 0
            for group in opt.param_groups:
                for p in group["params"]:
                    if key == "muon":
                        total += p.numel() * p.element_size()
                    else:
                        total += 2 * p.numel() * group.get("state_dtype", p.dtype).itemsize
            out[key] = total
        return out

    def param_groups_summary(self) -> list[str]:
        """One line per group: optimizer, name, #tensors, #params, lr, wd (and betas for AdamW)."""
        lines = []
        for key, g in self.groups:
            numel = sum(p.numel() for p in g["params"])
            line = (
                f"{key:<5} {g['name']:<14} tensors={len(g['params']):<5} params={numel:<13,} "
                f"lr={g['lr']:.3g} (peak {g['peak_lr']:.3g}, floor {g['floor_lr']:.3g}) "
                f"wd={g['weight_decay']:g}"
            )
            if "betas" in g:
                line += f" betas=({g['betas'][0]:g}, {g['betas'][1]:g})"
                if g.get("state_dtype", torch.float32) != torch.float32:
                    line += f" moments={str(g['state_dtype']).removeprefix('torch.')}"
            else:
                line += f" momentum={g['momentum']:g} update_rms={g['update_rms']:g}"
            lines.append(line)
        return lines


def build_optimizer(param_kinds: ParamKinds, cfg: OptimizerConfig) -> Optimizers:
    """Build the Muon and AdamW optimizers for a model's parameters (table in module docstring).

    Args:
        param_kinds: ``model.param_kinds()``: kind -> list of ``(name, parameter)``; kinds are
            those of `PARAM_KINDS` (missing kinds count as empty). ``matrix`` entries must be 2D,
            ``expert`` entries 3D ``[E_local, M, N]`` (optionally with ``muon_col_blocks``).
            A parameter may appear only once.
        cfg: the optimizer configuration.
    """
    _check_param_kinds(param_kinds)
    kinds = {k: list(param_kinds.get(k, ())) for k in PARAM_KINDS}
    floor = cfg.decay_floor
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    muon_extra = dict(momentum=cfg.muon_momentum, update_rms=cfg.muon_update_rms,
                      ns_steps=cfg.muon_ns_steps)

    muon_groups: list[dict[str, Any]] = []
    adamw_groups: list[dict[str, Any]] = []
    if cfg.use_muon:
        muon_groups.append(_group("matrix", kinds["matrix"], cfg.lr_muon, floor,
                                  cfg.muon_weight_decay, **muon_extra))
    else:
        adamw_groups.append(_group("dense", kinds["matrix"], cfg.lr_dense, floor,
                                   cfg.weight_decay, betas=betas))
    if cfg.expert_optimizer == "muon":
        muon_groups.append(_group("expert", kinds["expert"], cfg.lr_expert, floor,
                                  cfg.weight_decay, **muon_extra))
    else:
        adamw_groups.append(_group("expert", kinds["expert"], cfg.lr_expert, floor,
                                   cfg.weight_decay, betas=(cfg.adam_beta1, cfg.adam_beta2_expert)))
    adamw_groups += [
        _group("dense_no_decay", kinds["embedding"] + kinds["head"], cfg.lr_dense, floor, 0.0,
               betas=betas),
        _group("vector", kinds["vector"], cfg.lr_dense, floor, 0.0, betas=betas),
        _group("router", kinds["router"], cfg.lr_router, floor, 0.0, betas=betas),
    ]
    muon_groups = [g for g in muon_groups if g["params"]]
    adamw_groups = [g for g in adamw_groups if g["params"]]

    muon = Muon(muon_groups, lr=cfg.lr_muon) if muon_groups else None
    adamw = None
    if adamw_groups:
        adamw = make_adamw(adamw_groups, cfg)
    return Optimizers(muon, adamw, cfg)
