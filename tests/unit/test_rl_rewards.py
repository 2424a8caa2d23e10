"""Rewards: per-type accuracy tables (hand-computed), answer extraction, format per template, weights, errors."""

from __future__ import annotations

import math

import pytest

from megatron_ral.data.records import parse_record
from megatron_ral.errors import UserError
from megatron_ral.rl import rewards
from megatron_ral.rl.rewards import (
    ACCURACY_SCORERS,
    RewardError,
    RewardScore,
    accuracy_by_type,
    extract_answer,
    format_reward,
    parse_number,
    score,
    score_batch,
    word_edit_distance,
)


def rec(problem_type: str, truth: str, problem_id: str = "p1") -> dict:
    return {"problem_id": problem_id, "problem_type": problem_type, "solution": f"<answer>{truth}</answer>"}


def acc(problem_type: str, response: str, truth: str) -> float:
    return score(response, rec(problem_type, truth)).accuracy


def tagged(answer: str) -> str:
    return f"<think>reasoning</think><answer>{answer}</answer>"


# ---------------------------------------------------------------- answer extraction

EXTRACTION = [
    ("<answer>A</answer>", "A"),
    ("<answer>  A \n</answer>", "A"),                               # \s* and strip
    ("<think>x</think>\n<answer>\nline 1\nline 2\n</answer>", "line 1\nline 2"),  # dot matches newline
    ("<answer>A</answer><answer>B</answer>", "A"),                  # repeated: first match
    ("<answer><answer>A</answer></answer>", "<answer>A"),           # nested: first open to first close
    ("<answer></answer>", ""),                                      # empty
    ("A", ""),                                                      # no tags
    ("<answer>A", ""),                                              # unclosed
    ("A</answer>", ""),                                             # no opening tag
    ("<ANSWER>A</ANSWER>", ""),                                     # tags are case-sensitive
    ("<answer>é 三</answer>", "é 三"),                              # unicode kept as is
]


@pytest.mark.parametrize("text,expected", EXTRACTION)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


# ---------------------------------------------------------------- multiple choice

MULTIPLE_CHOICE = [
    (tagged("A"), "A", 1.0),
    (tagged("  A  "), "A", 1.0),
    (tagged("B"), "A", 0.0),
    (tagged("a"), "A", 0.0),                                        # case-sensitive
    (tagged("A. red"), "A", 0.0),                                   # the option text is not the letter
    (tagged("Ａ"), "A", 0.0),                                       # full-width letter is another string
    ("<answer>A</answer><answer>B</answer>", "A", 1.0),             # repeated tags: first answer counts
    ("<answer>B</answer><answer>A</answer>", "A", 0.0),
    ("<answer><answer>A</answer></answer>", "A", 0.0),              # nested: answer is "<answer>A"
    ("A", "A", 0.0),                                                # no tags
    ("<answer>A", "A", 0.0),                                        # unclosed tag
    (tagged(""), "A", 0.0),                                         # empty answer
    ("", "A", 0.0),
]


@pytest.mark.parametrize("response,truth,expected", MULTIPLE_CHOICE)
def test_multiple_choice(response, truth, expected):
    assert acc("multiple choice", response, truth) == expected


# ---------------------------------------------------------------- numerical

