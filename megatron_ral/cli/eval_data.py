"""Command lines of the benchmark converters (tools/eval_data/convert_{mvbench,videomme,tempcompass}.py).

    tools/eval_data/convert_mvbench.py     --src MVBENCH_DIR            --out RECORDS.json [--tasks a,b] [--media-root DIR] [--json]
    tools/eval_data/convert_videomme.py    --src VIDEOMME_QUESTIONS     --out RECORDS.json [--video-dir data] [--media-root DIR] [--json]
    tools/eval_data/convert_tempcompass.py --src MULTI_CHOICE_JSON      --out RECORDS.json [--video-dir videos] [--media-root DIR] [--json]

Each writes one JSON array of Video-R1 records (multiple choice, paths relative to the benchmark's root
directory) for ``tools/evaluate.py --data RECORDS.json --media-root BENCHMARK_ROOT``; items that cannot be
converted are counted by reason (``--json`` lists them). The conversion itself is
:mod:`megatron_ral.data.eval_sets`. Bad input: one line, exit 2.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn, Sequence

from megatron_ral.cli import input_checks as check
from megatron_ral.cli.arguments import ToolParser, add_json
from megatron_ral.cli.entry import prog_name, run_main
from megatron_ral.errors import UsageError


def _common(p: ToolParser, video_dir: str | None) -> None:
    p.add_argument("--out", required=True, help="output record file (one JSON array)")
    if video_dir is not None:
        p.add_argument("--video-dir", default=video_dir,
                       help="directory of the videos, relative to the benchmark's root (the records' paths start "
                            "with it)")
    p.add_argument("--media-root", default=None,
                   help="the benchmark's root directory: keep only records whose video exists under it")
    add_json(p, "the summary (out, records, skipped with reasons)")


def load_json_or_lines(path: str, flag: str) -> Any:
    """A JSON document, or JSON lines (one object per line, as `datasets` exports parquet)."""
    p = check.input_file(path, flag)
    text = p.read_text(encoding="utf-8-sig", errors="strict") if p.stat().st_size else ""
    if not text.strip():
        raise UsageError(f"{flag} {path}: empty file (expected JSON)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as whole:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise UsageError(f"{flag} {path}: neither JSON nor JSON lines ({whole}; line {n})") from None
        return rows


def _finish(args, converted, group_key: str) -> int:
    from megatron_ral.data.eval_sets import drop_missing_media

    if args.media_root is not None:
        check.input_dir(args.media_root, "--media-root")
        converted = drop_missing_media(converted, args.media_root)
    if not converted.records:
        reasons = converted.summary()["skipped_by_reason"]
        raise UsageError(f"--src {args.src}: no record converted ({len(converted.skipped)} items skipped: "
                         f"{', '.join(f'{k} ({v})' for k, v in reasons.items()) or 'nothing found'})")
    check.write_file_atomically(args.out, "--out", lambda tmp: tmp.write_text(
        json.dumps(converted.records, ensure_ascii=False, indent=1) + "\n"))
    summary = {"out": args.out, **converted.summary(group_key)}
    if args.json:
        print(json.dumps({**summary, "skipped_items": converted.skipped}))
    else:
        reasons = "; ".join(f"{k}: {v}" for k, v in summary["skipped_by_reason"].items())
        print(f"wrote {args.out}: {summary['records']} records, {summary['skipped']} skipped"
              + (f" ({reasons})" if reasons else ""))
    return 0


# --- MVBench ---------------------------------------------------------------------------------------------

def mvbench_parser() -> ToolParser:
    p = ToolParser(prog=prog_name("convert_mvbench.py"), description=(
        "MVBench (OpenGVLab/MVBench: json/<task>.json, video/<source>/...) -> Video-R1 multiple-choice records\n"
        "with paths relative to the MVBench directory."))
    p.add_argument("--src", required=True, help="the MVBench directory (holding json/), or its json/ directory")
    p.add_argument("--tasks", default=None, help="comma-separated task file names or task names to convert "
                                                 "(default: every task file found)")
    _common(p, None)
    return p


def mvbench_main(argv: Sequence[str] | None = None) -> int:
    from megatron_ral.data.eval_sets import MVBENCH_TASKS, mvbench_records

    args = mvbench_parser().parse_args(argv)
    src = check.input_dir(args.src, "--src")
    json_dir = src / "json" if (src / "json").is_dir() else src
    check.output_file(args.out, "--out")
    names = {name: task for name, (task, *_rest) in MVBENCH_TASKS.items()}
    if args.tasks:
        wanted = [t.strip() for t in args.tasks.split(",") if t.strip()]
        by_task = {task: name for name, task in names.items()}
        unknown = [t for t in wanted if t not in names and t not in by_task]
        if unknown:
            raise UsageError(f"--tasks {unknown[0]!r}: not an MVBench task (task files: {', '.join(sorted(names))})")
        files = [t if t in names else by_task[t] for t in wanted]
    else:
        files = sorted(p.name for p in json_dir.glob("*.json"))
    present = [f for f in files if f in names and (json_dir / f).is_file()]
    if not present:
        raise UsageError(f"--src {args.src}: no MVBench task file (e.g. action_sequence.json) in {json_dir}")
    # other JSON files are reported as skipped, unread
    task_files = {f: load_json_or_lines(str(json_dir / f), "--src") if f in names else None for f in files}
    # paths relative to the MVBench directory: video/<folder>/<file>
    return _finish(args, mvbench_records(task_files, video_root="video"), "benchmark_task")


def mvbench_cli() -> NoReturn:
    run_main(prog_name("convert_mvbench.py"), mvbench_main)


# --- Video-MME -------------------------------------------------------------------------------------------

def videomme_parser() -> ToolParser:
    p = ToolParser(prog=prog_name("convert_videomme.py"), description=(
        "Video-MME -> Video-R1 multiple-choice records. --src: lmms-lab/Video-MME's videomme/test-*.parquet\n"
        "exported to JSON or JSON lines (e.g. pandas.read_parquet(f).to_json(out, orient='records')), or the\n"
        "original Video-MME JSON (questions nested per video). Videos: <video-dir>/<videoID>.mp4."))
    p.add_argument("--src", required=True, help="the question file (JSON array or JSON lines)")
    _common(p, "data")
    return p


def videomme_main(argv: Sequence[str] | None = None) -> int:
    from megatron_ral.data.eval_sets import videomme_records

    args = videomme_parser().parse_args(argv)
    rows = load_json_or_lines(args.src, "--src")
    check.output_file(args.out, "--out")
    if isinstance(rows, dict):
        rows = [rows]
    if not isinstance(rows, list):
        raise UsageError(f"--src {args.src}: expected a list of Video-MME rows, got a JSON {type(rows).__name__}")
    return _finish(args, videomme_records(rows, video_dir=args.video_dir), "duration")


def videomme_cli() -> NoReturn:
    run_main(prog_name("convert_videomme.py"), videomme_main)


# --- TempCompass -----------------------------------------------------------------------------------------

def tempcompass_parser() -> ToolParser:
    p = ToolParser(prog=prog_name("convert_tempcompass.py"), description=(
        "TempCompass multi-choice -> Video-R1 multiple-choice records. --src: questions/multi-choice.json of\n"
        "the TempCompass repository ({video_id: {dimension: [{question, answer}]}}), or the multi-choice split\n"
        "exported to JSON / JSON lines (video_id, dim, question, answer). Videos: <video-dir>/<video_id>.mp4."))
    p.add_argument("--src", required=True, help="the multi-choice question file")
    _common(p, "videos")
    return p


def tempcompass_main(argv: Sequence[str] | None = None) -> int:
    from megatron_ral.data.eval_sets import tempcompass_records

    args = tempcompass_parser().parse_args(argv)
    data = load_json_or_lines(args.src, "--src")
    check.output_file(args.out, "--out")
    return _finish(args, tempcompass_records(data, video_dir=args.video_dir), "dimension")


def tempcompass_cli() -> NoReturn:
    run_main(prog_name("convert_tempcompass.py"), tempcompass_main)


__all__ = ["load_json_or_lines", "mvbench_cli", "mvbench_main", "mvbench_parser", "tempcompass_cli",
           "tempcompass_main", "tempcompass_parser", "videomme_cli", "videomme_main", "videomme_parser"]
