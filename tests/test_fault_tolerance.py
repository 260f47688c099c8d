"""Fault tolerance: resumable checkpoints in the unlearning loop, a Ray Train job surviving a killed worker,
and a pipeline surviving a killed driver and a lost MLflow server (``spunge run --resume``)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from jobs.data.io import load_jsonl
from jobs.spec import UnlearnSpec
from jobs.unlearn.loop import run_unlearning
from jobs.unlearn.outputs import CHECKPOINT_STATE, JOB_MARKER
from tests.conftest import MLFLOW_SERVER_ENV, SPUNGE, mlflow_uri_kept, spunge_env, spunge_here


def spec(tiny_dir, out, **kw) -> UnlearnSpec:
    base = dict(
        name="subset/old",
        model_path=str(tiny_dir / "model"),
        forget_path=str(tiny_dir / "forget.jsonl"),
        retain_path=str(tiny_dir / "retain.jsonl"),
        method="npo",
        optimizer={"lr": 3e-3},
        max_steps=6,
        batch_size=3,
        report_interval_s=0,
        checkpoint_every=2,
        output_dir=str(out),
    )
    return UnlearnSpec(**{**base, **kw})


def rows_of(calls):
    return [r for rows, _ in calls for r in rows]


@pytest.mark.parametrize("stage,method", [(0, "random_label"), (3, "npo")])
def test_a_restored_checkpoint_continues_exactly_where_the_run_was(
    tiny_dir, tmp_path, single_process_dist, stage, method
):
    """Run 6 steps with a checkpoint every 2; resume a second run from the step-4 checkpoint: steps 5-6 repeat
    the first run's losses exactly (same weights, optimizer moments, scheduler, data position, RNG, and the
    random labels of random_label's own generator)."""
    ds = {"zero_optimization": {"stage": stage}}
    kept, calls = {}, []

    def report(rows, checkpoint=None):
        calls.append((rows, checkpoint))
        if checkpoint is not None:  # the loop deletes its folder after the call: keep a copy, as Ray Train does
            kept[rows[-1]["step"]] = shutil.copytree(checkpoint, tmp_path / f"ckpt{rows[-1]['step']}")

    run_unlearning(spec(tiny_dir, tmp_path / "a", deepspeed=ds, method=method), report=report)
    first = rows_of(calls)
    assert [r["step"] for r in first] == [1, 2, 3, 4, 5, 6]
    assert [c is not None for _, c in calls] == [False, True, False, True, False, False]  # never at the last step
    assert sorted(kept) == [2, 4]
    assert json.loads((kept[4] / CHECKPOINT_STATE).read_text())["step"] == 4
    assert not any(Path(c).exists() for _, c in calls if c)  # local folders are cleaned up

    calls.clear()
    run_unlearning(
        spec(tiny_dir, tmp_path / "b", deepspeed=ds, method=method), report=report, restore_from=str(kept[4])
    )
    second = rows_of(calls)
    assert [r["step"] for r in second] == [5, 6] and all(r["resumed_from"] == 4 for r in second)
    for a, b in zip(first[4:], second):
        for k in ("loss", "forget_loss", "retain_loss", "lr"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (k, a["step"])
    assert first[5]["forget_loss"] != pytest.approx(first[3]["forget_loss"], rel=1e-3)  # the steps did differ
    final_a = json.loads((tmp_path / "a" / JOB_MARKER).read_text())["final_metrics"]
    final_b = json.loads((tmp_path / "b" / JOB_MARKER).read_text())["final_metrics"]
    assert final_b["step"] == 6 and final_b["resumed_from"] == 4
    assert final_b["loss"] == pytest.approx(final_a["loss"], rel=1e-5)


def test_an_in_process_job_keeps_its_newest_checkpoints_and_a_second_start_goes_on_after_them(
    tiny_dir, tmp_path, single_process_dist
):
    """``num_workers: 0``'s runner (``run_in_process``): the rows of each report reach its callback, the
    checkpoints are moved into the job's run folder (the newest 2 kept), and the job started again (a resumed
    driver) continues after the newest with the first start's losses."""
    from jobs.unlearn.outputs import ATTEMPTS_FILE, STEPS_FILE
    from jobs.unlearn.solo import run_in_process

    s, train = spec(tiny_dir, tmp_path / "a", checkpoint_every=1), tmp_path / "train"
    first: list[dict] = []
    run_in_process(s, first.extend, train)
    assert [r["step"] for r in first] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in train.iterdir()) == ["checkpoint_step0000004", "checkpoint_step0000005"]
    assert json.loads((train / "checkpoint_step0000005" / CHECKPOINT_STATE).read_text())["step"] == 5

    second: list[dict] = []
    run_in_process(s, second.extend, train)
    assert [(r["step"], r["resumed_from"]) for r in second] == [(6, 5)]
    assert second[0]["loss"] == pytest.approx(first[5]["loss"], rel=1e-5, abs=1e-6)
    assert first[5]["loss"] != pytest.approx(first[4]["loss"], rel=1e-3)  # the steps did differ
    out = tmp_path / "a"
    assert [r["step"] for r in load_jsonl(out / STEPS_FILE)] == [1, 2, 3, 4, 5, 6, 6]  # the driver dedups replays
    assert [a["from_checkpoint"] for a in load_jsonl(out / ATTEMPTS_FILE)] == [False, True]
    assert json.loads((out / JOB_MARKER).read_text())["final_metrics"]["resumed_from"] == 5


