"""MLflow: one parent run per pipeline, a nested run per stage (``unlearn/<subset>``, ``merge``, ``eval/<model>``).

Only the driver writes to MLflow (jobs report to the driver through Ray), so a SQLite store never sees
concurrent writers. Runs are created with ``MlflowClient`` and nested through ``mlflow.parentRunId``.
``MlflowEvents`` is the pipeline's events sink (``orchestrator.run.context.Events``) that writes them.
"""

from __future__ import annotations

import math
import os
import socket
import time
from pathlib import Path
from typing import Any, Optional

from orchestrator.config.schema import flatten, public_dump, redact_uri
from orchestrator.run.context import Events, Job, PipelineError, RunContext

DEFAULT_URI = "sqlite:///mlflow.db"


class TrackingError(PipelineError):
    """The MLflow tracking store failed; the message names it (its URI, a password hidden)."""


MAX_PARAM_LEN = 6000


def tracking_uri(configured: Optional[str]) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


class Tracker:
    """Thin wrapper over ``MlflowClient`` holding the pipeline's parent run."""

    def __init__(self, uri: str, experiment: str, run_name: str, tags: Optional[dict[str, str]] = None):
        import mlflow
        from mlflow.tracking import MlflowClient

        mlflow.set_tracking_uri(uri)
        self.uri = uri
        self.client = MlflowClient(uri)
        exp = self._call(self.client.get_experiment_by_name, experiment)
        self.experiment_id = exp.experiment_id if exp else self._call(self.client.create_experiment, experiment)
        tags = dict(tags or {})
        # runs a driver left RUNNING when it was killed outright (SIGKILL, a lost node) end as KILLED here
        self.ended_stale = (
            self._call(end_stale_runs, self.client, self.experiment_id, tags["spunge.output_dir"])
            if "spunge.output_dir" in tags
            else []
        )
        tags.update({"spunge.driver_host": socket.gethostname(), "spunge.driver_pid": str(os.getpid())})
        self.parent = self._call(self.client.create_run, self.experiment_id, run_name=run_name, tags=tags)
        self.parent_id = self.parent.info.run_id
        self.children: dict[str, str] = {}

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """An MLflow client call; a tracking store that fails (a server gone, a locked file) is one line naming
        it. The MLflow client retries HTTP calls first (MLFLOW_HTTP_REQUEST_MAX_RETRIES, _TIMEOUT)."""
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            raise TrackingError(
                f"MLflow at {self.public_uri}: {type(e).__name__}: {lines[0] if lines else ''}; "
                "finished stages are kept: bring the tracking store back and re-run with --resume"
            ) from None

    @property
    def public_uri(self) -> str:
        """The tracking URI as shown to people (a password in it hidden)."""
        return redact_uri(self.uri)

    def child(self, name: str, tags: Optional[dict[str, str]] = None) -> str:
        """Create (once) the nested run ``name`` and return its id."""
        if name not in self.children:
            run = self._call(
                self.client.create_run,
                self.experiment_id,
                run_name=name,
                tags={"mlflow.parentRunId": self.parent_id, **(tags or {})},
            )
            self.children[name] = run.info.run_id
        return self.children[name]

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            self._call(self.client.log_batch, run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if _finite_number(v)]
        for i in range(0, len(items), 500):
            self._call(self.client.log_batch, run_id, metrics=items[i : i + 500])

    def log_history(self, run_id: str, history: list[dict[str, Any]], step_key: str = "step") -> None:
        """Step metrics of a job, one metric point per reported step."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, int(row.get(step_key, i)))
            for i, row in enumerate(history)
            for k, v in row.items()
            if k != step_key and _finite_number(v)
        ]
        for i in range(0, len(items), 500):
            self._call(self.client.log_batch, run_id, metrics=items[i : i + 500])

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: Optional[str] = None) -> None:
        p = Path(path)
        if p.is_dir():
            self._call(self.client.log_artifacts, run_id, str(p), artifact_path)
        else:
            self._call(self.client.log_artifact, run_id, str(p), artifact_path)

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self._call(self.client.set_tag, run_id, k, str(v))

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self._call(self.client.set_terminated, run_id, status=status)

    def end_all(self, status: str = "FINISHED") -> None:
        for run_id in self.children.values():
            if self._call(self.client.get_run, run_id).info.status == "RUNNING":
                self.end(run_id, status)
        self.end(self.parent_id, status)


class MlflowEvents(Events):
    """The MLflow record of a pipeline run: params and the resolved config on the parent run; one nested
    run per unlearning job (params, step metrics, final metrics), the merge and each scored model; the
    report, plots and per-model metrics on the parent."""

    def __init__(self, tracker: Tracker):
        self.tracker = tracker

    def run_started(self, ctx: RunContext) -> None:
        t = self.tracker
        t.log_params(t.parent_id, flatten(public_dump(ctx.cfg)))
        cfg_file = Path(ctx.out) / "config.resolved.yaml"
        if cfg_file.exists():
            t.log_artifact(t.parent_id, cfg_file)

    def job_started(self, job: Job) -> None:
        run_id = self.tracker.child(job.run_name, tags={"spunge.stage": "unlearn", "spunge.stage_hash": job.hash})
        self.tracker.log_params(run_id, flatten(job.spec.model_dump(exclude={"deepspeed"})))

    def job_steps(self, job: Job, rows: list[dict[str, Any]]) -> None:
        self.tracker.log_history(self.tracker.child(job.run_name), rows)

    def job_eval(self, job: Job, step: int, metrics: dict[str, Any]) -> None:
        self.tracker.log_metrics(
            self.tracker.child(job.run_name), {f"eval/{k}": v for k, v in metrics.items()}, step=step
        )

    def job_done(self, job: Job) -> None:
        run_id = self.tracker.child(job.run_name)
        final = job.result.get("final_metrics", {})
        self.tracker.log_metrics(run_id, {f"final_{k}": v for k, v in final.items()})
        if job.selected:
            sel = job.selected
            self.tracker.log_metrics(run_id, {"selected_step": sel["step"], "selected_objective": sel["objective"]})
            self.tracker.set_tags(
                run_id,
                {
                    "spunge.selected_step": sel["step"],
                    "spunge.select_rule": sel["rule"],
                    "spunge.selected_path": sel["path"],
                },
            )
        self.tracker.set_tags(
            run_id,
            {
                "spunge.reused": job.reused,
                "spunge.output_dir": job.spec.output_dir,
                **({"spunge.attempts": job.result["attempts"]} if "attempts" in job.result else {}),
            },
        )
        self.tracker.end(run_id)

    def stage_started(self, stage: str, ctx: RunContext) -> None:
        if stage == "merge":
            m = ctx.cfg.merge
            run_id = self.tracker.child("merge", tags={"spunge.stage": "merge"})
            self.tracker.log_params(
                run_id,
                flatten({"method": m.method, "parameters": m.parameters, "model_parameters": m.model_parameters}),
            )

    def stage_done(self, stage: str, ctx: RunContext) -> None:
        getattr(self, f"_{stage}_done", lambda ctx: None)(ctx)

    def _merge_done(self, ctx: RunContext) -> None:
        from jobs.merge import MERGE_MARKER

        t, merged = self.tracker, ctx.merged
        run_id = t.child("merge")
        if merged.seconds is not None:
            t.log_metrics(run_id, {"merge_seconds": merged.seconds})
        t.log_artifact(run_id, Path(merged.path) / MERGE_MARKER)
        if ctx.cfg.tracking.log_models:
            t.log_artifact(run_id, merged.path, "merged_model")
        t.set_tags(
            run_id, {"spunge.stage_hash": merged.hash, "spunge.reused": merged.reused, "spunge.output_dir": merged.path}
        )
        t.end(run_id)

    def _evaluate_done(self, ctx: RunContext) -> None:
        for name, (path, _) in ctx.models.items():
            res = ctx.results[name]
            run_id = self.tracker.child(
                f"eval/{name}", tags={"spunge.stage": "eval", "spunge.reused": str(res["reused"])}
            )
            self.tracker.log_params(run_id, {"model_path": path, "suites": ",".join(ctx.cfg.eval.suites)})
            self.tracker.log_metrics(run_id, res["metrics"])
            self.tracker.log_metrics(run_id, {f"seconds.{s}": r["seconds"] for s, r in res["suites"].items()})
            self.tracker.end(run_id)

    def _report_done(self, ctx: RunContext) -> None:
        t = self.tracker
        for path, folder in ctx.artifacts:
            t.log_artifact(t.parent_id, path, folder)
        for model, metrics in ctx.report["models"].items():
            t.log_metrics(t.parent_id, {f"{model.replace('/', '.')}.{k}": v for k, v in metrics.items()})
        cost = ctx.report.get("cost")
        if cost:
            t.log_metrics(
                t.parent_id,
                {
                    **{f"cost.total.{k}": v for k, v in cost["total"].items()},
                    **{f"cost.{s}.{k}": v for s, c in cost["stages"].items() for k, v in c.items()},
                    **{
                        f"cost.{k}": cost.get(k)
                        for k in ("retrain_flops", "retrain_vs_pipeline", "retrain_vs_unlearning", "params")
                    },
                },
            )

    def run_ended(self, ctx: RunContext, status: str) -> None:
        try:
            self.tracker.end_all(status)
        except TrackingError:
            if status == "FINISHED":
                raise
            # the run already failed or was stopped, maybe because MLflow is gone: that error is the one to show


def _driver_alive(tags: dict[str, str]) -> bool:
    """Whether the driver process that tagged a run still runs (on this host; another host's cannot be
    checked from here and counts as alive, so its runs are left alone)."""
    if tags.get("spunge.driver_host") != socket.gethostname():
        return "spunge.driver_host" in tags
    try:
        pid = int(tags.get("spunge.driver_pid", ""))
        if pid == os.getpid():
            return False  # a run this process left behind (an earlier run in the same process)
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def end_stale_runs(client: Any, experiment_id: str, output_dir: str) -> list[str]:
    """End as KILLED the parent runs of ``output_dir`` still RUNNING whose driver is gone, and their RUNNING
    nested runs; the ids ended."""
    query = f"tags.`spunge.output_dir` = '{output_dir}' and attributes.status = 'RUNNING'"
    ended = []
    for run in client.search_runs([experiment_id], query, max_results=1000):
        if "mlflow.parentRunId" in run.data.tags or _driver_alive(run.data.tags):
            continue
        nested = client.search_runs(
            [experiment_id],
            f"tags.mlflow.parentRunId = '{run.info.run_id}' and attributes.status = 'RUNNING'",
            max_results=10000,
        )
        for r in [*nested, run]:
            client.set_terminated(r.info.run_id, status="KILLED")
            ended.append(r.info.run_id)
    return ended


def _finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _param_value(v: Any) -> str:
    s = str(v)
    return s if len(s) <= MAX_PARAM_LEN else s[: MAX_PARAM_LEN - 3] + "..."
