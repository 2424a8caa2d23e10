"""Rewards of the RL step: an accuracy reward by problem type plus a format reward (Video-R1's rules).

    total = accuracy_weight * accuracy + format_weight * format        (paper: 0.9 / 0.1; Video-R1: 1 / 1)

Answer extraction. The answer is the first match of ``<answer>\\s*(.*?)\\s*</answer>`` (dot matches
newline), stripped; "" when there is none. The same extraction gives the ground truth from the record's
``solution``; a solution with no ``<answer>`` tags is taken whole (stripped), as ``Record.answer`` does.

Accuracy, in [0, 1], by the record's ``problem_type`` (``ACCURACY_SCORERS``; each scorer is a pure
function ``(answer, truth) -> float`` on the two extracted strings):

- "multiple choice": 1 if the two strings are equal (case-sensitive), else 0.
- "numerical": 0 if exactly one of the two contains "." or ","; otherwise both are read as numbers
  (``parse_number``) and score 1 if equal after rounding to 2 decimals; unreadable gives 0.
- "OCR": 1 - WER clipped to [0, 1]; WER = word edit distance (whitespace split, case-sensitive) divided
  by max(1, number of reference words).
- "free-form": mean of the ROUGE-1, ROUGE-2 and ROUGE-L F-measures (``rouge_score`` with the Porter
  stemmer), clipped to [0, 1].
- "regression": 1 - min(1, (|answer - truth| + 1e-9) / (|truth| + 1e-9)); unreadable gives 0.

Numbers (``parse_number``): "," is dropped, then Python's ``float`` reads the rest, so "1e3" is 1000,
"3.50" equals "3.5", surrounding spaces, a sign, "_" digit groups and Unicode decimal digits ("٣") are
accepted; units, "%", "$", fractions "1/2", hexadecimal and anything else are unreadable. Values are
compared as float64 (integers beyond 2**53 lose their last digits). A non-finite value ("inf",
"-Infinity", "nan", or a literal too large for float64 such as "1e400") is unreadable: it never scores.
This departs from Video-R1 on purpose, where "inf" equals "inf" and a "nan" regression answer
scores 1 (max(0, nan) is 0 in Python).

Edge rules (ours, documented in the tests):
- An empty answer (no tags, or empty tags) scores accuracy 0 whatever the truth, so a record with an
  empty ground truth cannot reward a response for answering nothing.
- A response is never evaluated as code and never raises: a scorer that raises scores 0, as in
  Video-R1. Non-finite scorer results count 0, others are clipped to [0, 1] (custom scorers included).
- An unknown ``problem_type`` (not in the scorer table in use) is an input error: ``RewardError``
  naming the record's problem_id and source. So is an unknown template or a record without a string
  ``problem_type`` / ``solution``.

Format, 1 or 0, by prompt template (``FORMAT_PATTERNS``, full match of the whole response, dot
matches newline, nothing before or after):
- "think": ``<think>.*?</think>\\s*<answer>.*?</answer>`` (GRPO, RAL).
- "answer_only": ``<answer>.*?</answer>`` (RAL-zero).
As in Video-R1, the lazy ``.*?`` still stretches to the end of the string, so repeated or nested tags
("<answer>a</answer><answer>b</answer>") pass the format check, while leading or trailing text, even a
newline, fails it.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from rouge_score import rouge_scorer

from megatron_ral.errors import UserError

Scorer = Callable[[str, str], float]

ANSWER_PATTERN = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)

FORMAT_PATTERNS: dict[str, re.Pattern] = {
    "think": re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL),
    "answer_only": re.compile(r"<answer>.*?</answer>", re.DOTALL),
}

_ROUGE = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


class RewardError(UserError):
    """A record or setting the reward cannot score (unknown problem_type or template, missing solution)."""


@dataclass(frozen=True)
class RewardScore:
    """One response's rewards: accuracy and format in [0, 1], total = w_acc * accuracy + w_fmt * format."""

    accuracy: float
    format: float
    total: float


def extract_answer(text: str) -> str:
    """Text of the first <answer>...</answer> (dot matches newline), stripped; "" when there is none."""
    match = ANSWER_PATTERN.search(text)
    return match.group(1).strip() if match else ""