NUMERICAL = [
    ("3", "3", 1.0),
    ("3.50", "3.5", 1.0),                  # both have ".", 3.5 == 3.5
    ("3.5", "3", 0.0),                     # "." on one side only
    ("3.0", "3", 0.0),                     # "." on one side only (Video-R1's rule), although equal
    ("1e3", "1000", 1.0),                  # scientific notation reads as 1000.0
    ("1.5e3", "1500", 0.0),                # "." on one side only
    ("1,000", "1000", 0.0),                # "," counts like "." in the one-side rule
    ("1,000", "1,000", 1.0),               # both have ",": dropped, 1000 == 1000
    ("1,5", "1.5", 0.0),                   # "," dropped: 15 vs 1.5
    ("3.141", "3.14", 1.0),                # round(3.141, 2) == 3.14
    ("3.15", "3.14", 0.0),
    ("+2", "2", 1.0),
    ("-2", "2", 0.0),
    ("-0", "0", 1.0),                      # -0.0 == 0.0
    (" 7 ", "7", 1.0),
    ("1_000", "1000", 1.0),                # Python float digit groups
    ("٣", "3", 1.0),                       # Arabic-Indic digit three
    ("３", "3", 1.0),                      # full-width digit three
    ("３．５", "3.5", 0.0),                # full-width full stop is not "."
    ("½", "0.5", 0.0),                     # vulgar fraction does not parse
    ("three", "3", 0.0),                   # words where a number is expected
    ("3 apples", "3", 0.0),
    ("$3", "3", 0.0),
    ("30%", "30", 0.0),
    ("1/2", "0.5", 0.0),
    ("0x10", "16", 0.0),
    ("2+1", "3", 0.0),                     # never evaluated
    ("__import__('os').getcwd()", "3", 0.0),
    ("inf", "inf", 0.0),                   # non-finite never scores
    ("-Infinity", "-inf", 0.0),
    ("nan", "nan", 0.0),
    ("1e400", "1e400", 0.0),               # overflows to inf
    ("9" * 400, "9" * 400, 0.0),           # a 400-digit integer overflows to inf
    ("1e308", "1e308", 1.0),               # huge but finite
    ("12345678901234567890", "12345678901234567891", 1.0),  # equal as float64 (53-bit mantissa)
    ("", "3", 0.0),
]


@pytest.mark.parametrize("answer,truth,expected", NUMERICAL)
def test_numerical(answer, truth, expected):
    assert acc("numerical", tagged(answer), truth) == expected


def test_numerical_untagged_response_scores_zero():
    assert acc("numerical", "3", "3") == 0.0


@pytest.mark.parametrize(
    "text,expected",
    [("1e3", 1000.0), ("1,234.5", 1234.5), (" -2 ", -2.0), ("١٠.٥", 10.5), ("inf", None), ("NaN", None),
     ("1e400", None), ("abc", None), ("", None), ("1__0", None)],
)
def test_parse_number(text, expected):
    assert parse_number(text) == expected


# ---------------------------------------------------------------- OCR: 1 - WER

OCR = [
    # (answer, truth, expected)  arithmetic: distance / max(1, reference words)
    ("Hello World", "Hello World", 1.0),                             # 0 / 2
    ("the quick brown dog", "the quick brown fox", 0.75),            # 1 substitution / 4 -> 1 - 0.25
    ("hello world", "Hello World", 0.0),                             # 2 substitutions / 2 (case-sensitive)
    ("a x b", "a b", 0.5),                                           # 1 insertion / 2
    ("one three five", "one two three four five", 0.6),              # 2 deletions / 5 -> 1 - 0.4
    ("x y z w", "a b", 0.0),                                         # 2 subs + 2 ins = 4 / 2 = 2 -> -1, clip 0
    ("a b\nc", "a  b c", 1.0),                                       # whitespace split
    ("café creme", "café crème", 0.5),                               # 1 / 2, unicode words compared as is
    ("b a", "a b", 0.0),                                             # 2 substitutions / 2
    ("anything", "", 0.0),                                           # empty truth: 1 insertion / max(1, 0)
]


@pytest.mark.parametrize("answer,truth,expected", OCR)
def test_ocr(answer, truth, expected):
    assert acc("OCR", tagged(answer), truth) == pytest.approx(expected, abs=1e-12)


def test_word_edit_distance():
    assert word_edit_distance(list("kitten"), list("sitting")) == 3  # k->s, e->i, +g
    assert word_edit_distance(["a", "b", "c"], []) == 3
    assert word_edit_distance([], ["x"]) == 1
    assert word_edit_distance([], []) == 0


# ---------------------------------------------------------------- free-form: mean ROUGE-1/2/L F

