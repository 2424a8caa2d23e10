"""Held-out evaluation: greedy generation + the reward parser, on every data-parallel rank's shard.

The one evaluation function, used by the trainer (``eval/*`` metrics), ``tools/evaluate.py`` and the
quickstart. Each data-parallel rank answers its shard of the records (greedy, one response per
prompt); correct/format counts are summed over ranks, so the accuracy covers every record that could be
read (unreadable records are skipped and counted as ``eval/skipped``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_ral.data.records import PROBLEM_TYPES
from megatron_ral.inference.generate import generate
from megatron_ral.rl.metrics import MetricSums
from megatron_ral.rl.rewards import score
from megatron_ral.rl.rollout import decode_response, prompts_of


@dataclass
class EvalResult:
    """accuracy / format: means over the evaluated records; by_type: accuracy per problem type; by_source:
    accuracy per record ``data_source`` (the synthetic task name);
    samples: (problem_id, response text, accuracy) of this rank's records (for inspection);
    predictions: one dict per record of this rank (``keep_predictions``): problem_id, problem_type, response,
    answer (the parsed ``<answer>``), solution, accuracy, format."""

    accuracy: float
    format: float
    reward: float
    count: int
    skipped: int
    by_type: dict[str, float] = field(default_factory=dict)
    by_source: dict[str, float] = field(default_factory=dict)
    samples: list = field(default_factory=list)
    predictions: list = field(default_factory=list)

    def metrics(self, prefix: str = "eval") -> dict[str, float]:
        out = {f"{prefix}/accuracy": self.accuracy, f"{prefix}/format": self.format,
               f"{prefix}/reward": self.reward, f"{prefix}/count": float(self.count),
               f"{prefix}/skipped": float(self.skipped)}
        out.update({f"{prefix}/accuracy_by_type/{t}": v for t, v in self.by_type.items()})
        out.update({f"{prefix}/accuracy_by_source/{t}": v for t, v in self.by_source.items()})
        return out


def evaluate(model, loader, tokenizer, generation, *, template: str, stop_token_ids: list[int],
             suppress_token_ids: list[int], image_token_id: int, video_token_id: int, merge_size: int = 2,
             accuracy_weight: float = 0.9, format_weight: float = 0.1, owner: bool = True,
             keep_samples: int = 0, keep_predictions: bool = False, show_progress: bool = False) -> EvalResult:
    """Greedy answers to every record of ``loader`` (a one-epoch prompt-mode VisionDataLoader of this
    data-parallel rank); ``owner`` marks the rank that contributes this data-parallel group's counts
    (model-parallel rank 0). Collective over the world. ``show_progress``: a progress bar (batches) on stderr."""
    from megatron_ral.logging.progress import progress
    from megatron_ral.rl.rewards import extract_answer

    sums = MetricSums()
    samples, predictions = [], []
    stop = set(int(i) for i in stop_token_ids)
    for batch in progress(loader, desc="evaluate", unit="batch", enabled=None if show_progress else False):
        prompts = prompts_of(batch, image_token_id, video_token_id, merge_size)
        responses = generate(model, prompts, generation, num_samples=1, greedy=True, stop_token_ids=stop_token_ids,
                             suppress_token_ids=suppress_token_ids)
        for row, record in zip(responses, batch.records):
            text = decode_response(tokenizer, row[0].token_ids, stop)
            s = score(text, record, template, accuracy_weight, format_weight)
            if owner:
                sums.add("accuracy", s.accuracy)
                sums.add("format", s.format)
                sums.add("reward", s.total)
                sums.add(f"type/{record.problem_type}", s.accuracy)
                if record.data_source:
                    sums.add(f"source/{record.data_source}", s.accuracy)
            if len(samples) < keep_samples:
                samples.append((record.problem_id, text, s.accuracy))
            if keep_predictions:
                predictions.append({"problem_id": record.problem_id, "problem_type": record.problem_type,
                                    "response": text, "answer": extract_answer(text),
                                    "solution": record.answer,
                                    "accuracy": s.accuracy, "format": s.format})
    skipped = loader.metrics().get("data/skipped_total", 0.0)
    sums.add("skipped", skipped if owner else 0.0, 0.0)
    total = sums.all_reduce()
    by_type = {t: total.mean(f"type/{t}") for t in PROBLEM_TYPES if total.counts.get(f"type/{t}", 0) > 0}
    return EvalResult(accuracy=total.mean("accuracy"), format=total.mean("format"), reward=total.mean("reward"),
                      count=int(total.counts.get("accuracy", 0)), skipped=int(total.total("skipped")),
                      by_type=by_type, by_source={k[len("source/"):]: total.mean(k) for k in sorted(total.counts)
                                                  if k.startswith("source/")}, samples=samples,
                      predictions=predictions)


def chance_accuracy(records: list, reference: list) -> float:
    """Expected accuracy of guessing uniformly among the possible answers, over ``records``.

    A multiple-choice record has 1 / (number of options); any other record 1 / (number of distinct answers
    that ``reference`` records of the same ``data_source`` have), 1 / (distinct answers of its problem type)
    when the source is unknown. Records are dicts or ``Record`` objects; answers are the ``<answer>`` text of
    ``solution``.
    """
    from megatron_ral.rl.rewards import extract_answer

    def get(r, key):
        return r.get(key) if isinstance(r, dict) else getattr(r, key, None)

    answers: dict[tuple, set] = {}
    for r in reference:
        for key in (("source", get(r, "data_source")), ("type", get(r, "problem_type"))):
            answers.setdefault(key, set()).add(extract_answer(get(r, "solution") or ""))
    total = 0.0
    for r in records:
        options = get(r, "options") or []
        if get(r, "problem_type") == "multiple choice" and options:
            total += 1.0 / len(options)
            continue
        seen = answers.get(("source", get(r, "data_source"))) or answers.get(("type", get(r, "problem_type"))) or {""}
        total += 1.0 / len(seen)
    return total / max(len(records), 1)
