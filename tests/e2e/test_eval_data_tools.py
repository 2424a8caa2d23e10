"""tools/eval_data/convert_{mvbench,videomme,tempcompass}.py as a user runs them, on small files in each
benchmark's published layout: the record file they write loads through the trainer's record index, --json
reports counts and skipped items with reasons, --media-root keeps only records whose video exists, and bad
input is one line with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e


def _run(tool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    return subprocess.run([sys.executable, str(ROOT / "tools" / "eval_data" / f"convert_{tool}.py"), *args],
                          capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


def _load(path: Path) -> list:
    from megatron_ral.data.records import RecordIndex

    index = RecordIndex.build([str(path)])
    return [index.read(i) for i in range(len(index))]


def test_mvbench_tool(tmp_path):
    bench = tmp_path / "MVBench"
    (bench / "json").mkdir(parents=True)
    (bench / "json" / "action_antonym.json").write_text(json.dumps([
        {"video": "166583.webm", "question": "What is the action performed by the person in the video?",
         "candidates": ["Not sure", "Scattering something down", "Piling something up"],
         "answer": "Piling something up"},
        {"video": "74225.webm", "question": "What is the person doing?", "candidates": ["a", "b"], "answer": "a"}]))
    (bench / "json" / "episodic_reasoning.json").write_text(json.dumps([
        {"video": "s03e01_seg02_clip_01", "question": "q", "candidates": ["a", "b"], "answer": "a", "start": 1,
         "end": 2}]))
    videos = bench / "video" / "ssv2_video"
    videos.mkdir(parents=True)
    (videos / "166583.webm").write_bytes(b"\x1a\x45\xdf\xa3")

    out = _run("mvbench", "--src", str(bench), "--out", str(bench / "mvbench.json"), "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["records"] == 2 and summary["skipped"] == 1
    assert summary["records_by_benchmark_task"] == {"Action Antonym": 2}
    assert summary["skipped_items"] == [{"item": "episodic_reasoning.json[0]",
                                         "reason": "frame directories (Episodic Reasoning), not video files"}]
    records = _load(bench / "mvbench.json")
    assert [(r.problem_id, r.answer, r.path) for r in records] == [
        ("mvbench/action_antonym/0", "C", "video/ssv2_video/166583.webm"),
        ("mvbench/action_antonym/1", "A", "video/ssv2_video/74225.webm")]
    assert records[0].options == ["A. Not sure", "B. Scattering something down", "C. Piling something up"]
    assert records[0].media_path(str(bench)) == str(videos / "166583.webm")

    # only records whose video is there; tasks chosen by name
    out = _run("mvbench", "--src", str(bench / "json"), "--tasks", "Action Antonym", "--media-root", str(bench),
               "--out", str(tmp_path / "present.json"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (f"wrote {tmp_path / 'present.json'}: 1 records, 1 skipped "
                                  f"(video file not found under the media root: 1)")
    assert [r.problem_id for r in _load(tmp_path / "present.json")] == ["mvbench/action_antonym/0"]


def test_videomme_tool_json_lines(tmp_path):
    rows = [{"video_id": "601", "duration": "long", "domain": "Sports Competition", "sub_category": "Football",
             "url": "u", "videoID": "Zx1YVSEiRqU", "question_id": "601-1", "task_type": "Temporal Reasoning",
             "question": "Which team scored first?", "options": ["A. Red.", "B. Blue.", "C. Neither.", "D. Both."],
             "answer": "B"},
            {"video_id": "601", "duration": "long", "domain": "Sports Competition", "sub_category": "Football",
             "url": "u", "videoID": "Zx1YVSEiRqU", "question_id": "601-2", "task_type": "Counting Problem",
             "question": "How many goals?", "options": ["A. 1.", "B. 2.", "C. 3.", "D. 4."], "answer": "D"}]
    src = tmp_path / "videomme.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")      # what datasets' to_json writes
    out = _run("videomme", "--src", str(src), "--out", str(tmp_path / "vm.json"), "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["records_by_duration"] == {"long": 2}
    records = _load(tmp_path / "vm.json")
    assert [(r.problem_id, r.answer, r.path, r.extra["task_type"]) for r in records] == [
        ("videomme/601-1", "B", "data/Zx1YVSEiRqU.mp4", "Temporal Reasoning"),
        ("videomme/601-2", "D", "data/Zx1YVSEiRqU.mp4", "Counting Problem")]


def test_tempcompass_tool(tmp_path):
    src = tmp_path / "multi-choice.json"
    src.write_text(json.dumps({"1098982673": {"speed": [
        {"question": "What is the speed of the video?\nA. normal speed\nB. slow motion\nC. fast forward\nD. reverse",
         "answer": "A. normal speed"}]}}))
    out = _run("tempcompass", "--src", str(src), "--out", str(tmp_path / "tc.json"), "--video-dir", "clips",
               cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    [r] = _load(tmp_path / "tc.json")
    assert (r.problem, r.answer, r.path, r.extra["dimension"]) == ("What is the speed of the video?", "A",
                                                                  "clips/1098982673.mp4", "speed")


@pytest.mark.parametrize("tool, args, message", [
    ("mvbench", ["--src", "missing_dir", "--out", "o.json"], "--src missing_dir: no such directory"),
    ("mvbench", ["--src", ".", "--out", "o.json"], "no MVBench task file"),
    ("mvbench", ["--src", ".", "--tasks", "Jumping", "--out", "o.json"], "--tasks 'Jumping'"),
    ("videomme", ["--src", "bad.json", "--out", "o.json"], "neither JSON nor JSON lines"),
    ("videomme", ["--src", "empty.json", "--out", "o.json"], "no record converted"),
    ("tempcompass", ["--src", "empty.json", "--out", "no_dir/o.json"], "--out no_dir/o.json"),
])
def test_bad_input_is_one_line(tmp_path, tool, args, message):
    (tmp_path / "bad.json").write_text("{not json\n")
    (tmp_path / "empty.json").write_text("[]")
    out = _run(tool, *args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and f"convert_{tool}.py: error:" in lines[0] and message in lines[0], out.stderr
    assert not (tmp_path / "o.json").exists()
