"""The events the stages emit, and the null sink.

Stages never talk to MLflow or Tune: they tell an ``Events`` sink what happened (a run starts, a stage
starts, a job starts, reports steps, finishes, a stage is done, the run ends) and the sink records it.
``Events`` itself records nothing (the null sink: ``spunge eval``, a tune trial's reference evaluation);
``orchestrator.tracking.tracker.MlflowEvents`` writes the MLflow runs of ``spunge run``;
``orchestrator.experiments.tune.trial.TrialEvents`` turns job steps into ``ray.tune.report`` calls. ``ctx`` is the
``orchestrator.run.context.RunContext`` (not imported here: the context module imports this one).
"""

from __future__ import annotations

from typing import Any


class Events:
    """The sink interface; every method is a no-op here."""

    def run_started(self, ctx: Any) -> None:
        """The run's context is set up (config, output folder), before the first stage."""

    def stage_started(self, stage: str, ctx: Any) -> None:
        """``stage`` (prepare, unlearn, merge, evaluate, report) begins."""

    def job_started(self, job: Any) -> None:
        """An unlearning job is planned and about to run, or found finished in the cache (``job.reused``)."""

    def job_steps(self, job: Any, rows: list[dict[str, Any]]) -> None:
        """New step rows of a running job (each step once, in order; a restarted job's replays dropped)."""

    def job_eval(self, job: Any, step: int, metrics: dict[str, Any]) -> None:
        """A running job's model at ``step`` was scored (``unlearn.eval_every``; step 0 is the base model on
        the same sample); ``metrics`` include ``objective`` under an ``unlearn.select`` rule."""

    def job_done(self, job: Any) -> None:
        """A job finished (or was reused): ``job.result`` holds its final metrics, ``job.history`` its steps."""

    def stage_done(self, stage: str, ctx: Any) -> None:
        """``stage`` finished; its output is on ``ctx``."""

    def run_ended(self, ctx: Any, status: str) -> None:
        """The run ended: ``FINISHED`` (every stage done), ``FAILED`` (one failed) or ``KILLED`` (interrupted:
        Ctrl-C, SIGTERM, SIGHUP)."""


NullEvents = Events
