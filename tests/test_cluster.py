"""`spunge submit` against a real two-node Ray cluster on loopback, logging to a real MLflow server.

The test starts everything it uses (``ray start --head`` with token auth on, a second node with
``ray start --address``, ``mlflow server``) as child processes in their own process groups, on free
ports and a private temp dir, and stops only those: other Ray clusters on the machine are left alone.
The fast tests at the top check the submission's pieces (staged config, tracking URI, token lookup).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

import orchestrator.cli.submit as sub
from tests.conftest import MLFLOW_SERVER_ENV, kill_session, spunge

BIN = Path(sys.executable).parent


# ---------------------------------------------------------------------------------------------------
# fast: the pieces of a submission


def test_staged_config_has_absolute_paths_and_output_dir(tiny_dir, tmp_path, monkeypatch):
    work = tmp_path / "w"
    work.mkdir()
    shutil.copytree(tiny_dir / "model", work / "model")
    (work / "f.jsonl").write_text((tiny_dir / "forget.jsonl").read_text())
    cfg = {
        "model": {"path": "model"},
        "data": {"forget": "f.jsonl", "retain": str(tiny_dir / "retain.jsonl")},
        "split": {"attribute": "group"},
        "variants": {"a": {"unlearn.max_steps": 1}},
    }
    (work / "c.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    raw = sub.resolved_raw(work / "c.yaml")
    assert raw["model"]["path"] == str(work / "model")
    assert raw["data"]["forget"] == {"path": str(work / "f.jsonl")}
    assert raw["storage"]["output_dir"] == str(tmp_path / "spunge-output")  # the submitter's cwd, absolute
    assert raw["variants"] == {"a": {"unlearn.max_steps": 1}}
    assert sub.resolved_raw(work / "c.yaml", Path("out"))["storage"]["output_dir"] == str(tmp_path / "out")


def test_tracking_uri_must_reach_the_head_node():
    err, warn = sub.tracking_problem({}, {})  # default sqlite:///mlflow.db: relative
    assert err and "tracking.uri" in err and warn is None
    assert sub.tracking_problem({"tracking": {"uri": "sqlite:///runs/m.db"}}, {})[0]
    assert sub.tracking_problem({}, {"MLFLOW_TRACKING_URI": "mlruns"})[0]
    err, warn = sub.tracking_problem({"tracking": {"uri": "sqlite:////shared/m.db"}}, {})
    assert err is None and "shares" in warn
    assert sub.tracking_problem({}, {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}) == (None, None)


def test_runtime_env_merges_user_file_and_forwards_tracking(tmp_path):
    f = tmp_path / "env.yaml"
    f.write_text(
        yaml.safe_dump({"env_vars": {"HF_HOME": "/shared/hf", "A": 1, "DS_ACCELERATOR": "cpu"}, "pip": ["x==1"]})
    )
    user = sub.load_runtime_env(f)
    env = sub.build_runtime_env(
        tmp_path, user, {"MLFLOW_TRACKING_URI": "http://m:5000", "HF_HOME": "/x"}, ship_code=True
    )
    assert env["working_dir"] == str(tmp_path) and env["pip"] == ["x==1"]
    # the driver's ray.init sets DS_ACCELERATOR: Ray would refuse to merge two runtime_envs naming it
    assert env["env_vars"] == {"MLFLOW_TRACKING_URI": "http://m:5000", "HF_HOME": "/shared/hf", "A": "1"}
    assert sub.entrypoint(True, user) == (
        "DS_ACCELERATOR=cpu python -m orchestrator.cli.commands run spunge.yaml --address auto --resume"
    )
    assert [Path(p).name for p in env["py_modules"]] == ["orchestrator", "jobs"] and ".venv" in env["excludes"]
    (tmp_path / "bad.yaml").write_text("working_dir: /x\n")
    with pytest.raises(sub.SubmitError, match="working_dir"):
        sub.load_runtime_env(tmp_path / "bad.yaml")
    assert sub.submission_id("demo/ga kl", 0) == "spunge-demo-ga-kl-19700101-000000"


def test_a_submission_ships_the_config_alone_and_no_secret(tiny_dir, tmp_path, monkeypatch):
    """The job's working_dir holds the staged config and nothing else of the submitter's folder (.env, keys);
    of the environment only the MLflow and HF cache variables go with it (the job logs to MLflow), never the
    Ray token or an HF token; with --ship-code, only spunge's two packages."""
    import json

    work = tmp_path / "w"
    (work / ".ray").mkdir(parents=True)
    (work / ".env").write_text("HF_TOKEN=hf_dotenvSECRET\n")
    (work / ".ray" / "auth_token").write_text("rayhomeSECRET")
    cfg = {
        "model": {"path": str(tiny_dir / "model")},
        "split": {"attribute": "group"},
        "data": {"forget": str(tiny_dir / "forget.jsonl"), "retain": str(tiny_dir / "retain.jsonl")},
        "tracking": {"uri": "http://mlflow.internal:5000"},
    }
    (work / "c.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(work))
    for k, v in {
        "HF_TOKEN": "hf_envSECRET",
        "RAY_AUTH_TOKEN": "rayenvSECRET",
        "MLFLOW_TRACKING_TOKEN": "mlf-tok",
        "AWS_SECRET_ACCESS_KEY": "awsSECRET",
    }.items():
        monkeypatch.setenv(k, v)
    sent = {}

    class Jobs:  # the Jobs API client: what would go over the wire
        def get_address(self):
            return "http://head:8265"

        def submit_job(self, runtime_env, **kw):
            sent["files"] = sorted(p.name for p in Path(runtime_env["working_dir"]).rglob("*"))
            sent["blob"] = (
                json.dumps(runtime_env)
                + json.dumps(kw)
                + "".join(p.read_text() for p in Path(runtime_env["working_dir"]).rglob("*") if p.is_file())
            )
            sent["env"] = runtime_env
            return kw["submission_id"]

    monkeypatch.setattr(sub, "client", lambda address, token_path=None: Jobs())
    for ship_code in (False, True):
        sub.submit(work / "c.yaml", "http://head:8265", ship_code=ship_code)
        assert sent["files"] == ["spunge.yaml"]
        assert set(sent["env"]["env_vars"]) == {"MLFLOW_TRACKING_TOKEN"}  # forwarded for the job's MLflow client
        for secret in ("hf_dotenvSECRET", "rayhomeSECRET", "hf_envSECRET", "rayenvSECRET", "awsSECRET"):
            assert secret not in sent["blob"]
    assert [Path(p).name for p in sent["env"]["py_modules"]] == ["orchestrator", "jobs"]


def test_token_lookup_follows_rays_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "t1").write_text("one\n")
    assert sub.auth_token(None, {}) is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home")
    assert sub.auth_token(None, {}) == "home"
    assert sub.auth_token(None, {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "t1")}) == "one"
    assert sub.auth_token(None, {"RAY_AUTH_TOKEN": "env", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "t1")}) == "env"
    assert sub.auth_token(tmp_path / "t1", {"RAY_AUTH_TOKEN": "env"}) == "one"
    with pytest.raises(sub.SubmitError, match="--token-path"):
        sub.auth_token(tmp_path / "missing", {})


