"""Benchmark converters (MVBench, Video-MME, TempCompass -> Video-R1 records) on small hand-written files in
each benchmark's published layout: the records' options, answers, paths and labels against hand-derived
values, every record accepted by the trainer's record parser, and every unusable item counted with its reason."""

from __future__ import annotations

from megatron_ral.data.eval_sets import (
    MVBENCH_TASKS,
    drop_missing_media,
    mvbench_records,
    tempcompass_records,
    videomme_records,
)
from megatron_ral.data.records import parse_record

MVBENCH = {
    "action_sequence.json": [
        {"video": "3MSZA.mp4", "question": "What happened after the person took the food?",
         "candidates": ["Ate the medicine.", "Tidied up the blanket.", "Put down the cup/glass/bottle."],
         "answer": "Tidied up the blanket.", "start": 10.5, "end": 23.0},
        {"video": "QX1OZ.mp4", "question": "What did the person do first?",
         "candidates": ["Opened the door.", "Closed the box."], "answer": "Sat down."},        # not a candidate
    ],
    "object_shuffle.json": [
        {"video": "video_5011.mp4", "question": "Where is the hidden object at the end?",
         "candidates": ["Under the first object", "Under the second object", "Under the third object"],
         "answer": "Under the third object"},
    ],
    "episodic_reasoning.json": [
        {"video": "s01e01_seg02_clip_00", "question": "Why did Sheldon leave?", "candidates": ["a", "b"],
         "answer": "b", "start": 1.0, "end": 4.0},
    ],
    "notes.json": [{"anything": 1}],
}


def _parsed(records):
    return [parse_record(r, f"test:{i}") for i, r in enumerate(records)]


def test_mvbench():
    got = mvbench_records(MVBENCH)
    assert [r["problem_id"] for r in got.records] == ["mvbench/action_sequence/0", "mvbench/object_shuffle/0"]
    first, second = got.records
    assert first["options"] == ["A. Ate the medicine.", "B. Tidied up the blanket.", "C. Put down the cup/glass/bottle."]
    assert first["solution"] == "<answer>B</answer>"
    assert first["path"] == "video/star/Charades_v1_480/3MSZA.mp4"
    assert (first["video_start"], first["video_end"]) == (10.5, 23.0)
    assert first["benchmark_task"] == "Action Sequence" and first["data_source"] == "MVBench"
    assert second["solution"] == "<answer>C</answer>" and second["path"] == "video/perception/videos/video_5011.mp4"
    assert "video_start" not in second
    assert {s["item"]: s["reason"] for s in got.skipped} == {
        "action_sequence.json[1]": "answer is not one of the candidates",
        "episodic_reasoning.json[0]": "frame directories (Episodic Reasoning), not video files",
        "notes.json": "not an MVBench task file"}
    recs = _parsed(got.records)
    assert [r.answer for r in recs] == ["B", "C"] and all(r.data_type == "video" for r in recs)
    assert recs[0].extra["video_start"] == 10.5
    assert len(MVBENCH_TASKS) == 20


VIDEOMME_ROWS = [
    {"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
     "url": "https://www.youtube.com/watch?v=fFjv93ACGo8", "videoID": "fFjv93ACGo8", "question_id": "001-1",
     "task_type": "Counting Problem", "question": "When demonstrating the Germany modern Christmas tree is "
     "initially decorated with apples, candles and berries, which kind of the decoration has the largest number?",
     "options": ["A. Apples.", "B. Candles.", "C. Berries.", "D. The three kinds are of the same number."],
     "answer": "C"},
    {"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
     "url": "https://www.youtube.com/watch?v=fFjv93ACGo8", "videoID": "fFjv93ACGo8", "question_id": "001-2",
     "task_type": "Information Synopsis", "question": "What is the genre of this video?",
     "options": ["A. It is a news report.", "B. It is a documentary.", "C. It is a vlog.", "D. It is a tutorial."],
     "answer": "E"},                                                                        # no option E
    {"video_id": "002", "duration": "long", "domain": "Film & Television", "sub_category": "Movie & TV Show",
     "url": "u", "videoID": "abcDEF12345", "question_id": "002-3", "task_type": "Action Reasoning",
     "question": "Why does he run?", "options": ["B. x", "A. y"], "answer": "A"},            # letters out of order
]


