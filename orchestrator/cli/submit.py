"""Submit the pipeline to a Ray cluster as a Ray Job (``spunge submit``, ``status``, ``logs``, ``stop``).

The job's entrypoint is ``python -m orchestrator.cli.commands run spunge.yaml --address auto``: it runs on the
cluster's head node, so the pipeline's driver is there and its tasks go to the cluster's workers. The
config travels in the job's ``working_dir`` (a staging folder holding only the config, its relative
paths made absolute: model, data and output_dir must be on storage every node sees). With ``ship_code``
the submitter's own ``orchestrator`` and ``jobs`` packages travel too (``py_modules``), overriding the
spunge installed in the cluster's image.

Token auth (Ray >= 2.52): the token is sent as an ``Authorization: Bearer`` header, taken from, in order,
``--token-path``, ``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token`` (Ray's own order).
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

CONFIG_NAME = "spunge.yaml"
# never uploaded when code is shipped (py_modules); gitignore syntax, as Ray's ``excludes``
EXCLUDES = [
    "__pycache__",
    "*.pyc",
    ".venv",
    ".git",
    "spunge-demo",
    "spunge-output",
    "mlflow.db",
    "mlruns",
    "*.safetensors",
    "*.bin",
    "*.pt",
]
ENV_FORWARD = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "HF_HOME",
    "HF_HUB_OFFLINE",
)
# set by the pipeline driver's ray.init (orchestrator.remote.ray_init.start_ray) for every task and worker
DRIVER_VARS = ("TOKENIZERS_PARALLELISM", "DS_ACCELERATOR")


class SubmitError(ValueError):
    """Bad input for a submission (config, runtime_env file, token, tracking URI): one line."""


class ClusterError(RuntimeError):
    """The cluster could not be reached or refused the request: one line."""


# ---------------------------------------------------------------------------------------------------
# the job: config staging, runtime_env, entrypoint


def resolved_raw(config: Path, output_dir: Optional[Path] = None) -> dict:
    """The config file as a dict with every relative local path made absolute (variants kept).

    Relative paths are resolved against the config's folder, as ``spunge run`` does; a missing
    ``storage.output_dir`` becomes ``<cwd>/spunge-output`` (the job's cwd is a temporary folder)."""
    from orchestrator.config.parse import resolve_paths
    from orchestrator.config.schema import StorageConfig

    raw = yaml.safe_load(config.read_text()) or {}
    if not isinstance(raw, dict):
        raise SubmitError(f"{config}: expected a YAML mapping at the top level")
    variants, tune = raw.pop("variants", None), raw.pop("tune", None)
    storage = raw.setdefault("storage", {})
    if output_dir is not None:
        storage["output_dir"] = str(output_dir.resolve())
    elif not storage.get("output_dir"):
        storage["output_dir"] = str(Path(StorageConfig().output_dir).resolve())
    raw = resolve_paths(raw, config.parent.resolve())
    if variants is not None:
        raw["variants"] = variants
    if tune is not None:
        raw["tune"] = tune
    return raw


def tracking_problem(raw: dict, env: dict[str, str]) -> tuple[Optional[str], Optional[str]]:
    """(error, warning) about the tracking URI the job will use: the job runs on the head node."""
    from orchestrator.tracking.tracker import tracking_uri

    uri = (raw.get("tracking") or {}).get("uri") or env.get("MLFLOW_TRACKING_URI") or tracking_uri(None)
    m = re.match(r"^sqlite:///(.*)$", uri) or re.match(r"^(?:file://)?(/?[^:]*)$", uri)
    if m and not uri.startswith(("http://", "https://", "databricks")):
        path = m.group(1)
        if not path.startswith("/"):
            return (
                f"tracking.uri: {uri!r} is a relative path, which a cluster job would write into its temporary "
                "working folder; set tracking.uri (or $MLFLOW_TRACKING_URI) to an MLflow server "
                "(http://HOST:5000, see docs/cluster.md)",
                None,
            )
        return None, (
            f"tracking.uri {uri!r} is a local file: it must be on storage the head node shares; "
            "an MLflow server (http://HOST:5000) is safer on a cluster"
        )
    return None, None


def load_runtime_env(path: Optional[Path]) -> dict[str, Any]:
    """A user runtime_env (YAML or JSON mapping, the format of cluster/runtime_env.yaml)."""
    if path is None:
        return {}
    if not path.is_file():
        raise SubmitError(f"--runtime-env: no such file: {path}")
    try:
        env = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SubmitError(f"--runtime-env {path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(env, dict):
        raise SubmitError(f"--runtime-env {path}: expected a mapping (a Ray runtime_env), got {type(env).__name__}")
    if "working_dir" in env:
        raise SubmitError(
            f"--runtime-env {path}: working_dir is set by spunge submit (it holds the config); "
            "ship code with py_modules or --ship-code"
        )
    if not isinstance(env.get("env_vars", {}), dict):
        raise SubmitError(f"--runtime-env {path}: env_vars: expected a mapping of NAME: value")
    return env


def build_runtime_env(
    staging: Path, user_env: dict[str, Any], environ: dict[str, str], ship_code: bool = False
) -> dict[str, Any]:
    """The job's runtime_env: the user's, plus the staged config and forwarded variables.

    Variables set in the user's file win over forwarded ones. Those the driver's own ``ray.init`` sets
    (``DRIVER_VARS``) are left out: Ray refuses to merge a job's and a driver's runtime_env that name
    the same variable; ``entrypoint`` sets them on the driver instead, which passes them on."""
    env = dict(user_env)
    forwarded = {k: environ[k] for k in ENV_FORWARD if environ.get(k)}
    env_vars = {**forwarded, **{k: str(v) for k, v in (user_env.get("env_vars") or {}).items()}}
    env["env_vars"] = {k: v for k, v in env_vars.items() if k not in DRIVER_VARS}
    env["working_dir"] = str(staging)
    if ship_code:
        import jobs
        import orchestrator

        mods = [str(Path(m.__file__).parent) for m in (orchestrator, jobs)]
        env["py_modules"] = list(user_env.get("py_modules") or []) + mods
        env["excludes"] = list(user_env.get("excludes") or []) + [
            e for e in EXCLUDES if e not in (user_env.get("excludes") or [])
        ]
    return env


def entrypoint(resume: bool = False, user_env: Optional[dict[str, Any]] = None) -> str:
    """The job's shell command; driver variables from the user's runtime_env are set on it."""
    env_vars = (user_env or {}).get("env_vars") or {}
    prefix = "".join(f"{k}={shlex.quote(str(env_vars[k]))} " for k in DRIVER_VARS if k in env_vars)
    return f"{prefix}python -m orchestrator.cli.commands run {CONFIG_NAME} --address auto" + (
        " --resume" if resume else ""
    )


def submission_id(name: str, now: Optional[float] = None) -> str:
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "spunge"
    return f"spunge-{slug}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(time.time() if now is None else now))}"


# ---------------------------------------------------------------------------------------------------
# the client


def auth_token(token_path: Optional[Path] = None, environ: Optional[dict[str, str]] = None) -> Optional[str]:
    """Ray's token, looked up as Ray does (explicit file, $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray)."""
    environ = os.environ if environ is None else environ
    if token_path is not None:
        if not token_path.is_file():
            raise SubmitError(f"--token-path: no such file: {token_path}")
        return token_path.read_text().strip() or None
    if environ.get("RAY_AUTH_TOKEN"):
        return environ["RAY_AUTH_TOKEN"].strip()
    if environ.get("RAY_AUTH_TOKEN_PATH"):
        p = Path(environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        if not p.is_file():
            raise SubmitError(f"$RAY_AUTH_TOKEN_PATH: no such file: {p}")
        return p.read_text().strip() or None
    p = Path.home() / ".ray" / "auth_token"
    if p.is_file():
        return p.read_text().strip() or None
    return None


def default_address(address: Optional[str]) -> str:
    a = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not a:
        raise SubmitError(
            "--address: give the Ray dashboard address (http://HOST:8265), "
            "or set $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS"
        )
    return a


def client(address: Optional[str], token_path: Optional[Path] = None):
    """A ``JobSubmissionClient`` for ``address`` carrying the auth token; one-line errors."""
    from ray.job_submission import JobSubmissionClient

    address = default_address(address)
    token = auth_token(token_path)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as e:  # ConnectionError, ValueError (bad scheme), auth errors
        if "Authentication" in str(e):
            raise ClusterError(
                f"--address {address}: the Ray Jobs API refused the request: {_first_line(e)} "
                "(give the cluster's token: --token-path, $RAY_AUTH_TOKEN or ~/.ray/auth_token)"
            ) from None
        raise ClusterError(f"--address {address}: cannot reach the Ray Jobs API: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    lines = [s for s in str(e).splitlines() if s.strip()]
    return f"{type(e).__name__}: {lines[0].strip() if lines else ''}"


def _call(what: str, fn: Callable, *args):
    try:
        return fn(*args)
    except Exception as e:  # the Jobs API answered with an error (RuntimeError: unknown id, ...) or is gone
        raise ClusterError(f"{what}: {_first_line(e)}") from None


def submit(
    config: Path,
    address: Optional[str],
    *,
    token_path: Optional[Path] = None,
    runtime_env: Optional[Path] = None,
    output_dir: Optional[Path] = None,
    ship_code: bool = False,
    resume: bool = False,
    sid: Optional[str] = None,
    check: bool = True,
    warn: Callable[[str], None] = lambda s: None,
) -> str:
    """Stage the config, submit the job, return its submission id."""
    from orchestrator.config.loading import load_configs  # a ConfigError propagates (exit 2 in the CLI)

    config = config.resolve()
    if check:
        runs = load_configs(config, {"storage.output_dir": str(output_dir.resolve())} if output_dir else None)
        name = runs[0][1].name.split("/")[0]
    else:
        name = None
    raw = resolved_raw(config, output_dir)
    name = name or str(raw.get("name") or "spunge")
    user_env = load_runtime_env(runtime_env)
    environ = {**os.environ, **{k: str(v) for k, v in (user_env.get("env_vars") or {}).items()}}
    error, warning = tracking_problem(raw, environ)
    if error:
        raise SubmitError(error)
    if warning:
        warn(warning)
    c = client(address, token_path)
    with tempfile.TemporaryDirectory(prefix="spunge-submit-") as tmp:
        staging = Path(tmp)
        (staging / CONFIG_NAME).write_text(yaml.safe_dump(raw, sort_keys=False))
        env = build_runtime_env(staging, user_env, dict(os.environ), ship_code)
        sid = sid or submission_id(name)
        return _call(
            f"submitting to {c.get_address()}",
            lambda: c.submit_job(
                entrypoint=entrypoint(resume, user_env),
                submission_id=sid,
                runtime_env=env,
                metadata={"spunge.config": str(config), "spunge.name": name},
            ),
        )


def follow(c, sid: str, write: Callable[[str], None]) -> str:
    """Stream the job's logs until it ends; return its final status (a string)."""

    async def tail() -> None:
        async for chunk in c.tail_job_logs(sid):
            write(chunk)

    try:
        asyncio.run(tail())
    except Exception as e:
        raise ClusterError(f"following the logs of {sid}: {_first_line(e)}") from None
    for _ in range(60):  # the log stream closes just before the status is final
        status = _call(f"job {sid}", c.get_job_status, sid)
        if status.is_terminal():
            return str(status)
        time.sleep(1)
    return str(status)


def job_info(c, sid: str):
    return _call(f"job {sid}", c.get_job_info, sid)


def job_logs(c, sid: str) -> str:
    return _call(f"job {sid}", c.get_job_logs, sid)


def stop(c, sid: str) -> bool:
    return _call(f"job {sid}", c.stop_job, sid)