FREE_FORM = [
    ("the cat sat on the mat", "the cat sat on the mat", 1.0),
    # truth tokens: the cat sat on the mat (6), bigrams 5; answer: the cat sat (3), bigrams 2.
    # R1: overlap 3, P 3/3, R 3/6 -> F 2/3. R2: overlap 2, P 2/2, R 2/5 -> F 4/7. RL: LCS 3 -> F 2/3.
    # mean = (2/3 + 4/7 + 2/3) / 3 = 40/63
    ("the cat sat", "the cat sat on the mat", 40 / 63),
    # stemming: cats -> cat, running -> run, runs -> run; truth [the cat are run], answer [a cat run].
    # R1: overlap 2, P 2/3, R 2/4 -> F 4/7. R2: truth (the cat)(cat are)(are run), answer (a cat)(cat run): 0.
    # RL: LCS [cat run] = 2 -> F 4/7. mean = (4/7 + 0 + 4/7) / 3 = 8/21
    ("a cat runs", "the cats are running", 8 / 21),
    # lower-cased, punctuation dropped: both [red then blue] -> 1
    ("red then BLUE", "Red, then blue.", 1.0),
    # word order: R1 1, R2 0 (bigram reversed), RL: LCS 1 of 2 -> 1/2. mean = 1.5 / 3 = 0.5
    ("red blue", "blue red", 0.5),
    ("dog", "cat", 0.0),
    ("日本語", "日本語", 0.0),               # rouge_score keeps only [a-z0-9] tokens: no tokens, 0
]


@pytest.mark.parametrize("answer,truth,expected", FREE_FORM)
def test_free_form(answer, truth, expected):
    assert acc("free-form", tagged(answer), truth) == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------- regression

REGRESSION = [
    # 1 - min(1, (|a - t| + 1e-9) / (|t| + 1e-9))
    ("5", "5", 1 - 1e-9 / (5 + 1e-9)),
    ("5.0", "5", 1 - 1e-9 / (5 + 1e-9)),          # no "." rule for regression
    ("4", "5", 1 - (1 + 1e-9) / (5 + 1e-9)),      # ~0.8
    ("7.5", "5", 1 - (2.5 + 1e-9) / (5 + 1e-9)),  # ~0.5
    ("10", "5", 0.0),                             # relative error 1
    ("100", "5", 0.0),                            # clipped
    ("-5", "5", 0.0),
    ("1,000", "900", 1 - (100 + 1e-9) / (900 + 1e-9)),  # "," dropped: ~8/9
    ("1e3", "1000", 1 - 1e-9 / (1000 + 1e-9)),
    ("0", "0", 0.0),                              # the formula: truth 0 scores 0 for every answer
    ("1e308", "-1e308", 0.0),                     # |a - t| overflows to inf: clipped to 0
    ("nan", "5", 0.0),                            # non-finite: unreadable (Video-R1 would give 1)
    ("inf", "5", 0.0),
    ("about five", "5", 0.0),
    ("", "5", 0.0),
]


@pytest.mark.parametrize("answer,truth,expected", REGRESSION)
def test_regression(answer, truth, expected):
    assert acc("regression", tagged(answer), truth) == pytest.approx(expected, abs=1e-12)


def test_regression_values_are_hand_checked():
    assert acc("regression", tagged("4"), "5") == pytest.approx(0.8, abs=1e-9)
    assert acc("regression", tagged("7.5"), "5") == pytest.approx(0.5, abs=1e-9)
    assert acc("regression", tagged("1,000"), "900") == pytest.approx(8 / 9, abs=1e-9)


# ---------------------------------------------------------------- every scorer is total on odd text

ODD = ["", " ", ".", ",", "-", "e", "1e", "nan", "inf", "-inf", "1e400", "9" * 5000, "٣", "３．５", "\x00",
       "😀 🙂", "<answer>", "1,2,3", "..", "a " * 2000, "\n\t", "None", "[]", "{'a': 1}"]


@pytest.mark.parametrize("problem_type", sorted(ACCURACY_SCORERS))
def test_scorers_never_raise_and_stay_in_unit_interval(problem_type):
    scorer = ACCURACY_SCORERS[problem_type]
    for answer in ODD:
        for truth in ("A", "3", "3.5", "hello world", ""):
            value = scorer(answer, truth)
            assert 0.0 <= value <= 1.0, (problem_type, answer[:20], truth)


# ---------------------------------------------------------------- format reward

