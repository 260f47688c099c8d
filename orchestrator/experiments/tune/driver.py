"""``run_tune``: the search's driver. It scores the reference models (base, oracle) once with the pipeline's
evaluate stage, runs the ``Tuner`` over ``orchestrator.experiments.tune.trial.run_trial`` and is MLflow's only writer:
one parent run ``tune/<name>``, one nested run per trial (``MlflowTrials``); the trials table and
``best_config.yaml`` (a runnable pipeline YAML) are its artifacts."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, Optional

import ray
from ray.tune import Callback
from ray.tune.search.optuna import OptunaSearch
from rich.console import Console

from orchestrator.config.objective import best_trial
from orchestrator.config.schema import ConfigError, PipelineConfig, flatten, public_dump
from orchestrator.config.space import plain, search_space
from orchestrator.config.tune import TuneJob, TuneSection
from orchestrator.experiments.tune.output import trial_rows, write_best_config, write_trials
from orchestrator.experiments.tune.trial import PROGRESS_METRICS, run_trial
from orchestrator.pipeline import run_stages
from orchestrator.remote.ray_init import init_ray
from orchestrator.run.context import PipelineError, RunContext, killable
from orchestrator.run.display import Display
from orchestrator.tracking.tracker import Tracker, tracking_uri

TRIAL_MEMORY = 2**20  # bytes of Ray's "memory" resource a trial (the driver of its jobs) reserves


class MlflowTrials(Callback):
    """A Tune ``Callback`` (runs in the driver): one nested MLflow run per trial under the tune parent run."""

    def __init__(self, tracker: Tracker, space_paths: list[str]):
        self.tracker = tracker
        self.paths = space_paths
        self.status: dict[str, str] = {}

    def _run(self, trial) -> str:
        return self.tracker.child(
            f"trial/{trial.trial_id}", tags={"spunge.stage": "tune_trial", "spunge.trial_id": trial.trial_id}
        )

    def on_trial_start(self, iteration, trials, trial, **info):
        self.tracker.log_params(self._run(trial), {p: plain(trial.config.get(p)) for p in self.paths})

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "unlearn_step" in result and "objective_raw" not in result:  # progress, not the final result
            self.tracker.log_metrics(
                self._run(trial),
                {k: result[k] for k in PROGRESS_METRICS if k in result},
                step=int(result["unlearn_step"]),
            )

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, "FAILED")

    def _end(self, trial, status):
        run_id = self._run(trial)
        result = trial.last_result or {}
        final = "objective_raw" in result
        if final:
            self.tracker.log_metrics(
                run_id, {k: v for k, v in result.items() if k not in TUNE_KEYS and isinstance(v, (int, float))}
            )
        state = "ERROR" if status == "FAILED" else ("TERMINATED" if final else "STOPPED")
        self.status[trial.trial_id] = state
        self.tracker.set_tags(run_id, {"spunge.trial_status": state})
        self.tracker.end(run_id, status if state != "STOPPED" else "KILLED")


# keys Tune adds to every result; not metrics of ours
TUNE_KEYS = {
    "timestamp",
    "checkpoint_dir_name",
    "done",
    "training_iteration",
    "trial_id",
    "date",
    "time_this_iter_s",
    "time_total_s",
    "pid",
    "hostname",
    "node_ip",
    "time_since_restore",
    "iterations_since_restore",
    "config",
    "experiment_tag",
}


def plan_concurrency(
    cfg: PipelineConfig, spec: TuneSection, resources: dict[str, float], n_subsets: int
) -> tuple[int, int]:
    """(trials at once, unlearning jobs at once per trial). One job takes num_workers x per-worker CPUs/GPUs;
    a trial runs its subset jobs (or the one unsplit job). Without ``max_concurrent_trials``, as many trials
    as the cluster fits with all their jobs running; each trial then gets an equal share of job slots."""
    s = cfg.scaling
    fits = int(resources.get("CPU", 1) // (s.ranks * s.cpus_per_worker))
    if s.use_gpu:
        fits = min(fits, int(resources.get("GPU", 0) // (s.ranks * s.gpus_per_worker)))
    fits = max(1, fits)
    jobs_per_trial = 1 if spec.objective.model == "unsplit" else max(1, n_subsets)
    trials = spec.max_concurrent_trials or max(1, fits // max(1, jobs_per_trial))
    return trials, max(1, min(jobs_per_trial, fits // trials))


def run_tune(job: TuneJob, address: Optional[str] = None, console: Optional[Console] = None) -> dict[str, Any]:
    """Run the search; print and write the trials table and ``best_config.yaml``; return a summary."""
    cfg = job.cfg
    console = console or Console()
    out = Path(cfg.storage.output_dir).resolve()
    t0 = time.perf_counter()
    display = Display()
    # the data first, before Ray and MLflow start: a bad row fails here and writes nothing
    ctx = RunContext(cfg, out, resume=True, display=display, eval_models=("base", "oracle"))
    with display:
        run_stages(ctx, ["prepare"])
    init_ray(cfg, address, out / "logs" / "driver.log")
    tracker = Tracker(
        tracking_uri(cfg.tracking.uri),
        cfg.tracking.experiment,
        f"tune/{cfg.name}",
        tags={"spunge.output_dir": str(out), "spunge.stage": "tune"},
    )
    display.log(f"MLflow run {tracker.parent_id} at {tracker.public_uri} (experiment {cfg.tracking.experiment!r})")
    try:
        with killable():
            summary = _search(job, ctx, tracker, display, console, t0)
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM, SIGHUP
        tracker.end_all("KILLED")
        raise
    except BaseException:
        tracker.end_all("FAILED")
        raise
    tracker.end_all("FINISHED")
    return summary


def _search(
    job: TuneJob, ctx: RunContext, tracker: Tracker, display: Display, console: Console, t0: float
) -> dict[str, Any]:
    """The reference models scored once, then the Tuner over the trials; the summary."""
    from ray import tune

    cfg, spec, out = job.cfg, job.tune, ctx.out
    tracker.log_params(
        tracker.parent_id, {**flatten(public_dump(cfg)), **flatten(spec.model_dump(mode="json"), "tune.")}
    )
    # the reference models, once for every trial: the pipeline's evaluate stage
    with display:
        display.log("tune: evaluating the reference models (base" + (", oracle)" if cfg.eval.oracle else ")"))
        reference = run_stages(ctx, ["evaluate"]).results
    missing = [m for m in spec.objective.metrics() if m not in reference["base"]["metrics"]]
    if missing:
        raise ConfigError(
            [
                f"tune.objective: metric(s) {', '.join(missing)} not produced by eval.suites "
                f"{cfg.eval.suites} (available: {', '.join(sorted(reference['base']['metrics']))})"
            ],
            job.source,
        )
    for name, res in reference.items():
        tracker.log_metrics(tracker.parent_id, {f"{name}.{k}": v for k, v in res["metrics"].items()})
    # what trials need: the base metrics (constraints), the oracle's raw scores (forget_quality, privleak)
    reference = {
        n: {"metrics": r["metrics"], "raw": r.get("raw", {}) if n == "oracle" else {}} for n, r in reference.items()
    }

    n_subsets = len(ctx.prep.subsets)
    trials_at_once, jobs_per_trial = plan_concurrency(cfg, spec, ray.cluster_resources(), n_subsets)
    display.log(
        f"tune: {spec.num_samples} sample(s) of {len(spec.space)} parameter(s), search {spec.search}, "
        f"scheduler {spec.scheduler.name}, up to {trials_at_once} trial(s) at once; objective: "
        f"{spec.objective.describe()}"
    )
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            base=cfg.model_dump(mode="json"),
            tune_spec=spec.model_dump(mode="json"),
            reference=reference,
            out_dir=str(out),
            max_jobs=jobs_per_trial,
        ),
        # The trial only drives: its TorchTrainer workers and eval tasks hold the CPUs/GPUs. Tune wants a
        # non-empty bundle ({"CPU": 0} is refused) and a CPU fraction would cost a whole worker slot.
        {"memory": TRIAL_MEMORY},
    )
    callback = MlflowTrials(tracker, list(spec.space))
    tuner = tune.Tuner(
        trainable,
        param_space=search_space(spec.space),
        tune_config=tune.TuneConfig(
            num_samples=spec.num_samples, search_alg=_search_alg(spec, trials_at_once), scheduler=_scheduler(cfg, spec)
        ),
        run_config=tune.RunConfig(
            name=f"tune-{cfg.name.replace('/', '-')}",
            storage_path=str(out / "ray_tune"),
            callbacks=[callback],
            verbose=0,
        ),
    )
    # progress reports carry no objective (see TrialEvents): Tune would refuse them as missing the searcher's metric
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # Tune prints its own tables on stdout whatever its verbosity: to the log file, not over the display
    with open(out / "logs" / "driver.log", "a") as log, contextlib.redirect_stdout(log):
        results = tuner.fit()
    rows = trial_rows(results, spec, callback.status)
    return _summarise(rows, cfg, spec, out, tracker, console, time.perf_counter() - t0)


def _summarise(
    rows: list[dict[str, Any]],
    cfg: PipelineConfig,
    spec: TuneSection,
    out: Path,
    tracker: Tracker,
    console: Console,
    seconds: float,
) -> dict[str, Any]:
    """The trials table, ``best_config.yaml`` and ``tune.json``, logged to the tune run; the summary."""
    best = best_trial(rows, spec.objective.mode)
    for p in write_trials(rows, spec, out, console):
        tracker.log_artifact(tracker.parent_id, p)
    summary = {
        "trials": rows,
        "best": best,
        "mlflow_run_id": tracker.parent_id,
        "objective": spec.objective.describe(),
        "seconds": seconds,
    }
    if best is None:
        errors = [r["error"] for r in rows if r.get("error")]
        raise PipelineError("tune: no trial produced an objective" + (f"; first error: {errors[0]}" if errors else ""))
    best_path = write_best_config(cfg, best, spec, out)
    tracker.log_artifact(tracker.parent_id, best_path)
    tracker.log_metrics(tracker.parent_id, {"best_objective": best["objective"], "best_feasible": best["feasible"]})
    tracker.set_tags(tracker.parent_id, {"spunge.best_trial": best["trial_id"]})
    summary["best_config"] = str(best_path)
    (out / "tune.json").write_text(json.dumps(summary, indent=1, default=str))
    console.print(
        f"best trial {best['trial_id']}: objective {best['objective']:.4g}"
        f"{'' if best['feasible'] else ' (INFEASIBLE: no trial met the constraints)'}; "
        f"config: {best_path}",
        highlight=False,
        markup=False,
    )
    return summary


class FinalObjectiveOptuna(OptunaSearch):
    """Optuna told only the trial's objective: progress reports (no ``objective``) are not intermediate values,
    and a trial stopped before its last report is pruned (``OptunaSearch.on_trial_complete`` without it)."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.metric in result:
            super().on_trial_result(trial_id, result)


def _search_alg(spec: TuneSection, at_once: int):
    """Random search limits concurrency itself (``max_concurrent``); a ``Searcher`` through ``ConcurrencyLimiter``."""
    if spec.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter

        searcher = FinalObjectiveOptuna(metric="objective", mode=spec.objective.mode, seed=spec.seed)
        return ConcurrencyLimiter(searcher, at_once)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=spec.seed, max_concurrent=at_once)


def _scheduler(cfg: PipelineConfig, spec: TuneSection):
    s = spec.scheduler
    if s.name == "fifo":
        from ray.tune.schedulers import FIFOScheduler

        return FIFOScheduler()
    from ray.tune.schedulers import ASHAScheduler

    max_t = s.max_t or cfg.unlearn.max_steps or 100  # unlearn_step is in a job's steps
    grace = min(s.grace_period or max(1, max_t // 4), max_t)
    # ASHA stops a trial whose time reaches its max_t; a trial that has done all its steps still has to merge
    # and evaluate, so Tune's max_t is one step beyond the last (no rung sits there)
    return ASHAScheduler(
        time_attr="unlearn_step",
        metric=s.metric,
        mode=s.mode,
        max_t=max_t + 1,
        grace_period=grace,
        reduction_factor=s.reduction_factor,
    )
