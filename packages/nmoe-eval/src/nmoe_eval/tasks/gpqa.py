"""GPQA (diamond): graduate-level multiple choice, answered by generation, scored on the letter.

Online only (``Idavidrein/gpqa``, config ``gpqa_diamond``, a gated dataset: log in with
``huggingface-cli login`` first). The correct answer is listed first in the source, so each
question's four options are shuffled with ``random.Random(index)``. Prompt:
``Question: ...\\nA) ...\\nB) ...\\nC) ...\\nD) ...\\nAnswer:``; up to 32 tokens are generated.

`extract_letter` fixes the original's bug (inventory 8, 12: the regex never matched). In order of
preference it reads: the last "answer is (X)" / "answer: X" (any case), a letter at the very
start ("B", "(B)", "B)", "B."), the first parenthesised letter "(X)" (any case), else the first
standalone capital A-D; an "A" followed by a lower-case word is the article and never counts.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from nmoe_eval.tasks.sources import load_hf

__all__ = ["GpqaTask", "extract_letter", "load_gpqa"]

_STATED = re.compile(r"answer\s*(?:is|:)\s*:?\s*\(?\s*([A-D])\b", re.IGNORECASE)
# "A" followed by a lower-case word is the article, not an answer.
_LEADING = re.compile(r"^\s*\(?([B-D]|A(?!\s+[a-z]))(?:[).:]|\s|$)")
_PAREN = re.compile(r"\(([A-Da-d])\)")
_STANDALONE = re.compile(r"\b([B-D]|A(?!\s+[a-z]))\b")


def extract_letter(text: str) -> str | None:
    """The answer letter A-D of a completion (module docstring), or None."""
    stated = _STATED.findall(text)
    if stated:
        return stated[-1].upper()
    for pattern in (_LEADING, _PAREN, _STANDALONE):
        match = pattern.search(text)
        if match:
            return match.group(1).upper()
    return None


@dataclass
class GpqaTask:
    questions: list[tuple[str, list[str], int]]  # (question, 4 options, gold index)
    name: str = "gpqa"
    stop_strings: tuple[str, ...] = ("\n\n", "Question:")
    max_new_tokens: int = 32

    def __len__(self) -> int:
        return len(self.questions)

    def prompt(self, index: int, shots: int | None = None) -> str:
        question, options, _ = self.questions[index]
        listing = "".join(f"\n{'ABCD'[i]}) {o}" for i, o in enumerate(options))
        return f"Question: {question.strip()}{listing}\nAnswer:"

    def score(self, index: int, completions: list[str]) -> dict[str, float]:
        gold = "ABCD"[self.questions[index][2]]
        return {"acc": float(extract_letter(completions[0]) == gold)}


def make_question(index: int, question: str, correct: str, wrong: list[str]):
    options = [correct, *wrong]
    order = list(range(4))
    random.Random(index).shuffle(order)
    return question, [options[i].strip() for i in order], order.index(0)


def load_gpqa(source: str = "auto") -> GpqaTask:
    if source == "offline":
        raise FileNotFoundError("gpqa has no offline source (no package ships it); use "
                                "source='online' with access to Idavidrein/gpqa")
    rows = load_hf("Idavidrein/gpqa", "gpqa_diamond", "train", "gpqa")
    return GpqaTask([make_question(i, r["Question"], r["Correct Answer"],
                                   [r[f"Incorrect Answer {k}"] for k in (1, 2, 3)])
                     for i, r in enumerate(rows)])
