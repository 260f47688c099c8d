"""The embedded Ray: loopback only, Ray's own log lines in a file, start-up retried while ray.start_timeout_s
lasts and one line naming that setting when it never starts."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

import orchestrator.remote.ray_init as R
from orchestrator.run.context import PipelineError

ROOT = Path(__file__).resolve().parent.parent


def test_a_local_ray_listens_on_loopback_and_logs_to_the_file(tmp_path):
    """A real local Ray, in a fresh interpreter: its GCS on 127.0.0.1; Ray's start-up lines (and the raylet's
    messages) in the log file, none on the terminal."""
    log = tmp_path / "logs" / "driver.log"
    code = (
        "import ray\n"
        "from orchestrator.remote.ray_init import start_ray\n"
        f"start_ray(num_cpus=1, log_file=__import__('pathlib').Path({str(log)!r}))\n"
        "print('GCS', ray.get_runtime_context().gcs_address)\n"
        "ray._private.worker.print_to_stdstream({'lines': ['WARNING: 9 PYTHON worker processes'], 'pid': 'raylet',"
        " 'is_err': False}, ignore_prefix=False)\n"
        "ray.shutdown()\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "RAY_ADDRESS": "local"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    gcs = next(line for line in r.stdout.splitlines() if line.startswith("GCS "))
    assert gcs.split()[1].startswith("127.0.0.1:")
    text = log.read_text()
    assert "Started a local Ray instance" in text and "(raylet) WARNING: 9 PYTHON worker processes" in text
    assert "Started a local Ray instance" not in r.stdout + r.stderr and "PYTHON worker" not in r.stdout + r.stderr


class SlowNode:
    """``ray.init`` of a node that comes up after ``fails`` timed-out tries."""

    def __init__(self, fails: int):
        self.fails, self.calls = fails, 0

    def __call__(self, **kwargs):
        self.calls += 1
        if self.calls <= self.fails:
            raise Exception(
                "The current node timed out during startup. This could happen because some of the "
                "raylet failed to startup or the GCS has become overloaded."
            )


def test_a_slow_node_is_started_again_and_a_dead_one_named_once(monkeypatch):
    monkeypatch.setattr(R.time, "sleep", lambda s: None)
    monkeypatch.setattr(R.ray, "shutdown", lambda: None)
    slow = SlowNode(fails=2)
    monkeypatch.setattr(R.ray, "init", slow)
    R._start_local(2, {}, timeout_s=180)
    assert slow.calls == 3
    never = SlowNode(fails=10**6)
    monkeypatch.setattr(R.ray, "init", never)
    clock = iter(range(0, 10**6, 30))  # each try costs 30 s of the budget
    monkeypatch.setattr(R.time, "monotonic", lambda: next(clock))
    with pytest.raises(PipelineError) as e:
        R._start_local(2, {}, timeout_s=120)
    msg = str(e.value)
    assert msg.startswith("ray: the local Ray node did not start after ") and "\n" not in msg
    assert "raise ray.start_timeout_s (now 120)" in msg and "ray.address" in msg
    other = SlowNode(fails=0)

    def refuses(**kwargs):
        other.calls += 1
        raise Exception("some other problem")

    lost_port = SlowNode(fails=0)

    def dashboard_failed(**kwargs):  # the dashboard's port was taken between _free_port and its bind
        lost_port.calls += 1
        if lost_port.calls == 1:
            raise Exception(
                "The last 20 lines of /tmp/ray/session_x/logs/dashboard.log (it contains the error "
                "message from the dashboard): "
            )

    monkeypatch.setattr(R.ray, "init", dashboard_failed)
    R._start_local(2, {}, timeout_s=120)
    assert lost_port.calls == 2
    monkeypatch.setattr(R.ray, "init", refuses)
    with pytest.raises(PipelineError, match=r"after 1 try \(some other problem\)"):
        R._start_local(2, {}, timeout_s=120)  # not a slow start: no retry
    assert other.calls == 1


def test_library_loggers_go_to_the_file_only(tmp_path):
    log = tmp_path / "driver.log"
    R.route_logs(log)
    R.route_logs(log)  # twice: one handler
    try:
        logger = logging.getLogger("mlflow")
        assert not logger.propagate and len(logger.handlers) == 1
        logger.warning("creating tables")
        assert "WARNING mlflow: creating tables" in log.read_text()
    finally:
        for name in R.LOGGERS:
            logging.getLogger(name).handlers.clear()
            logging.getLogger(name).propagate = True
