"""What the stages share: the run's context, the unlearning jobs and what each stage leaves behind.

A stage is a function ``stage(ctx) -> None`` that reads what the stages before it left on the
``RunContext`` and adds its own output (``prep``, ``jobs``, ``merged``, ``results``, ``report``). Which
jobs a run plans (``kinds``) and which models it scores (``eval_models``) are fields of the context, so a
tune trial runs the same stages as ``spunge run`` over a narrower set of models.
"""

from __future__ import annotations

import enum
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from jobs.spec import UnlearnSpec
from orchestrator.config.schema import PipelineConfig
from orchestrator.run.display import Display


class PipelineError(RuntimeError):
    """A stage failed; the message names the stage and job."""


class Killed(KeyboardInterrupt):
    """The driver got SIGTERM or SIGHUP (``killable``): handled like Ctrl-C, recorded as KILLED."""


@contextmanager
def killable() -> Iterator[None]:
    """SIGTERM and SIGHUP raise ``Killed`` in the main thread while inside (a ``ray job stop``, a batch
    scheduler, a closed terminal), so the run records how it ended; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Killed(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


class JobKind(str, enum.Enum):
    SUBSET = "subset"  # the method on one attribute subset of the forget set; merged with the others
    UNSPLIT = "unsplit"  # the method on the whole forget set: the baseline SPUNGE is compared against


@dataclass
class Prepared:
    files: dict[str, str]  # forget/retain/holdout/general/mc -> canonical jsonl
    subsets: dict[str, str]  # subset value -> jsonl of that part of the forget set
    counts: dict[str, int]
    digests: dict[str, str] = field(default_factory=dict)  # files' and subsets' keys -> content digest
    clusters: dict[str, dict] = field(default_factory=dict)  # split.by cluster: subset -> size, top_terms
    formats: dict[str, str] = field(default_factory=dict)  # source -> "qa" | "text" (raw text rows)


@dataclass
class Job:
    """One unlearning job. ``key`` (``subset/<value>`` or ``unsplit``) names it in reports and the display."""

    kind: JobKind
    spec: UnlearnSpec
    hash: str
    subset: Optional[str] = None  # the subset's value (SUBSET jobs)
    train_dir: Optional[Path] = None  # its Ray Train run folder (checkpoints; kept for --resume)
    reused: bool = False
    result: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # the step rows drained from the board
    logged_step: int = 0  # the last step reported as an event (a restarted job replays steps after its checkpoint)
    selected: Optional[dict[str, Any]] = None  # unlearn.select's choice: step, path, rule, candidates
    curves: list[dict[str, Any]] = field(default_factory=list)  # unlearn.eval_every: eval/<metric> per step
    cost: dict[str, Any] = field(default_factory=dict)  # device_s, tokens, flops (orchestrator/tracking/costs.py)
    select_costs: list[dict[str, Any]] = field(default_factory=list)  # one per eval task of unlearn.select

    @staticmethod
    def key_of(kind: JobKind, subset: Optional[str] = None) -> str:
        return f"subset/{subset}" if kind is JobKind.SUBSET else kind.value

    @property
    def key(self) -> str:
        return self.key_of(self.kind, self.subset)

    @property
    def slug(self) -> str:
        """The key as one path component (folder and Ray Train run names)."""
        return f"subset-{self.subset}" if self.kind is JobKind.SUBSET else self.kind.value

    @property
    def model_dir(self) -> str:
        """The job's model: the step ``unlearn.select`` chose, else its output folder (the last step)."""
        return self.selected["path"] if self.selected else self.spec.output_dir

    @property
    def model_hash(self) -> str:
        """The stage hash of ``model_dir``: the job's, plus the step when a snapshot was chosen."""
        return f"{self.hash}-step{self.selected['step']}" if self.selected and self.selected["snapshot"] else self.hash

    @property
    def run_name(self) -> str:
        """The job's MLflow run: ``unlearn/<value>`` or ``unlearn/unsplit``."""
        return f"unlearn/{self.subset if self.kind is JobKind.SUBSET else self.kind.value}"