def test_an_in_process_job_makes_its_group_of_one_on_a_free_port_whatever_its_environment_names(monkeypatch):
    """A Ray worker inherits its node's environment, which may name another group's port and size (the tests'
    own group, made before their local Ray started, did: EADDRINUSE)."""
    from jobs.unlearn.solo import own_group_env

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        inherited = {"MASTER_ADDR": "10.0.0.9", "MASTER_PORT": port, "RANK": "2", "WORLD_SIZE": "4"}
        for k, v in {**inherited, "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4"}.items():
            monkeypatch.setenv(k, v)  # put back afterwards
        own_group_env()
        keys = ("MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
        assert {k: os.environ[k] for k in keys} == dict(zip(keys, ("127.0.0.1", "0", "1", "0", "1")))
        assert os.environ["MASTER_PORT"] != port
        with socket.socket() as store:  # free: the group's store can listen on it
            store.bind(("127.0.0.1", int(os.environ["MASTER_PORT"])))


def test_a_checkpoint_from_another_world_size_is_refused(tiny_dir, tmp_path, single_process_dist):
    kept = {}

    def report(rows, checkpoint=None):
        if checkpoint is not None:
            kept[rows[-1]["step"]] = shutil.copytree(checkpoint, tmp_path / "ckpt")

    run_unlearning(spec(tiny_dir, tmp_path / "a", max_steps=3), report=report)
    state = json.loads((kept[2] / CHECKPOINT_STATE).read_text())
    (kept[2] / CHECKPOINT_STATE).write_text(json.dumps({**state, "world_size": 4}))
    with pytest.raises(ValueError, match=r"job subset/old: checkpoint .* was written by 4 workers, this run has 1"):
        run_unlearning(spec(tiny_dir, tmp_path / "b", max_steps=3), restore_from=str(kept[2]))


# ---------------------------------------------------------------------------------------------------
# real Ray Train: a killed worker


def ray_processes(actor: str) -> list[psutil.Process]:
    """This test's processes of a Ray actor class (descendants of this process only, never another test's)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if actor in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def train_workers() -> list[psutil.Process]:
    return ray_processes("RayTrainWorker")


def wait_for(predicate, what: str, limit_s: float = 600):
    """Poll until ``predicate()`` is truthy (an event, not a duration: the limit only stops a hung test)."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"gave up waiting for {what}")


@pytest.mark.e2e
def test_a_killed_worker_restarts_from_its_checkpoint_and_the_job_completes(tiny_dir, tmp_path, local_ray):
    import ray

    from orchestrator.remote.progress import ProgressBoard
    from orchestrator.remote.runners import TRAIN_POLL_INTERVAL_S, run_unlearn_job

    s = spec(tiny_dir, tmp_path / "out", max_steps=40, checkpoint_every=5, batch_size=2, report_interval_s=0)
    scaling = {"num_workers": 2, "cpus_per_worker": 1, "gpus_per_worker": 0, "use_gpu": False, "max_failures": 1}
    storage, name = tmp_path / "ray_train", "job-kill-worker"
    board = ProgressBoard.remote()
    ref = run_unlearn_job.remote(s.model_dump(), scaling, str(storage), name, board)

    # a checkpoint is registered once Ray Train's checkpoint manager has written it into its snapshot
    snapshot = storage / name / "checkpoint_manager_snapshot.json"
    wait_for(lambda: snapshot.exists() and "checkpoint_step" in snapshot.read_text(), "a registered checkpoint")
    # and steps after it reported, which the restarted job will report again
    reported = lambda: ray.get(board.since.remote({})).get("subset/old", [{"step": 0}])[-1]["step"]
    wait_for(lambda: reported() > 5, "a step after the first checkpoint")
    victim = wait_for(train_workers, "the Ray Train workers")[0]
    # the job's controller polls at spunge's interval (Ray's 2 s would make each of these per-step reports wait)
    controller = ray_processes("TrainController")[0]
    assert controller.environ().get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S") == TRAIN_POLL_INTERVAL_S
    victim.send_signal(signal.SIGKILL)

    result = ray.get(ref, timeout=900)
    rows = ray.get(board.since.remote({}))["subset/old"]
    steps = [r["step"] for r in rows]
    assert result["final_metrics"]["step"] == 40 and steps[-1] == 40
    restart = next(i for i, r in enumerate(rows) if r.get("resumed_from"))
    resumed_from = rows[restart]["resumed_from"]
    assert resumed_from >= 5 and resumed_from % 5 == 0  # a checkpoint step, not a fresh start
    assert steps[restart] == resumed_from + 1 and max(steps[:restart]) >= resumed_from
    assert steps[restart:] == list(range(resumed_from + 1, 41))  # every step after the checkpoint, once
    assert result["final_metrics"]["resumed_from"] == resumed_from
    assert result["attempts"] == 2  # the first start and the restart, each recorded by rank 0
    assert victim.pid not in {p.pid for p in train_workers()}
    kept = sorted(p.name for p in (storage / name).glob("checkpoint_step*"))
    assert len(kept) <= 2  # CheckpointConfig(num_to_keep=2)
    assert (tmp_path / "out" / "model.safetensors").exists()

    # the driver's view (a real board, MLflow on sqlite): each step once, the replayed ones replacing the old
    from rich.console import Console

    from orchestrator.run.context import Job, JobKind, RunContext
    from orchestrator.run.display import Display
    from orchestrator.stages.unlearn import drain_progress
    from orchestrator.tracking.tracker import MlflowEvents, Tracker

    with mlflow_uri_kept():
        tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "ft", "kill-worker")
    job = Job(JobKind.SUBSET, s, "h", subset="old")
    display = Display(Console(file=open(os.devnull, "w")))
    display.add(job.key, "unlearn")
    ctx = RunContext(None, tmp_path, events=MlflowEvents(tracker), display=display, jobs=[job])  # no config needed
    seen = {}
    drain_progress(ctx, board, seen)
    assert seen == {"subset/old": len(rows)} and len(rows) >= 40  # the board holds replayed steps too
    assert [r["step"] for r in job.history] == list(range(1, 41))
    assert all(r.get("resumed_from") == resumed_from for r in job.history[resumed_from:])
    logged = tracker.client.get_metric_history(tracker.child(job.run_name), "loss")
    assert sorted(m.step for m in logged) == list(range(1, 41))


