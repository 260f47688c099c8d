"""``spunge tune``: a Ray Tune search over a pipeline config.

A ``tune:`` section beside the pipeline gives the search space (dotted config paths), the objective (one
metric of the merged or unsplit model, or a weighted sum, with constraints relative to the base model),
``num_samples``, the scheduler (FIFO or ASHA), the search algorithm (random or Optuna) and the concurrency.

Each trial is a Ray Tune function trainable (the Ray Train V2 pattern: the trial builds and fits its own
``TorchTrainer`` s, here through the pipeline's own stage functions): it applies its sampled values, runs
prepare -> unlearn -> merge (when the objective is on the merged model) -> eval of that model in
``<output_dir>/trials/<trial_id>``, reports the unlearning loss as it goes (``ray.tune.report``, so ASHA can
stop bad trials) and, last, the objective. Base and oracle models are evaluated once, by the driver, for all
trials. The driver is MLflow's only writer: one parent run ``tune/<name>``, one nested run per trial (a Tune
``Callback``); the trials table and ``best_config.yaml`` (a runnable pipeline YAML) are its artifacts.
"""

from __future__ import annotations

import csv
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import ray
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from rich.console import Console
from rich.table import Table

from orchestrator.config import ConfigError, PipelineConfig, _read_yaml, apply_overrides, config_yaml, flatten, parse_config

SAMPLERS = ("choice", "grid", "uniform", "loguniform", "randint")
# Sections a trial may not change: the reference models (base, oracle) are evaluated once for all trials on
# this data and these suites, and a trial's name, output folder, tracking and Ray are set by the tuner.
FIXED = ("model", "data", "eval", "tracking", "storage", "ray", "name")
# What a trial reports while it unlearns (means over its running jobs); what ASHA can rank trials by.
PROGRESS_METRICS = ("loss", "forget_loss", "retain_loss")
TRIAL_MEMORY = 2**20  # bytes of Ray's "memory" resource a trial (the driver of its jobs) reserves


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class Constraint(_Section):
    """A bound on one metric of the tuned model, absolute or relative to the base model's value."""

    metric: str
    min_ratio_to_base: Optional[float] = Field(None, description="metric >= ratio x base model's metric")
    max_ratio_to_base: Optional[float] = Field(None, description="metric <= ratio x base model's metric")
    min: Optional[float] = None
    max: Optional[float] = None

    @model_validator(mode="after")
    def _one_bound(self):
        if all(getattr(self, k) is None for k in ("min_ratio_to_base", "max_ratio_to_base", "min", "max")):
            raise ValueError("give at least one of min_ratio_to_base, max_ratio_to_base, min, max")
        return self


class Objective(_Section):
    """``metric`` (one metric) or ``weights`` (a weighted sum of metrics) of ``model``'s eval metrics.

    A trial that breaks a constraint scores ``value - penalty x shortfall`` (``+`` when minimising), the
    shortfall being the sum over broken bounds of ``|bound - actual| / |bound|``; the best trial is the best
    feasible one (an infeasible trial wins only when none is feasible)."""

    metric: Optional[str] = None
    weights: Optional[dict[str, float]] = None
    mode: Literal["max", "min"] = "max"
    model: Literal["merged", "unsplit"] = Field("merged", description="which model of a trial is scored")
    constraints: list[Constraint] = Field(default_factory=list)
    penalty: float = Field(1000.0, ge=0)

    @model_validator(mode="after")
    def _metric_or_weights(self):
        if (self.metric is None) == (self.weights is None):
            raise ValueError("give exactly one of metric (a single metric) or weights ({metric: weight})")
        if self.weights is not None and not self.weights:
            raise ValueError("weights: name at least one metric")
        return self

    def metrics(self) -> list[str]:
        names = [self.metric] if self.metric else list(self.weights or {})
        return list(dict.fromkeys(names + [c.metric for c in self.constraints]))

    def describe(self) -> str:
        what = self.metric if self.metric else " + ".join(f"{w:g}*{k}" for k, w in (self.weights or {}).items())
        cons = [f"{c.metric} {op} {v:g}{' x base' if 'ratio' in k else ''}"
                for c in self.constraints
                for k, op in (("min_ratio_to_base", ">="), ("max_ratio_to_base", "<="), ("min", ">="), ("max", "<="))
                if (v := getattr(c, k)) is not None]
        return f"{self.mode} {what} of {self.model}" + (f" s.t. {', '.join(cons)}" if cons else "")


