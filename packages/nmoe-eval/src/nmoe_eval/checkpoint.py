"""Read nmoe training checkpoints into a model, with safetensors and JSON only (no nmoe-train).

The layout written by nmoe-train (its ``checkpoint.py``)::

    run_dir/checkpoints/latest                  one line: the newest finalised step directory
    run_dir/checkpoints/step_0000400/
        meta.json                               {"step", "run_id", "config": TrainConfig JSON
                                                 with "model": ModelConfig, "seq_len", ...}
        manifest.json                           {"format", "world_size", "files": {name: {size,
                                                 sha256}}, ...}
        shared.safetensors                      replicated tensors (all of the model without
                                                 expert parallelism)
        rank_00000.safetensors ...              each rank's own tensors: its expert shard
                                                 (``layers.N.ffn.experts.*``, expert parallel
                                                 only), ``optimizer/...`` and ``rng/...``

Model tensors are the keys without a ``/``. A tensor found in several rank files is an expert
shard: the shards are concatenated along dim 0 in rank order (rank r holds experts
``[r * E_local, (r + 1) * E_local)``), which gives the single-device model of any world size.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from nmoe_core.config import ModelConfig
from nmoe_core.model import Transformer

__all__ = ["CheckpointInfo", "find_step_dir", "load_checkpoint", "read_model_state"]


@dataclass(frozen=True)
class CheckpointInfo:
    """What `load_checkpoint` learned besides the weights.

    Attributes:
        path: the ``step_*`` directory read.
        step: the training step.
        run_id: the run's id (may be empty).
        model_config: the validated `ModelConfig`.
        seq_len: the training sequence length (prompts are cropped to it), or None.
        world_size: ranks that wrote the checkpoint.
    """

    path: Path
    step: int
    run_id: str
    model_config: ModelConfig
    seq_len: int | None
    world_size: int


def _is_step_dir(path: Path) -> bool:
    return path.is_dir() and (path / "manifest.json").is_file()


def find_step_dir(path: str | os.PathLike[str]) -> Path:
    """The checkpoint directory ``path`` names: a ``step_*`` directory itself, or the newest
    complete one under ``path/checkpoints`` (a run directory) or ``path`` (a checkpoints
    directory), preferring the one named in ``latest``."""
    p = Path(path).expanduser()
    if _is_step_dir(p):
        return p
    for root in (p / "checkpoints", p):
        if not root.is_dir():
            continue
        latest = root / "latest"
        if latest.is_file():
            named = root / latest.read_text(encoding="utf-8").strip()
            if _is_step_dir(named):
                return named
        steps = sorted(d for d in root.glob("step_*") if _is_step_dir(d))
        if steps:
            return steps[-1]
    if not p.exists():
        raise FileNotFoundError(f"checkpoint path {p} does not exist")
    raise FileNotFoundError(
        f"no complete checkpoint at {p}: expected a step_* directory with manifest.json, or a run "
        f"directory holding checkpoints/step_*"
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: the checkpoint is incomplete") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e


def _check_sizes(step_dir: Path, manifest: dict[str, Any], names: list[str]) -> None:
    files = manifest.get("files", {})
    for name in names:
        entry, path = files.get(name), step_dir / name
        if entry is None:
            raise ValueError(f"{step_dir}: {name} is not listed in manifest.json")
        if not path.is_file():
            raise FileNotFoundError(f"{step_dir}: {name} is missing")
        if path.stat().st_size != entry["size"]:
            raise ValueError(f"{step_dir}: {name} has {path.stat().st_size} bytes, manifest.json "
                             f"says {entry['size']} (truncated or overwritten)")


def _model_tensors(path: Path, device: str) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            return {k: f.get_tensor(k) for k in f.keys() if "/" not in k}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


def read_model_state(
    step_dir: str | os.PathLike[str], device: str = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """``(state_dict, meta, manifest)`` of a checkpoint directory, expert shards merged.

    File sizes are checked against ``manifest.json`` (not checksums: reading a large checkpoint
    twice would double the load time; nmoe-train's ``verify_checkpoint`` does that).
    """
    step_dir = Path(step_dir)
    manifest = _read_json(step_dir / "manifest.json")
    world = int(manifest.get("world_size", 1))
    rank_files = [f"rank_{r:05d}.safetensors" for r in range(world)]
    _check_sizes(step_dir, manifest, ["shared.safetensors", "meta.json", *rank_files])
    meta = _read_json(step_dir / "meta.json")
    state = _model_tensors(step_dir / "shared.safetensors", device)
    shards: dict[str, list[torch.Tensor]] = {}
    for name in rank_files:
        for key, tensor in _model_tensors(step_dir / name, device).items():
            shards.setdefault(key, []).append(tensor)
    for key, parts in shards.items():
        if key in state:
            raise ValueError(f"{step_dir}: {key} is both replicated and in rank files")
        if len(parts) != world:
            raise ValueError(f"{step_dir}: {key} is in {len(parts)} of {world} rank files; "
                             f"expert shards must be in every rank's file")
        state[key] = parts[0] if world == 1 else torch.cat(parts, dim=0)
    return state, meta, manifest


def load_checkpoint(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[Transformer, CheckpointInfo]:
    """Build the single-device model of a training checkpoint, in eval mode, on ``device``.

    Args:
        path: a run directory, its ``checkpoints`` directory or a ``step_*`` directory
            (`find_step_dir`).
        device: where the weights go.
    """
    step_dir = find_step_dir(path)
    state, meta, manifest = read_model_state(step_dir, "cpu")
    config = meta.get("config") or {}
    if "model" not in config:
        raise ValueError(f"{step_dir}/meta.json has no config.model; not an nmoe-train checkpoint")
    model_cfg = ModelConfig.model_validate(config["model"])
    # Every weight comes from the checkpoint: build on the target device and skip the seeded
    # initialisation (it draws on the CPU; minutes for a multi-billion-parameter model).
    with torch.device(device):
        model = Transformer(model_cfg, init=False)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{step_dir}: weights do not match config.model (missing {missing}, "
                         f"unexpected {unexpected})")
    model = model.to(device).eval()
    info = CheckpointInfo(
        path=step_dir, step=int(meta.get("step", 0)), run_id=str(meta.get("run_id", "")),
        model_config=model_cfg, seq_len=config.get("seq_len"),
        world_size=int(manifest.get("world_size", 1)),
    )
    return model, info
