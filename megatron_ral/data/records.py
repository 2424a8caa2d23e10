"""Video-R1 records: the record type, its validation, and a byte-offset index over record files.

A record file is either a JSON array of objects or JSON lines. The index stores only the byte range
and line number of every record (three integers each), built by one scan of each file; a record is
parsed when it is read, so a rank parses only the records of its own shard.
"""

from __future__ import annotations

import json
import mmap
import os
import re
from dataclasses import dataclass, field

import numpy as np

from megatron_ral.data.errors import RecordError, RecordFileError

DATA_TYPES = ("image", "video")
PROBLEM_TYPES = ("multiple choice", "numerical", "OCR", "free-form", "regression")


@dataclass
class Record:
    """One Video-R1 example. `source` is 'file:line' of the record's first line."""

    problem_id: str
    problem: str
    data_type: str
    problem_type: str
    options: list[str]
    solution: str
    path: str
    source: str
    process: str | None = None
    data_source: str | None = None
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def answer(self) -> str:
        """Text inside the last <answer>...</answer> of the solution (the whole solution when untagged)."""
        found = re.findall(r"<answer>(.*?)</answer>", self.solution, flags=re.S)
        return found[-1].strip() if found else self.solution.strip()

    def media_path(self, media_root: str) -> str:
        return os.path.normpath(os.path.join(media_root, self.path)) if media_root else self.path


_KNOWN = {"problem_id", "problem", "data_type", "problem_type", "options", "solution", "path", "process", "data_source"}


def parse_record(obj, source: str, require_process: bool = False) -> Record:
    """Validate a decoded JSON object; raise RecordError('missing_field', source, ...) when unusable."""

    def bad(msg: str) -> RecordError:
        return RecordError("missing_field", source, msg)

    if not isinstance(obj, dict):
        raise RecordError("malformed_record", source, f"record is a JSON {type(obj).__name__}, not an object")
    for key in ("problem", "data_type", "problem_type", "solution", "path"):
        if key not in obj or obj[key] is None:
            raise bad(f"required field '{key}' is missing")
        if not isinstance(obj[key], str):
            raise bad(f"field '{key}' must be a string, got {type(obj[key]).__name__}")
    if obj["data_type"] not in DATA_TYPES:
        raise bad(f"data_type must be one of {DATA_TYPES}, got {obj['data_type']!r}")
    if obj["problem_type"] not in PROBLEM_TYPES:
        raise bad(f"problem_type must be one of {PROBLEM_TYPES}, got {obj['problem_type']!r}")
    if not obj["path"].strip():
        raise bad("field 'path' is empty")
    options = obj.get("options") or []
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise bad("field 'options' must be a list of strings")
    if obj["problem_type"] == "multiple choice" and not options:
        raise bad("a multiple-choice record needs 'options'")
    process = obj.get("process")
    if process is not None and not isinstance(process, str):
        raise bad("field 'process' must be a string")
    if require_process and not process:
        raise bad("required field 'process' (SFT rationale) is missing")
    pid = obj.get("problem_id", source)
    return Record(
        problem_id=str(pid),
        problem=obj["problem"],
        data_type=obj["data_type"],
        problem_type=obj["problem_type"],
        options=list(options),
        solution=obj["solution"],
        path=obj["path"],
        source=source,
        process=process,
        data_source=obj.get("data_source"),
        extra={k: v for k, v in obj.items() if k not in _KNOWN},
    )


# Byte-level JSON tokens. A record is matched in one step by _OBJECT when it nests at most one level
# of arrays/objects (the Video-R1 shape); deeper records fall back to the bracket-by-bracket scanner.
_STRING = rb'"[^"\\]*(?:\\.[^"\\]*)*"'
_FLAT = rb'(?:[^"\[\]{}]+|' + _STRING + rb")*"
_NESTED = rb'(?:[^"\[\]{}]+|' + _STRING + rb"|\[" + _FLAT + rb"\]|\{" + _FLAT + rb"\})*"
_OBJECT = re.compile(rb"\{" + _NESTED + rb"\}", re.S)
_TOKEN = re.compile(_STRING + rb"|[\[\]{}]", re.S)
_SPACE = re.compile(rb"\s*")


def _newline_positions(data, chunk: int = 1 << 24) -> np.ndarray:
    """Byte offsets of every newline (vectorised, chunk by chunk)."""
    out = []
    for start in range(0, len(data), chunk):
        block = np.frombuffer(data[start : start + chunk], dtype=np.uint8)
        out.append(np.flatnonzero(block == 10) + start)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def _line_of(newlines: np.ndarray, pos) -> np.ndarray:
    """1-based line number of byte offset(s) `pos`."""
    return np.searchsorted(newlines, pos, side="left") + 1


def _element_end(path: str, data, pos: int, newlines) -> int:
    """End offset of the JSON object starting at `pos` (bracket-by-bracket, strings skipped)."""
    m = _OBJECT.match(data, pos)
    if m:
        return m.end()
    depth = 0
    for tok in _TOKEN.finditer(data, pos):
        ch = data[tok.start()]
        if ch == 0x22:
            continue
        depth += 1 if ch in (0x5B, 0x7B) else -1
        if depth == 0:
            return tok.end()
        if depth < 0:
            break
    raise RecordFileError(f"{path}:{int(_line_of(newlines, pos))}: record is not terminated (unbalanced brackets or an unterminated string)")


