"""The SPUNGE pipeline: five stages run in order over one ``RunContext``.

    prepare   load and split the data                                   orchestrator/stages/prepare.py
    unlearn   one TorchTrainer per subset (and the unsplit baseline)    orchestrator/stages/unlearn/
    merge     the merge actor merges the subset models                  orchestrator/stages/merge/
    evaluate  one Ray task per (model, suite)                           orchestrator/stages/evaluate.py
    report    the comparison table, plots, report.json                  orchestrator/stages/report.py

``spunge run`` runs all five with MLflow as the events sink; a tune trial (orchestrator/experiments/tune/trial.py)
runs the same functions over fewer jobs and models.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from orchestrator.config.schema import PipelineConfig, config_yaml
from orchestrator.run.context import PipelineError, RunContext, killable
from orchestrator.run.display import Display
from orchestrator.stages.evaluate import evaluate
from orchestrator.stages.merge import merge
from orchestrator.stages.prepare import prepare
from orchestrator.stages.report import report
from orchestrator.stages.unlearn import unlearn

__all__ = ["STAGES", "PipelineError", "run_stages", "run_pipeline", "report"]


STAGES: dict[str, Callable[[RunContext], None]] = {
    "prepare": prepare,
    "unlearn": unlearn,
    "merge": merge,
    "evaluate": evaluate,
    "report": report,
}


def run_stages(ctx: RunContext, stages: Sequence[str] = tuple(STAGES)) -> RunContext:
    """Run ``stages`` (names of ``STAGES``, in that order) over ``ctx``, telling ``ctx.events``."""
    for name in stages:
        ctx.events.stage_started(name, ctx)
        t0 = time.perf_counter()
        STAGES[name](ctx)
        ctx.stage_seconds[name] = time.perf_counter() - t0
        ctx.events.stage_done(name, ctx)
    return ctx


def run_pipeline(
    cfg: PipelineConfig,
    resume: bool = False,
    address: Optional[str] = None,
    display: Optional[Display] = None,
    parent_run_id: Optional[str] = None,
) -> dict[str, Any]:
    """``spunge run``: every stage, recorded in MLflow (nested under ``parent_run_id`` when given: a seed's
    run under its variant's); returns the report."""
    from orchestrator.remote.ray_init import init_ray, ray_address
    from orchestrator.tracking.tracker import MlflowEvents, Tracker, tracking_uri

    out = Path(cfg.storage.output_dir).resolve()  # Ray Train's storage_path must be absolute
    display = display or Display()
    with display:
        ctx = RunContext(cfg, out, resume, display=display, started=time.perf_counter())
        run_stages(ctx, ["prepare"])  # bad data fails here, before Ray and MLflow start, and writes nothing
        init_ray(cfg, address, out / "logs" / "driver.log")
        display.log(f"Ray {ray_address()}; Ray's own messages: {out / 'logs' / 'driver.log'}")
        tracker = Tracker(
            tracking_uri(cfg.tracking.uri),
            cfg.tracking.experiment,
            cfg.name,
            tags={
                "spunge.output_dir": str(out),
                "spunge.resume": str(resume),
                **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {}),
            },
        )
        display.log(f"MLflow run {tracker.parent_id} at {tracker.public_uri} (experiment {cfg.tracking.experiment!r})")
        if tracker.ended_stale:
            display.log(
                f"MLflow: {len(tracker.ended_stale)} run(s) of {out} left RUNNING by a driver that is gone "
                "are now KILLED"
            )
        ctx.events, ctx.run_id = MlflowEvents(tracker), tracker.parent_id
        try:
            with killable():
                (out / "config.resolved.yaml").write_text(config_yaml(cfg))
                ctx.events.run_started(ctx)
                run_stages(ctx, [s for s in STAGES if s != "prepare"])
        except KeyboardInterrupt:  # Ctrl-C, SIGTERM, SIGHUP
            ctx.events.run_ended(ctx, "KILLED")
            raise
        except BaseException:
            ctx.events.run_ended(ctx, "FAILED")
            raise
        ctx.events.run_ended(ctx, "FINISHED")
    return ctx.report
