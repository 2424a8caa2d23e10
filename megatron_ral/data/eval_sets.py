"""Public video benchmarks (multiple choice) as Video-R1 records, for ``tools/evaluate.py``.

Each converter takes the benchmark's question file(s) as published (already decoded from JSON) and returns
:class:`Converted`: Video-R1 records (``problem_id``, ``problem``, ``data_type`` "video", ``problem_type``
"multiple choice", ``options`` ["A. ...", ...], ``solution`` "<answer>X</answer>", ``path`` relative to the
benchmark's root directory, ``data_source``, plus the benchmark's own labels as extra fields) and the items
that could not be converted, each with its reason. Nothing here reads media.

MVBench (OpenGVLab/MVBench): ``json/<task>.json``, a list of ``{"video", "question", "candidates",
    "answer" (the correct candidate's text), ["start", "end"] (seconds)}`` per task; videos under
    ``video/<the task's folder>/``. Records carry ``benchmark_task``; tasks whose items are a segment of
    their video keep it as ``video_start`` / ``video_end`` (the loader reads the whole video: see
    :data:`MVBENCH_TASKS`); Episodic Reasoning's items are directories of frames, not videos: skipped.
Video-MME (lmms-lab/Video-MME): ``videomme/test-*.parquet`` rows exported to JSON (``video_id``, ``duration``,
    ``domain``, ``sub_category``, ``url``, ``videoID``, ``question_id``, ``task_type``, ``question``,
    ``options`` ["A. ...", ...], ``answer`` "A"), or the original per-video JSON (the same fields, questions
    nested under ``questions``); videos ``data/<videoID>.mp4``. Extra fields: ``duration``, ``domain``,
    ``sub_category``, ``task_type``. Subtitles are not used (the "without subtitles" setting).
TempCompass (llyx97/TempCompass): ``questions/multi-choice.json``, ``{video_id: {dimension: [{"question":
    "text\\nA. ...\\nB. ...", "answer": "B. ..."}]}}``, or its flat export (``video_id``, ``dim``,
    ``question``, ``answer`` rows); videos ``videos/<video_id>.mp4``. Extra field: ``dimension``.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

LETTERS = string.ascii_uppercase
PROBLEM_TYPE = "multiple choice"

# MVBench task file -> (task name, video folder under video/, media kind, has a segment [start, end])
MVBENCH_TASKS: dict[str, tuple[str, str, str, bool]] = {
    "action_sequence.json": ("Action Sequence", "star/Charades_v1_480", "video", True),
    "action_prediction.json": ("Action Prediction", "star/Charades_v1_480", "video", True),
    "action_antonym.json": ("Action Antonym", "ssv2_video", "video", False),
    "fine_grained_action.json": ("Fine-grained Action", "Moments_in_Time_Raw/videos", "video", False),
    "unexpected_action.json": ("Unexpected Action", "FunQA_test/test", "video", False),
    "object_existence.json": ("Object Existence", "clevrer/video_validation", "video", False),
    "object_interaction.json": ("Object Interaction", "star/Charades_v1_480", "video", True),
    "object_shuffle.json": ("Object Shuffle", "perception/videos", "video", False),
    "moving_direction.json": ("Moving Direction", "clevrer/video_validation", "video", False),
    "action_localization.json": ("Action Localization", "sta/sta_video", "video", True),
    "scene_transition.json": ("Scene Transition", "scene_qa/video", "video", False),
    "action_count.json": ("Action Count", "perception/videos", "video", False),
    "moving_count.json": ("Moving Count", "clevrer/video_validation", "video", False),
    "moving_attribute.json": ("Moving Attribute", "clevrer/video_validation", "video", False),
    "state_change.json": ("State Change", "perception/videos", "video", False),
    "fine_grained_pose.json": ("Fine-grained Pose", "nturgbd", "video", False),
    "character_order.json": ("Character Order", "perception/videos", "video", False),
    "egocentric_navigation.json": ("Egocentric Navigation", "vlnqa", "video", False),
    "episodic_reasoning.json": ("Episodic Reasoning", "tvqa/frames_fps3_hq", "frames", True),
    "counterfactual_inference.json": ("Counterfactual Inference", "clevrer/video_validation", "video", False),
}

_OPTION = re.compile(r"^\s*\(?([A-Z])\)?[.:)]\s*(.*?)\s*$", re.S)   # "A. text", "(A) text", "A: text"


class Skip(Exception):
    """One item that cannot become a record; the message is the reason."""


@dataclass
class Converted:
    records: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)   # {"item": where, "reason": why}

    def add(self, make, where: str) -> None:
        try:
            self.records.append(make())
        except Skip as e:
            self.skipped.append({"item": where, "reason": str(e)})

    def summary(self, group_key: str | None = None) -> dict:
        reasons = Counter(s["reason"] for s in self.skipped)
        out = {"records": len(self.records), "skipped": len(self.skipped),
               "skipped_by_reason": dict(sorted(reasons.items()))}
        if group_key:
            out[f"records_by_{group_key}"] = dict(sorted(Counter(str(r.get(group_key)) for r in self.records).items()))
        return out


def letter_options(texts: Iterable[str]) -> list[str]:
    """["red", "blue"] -> ["A. red", "B. blue"] (Video-R1's option strings)."""
    texts = list(texts)
    if not texts:
        raise Skip("no options")
    if len(texts) > len(LETTERS):
        raise Skip(f"{len(texts)} options (at most {len(LETTERS)})")
    return [f"{LETTERS[i]}. {str(t).strip()}" for i, t in enumerate(texts)]


def split_lettered(options: Iterable[str]) -> list[str]:
    """Texts of options lettered A, B, C, ... in order ("A. x" or "(A) x"); Skip when not so lettered."""
    texts = []
    for i, option in enumerate(options):
        m = _OPTION.match(str(option))
        if not m or m.group(1) != LETTERS[i]:
            raise Skip("options are not lettered A, B, C, ... in order")
        texts.append(m.group(2))
    return texts


def _record(problem_id: str, problem: str, options: list[str], letter: str, path: str, source: str,
            **extra: Any) -> dict:
    if not str(problem).strip():
        raise Skip("empty question")
    if letter not in LETTERS[:len(options)]:
        raise Skip(f"answer {letter!r} is not one of the {len(options)} options")
    return {"problem_id": problem_id, "problem": str(problem).strip(), "data_type": "video",
            "problem_type": PROBLEM_TYPE, "options": options, "solution": f"<answer>{letter}</answer>",
            "path": path, "data_source": source, **extra}


def _field(item: Mapping, key: str):
    if not isinstance(item, Mapping):
        raise Skip(f"item is a JSON {type(item).__name__}, not an object")
    value = item.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise Skip(f"field '{key}' is missing")
    return value


# --- MVBench ---------------------------------------------------------------------------------------------

def mvbench_records(task_files: Mapping[str, Any], video_root: str = "video") -> Converted:
    """`task_files`: task file name (e.g. "action_sequence.json") -> its decoded list of items."""
    out = Converted()
    for name, items in task_files.items():
        if name not in MVBENCH_TASKS:
            out.skipped.append({"item": name, "reason": "not an MVBench task file"})
            continue
        task, folder, kind, segment = MVBENCH_TASKS[name]
        if not isinstance(items, list):
            out.skipped.append({"item": name, "reason": "task file is not a JSON list"})
            continue
        stem = name.rsplit(".", 1)[0]
        for i, item in enumerate(items):
            out.add(lambda: _mvbench_one(item, i, stem, task, folder, kind, segment, video_root), f"{name}[{i}]")
    return out


def _mvbench_one(item, i, stem, task, folder, kind, segment, video_root) -> dict:
    video = _field(item, "video")
    if kind != "video":
        raise Skip("frame directories (Episodic Reasoning), not video files")
    candidates = _field(item, "candidates")
    if not isinstance(candidates, list):
        raise Skip("field 'candidates' is not a list")
    answer = str(_field(item, "answer")).strip()
    matches = [j for j, c in enumerate(candidates) if str(c).strip() == answer]
    if not matches:
        raise Skip("answer is not one of the candidates")
    extra: dict[str, Any] = {"benchmark_task": task}
    if segment and item.get("start") is not None and item.get("end") is not None:
        extra.update(video_start=float(item["start"]), video_end=float(item["end"]))
    path = "/".join(p.strip("/") for p in (video_root, folder, str(video)) if p)
    return _record(f"mvbench/{stem}/{i}", _field(item, "question"), letter_options(candidates),
                   LETTERS[matches[0]], path, "MVBench", **extra)


# --- Video-MME -------------------------------------------------------------------------------------------

VIDEOMME_LABELS = ("duration", "domain", "sub_category", "task_type")


def videomme_records(rows: Iterable[Mapping], video_dir: str = "data", ext: str = ".mp4") -> Converted:
    """Rows of the parquet export, or the original per-video objects with nested ``questions``."""
    out = Converted()
    for i, row in enumerate(rows):
        if isinstance(row, Mapping) and isinstance(row.get("questions"), list):  # original layout
            video = {k: v for k, v in row.items() if k != "questions"}
            for j, q in enumerate(row["questions"]):
                merged = {**video, **q} if isinstance(q, Mapping) else q
                out.add(lambda: _videomme_one(merged, video_dir, ext), f"[{i}].questions[{j}]")
        else:
            out.add(lambda: _videomme_one(row, video_dir, ext), f"[{i}]")
    return out


def _videomme_one(row, video_dir, ext) -> dict:
    youtube_id = str(_field(row, "videoID")).strip()
    options = _field(row, "options")
    if not isinstance(options, list):
        raise Skip("field 'options' is not a list")
    texts = split_lettered(options)
    letter = str(_field(row, "answer")).strip().upper()
    qid = str(row.get("question_id") or f"{row.get('video_id', youtube_id)}-?")
    labels = {k: row[k] for k in VIDEOMME_LABELS if row.get(k) is not None}
    path = "/".join(p.strip("/") for p in (video_dir, youtube_id + ext) if p)
    return _record(f"videomme/{qid}", _field(row, "question"), letter_options(texts), letter, path, "Video-MME",
                   **labels)


# --- TempCompass -----------------------------------------------------------------------------------------

def tempcompass_records(data: Any, video_dir: str = "videos", ext: str = ".mp4") -> Converted:
    """``{video_id: {dimension: [{"question", "answer"}]}}`` (questions/multi-choice.json), or a list of
    ``{"video_id", "dim", "question", "answer"}`` rows."""
    out = Converted()
    if isinstance(data, Mapping):
        for video_id, dims in data.items():
            if not isinstance(dims, Mapping):
                out.skipped.append({"item": str(video_id), "reason": "not a {dimension: [questions]} object"})
                continue
            for dim, questions in dims.items():
                for i, q in enumerate(questions if isinstance(questions, list) else [questions]):
                    out.add(lambda: _tempcompass_one(q, str(video_id), str(dim), f"{video_id}/{dim}/{i}",
                                                     video_dir, ext), f"{video_id}.{dim}[{i}]")
    elif isinstance(data, list):
        seen: Counter = Counter()
        for i, row in enumerate(data):
            def one(row=row):
                video_id = str(_field(row, "video_id"))
                dim = str(row.get("dim") or row.get("dimension") or "unknown")
                key = f"{video_id}/{dim}"
                seen[key] += 1
                return _tempcompass_one(row, video_id, dim, f"{key}/{seen[key] - 1}", video_dir, ext)
            out.add(one, f"[{i}]")
    else:
        out.skipped.append({"item": "file", "reason": "neither a {video_id: ...} object nor a list of rows"})
    return out


def _tempcompass_one(q, video_id, dim, pid, video_dir, ext) -> dict:
    lines = [ln for ln in str(_field(q, "question")).splitlines() if ln.strip()]
    first = next((k for k, ln in enumerate(lines) if _OPTION.match(ln) and _OPTION.match(ln).group(1) == "A"), None)
    if first is None or first == 0:
        raise Skip("no question text followed by options A., B., ...")
    texts = split_lettered(lines[first:])
    answer = str(_field(q, "answer")).strip()
    m = _OPTION.match(answer)
    letter = m.group(1) if m else answer.upper()[:1]
    if m and m.group(2) and letter in LETTERS[:len(texts)] and m.group(2) != texts[LETTERS.index(letter)]:
        raise Skip("answer text differs from its option's text")
    path = "/".join(p.strip("/") for p in (video_dir, video_id + ext) if p)
    return _record(f"tempcompass/{pid}", "\n".join(lines[:first]), letter_options(texts), letter, path,
                   "TempCompass", dimension=dim)




def drop_missing_media(converted: Converted, media_root: str) -> Converted:
    """The records whose video exists under `media_root`; the others become skipped items."""
    import os

    kept = Converted(skipped=list(converted.skipped))
    for r in converted.records:
        if os.path.isfile(os.path.join(media_root, r["path"])):
            kept.records.append(r)
        else:
            kept.skipped.append({"item": r["problem_id"], "reason": "video file not found under the media root"})
    return kept


__all__ = ["Converted", "MVBENCH_TASKS", "Skip", "drop_missing_media", "letter_options", "mvbench_records",
           "split_lettered", "tempcompass_records", "videomme_records"]
