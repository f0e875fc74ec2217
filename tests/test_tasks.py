"""Tasks: extractors on hand cases and arbitrary text, majority vote, prompts, the paper datasets' schemas."""

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from callbacks.task_evaluation import score
from datamodules.io import DataError
from datamodules.tasks import ANLI, GSM8K, SVAMP, AQuA, Arithmetic, OpenBookQA, Sentiment, StrategyQA, Task
from datamodules.tasks.extract import extract_choice, extract_number, extract_word, same_number

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("text, want", [
    ("so 7 x 12 = 84. The answer is 84.", "84"),
    ("The answer is 1,200 apples.", "1200"),
    ("the answer is -3.5", "-3.5"),
    ("The answer is 84.0", "84"),
    ("first the answer is 3, then The answer is 5.", "5"),  # the last marker wins
    ("7 x 12 = 84", "84"),  # no marker: after the last "="
    ("I think eighty-four", None),
    ("The answer is unknown", None),
    ("", None),
])
def test_extract_number(text, want):
    assert extract_number(text) == want


def test_same_number_is_the_papers_int_float_comparison():
    assert same_number("84", "84.0") and same_number("84.7", "84") and not same_number("84", "85")
    assert not same_number(None, "1") and not same_number("x", "1") and not same_number("1e999", "1")


@pytest.mark.parametrize("text, want", [
    ("The answer is (B).", "B"),
    ("(A) is wrong, (C) is right. The answer is (c)", "C"),
    ("I pick (D) over (A)", "A"),  # no marker: the last letter
    ("The answer is (F)", None),  # out of the 5 options
    ("no letter here", None),
])
def test_extract_choice(text, want):
    assert extract_choice(text, 5) == want


def test_extract_word():
    assert extract_word("So the answer is Yes.", ("yes", "no")) == "yes"
    assert extract_word("The answer is no, not yes", ("yes", "no")) == "no"
    assert extract_word("Yes.", ("yes", "no")) is None  # no marker, no answer


@given(st.text())
def test_extractors_never_raise(text):
    for result in (extract_number(text), extract_choice(text), extract_word(text, ("yes", "no")),
                   Arithmetic().extract(text), StrategyQA().extract(text)):
        assert result is None or isinstance(result, str)


@given(st.integers(-10**6, 10**6), st.text(alphabet=st.characters(blacklist_characters="0123456789=-.,"), max_size=20))
def test_extract_number_reads_the_answer_sentence(value, noise):
    assert extract_number(f"{noise} The answer is {value:,}. {noise}") == str(value)


def test_majority_pools_equal_answers_and_breaks_ties_by_first_seen():
    task = Arithmetic()
    assert task.majority(["84", None, "84.0", "85", "85"]) == ("84", 2, 4)  # tie 2-2: the first seen wins
    assert task.majority(["3", "5", "5"]) == ("5", 2, 3)
    assert task.majority([None, None]) == (None, 0, 0)


def test_score_row():
    task = Arithmetic()
    q = task.load("test", 1)[0]
    row = score(task, q, f"The answer is {q.answer}.", ["The answer is 1.", "The answer is 1.", f"= {q.answer}"])
    assert row["greedy_correct"] and not row["maj_correct"] and row["pass"] and row["votes"] == 2


def test_sentiment_labels_and_extraction():
    task = Sentiment()
    qs = task.load("test", 6)
    assert [task.label_index(q) for q in qs] == [0, 1, 0, 1, 0, 1]
    assert all(task.extract(task.format_rationale(q)) == q.answer for q in qs)
    assert task.extract("This review is clearly negative.") == "negative" and task.extract("no idea") is None


def test_arithmetic_is_seeded_per_split_and_gold_is_consistent():
    task = Arithmetic(seed=3)
    test, again, train = task.load("test", 50), Arithmetic(seed=3).load("test", 50), task.load("train", 50)
    assert [q.question for q in test] == [q.question for q in again]
    assert [q.question for q in test] != [q.question for q in train]
    for q in test:
        assert task.same(task.extract(q.rationale), q.answer) and 2 * 12 <= int(q.answer) <= 12 * 25
    assert len({q.id for q in test}) == 50


def test_format_rationale_appends_the_answer_sentence_only_when_missing():
    task = GSM8K(data_path=str(FIXTURES / "gsm8k_{split}.jsonl"))
    qs = task.load("train")
    assert task.format_rationale(qs[0]) == "3 x 4 = 12. The answer is 12."
    mc = AQuA(data_path=str(FIXTURES / "aqua_rat_{split}.jsonl"))
    q = mc.load("train")[0]
    assert mc.format_rationale(q) == "2+2 = 4. The answer is (B)."
    assert mc.format_question(q).endswith("Answer choices: (A) 3 (B) 4 (C) 5 (D) 6 (E) 7")
    assert mc.same(mc.extract(mc.format_rationale(q)), q.answer)


def test_local_files_load_and_bad_rows_are_named(tmp_path):
    task = StrategyQA(data_path=str(FIXTURES / "strategyqa_{split}.jsonl"))
    q = task.load("train")[0]
    assert q.answer == "no" and task.extract(task.format_rationale(q)) == "no"
    (tmp_path / "bad.jsonl").write_text('{"question": "ok"}\n{"answer": "1"}\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        GSM8K(data_path=str(tmp_path / "bad.jsonl")).load("test")
    with pytest.raises(ValueError, match="needs data_path"):
        Task().load("test")


def test_hub_rows_map_to_the_common_schema():
    g = GSM8K().from_hub({"question": "q", "answer": "2 x 3 = <<2*3=6>>6 apples\n#### 1,006"}, 0)
    assert (g.answer, g.rationale) == ("1006", "2 x 3 = 6 apples The answer is 1006.")
    s = SVAMP().from_hub({"ID": "chal-1", "Body": "Ann has 3 pens.", "Question": "How many?", "Answer": 3.0}, 0)
    assert (s.id, s.question, s.answer) == ("chal-1", "Ann has 3 pens. How many?", "3")
    a = AQuA().from_hub({"question": "q", "options": ["A)1", "B)2"], "rationale": "r", "correct": "B"}, 0)
    assert a.options == ["1", "2"] and a.answer == "B"
    o = OpenBookQA().from_hub({"id": "o1", "question_stem": "q", "choices": {"text": ["x", "y"], "label": ["A", "B"]},
                               "answerKey": "B"}, 0)
    assert o.options == ["x", "y"] and o.answer == "B"
    n = ANLI(round=2).from_hub({"uid": "u", "premise": "p", "hypothesis": "h", "label": 2, "reason": ""}, 0)
    assert n.answer == "C" and n.rationale is None and ANLI(round=2).hub_splits["test"] == "test_r2"
    sq = StrategyQA().from_hub({"qid": "s", "question": "q", "answer": True, "facts": ["a.", "b."]}, 0)
    assert sq.answer == "yes" and sq.rationale == "a. b."