def parse_number(text: str) -> float | None:
    """float(text without ","), or None when that fails or is not finite (inf, nan, overflow)."""
    try:
        value = float(text.replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def multiple_choice_accuracy(answer: str, truth: str) -> float:
    """1 if answer.strip() == truth.strip() (case-sensitive), else 0."""
    return 1.0 if answer.strip() == truth.strip() else 0.0


def numerical_accuracy(answer: str, truth: str) -> float:
    """0 if exactly one side has "." or ","; else 1 if both parse and round(x, 2) agree; else 0."""

    def has_decimal(s: str) -> bool:
        return "." in s or "," in s

    if has_decimal(answer) != has_decimal(truth):
        return 0.0
    a, t = parse_number(answer), parse_number(truth)
    if a is None or t is None:
        return 0.0
    return 1.0 if round(a, 2) == round(t, 2) else 0.0


def word_edit_distance(reference: Sequence[str], hypothesis: Sequence[str]) -> int:
    """Levenshtein distance between two word sequences (substitution, insertion, deletion cost 1)."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref_word in enumerate(reference, start=1):
        current = [i]
        for j, hyp_word in enumerate(hypothesis, start=1):
            if ref_word == hyp_word:
                current.append(previous[j - 1])
            else:
                current.append(1 + min(previous[j], current[j - 1], previous[j - 1]))
        previous = current
    return previous[-1]


def ocr_accuracy(answer: str, truth: str) -> float:
    """1 - WER clipped to [0, 1]; WER = word_edit_distance(truth words, answer words) / max(1, #truth words)."""
    reference, hypothesis = truth.split(), answer.split()
    wer = word_edit_distance(reference, hypothesis) / max(1, len(reference))
    return min(1.0, max(0.0, 1.0 - wer))


def free_form_accuracy(answer: str, truth: str) -> float:
    """Mean of ROUGE-1, ROUGE-2, ROUGE-L F-measures of answer against truth (Porter stemming), in [0, 1].

    rouge_score lower-cases and keeps only [a-z0-9] runs as tokens (words longer than 3 letters are
    stemmed), so text in other scripts has no tokens and scores 0.
    """
    scores = _ROUGE.score(truth, answer)
    mean = (scores["rouge1"].fmeasure + scores["rouge2"].fmeasure + scores["rougeL"].fmeasure) / 3.0
    return min(1.0, max(0.0, mean))


def regression_accuracy(answer: str, truth: str) -> float:
    """1 - min(1, (|a - t| + 1e-9) / (|t| + 1e-9)); 0 when either does not parse.

    As the formula says, a truth of exactly 0 scores 0 for every answer, 0 included.
    """
    a, t = parse_number(answer), parse_number(truth)
    if a is None or t is None:
        return 0.0
    relative = (abs(a - t) + 1e-9) / (abs(t) + 1e-9)
    return 1.0 - min(1.0, max(0.0, relative))


ACCURACY_SCORERS: dict[str, Scorer] = {
    "multiple choice": multiple_choice_accuracy,
    "numerical": numerical_accuracy,
    "OCR": ocr_accuracy,
    "free-form": free_form_accuracy,
    "regression": regression_accuracy,
}


def format_reward(response: str, template: str = "think") -> float:
    """1 if the whole response matches FORMAT_PATTERNS[template] (dot matches newline), else 0."""
    if template not in FORMAT_PATTERNS:
        known = sorted(FORMAT_PATTERNS)
        raise RewardError(f"unknown prompt template {template!r} for the format reward; choose one of {known}")
    return 1.0 if FORMAT_PATTERNS[template].fullmatch(response) else 0.0


def _field(record, key: str):
    return record.get(key) if isinstance(record, Mapping) else getattr(record, key, None)


def _describe(record) -> str:
    """'record <problem_id> (<source>)' with whatever of the two the record has."""
    pid, source = _field(record, "problem_id"), _field(record, "source")
    name = f"record {pid}" if pid is not None else "record"
    return f"{name} ({source})" if source else name


def _scorer_for(record, scorers: Mapping[str, Scorer]) -> Scorer:
    problem_type = _field(record, "problem_type")
    if not isinstance(problem_type, str):
        raise RewardError(f"{_describe(record)}: 'problem_type' is missing or not a string")
    if problem_type not in scorers:
        known = sorted(scorers)
        raise RewardError(f"{_describe(record)}: unknown problem_type {problem_type!r}; the reward knows {known}")
    return scorers[problem_type]


def _truth(record) -> str:
    solution = _field(record, "solution")
    if not isinstance(solution, str):
        raise RewardError(f"{_describe(record)}: 'solution' is missing or not a string")
    match = ANSWER_PATTERN.search(solution)
    return match.group(1).strip() if match else solution.strip()


def accuracy_reward(response: str, record, scorers: Mapping[str, Scorer] | None = None) -> float:
    """Accuracy of `response` for `record` (a data.records.Record or a dict with Video-R1 keys), in [0, 1]."""
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    scorer = _scorer_for(record, ACCURACY_SCORERS if scorers is None else scorers)
    truth = _truth(record)
    answer = extract_answer(response)
    if not answer:
        return 0.0
    try:
        value = float(scorer(answer, truth))
    except Exception:  # a malformed response scores 0 and never stops training (Video-R1 does the same)
        return 0.0
    return min(1.0, max(0.0, value)) if math.isfinite(value) else 0.0


def score(
    response: str,
    record,
    template: str = "think",
    accuracy_weight: float = 0.9,
    format_weight: float = 0.1,
    scorers: Mapping[str, Scorer] | None = None,
) -> RewardScore:
    """Rewards of one response: accuracy by problem type, format by template, and their weighted sum.

    `record` is a Record or a dict with `problem_type` and `solution` (`problem_id` / `source` name it in
    errors); `scorers` replaces ACCURACY_SCORERS. Raises RewardError for an unknown problem_type or template.
    """
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    fmt = format_reward(response, template)
    accuracy = accuracy_reward(response, record, scorers)
    return RewardScore(accuracy=accuracy, format=fmt, total=accuracy_weight * accuracy + format_weight * fmt)


def score_batch(
    responses: Sequence[str],
    records: Sequence,
    template: str = "think",
    accuracy_weight: float = 0.9,
    format_weight: float = 0.1,
    scorers: Mapping[str, Scorer] | None = None,
) -> list[RewardScore]:
    """score() of responses[i] against records[i] (repeat each record G times for G responses)."""
    if len(responses) != len(records):
        raise ValueError(f"{len(responses)} responses for {len(records)} records")
    return [score(r, rec, template, accuracy_weight, format_weight, scorers) for r, rec in zip(responses, records)]


def accuracy_by_type(records: Iterable, scores: Iterable) -> dict[str, float]:
    """{problem_type: mean accuracy}, sorted by type, for the metrics `reward/accuracy_by_type/<type>`.

    `records` holds Records, dicts or plain problem-type strings; `scores` holds RewardScores or plain
    accuracies, one per record. Types with no record are absent.
    """
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    records, scores = list(records), list(scores)
    if len(records) != len(scores):
        raise ValueError(f"{len(scores)} scores for {len(records)} records")
    for record, s in zip(records, scores):
        problem_type = record if isinstance(record, str) else _field(record, "problem_type")
        accuracy = s.accuracy if isinstance(s, RewardScore) else float(s)
        sums[problem_type] = sums.get(problem_type, 0.0) + accuracy
        counts[problem_type] = counts.get(problem_type, 0) + 1
    return {t: sums[t] / counts[t] for t in sorted(sums)}


def load_reward_function(spec: str) -> Callable | None:
    """The callable named by ``algorithm.reward_function`` ("package.module:function"; "" = None, the
    Video-R1 reward). It is called as f(response_text, record, template) and returns a float total or an
    object with ``accuracy``, ``format`` and ``total``."""
    if not spec:
        return None
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UserError(f"algorithm.reward_function: expected 'package.module:function', got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(f"algorithm.reward_function: cannot load {spec!r} ({e})") from None
    if not callable(fn):
        raise UserError(f"algorithm.reward_function: {spec!r} is not callable")
    return fn