@dataclass
class Merged:
    path: str
    hash: str
    reused: bool
    seconds: Optional[float] = None  # None when reused


class Events:
    """What the stages report, and the null sink. Stages never talk to MLflow or Tune: they tell an ``Events``
    sink what happened and the sink records it. This class records nothing (``spunge eval``, a tune trial's
    reference evaluation); ``orchestrator.tracking.tracker.MlflowEvents`` writes the MLflow runs of ``spunge
    run``; ``orchestrator.experiments.tune.trial.TrialEvents`` turns job steps into ``ray.tune.report`` calls."""

    def run_started(self, ctx: RunContext) -> None:
        """The run's context is set up (config, output folder), before the first stage."""

    def stage_started(self, stage: str, ctx: RunContext) -> None:
        """``stage`` (prepare, unlearn, merge, evaluate, report) begins."""

    def job_started(self, job: Job) -> None:
        """An unlearning job is planned and about to run, or found finished in the cache (``job.reused``)."""

    def job_steps(self, job: Job, rows: list[dict[str, Any]]) -> None:
        """New step rows of a running job (each step once, in order; a restarted job's replays dropped)."""

    def job_eval(self, job: Job, step: int, metrics: dict[str, Any]) -> None:
        """A running job's model at ``step`` was scored (``unlearn.eval_every``; step 0 is the base model on
        the same sample); ``metrics`` include ``objective`` under an ``unlearn.select`` rule."""

    def job_done(self, job: Job) -> None:
        """A job finished (or was reused): ``job.result`` holds its final metrics, ``job.history`` its steps."""

    def stage_done(self, stage: str, ctx: RunContext) -> None:
        """``stage`` finished; its output is on ``ctx``."""

    def run_ended(self, ctx: RunContext, status: str) -> None:
        """The run ended: ``FINISHED`` (every stage done), ``FAILED`` (one failed) or ``KILLED`` (interrupted:
        Ctrl-C, SIGTERM, SIGHUP)."""


@dataclass
class RunContext:
    cfg: PipelineConfig
    out: Path
    resume: bool = False
    events: Events = field(default_factory=Events)
    display: Display = field(default_factory=Display)
    kinds: tuple[JobKind, ...] = (JobKind.SUBSET, JobKind.UNSPLIT)  # the jobs to plan (unsplit: split.baseline)
    eval_models: Optional[tuple[str, ...]] = (
        None  # models to score (base, oracle, subset/<v>, unsplit, merged); None: all
    )
    started: float = 0.0  # perf_counter at the start of the run
    stage_seconds: dict[str, float] = field(default_factory=dict)  # each stage's wall-clock (the cost report)
    run_id: Optional[str] = None  # the MLflow run the report names
    # what the stages leave behind
    prep: Optional[Prepared] = None
    jobs: list[Job] = field(default_factory=list)
    merge_actor: Any = None
    merge_memory: int = 0  # bytes of Ray's memory the merge actor holds from the unlearn stage on
    merged: Optional[Merged] = None
    models: dict[str, tuple[str, str]] = field(default_factory=dict)  # model scored by this run -> (path, stage hash)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # model -> eval result (may be pre-seeded)
    report: Optional[dict[str, Any]] = None
    artifacts: list[tuple[Path, Optional[str]]] = field(default_factory=list)  # (file, artifact folder) of the report

    def subset_jobs(self) -> list[Job]:
        return [j for j in self.jobs if j.kind is JobKind.SUBSET]


def root_message(e: BaseException) -> str:
    """The innermost useful line of a Ray error (RayTaskError wraps the worker's exception)."""
    cause = getattr(e, "cause", None) or e.__cause__
    while cause is not None and (getattr(cause, "cause", None) or cause.__cause__) is not None:
        cause = getattr(cause, "cause", None) or cause.__cause__
    text = str(cause or e).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__