def test_unreachable_address_is_one_line_exit_2(tmp_path):
    port = free_ports(1)[0]
    r = spunge("status", "x", "--address", f"http://127.0.0.1:{port}", cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and lines[0].startswith("error:")


# ---------------------------------------------------------------------------------------------------
# the real thing: two Ray nodes + an MLflow server on loopback


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def wait_for(check, what: str, timeout: float, procs=(), logdir: Path | None = None) -> None:
    """Poll ``check`` until true; fail with the processes' log tails if one of ``procs`` exits first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in procs:
            if p.poll() is not None:
                logs = (
                    "".join(
                        f"\n--- {f.name}:\n" + "\n".join(f.read_text(errors="replace").splitlines()[-15:])
                        for f in sorted(logdir.glob("*.log"))
                    )
                    if logdir
                    else ""
                )
                raise AssertionError(f"{what}: a process exited early ({p.args[:3]}, rc {p.returncode}){logs}")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def http_ok(url: str, token: str | None = None) -> bool:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.status == 200


def pids_mentioning(text: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if text in (d / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


@pytest.fixture(scope="module")
def cluster():
    """Head + worker node (token auth on, own token file) and an MLflow server; all stopped afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="spc", dir="/tmp"))  # short: Ray's unix sockets live under it
    token = tmp / "token"
    token.write_text("spunge-test-" + os.urandom(8).hex())
    (gcs, dash, mlf, *node_ports) = free_ports(3 + 2 * 7)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token),
        PATH=f"{BIN}:{env.get('PATH', '')}",
        TOKENIZERS_PARALLELISM="false",
        DS_ACCELERATOR="cpu",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_agent_register_timeout_ms="120000",
    )  # a loaded machine starts agents slowly
    procs: list[subprocess.Popen] = []

    def node_args(ports):
        names = [
            "node-manager-port",
            "object-manager-port",
            "metrics-export-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
            "ray-client-server-port",
        ]
        return [f"--{n}={p}" for n, p in zip(names, ports)]

    def start(args, log, extra_env=None):
        procs.append(
            subprocess.Popen(
                args,
                env={**env, **(extra_env or {})},
                cwd=tmp,
                start_new_session=True,
                stdout=open(tmp / log, "w"),
                stderr=subprocess.STDOUT,
            )
        )
        return procs[-1]

    common = [
        "--block",
        "--num-cpus=2",
        "--num-gpus=0",
        "--node-ip-address=127.0.0.1",
        "--object-store-memory=200000000",
        "--disable-usage-stats",
    ]
    try:
        start(
            [
                str(BIN / "mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{tmp}/mlflow.db",
                "--artifacts-destination",
                str(tmp / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(mlf),
                "--workers",
                "1",
            ],
            "mlflow.log",
            MLFLOW_SERVER_ENV,
        )
        head = start(
            [
                str(BIN / "ray"),
                "start",
                "--head",
                f"--port={gcs}",
                f"--dashboard-port={dash}",
                "--dashboard-host=127.0.0.1",
                "--include-dashboard=true",
                f"--temp-dir={tmp}/ray",
                *common,
                *node_args(node_ports[:7]),
            ],
            "head.log",
        )
        address = f"http://127.0.0.1:{dash}"
        wait_for(lambda: http_ok(f"{address}/api/version", token.read_text()), "the Ray dashboard", 120, [head], tmp)
        with pytest.raises(urllib.error.HTTPError) as denied:  # token auth is on: no token, no Jobs API
            http_ok(f"{address}/api/jobs/")
        assert denied.value.code == 401
        worker_args = [str(BIN / "ray"), "start", f"--address=127.0.0.1:{gcs}", *common, *node_args(node_ports[7:][:6])]
        worker = start(worker_args, "worker.log")
        wait_for(lambda: http_ok(f"http://127.0.0.1:{mlf}/health"), "the MLflow server", 120, procs[:1], tmp)

        def two_nodes() -> bool:
            import json

            req = urllib.request.Request(
                f"{address}/nodes?view=summary", headers={"Authorization": f"Bearer {token.read_text()}"}
            )
            with urllib.request.urlopen(req, timeout=5) as r:
                doc = json.load(r)
            nodes = doc["data"]["summary"]
            return sum(1 for n in nodes if n.get("raylet", {}).get("state") == "ALIVE") == 2

        for attempt in range(3):  # `ray start` gives a raylet 30 s to register: a loaded machine can miss that
            try:
                wait_for(two_nodes, "the second Ray node", 120, [head, worker], tmp)
                break
            except AssertionError:
                if attempt == 2 or head.poll() is not None or worker.poll() is None:
                    raise
                worker = start(worker_args, f"worker{attempt + 1}.log")
        yield {"tmp": tmp, "address": address, "token": token, "mlflow": f"http://127.0.0.1:{mlf}", "env": env}
    finally:
        for p in reversed(procs):  # each started in its own session: its processes are ours alone
            kill_session(p)
        deadline = time.time() + 20
        while pids_mentioning(str(tmp)) and time.time() < deadline:
            time.sleep(1)
        for pid in pids_mentioning(str(tmp)):  # stragglers that carry our private temp dir in their command line
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        left = pids_mentioning(str(tmp))
        shutil.rmtree(tmp, ignore_errors=True)
        assert not left, f"processes left running: {left}"


@pytest.mark.e2e
def test_submit_runs_the_pipeline_on_the_cluster_and_logs_to_mlflow_server(cluster, tiny_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    work = tmp_path / "work"
    work.mkdir()
    for f in ("forget.jsonl", "retain.jsonl"):  # relative paths: spunge submit makes them absolute
        shutil.copy(tiny_dir / f, work / f)
    cfg = {
        "name": "cluster",
        "model": {"path": str(tiny_dir / "model")},
        "data": {"forget": "forget.jsonl", "retain": "retain.jsonl"},
        "split": {"attribute": "group", "groups": {"north": ["north"]}, "baseline": "none"},  # one job
        "unlearn": {"method": "npo", "optimizer": {"name": "adamw", "lr": 1e-3}, "max_steps": 2, "batch_size": 4},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "eval": {"max_examples": 4},
        "tracking": {"uri": cluster["mlflow"], "experiment": "spunge-cluster"},
        "storage": {"output_dir": "run"},  # relative: the submitter makes it absolute (shared storage)
    }
    (work / "pipe.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in cluster["env"].items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token: the token comes from --token-path only
    addr = ["--address", cluster["address"]]

    denied = spunge("status", "nope", *addr, cwd=work, env=env, timeout=120)
    assert denied.returncode == 2 and len(denied.stderr.strip().splitlines()) == 1, denied.stderr
    assert "Authentication required" in denied.stderr and "--token-path" in denied.stderr

    tok = ["--token-path", str(cluster["token"])]
    r = spunge("submit", "pipe.yaml", *addr, *tok, "--submission-id", "spunge-test-1", cwd=work, env=env, timeout=900)
    logs = spunge("logs", "spunge-test-1", *addr, *tok, cwd=work, env=env, timeout=120)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:] + logs.stdout[-3000:]
    assert "submitted job spunge-test-1" in r.stdout and "job spunge-test-1 SUCCEEDED" in r.stdout
    assert "spunge report" in r.stdout  # the pipeline's own output, streamed from the head node
    st = spunge("status", "spunge-test-1", *addr, *tok, cwd=work, env=env, timeout=120)
    assert st.returncode == 0 and "spunge-test-1: SUCCEEDED" in st.stdout, st.stdout + st.stderr
    assert "spunge report" in logs.stdout

    import json

    report = json.loads((work / "run" / "report.json").read_text())  # output_dir resolved on the submitter's side
    client = MlflowClient(cluster["mlflow"])
    parent = client.get_run(report["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.info.run_name == "cluster"
    assert parent.data.params["unlearn.max_steps"] == "2"
    assert {"report.json", "config.resolved.yaml"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    exp = client.get_experiment_by_name("spunge-cluster")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    names = {c.info.run_name for c in children}
    assert {"merge", "unlearn/north", "eval/base", "eval/merged"} <= names
    # the runs are in the server's store, none in a local sqlite file
    assert (cluster["tmp"] / "mlflow.db").is_file() and not (work / "mlflow.db").exists()