def test_videomme_rows_and_original_layout():
    got = videomme_records(VIDEOMME_ROWS)
    assert len(got.records) == 1
    r = got.records[0]
    assert r["problem_id"] == "videomme/001-1" and r["path"] == "data/fFjv93ACGo8.mp4"
    assert r["options"] == VIDEOMME_ROWS[0]["options"] and r["solution"] == "<answer>C</answer>"
    assert (r["duration"], r["domain"], r["sub_category"], r["task_type"]) == (
        "short", "Knowledge", "Humanity & History", "Counting Problem")
    assert [s["reason"] for s in got.skipped] == ["answer 'E' is not one of the 4 options",
                                                  "options are not lettered A, B, C, ... in order"]
    assert _parsed(got.records)[0].answer == "C"

    nested = [{k: v for k, v in VIDEOMME_ROWS[0].items() if k in ("video_id", "duration", "domain", "sub_category",
                                                                  "url", "videoID")}]
    nested[0]["questions"] = [{k: VIDEOMME_ROWS[0][k] for k in ("question_id", "task_type", "question", "options",
                                                                "answer")}]
    assert videomme_records(nested, video_dir="videos", ext=".mkv").records == [
        {**r, "path": "videos/fFjv93ACGo8.mkv"}]


TEMPCOMPASS = {
    "1034419625": {
        "action": [
            {"question": "What is the man doing in the video?\nA. dunking a basketball\nB. dribbling a basketball\n"
                         "C. passing a basketball", "answer": "A. dunking a basketball"},
            {"question": "Which activity is the man engaged in?\nA. passing\nB. dunking", "answer": "B. passing"},
        ],
        "direction": [
            {"question": "From the camera's point of view, in which direction is the man moving?\nA. away from the "
                         "camera\nB. towards the camera\nC. from left to right", "answer": "C. from left to right"},
        ],
    },
    "1034419625_reverse": {
        "direction": [{"question": "Which way?\nA. left\nB. right\nC. up\nD. down", "answer": "D"}],
    },
    "broken": {"speed": [{"question": "How fast is it? (no options)", "answer": "A. fast"}]},
}


def test_tempcompass_nested_and_rows():
    got = tempcompass_records(TEMPCOMPASS)
    ids = [r["problem_id"] for r in got.records]
    assert ids == ["tempcompass/1034419625/action/0", "tempcompass/1034419625/direction/0",
                   "tempcompass/1034419625_reverse/direction/0"]
    a, d, rev = got.records
    assert a["problem"] == "What is the man doing in the video?"
    assert a["options"] == ["A. dunking a basketball", "B. dribbling a basketball", "C. passing a basketball"]
    assert a["solution"] == "<answer>A</answer>" and a["path"] == "videos/1034419625.mp4" and a["dimension"] == "action"
    assert d["solution"] == "<answer>C</answer>" and d["dimension"] == "direction"
    assert rev["solution"] == "<answer>D</answer>" and rev["path"] == "videos/1034419625_reverse.mp4"
    assert {s["item"]: s["reason"] for s in got.skipped} == {
        "1034419625.action[1]": "answer text differs from its option's text",
        "broken.speed[0]": "no question text followed by options A., B., ..."}
    assert [r.answer for r in _parsed(got.records)] == ["A", "C", "D"]

    rows = [{"video_id": vid, "dim": dim, **q} for vid, dims in TEMPCOMPASS.items() if vid != "broken"
            for dim, qs in dims.items() for q in qs]
    flat = tempcompass_records(rows)
    assert [r["problem_id"] for r in flat.records] == [
        "tempcompass/1034419625/action/0", "tempcompass/1034419625/direction/0",
        "tempcompass/1034419625_reverse/direction/0"]
    assert [r["options"] for r in flat.records] == [r["options"] for r in got.records]


def test_drop_missing_media(tmp_path):
    got = mvbench_records(MVBENCH)
    (tmp_path / "video" / "perception" / "videos").mkdir(parents=True)
    (tmp_path / "video" / "perception" / "videos" / "video_5011.mp4").write_bytes(b"x")
    kept = drop_missing_media(got, str(tmp_path))
    assert [r["problem_id"] for r in kept.records] == ["mvbench/object_shuffle/0"]
    assert kept.skipped[-1] == {"item": "mvbench/action_sequence/0",
                                "reason": "video file not found under the media root"}
    assert len(kept.skipped) == len(got.skipped) + 1
