"""Ray for the driver: connect to a cluster, or start a local one that behaves on a small, loaded machine.

A local Ray listens on 127.0.0.1 only, its dashboard too (nothing outside the machine reaches it); it
starts with the retries and timeouts of ``ray.start_timeout_s`` (Ray gives its node 30 s, which a loaded
2-core machine can miss; Ray Train gives a worker group 60 s) and keeps one helper actor per job fewer (no
preemption watcher: a local machine is not preempted). Ray's own log lines (its logger, the raylet's warnings such as
"N PYTHON worker
processes have been started") go to a log file instead of over the progress display.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import ray

from orchestrator.config.schema import PipelineConfig
from orchestrator.run.context import PipelineError

LOGGERS = ("ray", "mlflow", "alembic", "DeepSpeed", "optuna")  # libraries whose log lines go to the log file
_STARTED_LOCAL = [False]  # whether this process started its Ray node (no autoscaler can grow it)


def init_ray(cfg: PipelineConfig, address: Optional[str], log_file: Optional[Path] = None) -> None:
    """Ray for a pipeline config: ``--address``, else ``ray.address``, else a local Ray."""
    start_ray(address or cfg.ray.address, cfg.ray.num_cpus, cfg.scaling.use_gpu, cfg.ray.start_timeout_s, log_file)


def start_ray(
    address: Optional[str] = None,
    num_cpus: Optional[int] = None,
    use_gpu: bool = False,
    start_timeout_s: float = 180.0,
    log_file: Optional[Path] = None,
) -> None:
    """Connect to ``address``, or start a local Ray (``num_cpus`` logical CPUs, default 2 x cores)."""
    if ray.is_initialized():
        return
    if log_file is not None:
        route_logs(log_file)
    env = {
        "TOKENIZERS_PARALLELISM": "false",
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cuda" if use_gpu else "cpu"),
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(start_timeout_s),
    }
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False)
    else:
        env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
        _start_local(num_cpus or 2 * (os.cpu_count() or 1), env, start_timeout_s)
        _STARTED_LOCAL[0] = True
    if log_file is not None:
        route_logs(log_file)  # ray.init sets up its loggers again
        _route_raylet_messages(log_file)


def started_locally() -> bool:
    """Whether the Ray this process uses is a local node it started (rather than a cluster it connected to)."""
    return _STARTED_LOCAL[0] and ray.is_initialized()


def ray_address() -> str:
    """Where the driver's Ray is (for the log)."""
    ctx = ray.get_runtime_context()
    return f"at {ctx.gcs_address}" if hasattr(ctx, "gcs_address") else "started"


def _start_local(num_cpus: int, env: dict[str, str], timeout_s: float) -> None:
    """``ray.init`` of a local node on 127.0.0.1, tried again while ``timeout_s`` lasts when the node is slow
    to start; one line naming the setting when it never does."""
    deadline, tries = time.monotonic() + timeout_s, 0
    while True:
        tries += 1
        try:
            with _loopback_only():
                # the dashboard serves Ray's state API, which Ray Train's placement-group cleaner asks whether
                # a job's controller still lives: without it a stopped job's resources are never released. The
                # workers are told their own dashboard's address: with another Ray on the machine, the state
                # API's address discovery finds two clusters and fails ("Found multiple active Ray instances")
                port = _free_port()
                ray.init(
                    num_cpus=num_cpus,
                    include_dashboard=True,
                    dashboard_host="127.0.0.1",
                    dashboard_port=port,
                    runtime_env={"env_vars": {**env, "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
                    log_to_driver=False,
                )
            return
        except Exception as e:  # Ray raises a bare Exception for a node that does not come up
            ray.shutdown()
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            # a slow node, or a dashboard that lost its port: _free_port's port taken before the dashboard bound
            # it (another process of this start can take it; the next try picks another)
            if not ("timed out" in first or "dashboard" in first) or time.monotonic() + 5 > deadline:
                raise PipelineError(
                    f"ray: the local Ray node did not start after {tries} tr{'y' if tries == 1 else 'ies'} "
                    f"({first}); the machine may be overloaded: raise ray.start_timeout_s "
                    f"(now {timeout_s:g}) or give ray.address of a running cluster"
                ) from None
            time.sleep(min(10.0, 2.0 * tries))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def _loopback_only() -> Iterator[None]:
    """A local Ray node on 127.0.0.1 while inside: Ray picks the machine's routable address on Linux unless its
    cluster mode is off (as on macOS and Windows). ``ray_constants.ENABLE_RAY_CLUSTER`` is read when the node
    starts; it is restored after, so a later connection to a cluster is unaffected. A Ray without it keeps
    its own choice."""
    import ray._private.ray_constants as constants

    before = getattr(constants, "ENABLE_RAY_CLUSTER", None)
    if before is not None:
        constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if before is not None:
            constants.ENABLE_RAY_CLUSTER = before


def route_logs(log_file: Path) -> None:
    """The ``LOGGERS``' records go to ``log_file`` only (appended), not to the terminal. MLflow and Optuna set
    up their loggers when first imported: they are imported first, so that theirs do not replace ours."""
    for module in ("mlflow", "optuna"):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        if module == "optuna":
            mod.logging.get_verbosity()  # sets up optuna's handler now, so it is replaced below, not added later
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            if not isinstance(h, logging.FileHandler) or h.baseFilename != handler.baseFilename:
                logger.removeHandler(h)
        if not any(
            isinstance(h, logging.FileHandler) and h.baseFilename == handler.baseFilename for h in logger.handlers
        ):
            logger.addHandler(handler)
        logger.propagate = False


def _route_raylet_messages(log_file: Path) -> None:
    """The raylet's messages to the driver (worker-start warnings, dead workers) are printed by Ray's
    ``print_to_stdstream``; they are appended to ``log_file`` instead. A private Ray function: when a Ray
    version lacks it, the messages are printed as before."""
    import ray._private.worker as worker

    if not callable(getattr(worker, "print_to_stdstream", None)):
        return

    def to_file(data: dict, ignore_prefix: bool = False) -> None:
        with open(log_file, "a") as f:
            for line in data.get("lines", []):
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} ({data.get('pid', 'ray')}) {line}\n")

    worker.print_to_stdstream = to_file
