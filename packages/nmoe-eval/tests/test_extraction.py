"""GSM8K number and GPQA letter extraction on tricky completions (the original never matched)."""

from __future__ import annotations

import pytest

from nmoe_eval.tasks.gpqa import extract_letter, make_question
from nmoe_eval.tasks.gsm8k import Gsm8kTask, extract_number, normalize_number


@pytest.mark.parametrize("text,want", [
    ("Janet sells 9 eggs. #### 18", "18"),
    ("#### 1,000,000", "1000000"),
    ("The answer is 1,234.", "1234"),
    ("The answer is: $2,500.75 in total", "2500.75"),
    ("The answer is 42 dollars.\nQuestion: how many are 7", "42"),  # trailing text
    ("so she has -5 apples left", "-5"),
    ("The answer is \u22127.", "-7"),  # unicode minus
    ("it costs $18.00", "18"),
    ("x = 3.50.", "3.5"),
    ("temperatures 1, 2, 3", "3"),
    ("He walks 12 km then 0.5 km", "0.5"),
    ("answer is -0", "0"),
    ("no digits at all", None),
])
def test_gsm8k_extraction(text, want):
    assert extract_number(text) == want


def test_gsm8k_gold_and_scoring():
    task = Gsm8kTask([("q1", "a <<2*3=6>>6 b\n#### 1,200"), ("q2", "x\n#### -3"),
                      ("q3", "y\n#### 7")], shots=2)
    assert task.gold(0) == "1200" and task.gold(1) == "-3"
    assert task.score(0, ["... The answer is 1200."])["acc"] == 1.0
    assert task.score(1, ["I think -3.0 is it"])["acc"] == 1.0
    assert task.score(2, ["The answer is 8. Or 7"])["acc"] == 0.0
    prompt = task.prompt(2)
    assert "<<" not in prompt and "The answer is 1,200." in prompt
    assert prompt.endswith("Question: q3\nAnswer:") and prompt.count("Question:") == 3
    assert normalize_number("$1,234.50") == "1234.5" and normalize_number("abc") is None


@pytest.mark.parametrize("text,want", [
    (" B) because it is", "B"),
    ("The answer is (C).", "C"),
    ("the answer is d", "D"),
    ("A good guess would be D", "D"),  # the article "A" is not an answer
    ("I would pick (b) here", "B"),
    ("Answer: A. Next question B", "A"),
    ("A photon is emitted, so B", "B"),
    ("(A)", "A"),
    ("A", "A"),
    ("None of these", None),
    ("", None),
])
def test_gpqa_letter_extraction(text, want):
    assert extract_letter(text) == want


def test_gpqa_option_shuffle_tracks_the_answer():
    for index in range(20):
        question, options, gold = make_question(index, "Q?", " right ", ["w1", "w2", "w3"])
        assert options[gold] == "right" and sorted(options) == ["right", "w1", "w2", "w3"]
        assert make_question(index, "Q?", "right", ["w1", "w2", "w3"])[2] == gold
