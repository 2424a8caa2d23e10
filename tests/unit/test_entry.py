"""megatron_ral.cli.entry.run_main and the tools' argument parser, in process: exit codes, the one error line,
who prints in a multi-rank job (ranks faked through the launcher's environment variables)."""

from __future__ import annotations

import pytest

from megatron_ral.cli import entry
from megatron_ral.cli.arguments import ToolParser
from megatron_ral.errors import UsageError, UserError


def _run(main, argv=None) -> int:
    with pytest.raises(SystemExit) as exc:
        entry.run_main("tool.py", main, argv)
    return exc.value.code


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "MEGATRON_RAL_DEBUG"):
        monkeypatch.delenv(key, raising=False)


def _fail(err):
    def main(argv):
        raise err
    return main


def test_user_error_is_one_line_exit_2(capsys):
    assert _run(_fail(UserError("--video clip.mp4: no such file\nsecond line"))) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "tool.py: error: --video clip.mp4: no such file\n"


def test_debug_shows_the_traceback_too(capsys, monkeypatch):
    monkeypatch.setenv("MEGATRON_RAL_DEBUG", "1")
    assert _run(_fail(UserError("bad"))) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1] == "tool.py: error: bad"


def test_bug_keeps_its_traceback_and_return_codes_pass_through(capsys):
    with pytest.raises(ZeroDivisionError):
        entry.run_main("tool.py", lambda argv: 1 / 0)
    assert _run(lambda argv: None) == 0
    assert _run(lambda argv: 3) == 3
    assert _run(lambda argv: len(argv), ["a", "b"]) == 2
    assert capsys.readouterr().err == ""


def test_multi_rank_rules(capsys, monkeypatch):
    slept = []
    monkeypatch.setattr(entry.time, "sleep", lambda s: slept.append((s, capsys.readouterr().err)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert _run(_fail(UsageError("--tp 4: bad"))) == 2  # shared: rank 0 speaks for all, without a rank
    assert capsys.readouterr().err == "tool.py: error: --tp 4: bad\n" and slept == []

    monkeypatch.setenv("RANK", "1")
    assert _run(_fail(UsageError("--tp 4: bad"))) == 2  # shared: silent for the grace period, then speaks
    assert slept == [(entry.SILENT_RANK_GRACE_S, "")]
    assert capsys.readouterr().err == "tool.py: error: rank 1: --tp 4: bad\n"

    class OwnSample(UserError):
        same_on_every_rank = False

    slept.clear()
    assert _run(_fail(OwnSample("clip_7.mp4: cannot decode"))) == 2  # this rank's own error: at once
    assert slept == [] and capsys.readouterr().err == "tool.py: error: rank 1: clip_7.mp4: cannot decode\n"
    # Not flagged either way and torch.distributed not initialised here: treated as shared.
    assert _run(_fail(UserError("x"))) == 2 and len(slept) == 1


def test_slurm_variables_give_the_rank(monkeypatch, capsys):
    monkeypatch.setattr(entry.time, "sleep", lambda s: None)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert _run(_fail(UsageError("bad"))) == 2
    assert capsys.readouterr().err == "tool.py: error: rank 3: bad\n"


def test_peer_loss_is_recognised():
    assert entry.peer_lost(RuntimeError("[pair.cc:545] Read error: Connection reset by peer. GLHF")) == \
        "Connection reset by peer"
    assert entry.peer_lost(RuntimeError("shape mismatch")) is None
    assert entry.peer_lost(ValueError("Connection reset by peer")) is None


def test_prog_name(monkeypatch):
    monkeypatch.setattr(entry.sys, "argv", ["/repo/tools/generate.py", "--x"])
    assert entry.prog_name("default") == "generate.py"
    monkeypatch.setattr(entry.sys, "argv", ["/venv/bin/megatron-ral-generate"])
    assert entry.prog_name("default") == "megatron-ral-generate"
    monkeypatch.setattr(entry.sys, "argv", ["/repo/megatron_ral/config/__main__.py"])
    assert entry.prog_name("python -m megatron_ral.config") == "python -m megatron_ral.config"


def test_parser_errors_are_usage_errors_and_help_shows_defaults(capsys, monkeypatch):
    p = ToolParser(prog="tool.py", description="Does things.")
    p.add_argument("--n", type=int, default=3, help="how many")
    p.add_argument("--out", required=True, help="where")
    p.add_argument("--name", default=None, help="optional name")
    p.add_argument("--json", action="store_true", help="JSON")
    with pytest.raises(UsageError, match="argument --n: invalid int value: 'x'"):
        p.parse_args(["--out", "o", "--n", "x"])
    with pytest.raises(UsageError, match="the following arguments are required: --out"):
        p.parse_args([])
    help_text = p.format_help()
    assert "how many (default: 3)" in help_text
    assert "where\n" in help_text and "optional name\n" in help_text and "JSON\n" in help_text
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit):
        p.parse_args(["--help"])
    assert capsys.readouterr().out == ""  # --help once per job: rank 0