THINK_FORMAT = [
    ("<think>x</think><answer>A</answer>", 1.0),
    ("<think>x</think>\n\n <answer>A</answer>", 1.0),                 # whitespace between the blocks
    ("<think>\nmany\nlines\n</think><answer>\nA\n</answer>", 1.0),    # dot matches newline
    ("<think></think><answer></answer>", 1.0),                        # empty blocks still match
    ("<think>x</think><answer>A</answer><answer>B</answer>", 1.0),    # repeated answer: .*? stretches
    ("<think>x<think>y</think></think><answer>A</answer>", 1.0),      # nested think: .*? stretches
    (" <think>x</think><answer>A</answer>", 0.0),                     # text before
    ("<think>x</think><answer>A</answer>\n", 0.0),                    # text after, even a newline
    ("<think>x</think>so<answer>A</answer>", 0.0),                    # text between the blocks
    ("<answer>A</answer>", 0.0),
    ("<answer>A</answer><think>x</think>", 0.0),
    ("<think>x</think><answer>A", 0.0),
    ("<THINK>x</THINK><answer>A</answer>", 0.0),
    ("", 0.0),
]

ANSWER_ONLY_FORMAT = [
    ("<answer>A</answer>", 1.0),
    ("<answer>\nA\n</answer>", 1.0),
    ("<answer></answer>", 1.0),
    ("<answer>A</answer><answer>B</answer>", 1.0),                    # repeated: .*? stretches
    ("<think>x</think><answer>A</answer>", 0.0),                      # reasoning is not allowed here
    ("<answer>A</answer> ", 0.0),
    ("A", 0.0),
    ("", 0.0),
]


@pytest.mark.parametrize("response,expected", THINK_FORMAT)
def test_format_think(response, expected):
    assert format_reward(response, "think") == expected
    assert score(response, rec("multiple choice", "A"), template="think").format == expected


@pytest.mark.parametrize("response,expected", ANSWER_ONLY_FORMAT)
def test_format_answer_only(response, expected):
    assert format_reward(response, "answer_only") == expected
    assert score(response, rec("multiple choice", "A"), template="answer_only").format == expected


def test_format_on_pathological_repeats_is_zero():
    # many candidate split points and no full match: the lazy pattern must still finish
    response = "<think>" + "</think><answer></answer>x" * 500
    assert format_reward(response, "think") == 0.0


# ---------------------------------------------------------------- weights and total

def test_default_weights_are_the_papers():
    record = rec("multiple choice", "A")
    assert score(tagged("A"), record) == RewardScore(accuracy=1.0, format=1.0, total=1.0)
    assert score("<answer>A</answer>", record) == RewardScore(accuracy=1.0, format=0.0, total=0.9)
    assert score(tagged("B"), record) == RewardScore(accuracy=0.0, format=1.0, total=0.1)
    assert score("B", record) == RewardScore(accuracy=0.0, format=0.0, total=0.0)


def test_custom_weights():
    record = rec("OCR", "the quick brown fox")
    s = score(tagged("the quick brown dog"), record, accuracy_weight=1.0, format_weight=1.0)  # Video-R1's sum
    assert (s.accuracy, s.format, s.total) == (0.75, 1.0, 1.75)
    s = score(tagged("the quick brown dog"), record, accuracy_weight=0.5, format_weight=0.25)
    assert s.total == pytest.approx(0.5 * 0.75 + 0.25 * 1.0)
    s = score("<answer>A</answer>", rec("multiple choice", "A"), template="answer_only")
    assert (s.accuracy, s.format) == (1.0, 1.0) and s.total == pytest.approx(1.0)


def test_reward_score_is_frozen():
    s = score(tagged("A"), rec("multiple choice", "A"))
    with pytest.raises(AttributeError):
        s.total = 3.0


# ---------------------------------------------------------------- records, registry, errors

def test_record_object_and_dict_score_the_same():
    obj = {"problem_id": "7", "problem": "How many?", "data_type": "video", "problem_type": "numerical",
           "options": [], "solution": "<answer>3</answer>", "path": "v.mp4"}
    record = parse_record(obj, source="train.json:4")
    for response in (tagged("3"), tagged("3.0"), tagged("4"), "3"):
        assert score(response, record) == score(response, obj)


def test_untagged_solution_is_taken_whole():
    record = {"problem_type": "multiple choice", "solution": "  B \n"}
    assert score(tagged("B"), record).accuracy == 1.0


