"""Tasks besides CORE: log-likelihood choice tasks and generation tasks.

- choice (`nmoe_eval.tasks.choice`): mmlu, mmlu_pro, arc_easy, arc_challenge, hellaswag, boolq,
  openbookqa, winogrande, copa, piqa;
- generation: gsm8k (`nmoe_eval.tasks.gsm8k`), gpqa (`nmoe_eval.tasks.gpqa`), humaneval
  (`nmoe_eval.tasks.humaneval`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nmoe_eval.tasks.choice import CHOICE_TASKS, load_choice_task

__all__ = ["CHOICE_TASKS", "GENERATION_TASKS", "GENERATION_BASELINES", "load_choice_task",
           "load_generation_task"]


def _gsm8k(source: str, shots: int | None):
    from nmoe_eval.tasks.gsm8k import load_gsm8k

    return load_gsm8k(source, 5 if shots is None else shots)


def _gpqa(source: str, shots: int | None):
    from nmoe_eval.tasks.gpqa import load_gpqa

    return load_gpqa(source)


def _humaneval(source: str, shots: int | None):
    from nmoe_eval.tasks.humaneval import load_humaneval

    return load_humaneval(source)


GENERATION_TASKS: dict[str, Callable[[str, int | None], Any]] = {
    "gsm8k": _gsm8k,
    "gpqa": _gpqa,
    "humaneval": _humaneval,
}
"""name -> loader(source, shots)."""

GENERATION_BASELINES: dict[str, float | None] = {"gsm8k": 0.0, "gpqa": 0.25, "humaneval": 0.0}


def load_generation_task(name: str, source: str = "auto", shots: int | None = None) -> Any:
    """Load generation task ``name`` (a key of `GENERATION_TASKS`)."""
    if name not in GENERATION_TASKS:
        raise ValueError(f"unknown generation task {name!r}; known: {', '.join(GENERATION_TASKS)}")
    return GENERATION_TASKS[name](source, shots)