class SchedulerConfig(_Section):
    """``fifo`` runs every trial to the end; ``asha`` (``ray.tune.schedulers.ASHAScheduler``) stops trials
    whose unlearning ``metric`` is worse than their peers' at the same number of unlearning steps."""

    name: Literal["fifo", "asha"] = "fifo"
    metric: Literal["loss", "forget_loss", "retain_loss"] = Field("loss", description="ASHA: the reported unlearning metric")
    mode: Literal["min", "max"] = "min"
    max_t: Optional[int] = Field(None, gt=0, description="ASHA: unlearning steps of a whole trial (default: from max_steps)")
    grace_period: Optional[int] = Field(None, gt=0, description="ASHA: steps before a trial can be stopped (default max_t/4)")
    reduction_factor: float = Field(2.0, gt=1)


class TuneSection(_Section):
    space: dict[str, dict[str, Any]] = Field(description="dotted.config.path -> {choice|grid|uniform|loguniform|randint: ...}")
    objective: Objective
    num_samples: int = Field(4, gt=0, description="trials (times each grid point)")
    search: Literal["random", "optuna"] = "random"
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    max_concurrent_trials: Optional[int] = Field(None, gt=0, description="default: as many as the CPUs/GPUs fit")
    seed: Optional[int] = Field(0, description="seed of the search algorithm")

    @field_validator("scheduler", mode="before")
    @classmethod
    def _scheduler_name(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @field_validator("space")
    @classmethod
    def _space(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        if not v:
            raise ValueError("name at least one dotted.config.path to search")
        problems = []
        for path, dist in v.items():
            if err := _check_dist(dist):
                problems.append(f"{path}: {err}")
        if problems:
            raise ValueError("; ".join(problems))
        return v

    @model_validator(mode="after")
    def _grid_random_only(self):
        if self.search == "optuna" and any("grid" in d for d in self.space.values()):
            raise ValueError("space: grid works with search: random only (use choice with optuna)")
        return self


def _check_dist(dist: Any) -> Optional[str]:
    if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in SAMPLERS:
        return f"expected one of {{{' | '.join(f'{s}: ...' for s in SAMPLERS)}}}, got {dist!r}"
    kind, arg = next(iter(dist.items()))
    if kind in ("choice", "grid"):
        return None if isinstance(arg, list) and arg else f"{kind}: expected a non-empty list of values"
    if not (isinstance(arg, list) and len(arg) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in arg)):
        return f"{kind}: expected [low, high]"
    lo, hi = arg
    if not lo < hi:
        return f"{kind}: expected low < high, got [{lo}, {hi}]"
    if kind == "loguniform" and lo <= 0:
        return "loguniform: expected low > 0"
    if kind == "randint" and not (isinstance(lo, int) and isinstance(hi, int)):
        return "randint: expected integers [low, high) (high excluded, as ray.tune.randint)"
    return None


def _candidates(dist: dict[str, Any]) -> list[Any]:
    """Values that stand for a distribution when checking that the path takes them."""
    kind, arg = next(iter(dist.items()))
    if kind in ("choice", "grid"):
        return list(arg)
    return [arg[0], arg[1] - 1] if kind == "randint" else list(arg)


def _plain(v: Any) -> Any:
    """A Python scalar for a sampled value (Tune's samplers return numpy scalars)."""
    return v.item() if hasattr(v, "item") and not isinstance(v, (list, dict, str)) else v


def search_space(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Tune's ``param_space`` for the ``space`` section (keys stay dotted config paths)."""
    from ray import tune

    make = {"choice": tune.choice, "grid": tune.grid_search, "uniform": lambda a: tune.uniform(*a),
            "loguniform": lambda a: tune.loguniform(*a), "randint": lambda a: tune.randint(*a)}
    return {path: make[kind](arg) for path, dist in space.items() for kind, arg in dist.items()}


# ---------------------------------------------------------------------------------------------------
# loading


@dataclass
class TuneJob:
    cfg: PipelineConfig  # the base pipeline (the tune section removed, paths resolved)
    tune: TuneSection
    source: str


def parse_tune(raw_tune: Any, cfg: PipelineConfig, source: str = "config") -> TuneSection:
    """Validate a ``tune:`` section against the pipeline ``cfg``: every searched path must be a config field
    and take each of its values (checked with the whole pipeline validation). Raises ``ConfigError``."""
    if not isinstance(raw_tune, dict):
        raise ConfigError([f"tune: expected a mapping (space, objective, num_samples, ...), got {type(raw_tune).__name__}"], source)
    try:
        spec = TuneSection.model_validate(raw_tune)
    except ValidationError as e:
        raise ConfigError([f"tune.{'.'.join(str(p) for p in err['loc'])}: {err['msg'].removeprefix('Value error, ')}"
                           for err in e.errors()], source) from None
    base = cfg.model_dump(mode="json")
    problems = []
    for path, dist in spec.space.items():
        if path.split(".")[0] in FIXED:
            problems.append(f"tune.space.{path}: cannot be searched (fixed for all trials: {', '.join(FIXED)}); "
                            "search unlearn, split, merge, scaling or deepspeed fields")
            continue
        for value in _candidates(dist):
            err = _check_value(base, path, value)
            if err:
                problems.append(f"tune.space.{path}: {err}")
                break
    if problems:
        raise ConfigError(problems, source)
    return spec


def _check_value(base: dict, path: str, value: Any) -> Optional[str]:
    node = base
    for key in path.split(".")[:-1]:
        node = node.get(key, {}) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            return f"no such config field ({key!r} holds no fields)"
    try:
        parse_config(apply_overrides(base, {path: value}))
    except ConfigError as e:
        for p in e.problems:
            if p.startswith(f"{path}: Extra inputs are not permitted"):
                return "no such config field (expected a dotted path into the pipeline config, e.g. unlearn.optimizer.lr)"
        return f"value {value!r}: {e.problems[0]}"
    return None


def load_tune(path: str | Path, output_dir: Optional[str] = None) -> TuneJob:
    """The base pipeline and its ``tune:`` section from one YAML; ``ConfigError`` on any problem."""
    raw = _read_yaml(path)
    if not isinstance(raw, dict) or "tune" not in raw:
        raise ConfigError(["tune: no tune section (space, objective, ...): nothing to search; see docs/tune.md"], str(path))
    if "variants" in raw:
        raise ConfigError(["tune: a tune section cannot be combined with variants (tune one pipeline)"], str(path))
    tune_raw = raw.pop("tune")
    if output_dir:
        raw = apply_overrides(raw, {"storage.output_dir": output_dir})
    cfg = parse_config(raw, Path(path).parent.resolve(), str(path))
    return TuneJob(cfg, parse_tune(tune_raw, cfg, str(path)), str(path))


# ---------------------------------------------------------------------------------------------------
# the objective


class ObjectiveError(RuntimeError):
    pass


def objective_value(obj: Objective, metrics: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    """``objective`` (what the search optimises), ``objective_raw`` (before penalties), ``feasible`` (1/0)
    and ``constraint_shortfall`` for one model's ``metrics``; ``base`` holds the base model's metrics."""

    def get(m: dict[str, float], name: str, whose: str) -> float:
        if name not in m or m[name] is None:
            raise ObjectiveError(f"objective: metric {name!r} is not among the {whose} model's metrics "
                                 f"({', '.join(sorted(m))}); check eval.suites")
        return float(m[name])

    if obj.metric:
        raw = get(metrics, obj.metric, obj.model)
    else:
        raw = sum(w * get(metrics, k, obj.model) for k, w in (obj.weights or {}).items())
    shortfall = 0.0
    for c in obj.constraints:
        actual = get(metrics, c.metric, obj.model)
        bounds = []
        if c.min_ratio_to_base is not None:
            bounds.append((c.min_ratio_to_base * get(base, c.metric, "base"), 1))
        if c.max_ratio_to_base is not None:
            bounds.append((c.max_ratio_to_base * get(base, c.metric, "base"), -1))
        if c.min is not None:
            bounds.append((c.min, 1))
        if c.max is not None:
            bounds.append((c.max, -1))
        for bound, sign in bounds:  # sign 1: actual >= bound; -1: actual <= bound
            gap = sign * (bound - actual)
            if gap > 0:
                shortfall += gap / max(abs(bound), 1e-12)
    penalised = raw - obj.penalty * shortfall if obj.mode == "max" else raw + obj.penalty * shortfall
    return {"objective": penalised, "objective_raw": raw, "feasible": float(shortfall == 0.0),
            "constraint_shortfall": shortfall}


def best_trial(rows: list[dict[str, Any]], mode: str) -> Optional[dict[str, Any]]:
    """The best row: feasible before infeasible, then by objective; rows without an objective never win."""
    scored = [r for r in rows if isinstance(r.get("objective"), (int, float)) and math.isfinite(r["objective"])]
    if not scored:
        return None
    sign = 1 if mode == "max" else -1
    return max(scored, key=lambda r: (r.get("feasible", 0.0), sign * r["objective"]))


# ---------------------------------------------------------------------------------------------------
# the trial (runs inside a Ray Tune trial actor)


class _NoTracking:
    """Stands in for ``Tracker`` where the pipeline's stage functions run without MLflow (trials, the
    reference evaluation): the tune driver is MLflow's only writer."""

    parent_id = "none"

    def child(self, name: str, tags: Optional[dict] = None) -> str:
        return name

    def log_params(self, *a, **k) -> None: ...
    def log_metrics(self, *a, **k) -> None: ...
    def log_artifact(self, *a, **k) -> None: ...
    def set_tags(self, *a, **k) -> None: ...
    def end(self, *a, **k) -> None: ...
    def end_all(self, *a, **k) -> None: ...

    def log_history(self, run_id: str, history: list[dict[str, Any]], step_key: str = "step") -> None: ...


class _TuneProgress(_NoTracking):
    """Forwards the unlearning jobs' step metrics to Tune: each batch of rows becomes one ``ray.tune.report``
    of the means over jobs of their latest loss values, at ``unlearn_steps`` (steps done by all jobs).
    ``objective`` is NaN until the trial's last report (Tune checks the searcher's metric on every result)."""

    def __init__(self) -> None:
        self.latest: dict[str, dict[str, Any]] = {}

    def log_history(self, run_id: str, history: list[dict[str, Any]], step_key: str = "step") -> None:
        from ray import tune

        if not history:
            return
        self.latest[run_id] = history[-1]
        tune.report(self.progress())

    def progress(self) -> dict[str, float]:
        rows = list(self.latest.values())
        out: dict[str, float] = {"objective": float("nan"),
                                 "unlearn_steps": float(sum(r.get("step", 0) for r in rows)),
                                 "unlearn_total_steps": float(sum(r.get("total_steps", 0) for r in rows))}
        for k in PROGRESS_METRICS:
            vals = [float(r[k]) for r in rows if isinstance(r.get(k), (int, float))]
            if vals:
                out[k] = sum(vals) / len(vals)
        return out


@ray.remote(num_cpus=0)
def _evaluate(cfg: PipelineConfig, prep: Any, models: dict[str, tuple[str, str]], out: str) -> dict[str, Any]:
    """A trial's evaluation (``run_evaluation``, no MLflow), logging to ``<trial>/eval.log``."""
    from orchestrator.display import Display
    from orchestrator.pipeline import run_evaluation

    with open(Path(out) / "eval.log", "w") as log:
        display = Display(Console(file=log, width=160))
        with display:
            return run_evaluation(cfg, prep, models, Path(out), False, _NoTracking(), display)


def run_trial(config: dict[str, Any], base: dict[str, Any], tune_spec: dict[str, Any], reference: dict[str, Any],
              out_dir: str, max_jobs: int) -> None:
    """One trial: the pipeline with ``config``'s values (dotted paths), scored by the objective."""
    from ray import tune

    from orchestrator.display import Display
    from orchestrator.merge_actor import MergeActor
    from orchestrator.pipeline import add_reference_metrics, plan_jobs, prepare, run_merge, run_unlearning

    spec = TuneSection.model_validate(tune_spec)
    config = {k: _plain(v) for k, v in config.items()}
    trial_id = tune.get_context().get_trial_id()
    out = Path(out_dir) / "trials" / trial_id
    changes = {**config, "name": f"{base['name']}/{trial_id}", "storage.output_dir": str(out)}
    if spec.objective.model == "merged":
        changes["split.baseline"] = "none"  # the merged model needs the subset jobs only
    if not base["scaling"].get("max_concurrent_jobs"):
        changes["scaling.max_concurrent_jobs"] = max_jobs  # this trial's share of the cluster
    cfg = parse_config(apply_overrides(base, changes), out_dir, f"trial {trial_id}")
    out.mkdir(parents=True, exist_ok=True)
    progress = _TuneProgress()
    with open(out / "trial.log", "w") as log:
        display = Display(Console(file=log, width=160))
        with display:
            prep = prepare(cfg, out)
            jobs = plan_jobs(cfg, prep, out)
            if spec.objective.model == "unsplit":
                jobs = [j for j in jobs if j.key == "unsplit"]
            subsets = [j.key for j in jobs if j.key.startswith("subset/")]
            merge_actor = MergeActor.options(num_cpus=0).remote(cfg.model.path, subsets)
            run_unlearning(cfg, jobs, out, False, progress, display, merge_actor)
            if spec.objective.model == "merged":
                path, h, _ = run_merge(cfg, jobs, out, False, progress, display, merge_actor)
                models = {"merged": (path, h)}
            else:
                models = {"unsplit": (jobs[0].spec.output_dir, jobs[0].hash)}
            display.log(f"eval {', '.join(models)}")
            # Outside the trial's placement group (Tune captures a trial's child tasks in it, and it holds no
            # CPU): a zero-CPU task with the default strategy launches the eval tasks on the cluster.
            results = ray.get(_evaluate.options(scheduling_strategy="DEFAULT").remote(cfg, prep, models, str(out)))
            display.log("eval done")
    if "oracle" in reference:
        results["oracle"] = reference["oracle"]
        add_reference_metrics(results)
    metrics = {k: v for k, v in results[spec.objective.model]["metrics"].items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    scored = objective_value(spec.objective, metrics, reference["base"]["metrics"])
    final = {**progress.progress(), **metrics, **scored}
    (out / "trial.json").write_text(json.dumps({"trial_id": trial_id, "config": config, "metrics": final}, indent=1))
    tune.report(final)


# ---------------------------------------------------------------------------------------------------
# the driver


class _MlflowTrials:
    """A Tune ``Callback`` (runs in the driver): one nested MLflow run per trial under the tune parent run."""

    def __new__(cls, *a, **k):
        from ray.tune import Callback

        class MlflowTrials(Callback):
            def __init__(self, tracker, space_paths):
                self.tracker = tracker
                self.paths = space_paths
                self.status: dict[str, str] = {}

            def _run(self, trial) -> str:
                return self.tracker.child(f"trial/{trial.trial_id}", tags={"spunge.stage": "tune_trial",
                                                                           "spunge.trial_id": trial.trial_id})

            def on_trial_start(self, iteration, trials, trial, **info):
                run_id = self._run(trial)
                self.tracker.log_params(run_id, {p: _plain(trial.config.get(p)) for p in self.paths})

            def on_trial_result(self, iteration, trials, trial, result, **info):
                if "unlearn_steps" in result and "objective_raw" not in result:  # progress, not the final result
                    self.tracker.log_metrics(self._run(trial), {k: result[k] for k in PROGRESS_METRICS if k in result},
                                             step=int(result["unlearn_steps"]))

            def on_trial_complete(self, iteration, trials, trial, **info):
                self._end(trial, "FINISHED")

            def on_trial_error(self, iteration, trials, trial, **info):
                self._end(trial, "FAILED")

            def _end(self, trial, status):
                run_id = self._run(trial)
                result = trial.last_result or {}
                final = "objective_raw" in result
                if final:
                    self.tracker.log_metrics(run_id, {k: v for k, v in result.items()
                                                      if k not in _TUNE_KEYS and isinstance(v, (int, float))})
                state = "ERROR" if status == "FAILED" else ("TERMINATED" if final else "STOPPED")
                self.status[trial.trial_id] = state
                self.tracker.set_tags(run_id, {"spunge.trial_status": state})
                self.tracker.end(run_id, status if state != "STOPPED" else "KILLED")

        return MlflowTrials(*a, **k)


# keys Tune adds to every result; not metrics of ours
_TUNE_KEYS = {"timestamp", "checkpoint_dir_name", "done", "training_iteration", "trial_id", "date", "time_this_iter_s",
              "time_total_s", "pid", "hostname", "node_ip", "time_since_restore", "iterations_since_restore", "config",
              "experiment_tag"}


def plan_concurrency(cfg: PipelineConfig, spec: TuneSection, resources: dict[str, float], n_subsets: int) -> tuple[int, int]:
    """(trials at once, unlearning jobs at once per trial). One job takes num_workers x per-worker CPUs/GPUs;
    a trial runs its subset jobs (or the one unsplit job). Without ``max_concurrent_trials``, as many trials
    as the cluster fits with all their jobs running; each trial then gets an equal share of job slots."""
    s = cfg.scaling
    fits = int(resources.get("CPU", 1) // (s.num_workers * s.cpus_per_worker))
    if s.use_gpu:
        fits = min(fits, int(resources.get("GPU", 0) // (s.num_workers * s.gpus_per_worker)))
    fits = max(1, fits)
    jobs_per_trial = 1 if spec.objective.model == "unsplit" else max(1, n_subsets)
    trials = spec.max_concurrent_trials or max(1, fits // max(1, jobs_per_trial))
    return trials, max(1, min(jobs_per_trial, fits // trials))


def run_tune(job: TuneJob, address: Optional[str] = None, console: Optional[Console] = None) -> dict[str, Any]:
    """Run the search; print and write the trials table and ``best_config.yaml``; return a summary."""
    import ray
    from ray import tune

    from orchestrator.display import Display
    from orchestrator.pipeline import PipelineError, add_reference_metrics, init_ray, prepare, run_evaluation
    from orchestrator.stages import model_fingerprint
    from orchestrator.tracking import Tracker, tracking_uri

    cfg, spec = job.cfg, job.tune
    console = console or Console()
    out = Path(cfg.storage.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    display = Display()
    init_ray(cfg, address)
    tracker = Tracker(tracking_uri(cfg.tracking.uri), cfg.tracking.experiment, f"tune/{cfg.name}",
                      tags={"spunge.output_dir": str(out), "spunge.stage": "tune"})
    display.log(f"MLflow run {tracker.parent_id} at {tracker.uri} (experiment {cfg.tracking.experiment!r})")
    try:
        tracker.log_params(tracker.parent_id, {**flatten(cfg.model_dump(mode="json")),
                                               **flatten(spec.model_dump(mode="json"), "tune.")})
        # the reference models, once for every trial
        with display:
            prep = prepare(cfg, out)
            models = {"base": (cfg.model.path, model_fingerprint(cfg.model.path))}
            if cfg.eval.oracle:
                models["oracle"] = (cfg.eval.oracle, model_fingerprint(cfg.eval.oracle))
            display.log("tune: evaluating the reference models (" + ", ".join(models) + ")")
            reference = run_evaluation(cfg, prep, models, out, True, _NoTracking(), display)
        add_reference_metrics(reference)
        missing = [m for m in spec.objective.metrics() if m not in reference["base"]["metrics"]]
        if missing:
            raise ConfigError([f"tune.objective: metric(s) {', '.join(missing)} not produced by eval.suites "
                               f"{cfg.eval.suites} (available: {', '.join(sorted(reference['base']['metrics']))})"], job.source)
        for name, res in reference.items():
            tracker.log_metrics(tracker.parent_id, {f"{name}.{k}": v for k, v in res["metrics"].items()})
        # what trials need: the base metrics (constraints), the oracle's raw scores (forget_quality, privleak)
        reference = {n: {"metrics": r["metrics"], "raw": r.get("raw", {}) if n == "oracle" else {}}
                     for n, r in reference.items()}

        trials_at_once, jobs_per_trial = plan_concurrency(cfg, spec, ray.cluster_resources(), len(prep.subsets))
        display.log(f"tune: {spec.num_samples} sample(s) of {len(spec.space)} parameter(s), search {spec.search}, "
                    f"scheduler {spec.scheduler.name}, up to {trials_at_once} trial(s) at once; objective: "
                    f"{spec.objective.describe()}")
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, base=cfg.model_dump(mode="json"), tune_spec=spec.model_dump(mode="json"),
                                 reference=reference, out_dir=str(out), max_jobs=jobs_per_trial),
            # The trial only drives: its TorchTrainer workers and eval tasks hold the CPUs/GPUs. Tune wants a
            # non-empty bundle ({"CPU": 0} is refused) and a CPU fraction would cost a whole worker slot.
            {"memory": TRIAL_MEMORY})
        callback = _MlflowTrials(tracker, list(spec.space))
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(spec.space),
            tune_config=tune.TuneConfig(num_samples=spec.num_samples, search_alg=_search_alg(spec, trials_at_once),
                                        scheduler=_scheduler(cfg, spec, len(prep.subsets))),
            run_config=tune.RunConfig(name=f"tune-{cfg.name.replace('/', '-')}", storage_path=str(out / "ray_tune"),
                                      callbacks=[callback], verbose=0),
        )
        grid = tuner.fit()
        rows = _rows(grid, spec, callback.status)
        best = best_trial(rows, spec.objective.mode)
        paths = write_trials(rows, spec, out, console)
        for p in paths:
            tracker.log_artifact(tracker.parent_id, p)
        summary = {"trials": rows, "best": best, "mlflow_run_id": tracker.parent_id, "objective": spec.objective.describe(),
                   "seconds": time.perf_counter() - t0}
        if best is None:
            errors = [r["error"] for r in rows if r.get("error")]
            raise PipelineError("tune: no trial produced an objective" + (f"; first error: {errors[0]}" if errors else ""))
        best_path = write_best_config(cfg, best, spec, out)
        tracker.log_artifact(tracker.parent_id, best_path)
        tracker.log_metrics(tracker.parent_id, {"best_objective": best["objective"], "best_feasible": best["feasible"]})
        tracker.set_tags(tracker.parent_id, {"spunge.best_trial": best["trial_id"]})
        summary["best_config"] = str(best_path)
        (out / "tune.json").write_text(json.dumps(summary, indent=1, default=str))
        console.print(f"best trial {best['trial_id']}: objective {best['objective']:.4g}"
                      f"{'' if best['feasible'] else ' (INFEASIBLE: no trial met the constraints)'}; "
                      f"config: {best_path}", highlight=False)
        tracker.end_all("FINISHED")
        return summary
    except BaseException:
        tracker.end_all("FAILED")
        raise


def _search_alg(spec: TuneSection, at_once: int):
    """Random search limits concurrency itself (``max_concurrent``); a ``Searcher`` through ``ConcurrencyLimiter``."""
    if spec.search == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as e:  # optuna missing
            raise ConfigError([f"tune.search: optuna needs the optuna package: pip install 'spunge[tune]' ({e})"]) from None
        from ray.tune.search import ConcurrencyLimiter

        return ConcurrencyLimiter(OptunaSearch(metric="objective", mode=spec.objective.mode, seed=spec.seed), at_once)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=spec.seed, max_concurrent=at_once)


def _scheduler(cfg: PipelineConfig, spec: TuneSection, n_subsets: int):
    s = spec.scheduler
    if s.name == "fifo":
        from ray.tune.schedulers import FIFOScheduler

        return FIFOScheduler()
    from ray.tune.schedulers import ASHAScheduler

    max_t = s.max_t or (cfg.unlearn.max_steps or 100) * (1 if spec.objective.model == "unsplit" else max(1, n_subsets))
    grace = min(s.grace_period or max(1, max_t // 4), max_t)
    return ASHAScheduler(time_attr="unlearn_steps", metric=s.metric, mode=s.mode, max_t=max_t, grace_period=grace,
                         reduction_factor=s.reduction_factor)


def _rows(grid, spec: TuneSection, status: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    for res in grid:
        m = res.metrics or {}
        found = re.search(r"_([0-9a-f]{5}_\d{5})_", Path(res.path).name)  # <trainable>_<trial_id>_<n>_...
        tid = m.get("trial_id") or (found.group(1) if found else Path(res.path).name)
        row: dict[str, Any] = {"trial_id": tid, **{p: _plain(res.config.get(p)) for p in spec.space}}
        final = "objective_raw" in m
        row["status"] = "ERROR" if res.error else status.get(tid, "TERMINATED" if final else "STOPPED")
        for k in ("objective", "feasible", "objective_raw", *spec.objective.metrics(), "unlearn_steps"):
            v = m.get(k)
            row[k] = v if final or k == "unlearn_steps" else None
        if res.error:
            row["error"] = str(res.error).strip().splitlines()[-1][:300]
        rows.append(row)
    return sorted(rows, key=lambda r: r["trial_id"])


def write_trials(rows: list[dict[str, Any]], spec: TuneSection, out: Path, console: Console) -> list[Path]:
    """Print the trials table (rich) and write trials.csv and trials.md."""
    if not rows:
        return []
    cols = list(dict.fromkeys(k for r in rows for k in r if k != "error"))
    best = best_trial(rows, spec.objective.mode)
    table = Table(title=f"spunge tune: {spec.objective.describe()}", title_justify="left")
    for c in cols:
        table.add_column(c, justify="left" if c in ("trial_id", "status") else "right")
    fmt = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
    for r in rows:
        table.add_row(*[fmt(r.get(c)) for c in cols], style="bold green" if r is best else None)
    console.print(table)
    csv_path = out / "trials.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols + ["error"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    md = out / "trials.md"
    md.write_text(f"# spunge tune: {spec.objective.describe()}\n\n| " + " | ".join(cols) + " |\n|"
                  + "---|" * len(cols) + "\n" + "".join("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |\n" for r in rows))
    return [csv_path, md]


def write_best_config(cfg: PipelineConfig, best: dict[str, Any], spec: TuneSection, out: Path) -> Path:
    """``<output_dir>/best_config.yaml``: the base pipeline with the best trial's values, runnable as is
    (``spunge run``), writing to ``<output_dir>/best`` under the name ``<name>-best``."""
    values = {p: best[p] for p in spec.space}
    raw = apply_overrides(cfg.model_dump(mode="json"), {**values, "name": f"{cfg.name}-best",
                                                         "storage.output_dir": str(out / "best")})
    best_cfg = parse_config(raw, out, "best_config.yaml")
    path = out / "best_config.yaml"
    header = [f"# spunge tune best config: trial {best['trial_id']} of {cfg.name!r}",
              f"# objective: {spec.objective.describe()}",
              f"# objective value {best['objective']:.6g} (raw {best['objective_raw']:.6g}, "
              f"{'feasible' if best['feasible'] else 'INFEASIBLE'})",
              *[f"# {p}: {v!r}" for p, v in values.items()],
              "# run it: spunge run best_config.yaml"]
    path.write_text("\n".join(header) + "\n" + config_yaml(best_cfg))
    return path