def test_empty_truth_does_not_reward_an_empty_answer():
    record = rec("OCR", "")
    assert score("no tags at all", record).accuracy == 0.0
    assert score(tagged(""), record).accuracy == 0.0
    assert score(tagged(""), rec("multiple choice", "")).accuracy == 0.0


def test_unknown_problem_type_is_a_user_error_naming_the_record():
    with pytest.raises(RewardError, match=r"record p42.*unknown problem_type 'essay'") as info:
        score(tagged("A"), rec("essay", "A", problem_id="p42"))
    assert isinstance(info.value, UserError)
    record = parse_record({"problem_id": "9", "problem": "q", "data_type": "image", "problem_type": "OCR",
                           "solution": "<answer>x</answer>", "path": "i.png"}, source="data/train.json:12")
    record.problem_type = "OCR-v2"
    with pytest.raises(RewardError, match=r"record 9 \(data/train.json:12\).*'OCR-v2'"):
        score("garbage", record)                 # raised even for a malformed response


def test_missing_fields_and_unknown_template_are_user_errors():
    with pytest.raises(RewardError, match="problem_type"):
        score(tagged("A"), {"solution": "<answer>A</answer>", "source": "x.json:3"})
    with pytest.raises(RewardError, match=r"x.json:3.*solution"):
        score(tagged("A"), {"problem_type": "multiple choice", "solution": None, "source": "x.json:3"})
    with pytest.raises(RewardError, match="template 'cot'"):
        score(tagged("A"), rec("multiple choice", "A"), template="cot")


def test_non_string_response_is_a_bug():
    with pytest.raises(TypeError):
        score(None, rec("multiple choice", "A"))


def test_custom_scorers_replace_the_table():
    def exact_lower(answer: str, truth: str) -> float:
        return float(answer.lower() == truth.lower())

    scorers = {**ACCURACY_SCORERS, "multiple choice": exact_lower, "essay": lambda a, t: 0.25}
    assert score(tagged("a"), rec("multiple choice", "A"), scorers=scorers).accuracy == 1.0
    assert score(tagged("x"), rec("essay", "y"), scorers=scorers).accuracy == 0.25
    assert ACCURACY_SCORERS["multiple choice"] is rewards.multiple_choice_accuracy  # the default is untouched
    with pytest.raises(RewardError, match="unknown problem_type 'numerical'"):
        score(tagged("3"), rec("numerical", "3"), scorers={"essay": exact_lower})


def test_scorer_exceptions_and_odd_results_score_zero_or_clip():
    def boom(answer: str, truth: str) -> float:
        raise ZeroDivisionError

    record = rec("multiple choice", "A")
    assert score(tagged("A"), record, scorers={"multiple choice": boom}) == RewardScore(0.0, 1.0, 0.1)
    assert score(tagged("A"), record, scorers={"multiple choice": lambda a, t: math.nan}).accuracy == 0.0
    assert score(tagged("A"), record, scorers={"multiple choice": lambda a, t: 1.5}).accuracy == 1.0
    assert score(tagged("A"), record, scorers={"multiple choice": lambda a, t: -2}).accuracy == 0.0


# ---------------------------------------------------------------- batch and aggregation

def test_score_batch_and_accuracy_by_type():
    records = [rec("multiple choice", "A")] * 2 + [rec("numerical", "3")] * 3 + [rec("OCR", "a b")]
    responses = [tagged("A"), tagged("B"), tagged("3"), tagged("3.0"), "3", tagged("a c")]
    scores = score_batch(responses, records)
    assert [s.accuracy for s in scores] == [1.0, 0.0, 1.0, 0.0, 0.0, 0.5]
    assert [s.format for s in scores] == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0]
    assert scores == [score(r, rec_) for r, rec_ in zip(responses, records)]
    assert accuracy_by_type(records, scores) == {"OCR": 0.5, "multiple choice": 0.5, "numerical": 1 / 3}
    types = [r["problem_type"] for r in records]
    assert accuracy_by_type(types, [s.accuracy for s in scores]) == accuracy_by_type(records, scores)
    assert accuracy_by_type([], []) == {}
    with pytest.raises(ValueError):
        score_batch(responses[:2], records)
    with pytest.raises(ValueError):
        accuracy_by_type(records, scores[:1])
