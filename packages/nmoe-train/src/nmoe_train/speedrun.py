"""``n speedrun``: train a preset until its target validation loss and keep a leaderboard.

The leaderboard is a JSON file (``{runs_root}/LEADERBOARD.json``) with the fields of the
original's LEADERBOARD.json (inventory section 7.3): ``{schema_version, rules, runs: [...]}``; an
entry records config, hardware, GPU count, dtype, final (validation) loss, tokens and steps to
the target, wall time (training time to the target; validation excluded), whether the target
was reached, date, run id. Entries sort by config, then wall time, then steps.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
from pathlib import Path
from typing import Any

LEADERBOARD_FILE = "LEADERBOARD.json"


def leaderboard_path(runs_root: str | Path) -> Path:
    return Path(runs_root).expanduser() / LEADERBOARD_FILE


def read_leaderboard(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"schema_version": 1, "rules": {"sort_by": ["config", "wall_time_s", "steps"]},
                "runs": []}
    try:
        board = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); fix or move it away") from None
    if not isinstance(board, dict) or not isinstance(board.get("runs"), list):
        raise ValueError(f"{path} is not a leaderboard (expected an object with a 'runs' list)")
    return board


def add_entry(path: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """Append ``entry`` and rewrite the file atomically; returns the board."""
    board = read_leaderboard(path)
    board["runs"].append(entry)
    board["runs"].sort(key=lambda e: (e.get("config", ""), not e.get("target_reached", False),
                                      e.get("wall_time_s") or 0.0, e.get("steps") or 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".leaderboard.")
    with os.fdopen(fd, "w") as handle:
        json.dump(board, handle, indent=2)
        handle.write("\n")
    os.replace(tmp, path)
    return board


def format_leaderboard(board: dict[str, Any], limit: int = 20) -> str:
    runs = board.get("runs", [])
    if not runs:
        return "leaderboard is empty: run `n speedrun` to add an entry"
    header = (f"{'config':<8} {'hardware':<22} {'gpus':>4} {'dtype':<10} {'loss':>7} "
              f"{'CORE':>7} {'tokens':>14} {'steps':>7} {'wall s':>9} {'target':>6}  "
              f"{'date':<10} run")
    lines = [header, "-" * len(header)]
    for e in runs[:limit]:
        lines.append(
            f"{e.get('config', '?'):<8} {str(e.get('hardware', '?'))[:22]:<22} "
            f"{e.get('n_gpus', 0):>4} {e.get('dtype', '?'):<10} "
            f"{(e.get('final_loss') or float('nan')):>7.4f} "
            f"{(e.get('core_score') if e.get('core_score') is not None else float('nan')):>7.4f} "
            f"{e.get('tokens', 0):>14,} "
            f"{e.get('steps', 0):>7} {(e.get('wall_time_s') or 0.0):>9.1f} "
            f"{'yes' if e.get('target_reached') else 'no':>6}  {str(e.get('date', ''))[:10]:<10} "
            f"{e.get('run_id', '')}"
        )
    return "\n".join(lines)


def make_entry(cfg, result, hardware: str, n_gpus: int, precision: str) -> dict[str, Any]:
    """A leaderboard entry from a finished run (`nmoe_train.trainer.TrainResult`)."""
    reached = result.target_reached
    return {
        "config": cfg.preset,
        "hardware": hardware,
        "n_gpus": n_gpus,
        "dtype": precision,
        "final_loss": (result.final_val_loss if not reached else
                       _target_loss(result)),
        "target_loss": cfg.target_loss,
        "tokens": result.tokens_to_target if reached else result.tokens,
        "steps": result.step_to_target if reached else result.steps,
        "wall_time_s": round(result.time_to_target_s if reached else result.train_time_s, 2),
        "target_reached": reached,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "run_id": result.run_id,
        "tokens_per_s": round(result.tokens_per_s, 1),
        "core_score": result.eval.get("eval/core"),
        "core_tasks": result.eval.get("eval/core/num_tasks"),
        "fingerprint": cfg.fingerprint(),
    }


def _target_loss(result) -> float | None:
    for step, loss in reversed(getattr(result, "val_history", []) or []):
        if step == result.step_to_target:
            return loss
    return result.final_val_loss
