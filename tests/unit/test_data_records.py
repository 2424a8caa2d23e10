"""Record files: JSON array and JSON lines indexed by byte offset, malformed records reported with
file:line, validation of required fields, max_records, and the per-epoch DP partition."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_ral.data.errors import RecordError, RecordFileError
from megatron_ral.data.records import Record, RecordIndex, parse_record, scan_record_file
from megatron_ral.data.sharding import epoch_order, shard


def rec(i, **kw):
    r = {"problem_id": i, "problem": f"Q{i} with \"quotes\", {{braces}} and [brackets]\\n", "data_type": "video",
         "problem_type": "numerical", "options": [], "solution": f"<answer>{i}</answer>", "path": f"v/{i}.webm"}
    r.update(kw)
    return r


def test_json_array_pretty_printed(tmp_path):
    recs = [rec(i) for i in range(5)]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(recs, indent=2))
    index = RecordIndex.build([str(path)])
    assert len(index) == 5
    for i in range(5):
        r = index.read(i)
        assert r.problem_id == str(i) and r.problem == recs[i]["problem"]
    # Line numbers point at each record's opening brace.
    lines = path.read_text().splitlines()
    for i in range(5):
        assert lines[int(index.lines[i]) - 1].strip() == "{"
        assert index.source(i) == f"{path}:{int(index.lines[i])}"


def test_jsonl_with_blank_lines_and_malformed_line(tmp_path):
    path = tmp_path / "a.jsonl"
    rows = [json.dumps(rec(0)), "", json.dumps(rec(1)), '{"problem": "broken", ', json.dumps(rec(3))]
    path.write_text("\n".join(rows) + "\n")
    index = RecordIndex.build([str(path)])
    assert len(index) == 4
    assert [int(x) for x in index.lines] == [1, 3, 4, 5]
    assert index.read(1).problem_id == "1"
    with pytest.raises(RecordError) as err:
        index.read(2)
    assert err.value.reason == "malformed_record"
    assert err.value.source == f"{path}:4"
    assert index.read(3).problem_id == "3"


def test_malformed_record_inside_array_reports_exact_line(tmp_path):
    path = tmp_path / "a.json"
    text = json.dumps([rec(0), rec(1)], indent=1)
    # Break the second record's 3rd line: remove a comma between two fields.
    lines = text.splitlines()
    start = [k for k, l in enumerate(lines) if l.strip() == "{"][1]
    lines[start + 2] = lines[start + 2].rstrip(",")
    path.write_text("\n".join(lines))
    index = RecordIndex.build([str(path)])
    assert index.read(0).problem_id == "0"
    with pytest.raises(RecordError) as err:
        index.read(1)
    assert err.value.reason == "malformed_record"
    # The decoder fails on the line after the missing comma.
    assert err.value.source == f"{path}:{start + 4}"


@pytest.mark.parametrize("text,needle", [
    ('[{"a": 1}, {"b": 2}', "ends inside"),
    ('[{"a": 1} {"b": 2}]', "unexpected text"),
    ('[{"a": 1}, "x"]', "not a JSON object"),
    ('[{"a": 1}] extra', "after the end"),
])
def test_broken_array_structure_names_file_and_line(tmp_path, text, needle):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(RecordFileError, match=needle) as err:
        scan_record_file(str(path))
    assert str(path) + ":1" in str(err.value)


def test_multiple_files_and_max_records(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.jsonl"
    a.write_text(json.dumps([rec(i) for i in range(3)]))
    b.write_text("\n".join(json.dumps(rec(i)) for i in range(3, 8)))
    index = RecordIndex.build([str(a), str(b)])
    assert [index.read(i).problem_id for i in range(len(index))] == [str(i) for i in range(8)]
    index = RecordIndex.build([str(a), str(b)], max_records=4)
    assert [index.read(i).problem_id for i in range(len(index))] == ["0", "1", "2", "3"]


@pytest.mark.parametrize("change,needle", [
    ({"problem": None}, "'problem'"),
    ({"path": ""}, "'path' is empty"),
    ({"data_type": "audio"}, "data_type"),
    ({"problem_type": "essay"}, "problem_type"),
    ({"problem_type": "multiple choice", "options": []}, "options"),
    ({"options": "A. x"}, "options"),
    ({"solution": 3}, "'solution' must be a string"),
])
def test_missing_or_wrong_fields(change, needle):
    with pytest.raises(RecordError, match=needle) as err:
        parse_record(rec(0, **change), "f.json:3")
    assert err.value.reason == "missing_field" and err.value.source == "f.json:3"


def test_record_answer_and_media_path():
    r = parse_record(rec(0, solution="<answer> B </answer>", path="./x/y.webm"), "f:1")
    assert isinstance(r, Record) and r.answer == "B"
    assert r.media_path("/data/root") == "/data/root/x/y.webm"
    with pytest.raises(RecordError, match="process"):
        parse_record(rec(0), "f:1", require_process=True)


def test_epoch_partition_is_exact():
    for n, world in [(10, 3), (7, 4), (100, 8), (3, 5)]:
        for epoch in range(2):
            order = epoch_order(n, epoch, seed=5, shuffle=True)
            parts = [shard(order, r, world) for r in range(world)]
            merged = np.concatenate(parts)
            assert sorted(merged.tolist()) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert not np.array_equal(epoch_order(50, 0, 1, True), epoch_order(50, 1, 1, True))
    assert np.array_equal(epoch_order(50, 0, 1, True), epoch_order(50, 0, 1, True))
    assert epoch_order(5, 3, 1, False).tolist() == [0, 1, 2, 3, 4]


def test_large_file_index_is_fast_and_small(tmp_path):
    """260k-record scale: one scan builds an index of three integers per record."""
    import time

    path = tmp_path / "big.json"
    n = 50_000
    with open(path, "w") as f:
        f.write("[\n")
        f.write(",\n".join(json.dumps(rec(i)) for i in range(n)))
        f.write("\n]\n")
    t0 = time.perf_counter()
    index = RecordIndex.build([str(path)])
    elapsed = time.perf_counter() - t0
    assert len(index) == n
    assert index.read(n - 1).problem_id == str(n - 1)
    assert index.offsets.nbytes + index.lengths.nbytes + index.lines.nbytes + index.file_ids.nbytes <= 28 * n
    print(f"indexed {n} records in {elapsed:.2f}s")
