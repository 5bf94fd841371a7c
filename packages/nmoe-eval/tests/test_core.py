"""CORE: prompt rendering (golden strings), scored spans, few-shot sampling, bundle loading."""

from __future__ import annotations

import json
import random

import pytest

from nmoe_core.tokenizer import get_tokenizer
from nmoe_eval.core import (
    CORE_TASKS,
    build_requests,
    centered,
    fewshot_indices,
    judge,
    load_core_tasks,
    render_prompts,
)
from nmoe_eval.scoring import ScoreResult

MC_SHOT = {"query": "Question: 2+2?", "choices": ["3", "4"], "gold": 1}
MC_ITEM = {"query": "Question: 1+1?", "choices": ["2", "5"], "gold": 0}


def test_multiple_choice_prompts_golden():
    got = render_prompts("multiple_choice", MC_ITEM, "\nAnswer: ", [MC_SHOT, MC_SHOT])
    shot = "Question: 2+2?\nAnswer: 4\n\n"
    assert got == [shot * 2 + "Question: 1+1?\nAnswer: 2", shot * 2 + "Question: 1+1?\nAnswer: 5"]
    assert render_prompts("multiple_choice", MC_ITEM, " ", []) == ["Question: 1+1? 2",
                                                                  "Question: 1+1? 5"]


def test_schema_prompts_golden():
    shot = {"context_options": ["Tom ran so Tom", "Tom ran so Ann"], "continuation": "won.",
            "gold": 0}
    item = {"context_options": ["Bo sat so Bo", "Bo sat so Cy"], "continuation": "slept.",
            "gold": 1}
    assert render_prompts("schema", item, " ", [shot]) == [
        "Tom ran so Tom won.\n\nBo sat so Bo slept.",
        "Tom ran so Tom won.\n\nBo sat so Cy slept.",
    ]


def test_language_modeling_prompts_golden():
    shot = {"context": "  Capital of France:  ", "continuation": "Paris"}
    item = {"context": "Capital of Peru: \n", "continuation": "Lima"}
    without, full = render_prompts("language_modeling", item, "\nAnswer: ", [shot])
    assert full == "Capital of France:\nAnswer: Paris\n\nCapital of Peru:\nAnswer: Lima"
    assert without == "Capital of France:\nAnswer: Paris\n\nCapital of Peru:\nAnswer:"
    with pytest.raises(ValueError, match="task type"):
        render_prompts("cloze", item, " ", [])


def test_spans_mc_prefix_schema_suffix_lm_continuation():
    enc = get_tokenizer("gpt2")
    encode, bos = enc.encode_ordinary, 50256
    mc = build_requests("multiple_choice", render_prompts("multiple_choice", MC_ITEM, " ", []),
                        encode, bos, 1000)
    for req, choice in zip(mc, MC_ITEM["choices"], strict=True):
        assert enc.decode(list(req.tokens[req.start:req.end])) == f" {choice}"
        assert req.tokens[0] == bos
    schema_item = {"context_options": ["The cat", "A dog"], "continuation": "barked loudly.",
                   "gold": 1}
    sc = build_requests("schema", render_prompts("schema", schema_item, " ", []), encode, bos,
                        1000)
    assert all(enc.decode(list(r.tokens[r.start:r.end])) == " barked loudly." for r in sc)
    lm_item = {"context": "The sky is", "continuation": "blue today"}
    (lm,) = build_requests("language_modeling",
                           render_prompts("language_modeling", lm_item, " ", []), encode, bos,
                           1000)
    assert enc.decode(list(lm.tokens[lm.start:])) == " blue today"
    # Left crop keeps the span and the last max_len tokens.
    (cropped,) = build_requests("language_modeling",
                                render_prompts("language_modeling", lm_item, " ", []), encode,
                                bos, 4)
    assert len(cropped.tokens) == 4 and cropped.tokens == lm.tokens[-4:]
    assert enc.decode(list(cropped.tokens[cropped.start:])) == " blue today"


def test_fewshot_sampling_is_deterministic_and_matches_explicit_population(seed):
    rng = random.Random(seed)
    n, k = rng.randrange(12, 400), rng.randrange(1, 10)
    for index in (0, n - 1, rng.randrange(n)):
        got = fewshot_indices(n, index, k)
        want = random.Random(1234 + index).sample([j for j in range(n) if j != index], k)
        assert got == want and index not in got, f"n={n}, k={k}, seed {seed}"
        assert fewshot_indices(n, index, k) == got
    assert fewshot_indices(5, 2, 0) == []
    with pytest.raises(ValueError, match="few-shot"):
        fewshot_indices(3, 0, 3)


def test_judge_and_centering():
    r = lambda nll, n, g=False: ScoreResult(nll, n, g)  # noqa: E731
    # Mean (not summed) NLL decides: 4/4 = 1.0 beats 1.5/1.
    assert judge("multiple_choice", [r(1.5, 1), r(4.0, 4)], gold=1)
    assert not judge("schema", [r(2.0, 2), r(2.0, 2)], gold=1)  # ties go to the first option
    assert judge("language_modeling", [r(9.0, 3, True)], None)
    assert centered(0.25, 0.25) == 0.0 and centered(1.0, 0.5) == 1.0
    assert centered(0.2, 0.25) == pytest.approx(-1 / 15)


def _write_task(root, uri, items):
    path = root / "eval_data" / uri
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(x) + "\n" for x in items))


def test_load_bundle_overrides_and_reports_missing(tmp_path):
    items = [{"query": f"q{i}", "choices": ["a", "b"], "gold": i % 2} for i in range(30)]
    _write_task(tmp_path, "commonsense_reasoning/copa.jsonl", items)
    _write_task(tmp_path, "elsewhere/piqa.jsonl", items)  # found by file name
    (tmp_path / "core.yaml").write_text(
        "icl_tasks:\n- label: copa\n  dataset_uri: commonsense_reasoning/copa.jsonl\n"
        "  num_fewshot: [3]\n  icl_task_type: multiple_choice\n"
        "  continuation_delimiter: ' => '\n")
    (tmp_path / "eval_meta_data.csv").write_text("Eval Task,Random baseline\ncopa,40\n")
    tasks, missing = load_core_tasks(tmp_path, ["copa", "piqa", "winograd"])
    copa, piqa = tasks
    assert (copa.spec.num_fewshot, copa.spec.delimiter, copa.spec.baseline) == (3, " => ", 0.4)
    assert piqa.spec.num_fewshot == 10 and piqa.spec.delimiter == "\nAnswer: "
    assert [m[0] for m in missing] == ["winograd"]
    shuffled = list(items)
    random.Random(1337).shuffle(shuffled)
    assert copa.items == shuffled
    prompt = copa.prompts(0)[0]
    assert prompt.count(" => ") == 4 and prompt.endswith(f"{shuffled[0]['query']} => a")
    _write_task(tmp_path, "language_understanding/winograd_wsc.jsonl", [{"continuation": "x"}])
    with pytest.raises(ValueError, match="context_options"):
        load_core_tasks(tmp_path, ["winograd"])
    with pytest.raises(ValueError, match="unknown CORE task"):
        load_core_tasks(tmp_path, ["nope"])


def test_core_table_has_22_tasks():
    assert len(CORE_TASKS) == 22 and len({s.label for s in CORE_TASKS}) == 22
    kinds = [s.task_type for s in CORE_TASKS]
    assert kinds.count("schema") == 2 and kinds.count("language_modeling") == 9