# ---------------------------------------------------------------------------------------------------
# the real pipeline: a killed driver


STEPS = 50  # steps are ~0.2 s each (a report each): driver 1's SIGTERM lands with 40 still to go
# the MLflow client gives up on a server that is gone at once (its default: 7 retries, minutes of back-off)
NO_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def start_driver(tmp_path: Path, log_name: str, *extra: str) -> subprocess.Popen:
    log = open(tmp_path / log_name, "w")
    return subprocess.Popen(
        [SPUNGE, "run", "pipe.yaml", *extra],
        cwd=tmp_path,
        env=spunge_env(**NO_RETRIES),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def reap(driver: subprocess.Popen, family: list) -> None:
    """The driver's session gone: the driver, and anything it started that outlived it."""
    if driver.poll() is None:
        os.killpg(driver.pid, signal.SIGKILL)
    driver.wait(timeout=120)
    _, alive = psutil.wait_procs(family, timeout=60)
    for p in alive:  # anything that left the session: ours to clean up, by pid
        p.kill()
    assert not alive, [p.cmdline() for p in alive]  # Ray's processes share the driver's fate


def start_mlflow_server(folder: Path, port: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("mlflow")),
            "server",
            "--backend-store-uri",
            f"sqlite:///{folder / 'mlflow.db'}",
            "--artifacts-destination",
            str(folder / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env={**os.environ, **MLFLOW_SERVER_ENV},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    def up() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return server.poll() is not None

    wait_for(up, "the MLflow server")
    assert server.poll() is None
    return server


def stop_server(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=60)


@pytest.mark.e2e
def test_a_pipeline_outlives_its_driver_and_its_tracking_server_and_reruns_no_finished_unlearning(
    tiny_dir, tmp_path, local_ray
):
    """Four drivers of one pipeline, tracked on an MLflow server. Driver 1 gets SIGTERM in the middle of
    unlearning: its MLflow runs end KILLED. Driver 2 resumes the unfinished job from its checkpoint and is
    SIGKILLed once it is done: its runs stay RUNNING. Driver 3 ends those as KILLED, then loses the MLflow server:
    it fails in one line that says to resume. Driver 4, the server back with the same store, ends driver 3's run
    as KILLED, reruns no unlearning job and completes (in this process, on its local Ray); no step of the job is
    lost. One subset job (one group of two): what is asserted holds job by job, and each Ray Train job costs
    every driver its start-up."""
    from mlflow.tracking import MlflowClient

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    cfg = {
        "name": "killed",
        "model": {"path": str(tiny_dir / "model")},
        "data": {"forget": str(tiny_dir / "forget.jsonl"), "retain": str(tiny_dir / "retain.jsonl")},
        "split": {"attribute": "group", "groups": {"north": ["north"]}, "baseline": "none"},
        "unlearn": {
            "method": "grad_diff",
            "optimizer": {"lr": 1e-3},
            "max_steps": STEPS,
            "batch_size": 4,
            "checkpoint_every": 10,
            "report_interval_s": 0,
        },
        "eval": {"max_examples": 4},
        "tracking": {"uri": uri},
        "storage": {"output_dir": "run"},
        "ray": {"num_cpus": 4},
    }
    (tmp_path / "pipe.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    client = MlflowClient(uri)
    job_markers = lambda: list(run.glob(f"stages/unlearn/*/{JOB_MARKER}"))
    # a checkpoint counts once Ray Train's checkpoint manager has registered it in its snapshot
    checkpoints = lambda: [
        p for p in run.glob("ray_train/*/checkpoint_manager_snapshot.json") if "checkpoint_step" in p.read_text()
    ]
    server = start_mlflow_server(tmp_path, port)
    try:
        # 1. SIGTERM while unlearning: the driver ends its MLflow runs as KILLED and exits 130
        driver = start_driver(tmp_path, "first.log")
        family = []
        try:
            wait_for(lambda: checkpoints() or driver.poll() is not None, "a first registered checkpoint")
            assert driver.poll() is None and not job_markers(), (tmp_path / "first.log").read_text()[-3000:]
            family = [psutil.Process(driver.pid), *psutil.Process(driver.pid).children(recursive=True)]
            driver.send_signal(signal.SIGTERM)  # the driver alone, as `ray job stop` or a scheduler would
            assert driver.wait(timeout=120) == 130, (tmp_path / "first.log").read_text()[-3000:]
        finally:
            reap(driver, family)
        assert "interrupted; finished stages are kept" in (tmp_path / "first.log").read_text()
        assert not job_markers()  # stopped in the middle of unlearning
        experiment = client.get_experiment_by_name("spunge").experiment_id
        first = client.search_runs([experiment], "attributes.run_name = 'killed'")
        assert [r.info.status for r in first] == ["KILLED"]
        first_children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{first[0].info.run_id}'")
        assert first_children and {r.info.status for r in first_children} == {"KILLED"}

        # 2. --resume: the unfinished job restarts from its checkpoint; SIGKILL once it is done
        driver = start_driver(tmp_path, "second.log", "--resume")
        try:
            wait_for(lambda: job_markers() or driver.poll() is not None, "the unlearning job to finish")
            assert driver.poll() is None, (tmp_path / "second.log").read_text()[-3000:]
            markers = job_markers()
            family = [psutil.Process(driver.pid), *psutil.Process(driver.pid).children(recursive=True)]
            os.killpg(driver.pid, signal.SIGKILL)  # the driver, and the local Ray it started (same session)
        finally:
            reap(driver, family)
        assert not (run / "report.json").exists()  # killed before the end
        mtimes = {m.parent.name: (m.parent / "model.safetensors").stat().st_mtime_ns for m in markers}
        trainer_runs = sorted(p.name for p in (run / "ray_train").iterdir())
        assert len(trainer_runs) == 1
        resumed = json.loads(markers[0].read_text())["final_metrics"].get("resumed_from", 0)
        assert resumed >= 10 and resumed % 10 == 0  # the job went on from a checkpoint

        # 3. --resume, and the MLflow server goes away once the driver's run has started: one line, exit 1
        driver = start_driver(tmp_path, "third.log", "--resume")
        try:
            wait_for(
                lambda: "MLflow run " in (tmp_path / "third.log").read_text() or driver.poll() is not None,
                "the third driver's MLflow run",
            )
            stop_server(server)
            assert driver.wait(timeout=600) == 1
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
        text = (tmp_path / "third.log").read_text()
        assert "left RUNNING by a driver that is gone are now KILLED" in text  # driver 2's, before the server went
        errors = [line for line in text.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in text, text[-3000:]
        assert errors[0].startswith(f"error: MLflow at {uri}: ") and "re-run with --resume" in errors[0]
        assert not (run / "report.json").exists()

        # 4. the server back, with the same store: --resume ends driver 3's run as KILLED and unlearns nothing again
        # (in this process, on its local Ray: no signal reaches this driver)
        server = start_mlflow_server(tmp_path, port)
        last = spunge_here("run", "pipe.yaml", "--resume", cwd=tmp_path)
        assert last.exit_code == 0, (last.output[-5000:], last.exception)
        assert "left RUNNING by a driver that is gone are now KILLED" in last.output
        report = json.loads((run / "report.json").read_text())
        assert set(report["jobs"]) == {"subset/north"} and report["jobs"]["subset/north"]["reused"]
        assert sorted(p.name for p in (run / "ray_train").iterdir()) == trainer_runs  # no new Ray Train run
        for key, job in report["jobs"].items():
            folder = Path(job["output_dir"])
            assert (folder / "model.safetensors").stat().st_mtime_ns == mtimes[folder.name], key
            # every step of the job, across the four drivers, each once
            assert [r["step"] for r in load_jsonl(folder / "history.jsonl")] == list(range(1, STEPS + 1)), key
        assert {"base", "merged", "subset/north"} <= set(report["models"])
        assert 0 <= report["models"]["merged"]["forget_prob"] <= 1

        parent = client.get_run(report["mlflow_run_id"])
        assert parent.info.status == "FINISHED" and parent.data.tags["spunge.resume"] == "True"
        runs = client.search_runs(
            [experiment], "attributes.run_name = 'killed'", order_by=["attributes.start_time ASC"]
        )
        # driver 2's, ended by driver 3; driver 3's, which it could not end (its server was gone), by driver 4
        assert [r.info.status for r in runs] == ["KILLED", "KILLED", "KILLED", "FINISHED"]
        assert runs[3].info.run_id == report["mlflow_run_id"]
        stale = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{runs[1].info.run_id}'")
        # a job that finished under driver 2 keeps its FINISHED run; nothing of driver 2 is left RUNNING
        assert stale and {r.info.status for r in stale} <= {"KILLED", "FINISHED"}, [r.info.status for r in stale]
        children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        by_name = {r.info.run_name: r for r in children}
        assert by_name["unlearn/north"].data.tags["spunge.reused"] == "True"
        assert by_name["merge"].info.status == "FINISHED" and "eval/merged" in by_name
    finally:
        if server.poll() is None:
            stop_server(server)
