"""The verbs nmoe-train adds to ``n``: ``train``, ``speedrun``, ``data``, ``mon``, ``viz``.

Imports of torch and the trainer happen inside the verbs, so ``n --help`` stays fast.
Under torchrun: ``torchrun --nproc_per_node 8 -m nmoe_train train super``.
"""

from __future__ import annotations

import argparse
import signal
import sys

from nmoe_core.cli import Command

_OVERRIDES_HELP = (
    "key=value overrides with dotted keys, e.g. steps=200 model.moe.n_routed_experts=16 "
    "optim.lr_dense=1e-3 data.sources='[{\"path\": \"/data/fineweb\"}]'"
)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _resolve(spec: str, overrides: list[str]):
    from nmoe_core.config import ConfigKeyError
    from nmoe_train.config import ConfigFileError, resolve_config

    try:
        return resolve_config(spec, overrides), None
    except (ConfigKeyError, ConfigFileError, ValueError) as err:
        return None, str(err)


def _train(cfg, run_dir: str | None = None):
    """Build and run a `Trainer`: ``(trainer, result)``, or ``(None, exit code)`` after one
    ``error:`` line for a config, data or checkpoint problem (2), Ctrl-C (130) or SIGTERM (143)."""
    from nmoe_train.checkpoint import CheckpointError
    from nmoe_train.config import ConfigFileError
    from nmoe_train.data import DataError
    from nmoe_train.distributed import shutdown_distributed
    from nmoe_train.trainer import Terminated, Trainer

    try:
        trainer = Trainer(cfg, run_dir=run_dir)
        result = trainer.run()
    except (ConfigFileError, DataError, CheckpointError) as err:
        return None, _fail(str(err))
    except Terminated:
        print("terminated (SIGTERM)", file=sys.stderr)
        return None, 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return None, 130
    shutdown_distributed()
    return trainer, result


def train_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="n train", description="Train a model from a preset or a TOML config."
    )
    parser.add_argument("config", help="preset name (tiny, super, ultra, moonlet, moonlight) "
                                       "or a TOML file")
    parser.add_argument("overrides", nargs="*", help=_OVERRIDES_HELP)
    parser.add_argument("--run-dir", help="run directory (default: runs_root/run_name)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as JSON and exit")
    args = parser.parse_intermixed_args(argv)
    cfg, error = _resolve(args.config, args.overrides)
    if error:
        return _fail(error)
    if args.print_config:
        print(cfg.model_dump_json(indent=2))
        return 0
    trainer, result = _train(cfg, run_dir=args.run_dir)
    if trainer is None:
        return result
    return 0 if result.status in ("completed", "target_reached", "time_limit") else 1


def speedrun_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="n speedrun",
        description="Train a preset until its target validation loss, then record it on the "
                    "leaderboard (runs_root/LEADERBOARD.json).",
    )
    parser.add_argument("preset", nargs="?", help="tiny, super, ... (default: super with a GPU, "
                                                 "tiny without)")
    parser.add_argument("overrides", nargs="*", help=_OVERRIDES_HELP)
    parser.add_argument("--leaderboard", action="store_true", help="only print the leaderboard")
    parser.add_argument("--runs-root", default=None, help="where runs and the leaderboard live")
    args = parser.parse_intermixed_args(argv)
    from nmoe_train.speedrun import (
        add_entry,
        format_leaderboard,
        leaderboard_path,
        make_entry,
        read_leaderboard,
    )

    preset = args.preset
    overrides = list(args.overrides)
    if preset and "=" in preset:
        overrides.insert(0, preset)
        preset = None
    if args.runs_root:
        overrides.append(f"runs_root={args.runs_root}")
    if args.leaderboard:
        # The board of the runs root the same command line would train under (a TOML config or
        # a runs_root= override may name it, as --runs-root does).
        runs_root = "runs"
        if preset or overrides:
            cfg, error = _resolve(preset or "tiny", overrides)
            if error:
                return _fail(error)
            runs_root = cfg.runs_root
        try:
            board = read_leaderboard(leaderboard_path(runs_root))
        except ValueError as err:
            return _fail(str(err))
        print(format_leaderboard(board))
        return 0
    import torch

    if preset is None:
        preset = "super" if torch.cuda.is_available() else "tiny"
        print(f"speedrun: no preset given; {'a GPU is' if preset == 'super' else 'no GPU is'} "
              f"present, so running `{preset}`", file=sys.stderr)
    cfg, error = _resolve(preset, overrides)
    if error:
        return _fail(error)
    if cfg.target_loss is None:
        return _fail(f"preset {preset!r} has no target_loss; pass target_loss=VALUE")
    if cfg.val_every == 0:
        return _fail("a speedrun needs validation: set val_every > 0")
    try:  # a board that cannot take the entry is found now, not after the training
        read_leaderboard(leaderboard_path(cfg.runs_root))
    except ValueError as err:
        return _fail(str(err))
    import time

    if cfg.run_name is None:
        cfg = cfg.model_copy(update={"run_name": f"speedrun-{preset}-{int(time.time())}",
                                     "resume": False})
    from nmoe_train.trainer import _hardware_name

    trainer, result = _train(cfg)
    if trainer is None:
        return result
    if trainer.dist.is_main:
        result.val_history = trainer.val_history
        entry = make_entry(cfg, result, _hardware_name(trainer.device),
                           trainer.dist.world_size if trainer.device.type == "cuda" else 0,
                           trainer.precision)
        board = add_entry(leaderboard_path(cfg.runs_root), entry)
        print(format_leaderboard(board))
        verdict = "reached" if result.target_reached else "did NOT reach"
        loss = entry["final_loss"]
        print(f"\nspeedrun {preset}: {verdict} target {cfg.target_loss} "
              f"(val loss {'none' if loss is None else f'{loss:.4f}'}) in {entry['steps']} steps, "
              f"{entry['wall_time_s']:.1f} s of training", file=sys.stderr)
    return 0 if result.target_reached else 1


def data_main(argv: list[str]) -> int:
    from nmoe_train.data import data_main as run

    return run(argv)


def mon_main(argv: list[str]) -> int:
    from nmoe_train.monitor import mon_main as run

    return run(argv)


def viz_main(argv: list[str]) -> int:
    from nmoe_train.report import viz_main as run

    return run(argv)


def main(argv: list[str] | None = None) -> int:
    """``python -m nmoe_train VERB ...`` (what torchrun launches)."""
    argv = sys.argv[1:] if argv is None else argv
    verbs = {"train": train_main, "speedrun": speedrun_main, "data": data_main,
             "mon": mon_main, "viz": viz_main}
    if not argv or argv[0] not in verbs:
        print(f"usage: python -m nmoe_train {{{','.join(verbs)}}} ...", file=sys.stderr)
        return 2
    return verbs[argv[0]](argv[1:])


train_command = Command("train", "train a model from a preset or TOML config", train_main)
speedrun_command = Command("speedrun", "train to a target loss and record it on the leaderboard",
                           speedrun_main)
data_command = Command("data", "prepare, verify and inspect token datasets", data_main)
mon_command = Command("mon", "live terminal view of a training run", mon_main)
viz_command = Command("viz", "write an HTML report of a training run", viz_main)
