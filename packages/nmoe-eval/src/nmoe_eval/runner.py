"""Run evaluation tasks on a live model: the engine behind ``n eval`` and `run_in_training`.

Task names (`parse_tasks`): ``core`` (the CORE suite), ``core:<label>`` (one CORE task), the
choice tasks (``mmlu``, ``arc_easy``, ...) and the generation tasks (``gsm8k``, ``gpqa``,
``humaneval``), comma-separated.

Examples are taken in a fixed shuffled order (``random.Random(1337)``; CORE shuffles at load) and
cut to ``max_examples``. With ``world_size > 1`` every rank takes ``examples[rank::world]``,
padded with dummy copies of the first example to ``ceil(N / world)`` (scored, never counted), so
all ranks run the same number of model forwards in the same order; the only collectives are the
``all_reduce`` calls the caller passes (a SUM), made once per chunk of examples to agree on the
number of forwards and once per task for the counts. No barriers inside loops.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nmoe_core.generate import generate
from nmoe_core.progress import Progress
from nmoe_core.tokenizer import get_tokenizer, tokenizer_info
from nmoe_eval.core import CORE_TASKS, CoreTask, centered, load_core_tasks
from nmoe_eval.offline import OFFLINE_BUILDERS, build_offline_bundle, default_cache_dir
from nmoe_eval.scoring import score_requests
from nmoe_eval.tasks import (
    CHOICE_TASKS,
    GENERATION_BASELINES,
    GENERATION_TASKS,
    load_choice_task,
    load_generation_task,
)

__all__ = ["EvalOptions", "Evaluator", "TaskResult", "parse_tasks", "run_in_training"]

SHUFFLE_SEED = 1337
CHUNK_EXAMPLES = 256  # examples whose requests are built and scored together


@dataclass
class EvalOptions:
    """Knobs of an evaluation.

    Attributes:
        max_examples: examples per task at most (None: all).
        max_len: context length in tokens; longer prompts are cropped on the left (None: the
            model's ``max_position_embeddings``).
        max_batch_tokens: padded tokens per scoring forward.
        bundle_dir: the CORE bundle (None: ``~/.cache/nmoe/eval/eval_bundle``, built offline at
            first use when absent).
        source: ``auto``, ``offline`` or ``online`` data for non-CORE tasks.
        shots: few-shot examples for generation tasks (None: the task's default).
        gen_batch_size: prompts per generation batch.
        max_new_tokens: tokens generated per prompt (None: the task's default, at most half of
            ``max_len``).
        samples: completions per prompt (HumanEval pass@k needs ``samples >= k``).
        temperature: 0 = greedy; sampling needs > 0 (default 0.8 when ``samples > 1``).
        seed: seeds sampling.
        autocast_dtype: compute dtype for the forwards (None: float32; bf16 is typical on GPU).
        progress: draw a progress bar per task (rank 0).

    Counts are checked at construction (``max_examples``, ``max_batch_tokens``,
    ``gen_batch_size``, ``max_new_tokens``, ``samples`` >= 1; ``max_len`` >= 2; ``shots``,
    ``temperature`` >= 0): a bad value raises ValueError naming the field.
    """

    max_examples: int | None = None
    max_len: int | None = None
    max_batch_tokens: int = 8192
    bundle_dir: Path | None = None
    source: str = "auto"
    shots: int | None = None
    gen_batch_size: int = 16
    max_new_tokens: int | None = None
    samples: int = 1
    temperature: float | None = None
    seed: int = 0
    autocast_dtype: torch.dtype | None = None
    progress: bool = False

    def __post_init__(self) -> None:
        lower = {"max_examples": 1, "max_len": 2, "max_batch_tokens": 1, "shots": 0,
                 "gen_batch_size": 1, "max_new_tokens": 1, "samples": 1, "temperature": 0}
        for name, lo in lower.items():
            value = getattr(self, name)
            if value is not None and value < lo:
                raise ValueError(f"EvalOptions.{name} must be >= {lo}, got {value}")


@dataclass
class TaskResult:
    """One task's outcome: metric means over ``n`` examples, elapsed seconds."""

    task: str
    suite: str
    n: int
    metrics: dict[str, float]
    elapsed_s: float
    baseline: float | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)  # a few completions (rank 0)


@dataclass
class EvalReport:
    """All results of one `Evaluator.run`, and the CORE summary when CORE tasks ran."""

    results: list[TaskResult] = field(default_factory=list)
    core: dict[str, Any] | None = None
    elapsed_s: float = 0.0


def parse_tasks(spec: str | Sequence[str]) -> list[str]:
    """Expand a task list (``"core,mmlu"``) into task names; unknown names are an error."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    core_labels = [s.label for s in CORE_TASKS]
    for raw in (n.strip() for n in names):
        if not raw:
            continue
        if raw == "core":
            out += [f"core:{s.label}" for s in CORE_TASKS]
        elif raw.startswith("core:"):
            if raw[5:] not in core_labels:
                raise ValueError(f"unknown CORE task {raw[5:]!r} in {raw!r}; known labels: "
                                 f"{', '.join(core_labels)}")
            out.append(raw)
        elif raw in CHOICE_TASKS or raw in GENERATION_TASKS:
            out.append(raw)
        else:
            raise ValueError(f"unknown task {raw!r}; known: core, core:<label>, "
                             f"{', '.join([*CHOICE_TASKS, *GENERATION_TASKS])}")
    if not out:
        raise ValueError(f"no task named in {spec!r}; name at least one, e.g. 'core' or 'mmlu'")
    return list(dict.fromkeys(out))


def shard(indices: Sequence[int], rank: int, world_size: int) -> list[int | None]:
    """``indices[rank::world_size]`` padded with None to ``ceil(len / world_size)``."""
    mine: list[int | None] = list(indices[rank::world_size])
    return mine + [None] * (math.ceil(len(indices) / world_size) - len(mine))


def _select(n: int, max_examples: int | None, shuffled: bool) -> list[int]:
    order = list(range(n))
    if not shuffled:
        random.Random(SHUFFLE_SEED).shuffle(order)
    return order[:max_examples] if max_examples is not None else order


class Evaluator:
    """Evaluates tasks on one model replica (one rank of ``world_size``).

    Args:
        model: a `nmoe_core.model.Transformer`; used in eval mode under ``torch.no_grad``.
        tokenizer_name: the model's tokenizer (`nmoe_core.tokenizer`).
        options: `EvalOptions`.
        rank, world_size: this replica's place (examples are sharded over ranks).
        all_reduce: SUM over ranks of a tensor on ``device`` (returns the reduced tensor; may
            work in place); required when ``world_size > 1``.
        device: where the model lives.
    """

    def __init__(self, model: torch.nn.Module, tokenizer_name: str, options: EvalOptions,
                 rank: int = 0, world_size: int = 1,
                 all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 device: torch.device | str = "cpu") -> None:
        if world_size > 1 and all_reduce is None:
            raise ValueError("world_size > 1 needs all_reduce (a SUM over ranks)")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.model, self.options = model, options
        self.rank, self.world_size, self._all_reduce = rank, world_size, all_reduce
        self.device = torch.device(device)
        self.enc = get_tokenizer(tokenizer_name)
        self.info = tokenizer_info(tokenizer_name)
        self.bos_id = self.info.eos_id
        positions = model.cfg.attention.max_position_embeddings
        self.max_len = options.max_len or positions
        if self.max_len > positions:
            raise ValueError(f"max_len {self.max_len} exceeds the model's "
                             f"attention.max_position_embeddings ({positions}); evaluate with "
                             f"max_len <= {positions}")

    # -- collectives ---------------------------------------------------------------------------

    def _reduce(self, values: list[float]) -> list[float]:
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        return self._all_reduce(t).cpu().tolist()

    def _sync_max(self, count: int) -> int:
        """The largest ``count`` over ranks (a SUM of one-hot rows)."""
        if self.world_size == 1:
            return count
        row = [0.0] * self.world_size
        row[self.rank] = float(count)
        return int(max(self._reduce(row)))

    def barrier(self) -> None:
        self._reduce([0.0])

    # -- helpers -------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def _bar(self, total: int, desc: str):
        if self.options.progress and self.rank == 0:
            return Progress(total=total, desc=desc, unit="ex")
        return contextlib.nullcontext()

    # -- scored tasks (CORE, choice) -----------------------------------------------------------

    def _score_task(self, task, selected: list[int], judge: Callable, names: list[str],
                    desc: str) -> tuple[list[float], int]:
        """Sum of each metric over this task's examples (all ranks) and their number."""
        mine = shard(selected, self.rank, self.world_size)
        sums = [0.0] * len(names)
        count = 0
        with self._bar(len(mine), desc) as bar:
            for lo in range(0, len(mine), CHUNK_EXAMPLES):
                chunk = mine[lo : lo + CHUNK_EXAMPLES]
                requests, spans = [], []
                for idx in chunk:
                    reqs = task.requests(selected[0] if idx is None else idx, self.encode,
                                         self.bos_id, self.max_len)
                    spans.append((len(requests), len(reqs)))
                    requests += reqs
                results = score_requests(
                    self.model, requests, pad_id=self.bos_id, device=self.device,
                    max_batch_tokens=self.options.max_batch_tokens,
                    autocast_dtype=self.options.autocast_dtype,
                    sync=self._sync_max if self.world_size > 1 else None,
                )
                for idx, (first, num) in zip(chunk, spans, strict=True):
                    if idx is None:
                        continue
                    values = judge(idx, results[first : first + num])
                    sums = [s + values[name] for s, name in zip(sums, names, strict=True)]
                    count += 1
                if bar is not None and hasattr(bar, "update"):
                    bar.update(len(chunk))
        reduced = self._reduce([*sums, float(count)])
        return reduced[:-1], int(reduced[-1])

    def run_core_task(self, task: CoreTask) -> TaskResult:
        start = time.monotonic()
        selected = _select(len(task), self.options.max_examples, shuffled=True)

        def judge(idx, results):
            return {"acc": float(task.correct(idx, results))}

        (acc_sum,), n = self._score_task(task, selected, judge, ["acc"], f"core/{task.name}")
        acc = acc_sum / max(n, 1)
        metrics = {"acc": acc, "centered": centered(acc, task.spec.baseline)}
        return TaskResult(f"core/{task.name}", "core", n, metrics, time.monotonic() - start,
                          task.spec.baseline)

    def run_choice_task(self, name: str) -> TaskResult:
        start = time.monotonic()
        task = load_choice_task(name, self.options.source)
        selected = _select(len(task), self.options.max_examples, shuffled=False)
        (acc, acc_norm), n = self._score_task(task, selected, task.metrics, ["acc", "acc_norm"],
                                              name)
        acc, acc_norm = acc / max(n, 1), acc_norm / max(n, 1)
        metrics = {"acc": acc, "acc_norm": acc_norm, "centered": centered(acc, task.baseline)}
        return TaskResult(name, "choice", n, metrics, time.monotonic() - start, task.baseline)

    # -- generation tasks ----------------------------------------------------------------------

    def _prompt_tokens(self, task, idx: int, budget: int) -> list[int]:
        """The prompt of ``idx`` within ``budget`` tokens: fewer shots first, then a left crop."""
        shots = self.options.shots if self.options.shots is not None else getattr(task, "shots",
                                                                                  0)
        tokens = [self.bos_id, *self.encode(task.prompt(idx, shots))]
        while len(tokens) > budget and shots > 0:
            shots -= 1
            tokens = [self.bos_id, *self.encode(task.prompt(idx, shots))]
        return tokens[-budget:]

    def _stop_ids(self, strings: Sequence[str]) -> list[int]:
        ids = [self.info.eos_id]
        for s in strings:
            toks = self.encode(s)
            if len(toks) == 1:
                ids.append(toks[0])
        return ids

    def run_generation_task(self, name: str) -> TaskResult:
        start = time.monotonic()
        opts = self.options
        task = load_generation_task(name, opts.source, opts.shots)
        selected = _select(len(task), opts.max_examples, shuffled=False)
        mine = shard(selected, self.rank, self.world_size)
        # The task's default length, at most half the context (the tiny preset trains at 256).
        max_new = opts.max_new_tokens or min(task.max_new_tokens, self.max_len // 2)
        budget = self.max_len - max_new
        if budget < 8:
            raise ValueError(f"max_len {self.max_len} leaves {budget} prompt tokens after "
                             f"{max_new} new tokens; raise max_len or lower max_new_tokens")
        temperature = opts.temperature if opts.temperature is not None else (
            0.8 if opts.samples > 1 else 0.0)
        stop_ids = self._stop_ids(task.stop_strings)
        sums: dict[str, float] = {}
        count = 0
        shown: list[dict[str, Any]] = []
        per_batch = max(1, opts.gen_batch_size // opts.samples)
        autocast = (torch.autocast(self.device.type, dtype=opts.autocast_dtype)
                    if opts.autocast_dtype is not None else contextlib.nullcontext())
        with self._bar(len(mine), name) as bar:
            for b, lo in enumerate(range(0, len(mine), per_batch)):
                chunk = mine[lo : lo + per_batch]
                rows = [self._prompt_tokens(task, selected[0] if i is None else i, budget)
                        for i in chunk for _ in range(opts.samples)]
                with autocast:
                    outs = generate(
                        self.model, rows, max_new, temperature=temperature,
                        stop_token_ids=stop_ids, seed=opts.seed + 7919 * b + 104729 * self.rank,
                        vocab_size=self.info.n_vocab, run_all_steps=self.world_size > 1,
                    )
                for j, idx in enumerate(chunk):
                    if idx is None:
                        continue
                    texts = [_cut(self.enc.decode(o), task.stop_strings)
                             for o in outs[j * opts.samples : (j + 1) * opts.samples]]
                    scores = task.score(idx, texts)
                    for key, value in scores.items():
                        sums[key] = sums.get(key, 0.0) + value
                    count += 1
                    if len(shown) < 3:
                        shown.append({"index": idx, "completion": texts[0], **scores})
                if bar is not None and hasattr(bar, "update"):
                    bar.update(len(chunk))
        keys = sorted(sums) if sums else ["acc"]
        reduced = self._reduce([*(sums.get(k, 0.0) for k in keys), float(count)])
        n = int(reduced[-1])
        metrics = {k: v / max(n, 1) for k, v in zip(keys, reduced[:-1], strict=True)}
        baseline = GENERATION_BASELINES.get(name)
        if baseline and "acc" in metrics:
            metrics["centered"] = centered(metrics["acc"], baseline)
        return TaskResult(name, "generation", n, metrics, time.monotonic() - start, baseline,
                          shown if self.rank == 0 else [])

    # -- driver --------------------------------------------------------------------------------

    def _core_bundle(self) -> Path:
        bundle = self.options.bundle_dir or default_cache_dir() / "eval_bundle"

        def needs_build() -> bool:
            marker = bundle / "OFFLINE.json"
            # An offline subset built before the data packages were installed is built again.
            return not bundle.is_dir() or (marker.is_file() and len(
                json.loads(marker.read_text())["built"]) < len(OFFLINE_BUILDERS))

        # Rank 0 first; then any rank that still lacks it (another node's cache). Writes are
        # atomic, so ranks sharing a cache never read a torn file.
        for turn in (0, 1):
            if (self.rank == 0) == (turn == 0) and needs_build():
                print(f"eval: no complete CORE bundle at {bundle}; building the offline subset "
                      f"from package data (`n eval prep-core` downloads the full one)",
                      file=sys.stderr)
                build_offline_bundle(bundle)
            self.barrier()
        return bundle

    @torch.no_grad()
    def run(self, names: Sequence[str],
            on_result: Callable[[TaskResult], None] | None = None) -> EvalReport:
        """Evaluate ``names`` (from `parse_tasks`) in order; ``on_result`` sees each result."""
        report = EvalReport()
        start = time.monotonic()
        was_training = self.model.training
        self.model.eval()
        try:
            core_labels = [n[5:] for n in names if n.startswith("core:")]
            if core_labels:
                bundle = self._core_bundle()
                tasks, missing = load_core_tasks(bundle, core_labels)
                by_label = {t.name: t for t in tasks}
                marker = bundle / "OFFLINE.json"
                # An offline subset knows why a task is absent (e.g. a data package to install).
                why = json.loads(marker.read_text())["missing"] if marker.is_file() else {}
                report.core = {"bundle": str(bundle), "offline_subset": marker.is_file(),
                               "missing": {label: why.get(label, reason)
                                           for label, reason in missing}}
            for name in names:
                if name.startswith("core:"):
                    if name[5:] not in by_label:
                        continue
                    result = self.run_core_task(by_label[name[5:]])
                elif name in CHOICE_TASKS:
                    result = self.run_choice_task(name)
                else:
                    result = self.run_generation_task(name)
                report.results.append(result)
                if on_result is not None:
                    on_result(result)
        finally:
            self.model.train(was_training)
        if report.core is not None:
            core = [r for r in report.results if r.suite == "core"]
            report.core["score"] = (sum(r.metrics["centered"] for r in core) / len(core)
                                    if core else None)
            report.core["num_tasks"] = len(core)
        report.elapsed_s = time.monotonic() - start
        return report


def _cut(text: str, stops: Sequence[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return text if cut < 0 else text[:cut]


def flat_metrics(report: EvalReport) -> dict[str, float]:
    """``{"eval/core": .., "eval/core/<task>/acc": .., "eval/<task>/<metric>": ..}``."""
    out: dict[str, float] = {}
    if report.core is not None and report.core.get("num_tasks"):
        out["eval/core"] = float(report.core["score"])
        out["eval/core/num_tasks"] = float(report.core["num_tasks"])
    for r in report.results:
        for key, value in r.metrics.items():
            out[f"eval/{r.task}/{key}"] = float(value)
    return out


def run_in_training(
    model: torch.nn.Module,
    tokenizer_name: str,
    tasks: str | Sequence[str],
    max_examples: int | None,
    rank: int,
    world_size: int,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None,
    device: torch.device | str,
    *,
    max_len: int | None = None,
    max_batch_tokens: int = 8192,
    bundle_dir: str | Path | None = None,
    autocast_dtype: torch.dtype | None | str = "auto",
) -> dict[str, float]:
    """Evaluate the live training model on every rank in lockstep; returns flat metrics.

    Every rank must call this at the same step with the same arguments (the examples are sharded
    over ranks inside, see the module docstring). The model's train/eval mode is restored.

    Args:
        model: the training `Transformer` (its expert-parallel dispatchers, if any, stay
            attached: every rank runs the same number of forwards).
        tokenizer_name: ``cfg.model.tokenizer``.
        tasks: e.g. ``"core"`` or ``["core", "mmlu"]`` (`parse_tasks`).
        max_examples: examples per task at most (None: all).
        rank, world_size: this process in the data-parallel group.
        all_reduce: SUM over ranks of a tensor on ``device`` (e.g. the trainer's
            ``all_reduce_sum``); None when ``world_size == 1``.
        device: the model's device.
        max_len: context length (typically the training ``seq_len``).
        max_batch_tokens: padded tokens per scoring forward; keep it within what the model's
            dispatchers were sized for (``micro_batch * seq_len``) under expert parallelism.
        bundle_dir: CORE bundle (default ``~/.cache/nmoe/eval/eval_bundle``; rank 0 builds the
            offline subset when absent).
        autocast_dtype: ``"auto"``: bf16 on CUDA, float32 on CPU.

    Returns:
        ``eval/core``, ``eval/core/num_tasks``, ``eval/core/<task>/{acc,centered}``,
        ``eval/<task>/{acc,acc_norm,centered}``, ``eval/gsm8k/acc``, ``eval/humaneval/pass@1``
        (those of the tasks run).
    """
    device = torch.device(device)
    if autocast_dtype == "auto":
        autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    options = EvalOptions(max_examples=max_examples, max_len=max_len,
                          max_batch_tokens=max_batch_tokens,
                          bundle_dir=Path(bundle_dir).expanduser() if bundle_dir else None,
                          autocast_dtype=autocast_dtype)
    evaluator = Evaluator(model, tokenizer_name, options, rank, world_size, all_reduce, device)
    return flat_metrics(evaluator.run(parse_tasks(tasks)))
