import json
import logging

from megatron_ral.config.schema import LoggingConfig
from megatron_ral.logging import MetricsSink, progress, setup_logging


def test_jsonl_and_offline_wandb(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_DISABLE_SERVICE", "false")
    with MetricsSink(tmp_path, LoggingConfig(wandb_mode="offline"), {"a": 1}, rank=0) as sink:
        sink.log(1, {"reward/total": 0.5, "loss/attn": float("nan")})
        sink.log(2, {"reward/total": 0.75})
        assert sink._wandb is None or sink._wandb.settings.mode == "offline"
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "reward/total": 0.5, "loss/attn": None}, {"step": 2, "reward/total": 0.75}]
    # offline runs leave their files under RUN_DIR/wandb, nothing is sent anywhere
    assert (tmp_path / "wandb").is_dir()


def test_env_wins_and_other_ranks_write_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    with MetricsSink(tmp_path / "r0", LoggingConfig(wandb_mode="online"), rank=0) as sink:
        assert sink._wandb is None
        sink.log(0, {"x": 1})
    with MetricsSink(tmp_path / "r1", LoggingConfig(), rank=1) as sink:
        sink.log(0, {"x": 1})
    assert (tmp_path / "r0" / "metrics.jsonl").exists() and not (tmp_path / "r1").exists()


def test_console_rank_filter(capsys):
    logger = setup_logging("INFO", rank=1)
    logging.getLogger("megatron_ral.test").info("hidden on rank 1")
    logging.getLogger("megatron_ral.test").warning("shown")
    err = capsys.readouterr().err
    assert "hidden" not in err and "[rank 1] shown" in err
    for h in list(logger.handlers):
        logger.removeHandler(h)


def test_progress_passes_items_through(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    assert list(progress(range(5), desc="x")) == [0, 1, 2, 3, 4]
    assert list(progress(range(3), enabled=False)) == [0, 1, 2]


_KILLED_SERVICE = """
import json, logging, signal, sys, time
from pathlib import Path
import psutil
from megatron_ral.config.schema import LoggingConfig
from megatron_ral.logging import MetricsSink
out = Path(sys.argv[1])
sink = MetricsSink(out, LoggingConfig(wandb_mode="offline"), {"a": 1}, rank=0)
assert sink._wandb is not None, "wandb did not start: nothing to test"
sink.log(1, {"x": 1.0})
service = [c for c in psutil.Process().children(recursive=True) if "wandb" in " ".join(c.cmdline()).lower()]
assert service, "no wandb service process found"
for c in service:
    c.send_signal(signal.SIGTERM)
psutil.wait_procs(service, timeout=10)
time.sleep(0.2)
import importlib.util
fresh = [m for m in ("joblib", "accelerate", "datasets") if m not in sys.modules and importlib.util.find_spec(m)]
if fresh:  # one of wandb's telemetry-hooked libraries imported after the service died (as transformers is at a save)
    __import__(fresh[0])
sink.log(2, {"x": 2.0})
sink.close()
assert sink._wandb is None
print("closed")
"""


def test_wandb_service_killed_by_the_job_signal_does_not_stop_the_run(tmp_path):
    """SLURM signals every process of a job step, wandb's service process included: its death must not turn a
    preempted run's save-and-exit-0 into a crash (seen on a real SLURM job: wandb.finish raised). In a child
    process: wandb's global state after its service died would disturb later tests in this one."""
    import os
    import subprocess
    import sys

    # its own wandb service (a service started by this process is announced in WANDB_SERVICE* variables)
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE" and not (k.startswith("WANDB") and "SERVICE" in k)}
    env["WANDB_DISABLE_SERVICE"] = "false"
    r = subprocess.run([sys.executable, "-c", _KILLED_SERVICE, str(tmp_path)], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("closed"), r.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert "metrics go to metrics.jsonl only" in r.stderr
    # and no traceback from wandb's own exit hook (it tore down a dead service at exit before close() did)
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
