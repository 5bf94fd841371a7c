"""Hooks other installed packages provide to training, found at run time through entry points.

nmoe-train and nmoe-eval sit side by side in the layer diagram and never import each other;
nmoe-eval registers ``run_in_training`` in the entry-point group ``nmoe.train_hooks`` under the
name ``eval``, and the trainer looks it up here when a config asks for evaluations.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable

GROUP = "nmoe.train_hooks"


def find_hook(name: str) -> Callable | None:
    """The hook registered as ``name`` in `GROUP`, or None when no installed package has one."""
    for entry in importlib.metadata.entry_points(group=GROUP):
        if entry.name == name:
            return entry.load()
    return None


def require_eval_hook() -> Callable:
    hook = find_hook("eval")
    if hook is None:
        raise RuntimeError(
            "this config evaluates during training (eval_every > 0 or final_eval_tasks set) but "
            "nmoe-eval is not installed; install it (pip install -e packages/nmoe-eval) or set "
            "eval_every=0 final_eval_tasks=null"
        )
    return hook