def _scan_array(path: str, data) -> list[tuple[int, int, int]]:
    """(offset, length, line) of every element of a top-level JSON array of objects."""
    newlines = _newline_positions(data)

    def fail(pos: int, msg: str):
        raise RecordFileError(f"{path}:{int(_line_of(newlines, pos))}: {msg}")

    n = len(data)
    pos = _SPACE.match(data, 0).end()
    if data[pos : pos + 3] == b"\xef\xbb\xbf":
        pos = _SPACE.match(data, pos + 3).end()
    if pos >= n or data[pos] != 0x5B:
        fail(pos, "expected a JSON array")
    pos = _SPACE.match(data, pos + 1).end()
    spans = []
    if pos < n and data[pos] == 0x5D:
        end = pos + 1
    else:
        while True:
            if pos >= n:
                fail(n, "file ends inside the array (unterminated JSON)")
            if data[pos] != 0x7B:
                fail(pos, "array element is not a JSON object")
            end = _element_end(path, data, pos, newlines)
            spans.append((pos, end - pos))
            pos = _SPACE.match(data, end).end()
            if pos < n and data[pos] == 0x2C:
                pos = _SPACE.match(data, pos + 1).end()
                continue
            if pos < n and data[pos] == 0x5D:
                end = pos + 1
                break
            if pos >= n:
                fail(n, "file ends inside the array (unterminated JSON)")
            fail(pos, "unexpected text between records (expected ',' or ']')")
    if bytes(data[end:]).strip():
        fail(end, "text after the end of the array")
    if not spans:
        return []
    offsets = np.fromiter((o for o, _ in spans), dtype=np.int64, count=len(spans))
    lines = _line_of(newlines, offsets)
    return [(o, length, int(line)) for (o, length), line in zip(spans, lines)]


def _scan_lines(path: str, data) -> list[tuple[int, int, int]]:
    """(offset, length, line) of every non-blank line of a JSON-lines file."""
    out = []
    pos, line, n = 0, 1, len(data)
    while pos < n:
        end = data.find(b"\n", pos)
        end = n if end < 0 else end
        if data[pos:end].strip():
            out.append((pos, end - pos, line))
        pos, line = end + 1, line + 1
    return out


def scan_record_file(path: str) -> list[tuple[int, int, int]]:
    """Index one record file: a JSON array (first non-blank byte '[') or JSON lines."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"record file {path} does not exist")
    if os.path.getsize(path) == 0:
        return []
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        head = bytes(data[:4096]).lstrip()
        if head.startswith(b"\xef\xbb\xbf"):
            head = head[3:].lstrip()
        if head.startswith(b"["):
            return _scan_array(path, data)
        return _scan_lines(path, data)


class RecordIndex:
    """Byte-offset index over one or more record files (concatenated in order)."""

    def __init__(self, files: list[str], file_ids: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, lines: np.ndarray):
        self.files = list(files)
        self.file_ids = file_ids
        self.offsets = offsets
        self.lengths = lengths
        self.lines = lines
        self._handles: dict[int, object] = {}
        self._pid = os.getpid()

    @classmethod
    def build(cls, files: list[str], max_records: int | None = None) -> "RecordIndex":
        if not files:
            raise ValueError("no record files given")
        ids, offs, lens, lines = [], [], [], []
        for fid, path in enumerate(files):
            entries = scan_record_file(path)
            if max_records is not None:
                entries = entries[: max(0, max_records - len(offs))]
            for off, length, line in entries:
                ids.append(fid)
                offs.append(off)
                lens.append(length)
                lines.append(line)
            if max_records is not None and len(offs) >= max_records:
                break
        return cls(
            files,
            np.asarray(ids, dtype=np.int32),
            np.asarray(offs, dtype=np.int64),
            np.asarray(lens, dtype=np.int64),
            np.asarray(lines, dtype=np.int64),
        )

    def __len__(self) -> int:
        return len(self.offsets)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def source(self, i: int) -> str:
        return f"{self.files[self.file_ids[i]]}:{int(self.lines[i])}"

    def _handle(self, fid: int):
        if self._pid != os.getpid():  # opened in another process (fork): reopen
            self._handles, self._pid = {}, os.getpid()
        h = self._handles.get(fid)
        if h is None:
            h = self._handles[fid] = open(self.files[fid], "rb")
        return h

    def read_raw(self, i: int) -> bytes:
        h = self._handle(int(self.file_ids[i]))
        h.seek(int(self.offsets[i]))
        return h.read(int(self.lengths[i]))

    def read_json(self, i: int):
        """Decoded JSON of record i; RecordError('malformed_record', 'file:line') when it does not parse."""
        raw = self.read_raw(i)
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            line = int(self.lines[i]) + e.lineno - 1
            where = f"{self.files[self.file_ids[i]]}:{line}"
            raise RecordError("malformed_record", where, f"invalid JSON: {e.msg} (column {e.colno})") from e
        except UnicodeDecodeError as e:
            raise RecordError("malformed_record", self.source(i), f"invalid UTF-8: {e}") from e

    def read(self, i: int, require_process: bool = False) -> Record:
        return parse_record(self.read_json(i), self.source(i), require_process)

    def close(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles = {}
