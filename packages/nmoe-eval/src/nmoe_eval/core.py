"""CORE: the DCLM 22-task in-context-learning suite (inventory 7.4, anchors 6.2).

A bundle directory (``eval_bundle/``, from ``eval_bundle.zip`` or built offline by
`nmoe_eval.offline`) holds ``eval_data/<dataset_uri>`` JSONL files, optionally ``core.yaml``
(``icl_tasks``: label, dataset_uri, num_fewshot, icl_task_type, continuation_delimiter) and
``eval_meta_data.csv`` (``Eval Task``, ``Random baseline`` in percent). `CORE_TASKS` is the built-in
definition of the 22 tasks; the bundle's files override its fields when present.

Task types and item formats:

- ``multiple_choice``: ``{"query", "choices", "gold"}``. Prompt per choice:
  ``{few-shot}{query}{delimiter}{choice}``; each few-shot example is
  ``{query}{delimiter}{gold choice}\\n\\n``. The scored span is what follows the choices' common
  token prefix.
- ``schema``: ``{"context_options", "continuation", "gold"}``. Prompt per context option:
  ``{few-shot}{option}{delimiter}{continuation}``; few-shot ``{gold option}{delimiter}
  {continuation}\\n\\n``. The scored span is the options' common token suffix.
- ``language_modeling``: ``{"context", "continuation"}``. Prompt ``{few-shot}{context.strip()}
  {delimiter}{continuation}``; few-shot ``{context.strip()}{delimiter}{continuation}\\n\\n``. The
  scored span is what the full prompt adds to the prompt without the continuation (stripped).

Every sequence starts with the BOS id (the tokenizer's end-of-text id) and is cropped on the left
to ``max_len`` tokens. Multiple-choice and schema items are correct when the gold option has the
lowest mean negative log-likelihood over its span (the first on ties); language-modelling items
when greedy decoding reproduces the whole span. Few-shot examples of item ``i`` are
``random.Random(1234 + i).sample`` of the other items; items are first shuffled with
``random.Random(1337)`` (the order ``--max-examples`` takes from), and few-shot examples come from
the whole shuffled task, so the first N items score the same whatever N is.
``centered = (acc - b) / (1 - b)`` with ``b`` the random baseline (not clamped); CORE is the mean
of the centered accuracies over the tasks evaluated.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from nmoe_eval.scoring import ScoreRequest, ScoreResult

__all__ = [
    "CORE_TASKS",
    "CoreTask",
    "CoreTaskSpec",
    "fewshot_indices",
    "load_core_tasks",
    "render_prompts",
]

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")


@dataclass(frozen=True)
class CoreTaskSpec:
    """One CORE task: its label, data file, type, shots, delimiter and random baseline (0-1)."""

    label: str
    dataset_uri: str
    task_type: str
    num_fewshot: int
    delimiter: str
    baseline: float


def _spec(label, uri, kind, shots, baseline, delimiter=" "):
    kinds = {"mc": "multiple_choice", "schema": "schema", "lm": "language_modeling"}
    return CoreTaskSpec(label, uri, kinds[kind], shots, delimiter, baseline / 100.0)


_ANSWER = "\nAnswer: "
# Shots, types and delimiters: inventory 7.4 / the DCLM task YAML; random baselines: DCLM's
# eval_meta_data.csv (bigbench_language_identification is listed there as 9.1 %, but its items
# have four choices, so 25 % is used; a bundle's own CSV always takes precedence).
CORE_TASKS: tuple[CoreTaskSpec, ...] = (
    _spec("hellaswag_zeroshot", "language_understanding/hellaswag.jsonl", "mc", 0, 25),
    _spec("jeopardy", "world_knowledge/jeopardy_all.jsonl", "lm", 10, 0, _ANSWER),
    _spec("bigbench_qa_wikidata", "world_knowledge/bigbench_qa_wikidata.jsonl", "lm", 10, 0),
    _spec("arc_easy", "world_knowledge/arc_easy.jsonl", "mc", 10, 25, _ANSWER),
    _spec("arc_challenge", "world_knowledge/arc_challenge.jsonl", "mc", 10, 25, _ANSWER),
    _spec("copa", "commonsense_reasoning/copa.jsonl", "mc", 0, 50),
    _spec("commonsense_qa", "commonsense_reasoning/commonsense_qa.jsonl", "mc", 10, 20),
    _spec("piqa", "commonsense_reasoning/piqa.jsonl", "mc", 10, 50, _ANSWER),
    _spec("openbook_qa", "commonsense_reasoning/openbook_qa.jsonl", "mc", 0, 25),
    _spec("lambada_openai", "language_understanding/lambada_openai.jsonl", "lm", 0, 0),
    _spec("hellaswag", "language_understanding/hellaswag.jsonl", "mc", 10, 25),
    _spec("winograd", "language_understanding/winograd_wsc.jsonl", "schema", 0, 50),
    _spec("winogrande", "language_understanding/winogrande.jsonl", "schema", 0, 50),
    _spec("bigbench_dyck_languages", "symbolic_problem_solving/bigbench_dyck_languages.jsonl",
          "lm", 10, 0),
    _spec("agi_eval_lsat_ar", "symbolic_problem_solving/agi_eval_lsat_ar.jsonl", "mc", 3, 20),
    _spec("bigbench_cs_algorithms", "symbolic_problem_solving/bigbench_cs_algorithms.jsonl",
          "lm", 10, 0),
    _spec("bigbench_operators", "symbolic_problem_solving/bigbench_operators.jsonl", "lm", 10, 0),
    _spec("bigbench_repeat_copy_logic",
          "symbolic_problem_solving/bigbench_repeat_copy_logic.jsonl", "lm", 10, 0),
    _spec("squad", "reading_comprehension/squad.jsonl", "lm", 10, 0),
    _spec("coqa", "reading_comprehension/coqa.jsonl", "lm", 0, 0),
    _spec("boolq", "reading_comprehension/boolq.jsonl", "mc", 10, 62, _ANSWER),
    _spec("bigbench_language_identification",
          "language_understanding/bigbench_language_identification.jsonl", "mc", 10, 25),
)

SHUFFLE_SEED = 1337
FEWSHOT_SEED = 1234


# ---------------------------------------------------------------------------------------------
# Prompts


def render_prompts(
    task_type: str, item: dict[str, Any], delimiter: str, fewshot: list[dict[str, Any]]
) -> list[str]:
    """The prompt strings of one item (module docstring): one per choice / context option for
    ``multiple_choice`` / ``schema``; ``[without continuation (stripped), with continuation]``
    for ``language_modeling``."""
    if task_type == "multiple_choice":
        shots = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n"
                        for ex in fewshot)
        return [f"{shots}{item['query']}{delimiter}{choice}" for choice in item["choices"]]
    if task_type == "schema":
        shots = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n"
                        for ex in fewshot)
        return [f"{shots}{option}{delimiter}{item['continuation']}"
                for option in item["context_options"]]
    if task_type == "language_modeling":
        shots = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n"
                        for ex in fewshot)
        head = f"{shots}{item['context'].strip()}{delimiter}"
        return [head.strip(), head + item["continuation"]]
    raise ValueError(f"unknown CORE task type {task_type!r}; expected one of {TASK_TYPES}")


def fewshot_indices(num_items: int, index: int, k: int) -> list[int]:
    """``random.Random(1234 + index).sample`` of ``k`` item indices other than ``index``.

    Equal to sampling from the explicit list ``[j for j in range(n) if j != index]`` (what the
    reference implementation does) without building it: `random.sample` picks positions in the
    population, and position ``p`` of that list is ``p + (p >= index)``.
    """
    if k <= 0:
        return []
    if k > num_items - 1:
        raise ValueError(f"cannot draw {k} few-shot examples from {num_items - 1} other items")
    picks = random.Random(FEWSHOT_SEED + index).sample(range(num_items - 1), k)
    return [p + (p >= index) for p in picks]


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def _common_suffix(seqs: list[list[int]]) -> int:
    return _common_prefix([s[::-1] for s in seqs])


def _crop(tokens: list[int], start: int, end: int, max_len: int) -> ScoreRequest:
    if len(tokens) > max_len:
        cut = len(tokens) - max_len
        tokens, start, end = tokens[cut:], start - cut, end - cut
    start = max(1, min(start, end - 1))
    return ScoreRequest(tuple(tokens), start, end)


def build_requests(
    task_type: str, prompts: list[str], encode, bos_id: int, max_len: int
) -> list[ScoreRequest]:
    """Token sequences and scored spans of one item's prompts (`render_prompts`).

    Args:
        encode: ``str -> list[int]`` (ordinary text, no special tokens).
        bos_id: prepended to every sequence.
        max_len: sequences are cropped on the left to this many tokens.
    """
    seqs = [[bos_id, *encode(p)] for p in prompts]
    if task_type == "multiple_choice":
        start = _common_prefix(seqs)
        return [_crop(s, start, len(s), max_len) for s in seqs]
    if task_type == "schema":
        suffix = max(1, _common_suffix(seqs))
        return [_crop(s, len(s) - suffix, len(s), max_len) for s in seqs]
    without, full = seqs
    # The prompt without the continuation is normally a token prefix of the full prompt; where a
    # merge crosses the boundary, the span starts at the first differing token.
    start = _common_prefix([without, full])
    return [_crop(full, start, len(full), max_len)]


def judge(task_type: str, results: list[ScoreResult], gold: int | None) -> bool:
    """Whether an item is answered correctly (module docstring)."""
    if task_type == "language_modeling":
        return results[0].greedy
    means = [r.mean_nll for r in results]
    return means.index(min(means)) == gold


# ---------------------------------------------------------------------------------------------
# Tasks and bundles


@dataclass
class CoreTask:
    """A loaded CORE task: its spec and items (shuffled with seed 1337)."""

    spec: CoreTaskSpec
    items: list[dict[str, Any]]
    path: Path

    @property
    def name(self) -> str:
        return self.spec.label

    def __len__(self) -> int:
        return len(self.items)

    def prompts(self, index: int) -> list[str]:
        """The rendered prompts of item ``index`` (with its few-shot examples)."""
        spec = self.spec
        shots = min(spec.num_fewshot, len(self.items) - 1)
        fewshot = [self.items[j] for j in fewshot_indices(len(self.items), index, shots)]
        return render_prompts(spec.task_type, self.items[index], spec.delimiter, fewshot)

    def requests(self, index: int, encode, bos_id: int, max_len: int) -> list[ScoreRequest]:
        return build_requests(self.spec.task_type, self.prompts(index), encode, bos_id, max_len)

    def correct(self, index: int, results: list[ScoreResult]) -> bool:
        return judge(self.spec.task_type, results, self.items[index].get("gold"))


_REQUIRED = {
    "multiple_choice": ("query", "choices", "gold"),
    "schema": ("context_options", "continuation", "gold"),
    "language_modeling": ("context", "continuation"),
}


def _read_items(path: Path, spec: CoreTaskSpec) -> list[dict[str, Any]]:
    items = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from e
            missing = [k for k in _REQUIRED[spec.task_type] if k not in item]
            if missing:
                raise ValueError(f"{path}:{lineno}: a {spec.task_type} item needs fields "
                                 f"{list(_REQUIRED[spec.task_type])}; missing {missing}")
            items.append(item)
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def _bundle_overrides(bundle: Path) -> dict[str, dict[str, Any]]:
    """``{label: fields}`` from ``core.yaml`` and ``eval_meta_data.csv`` where present."""
    out: dict[str, dict[str, Any]] = {}
    config = bundle / "core.yaml"
    if config.is_file():
        import yaml

        data = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
        for task in data.get("icl_tasks", []):
            shots = task.get("num_fewshot", [0])
            fields = {
                "dataset_uri": task["dataset_uri"],
                "task_type": task["icl_task_type"],
                "num_fewshot": int(shots[0] if isinstance(shots, list) else shots),
                "delimiter": task.get("continuation_delimiter", " "),
            }
            out.setdefault(task["label"], {}).update(fields)
    meta = bundle / "eval_meta_data.csv"
    if meta.is_file():
        with meta.open(encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f):
                label, base = row.get("Eval Task"), row.get("Random baseline")
                if label and base not in (None, ""):
                    out.setdefault(label, {})["baseline"] = float(base) / 100.0
    return out


def _find_data(bundle: Path, uri: str) -> Path | None:
    data = bundle / "eval_data"
    for candidate in (data / uri, bundle / uri):
        if candidate.is_file():
            return candidate
    matches = sorted(data.rglob(Path(uri).name)) if data.is_dir() else []
    return matches[0] if matches else None


def load_core_tasks(
    bundle_dir: str | Path, labels: list[str] | None = None
) -> tuple[list[CoreTask], list[tuple[str, str]]]:
    """Load CORE tasks from a bundle directory.

    Args:
        bundle_dir: the ``eval_bundle`` directory (module docstring).
        labels: task labels to load (default: all 22, in `CORE_TASKS` order).

    Returns:
        ``(tasks, missing)``: the tasks found and ``(label, reason)`` for each task whose data
        file is absent.
    """
    bundle = Path(bundle_dir).expanduser()
    if not bundle.is_dir():
        raise FileNotFoundError(
            f"CORE bundle directory {bundle} does not exist; run `n eval prep-core {bundle.parent}`"
        )
    known = {s.label: s for s in CORE_TASKS}
    wanted = labels or [s.label for s in CORE_TASKS]
    unknown = [label for label in wanted if label not in known]
    if unknown:
        raise ValueError(f"unknown CORE task(s) {unknown}; known: {', '.join(known)}")
    overrides = _bundle_overrides(bundle)
    tasks, missing = [], []
    for label in wanted:
        spec = replace(known[label], **overrides.get(label, {}))
        if spec.task_type not in TASK_TYPES:
            raise ValueError(f"{bundle}: task {label} has icl_task_type {spec.task_type!r}; "
                             f"expected one of {TASK_TYPES}")
        path = _find_data(bundle, spec.dataset_uri)
        if path is None:
            missing.append((label, f"no {spec.dataset_uri} under {bundle / 'eval_data'}"))
            continue
        items = _read_items(path, spec)
        random.Random(SHUFFLE_SEED).shuffle(items)
        tasks.append(CoreTask(spec, items, path))
    return tasks, missing


def centered(acc: float, baseline: float) -> float:
    """``(acc - baseline) / (1 - baseline)``."""
    return (acc - baseline) / (1.0 - baseline)
