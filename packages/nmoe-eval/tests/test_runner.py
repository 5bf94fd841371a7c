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
