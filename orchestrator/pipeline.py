"""The SPUNGE pipeline: five stages run in order over one ``RunContext``.

    prepare   load and split the data                                   orchestrator/prepare.py
    unlearn   one TorchTrainer per subset (and the unsplit baseline)    orchestrator/unlearn.py
    merge     the merge actor merges the subset models                  orchestrator/merge.py
    evaluate  one Ray task per (model, suite)                           orchestrator/evaluate.py
    report    the comparison table, plots, report.json                  (below)

``spunge run`` runs all five with MLflow as the events sink; a tune trial (orchestrator/tune/trial.py)
runs the same functions over fewer jobs and models.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from orchestrator.config import PipelineConfig, config_yaml
from orchestrator.context import PipelineError, RunContext, killable
from orchestrator.display import Display
from orchestrator.evaluate import evaluate
from orchestrator.merge import merge
from orchestrator.prepare import prepare
from orchestrator.report import build_report, write_report
from orchestrator.unlearn import unlearn

__all__ = ["STAGES", "PipelineError", "run_stages", "run_pipeline", "report"]


def report(ctx: RunContext) -> None:
    """``ctx.report``: the tables printed, report.json/report.md and the plots written (``ctx.artifacts``)."""
    from orchestrator.costs import cost_report

    ctx.report = build_report(ctx.results, ctx.jobs, ctx.prep, ctx.run_id,
                              time.perf_counter() - ctx.started, cost_report(ctx))
    ctx.artifacts += [(p, None) for p in write_report(ctx.report, ctx.out, ctx.display.console)]
    ctx.artifacts += [(p, "plots") for p in _plots(ctx)]


STAGES: dict[str, Callable[[RunContext], None]] = {
    "prepare": prepare, "unlearn": unlearn, "merge": merge, "evaluate": evaluate, "report": report}


def run_stages(ctx: RunContext, stages: Sequence[str] = tuple(STAGES)) -> RunContext:
    """Run ``stages`` (names of ``STAGES``, in that order) over ``ctx``, telling ``ctx.events``."""
    for name in stages:
        ctx.events.stage_started(name, ctx)
        t0 = time.perf_counter()
        STAGES[name](ctx)
        ctx.stage_seconds[name] = time.perf_counter() - t0
        ctx.events.stage_done(name, ctx)
    return ctx


def run_pipeline(cfg: PipelineConfig, resume: bool = False, address: Optional[str] = None,
                 display: Optional[Display] = None, parent_run_id: Optional[str] = None) -> dict[str, Any]:
    """``spunge run``: every stage, recorded in MLflow (nested under ``parent_run_id`` when given: a seed's
    run under its variant's); returns the report."""
    from orchestrator.ray_init import init_ray, ray_address
    from orchestrator.tracking import MlflowEvents, Tracker, tracking_uri

    out = Path(cfg.storage.output_dir).resolve()  # Ray Train's storage_path must be absolute
    display = display or Display()
    with display:
        ctx = RunContext(cfg, out, resume, display=display, started=time.perf_counter())
        run_stages(ctx, ["prepare"])  # bad data fails here, before Ray and MLflow start, and writes nothing
        init_ray(cfg, address, out / "logs" / "driver.log")
        display.log(f"Ray {ray_address()}; Ray's own messages: {out / 'logs' / 'driver.log'}")
        tracker = Tracker(tracking_uri(cfg.tracking.uri), cfg.tracking.experiment, cfg.name,
                          tags={"spunge.output_dir": str(out), "spunge.resume": str(resume),
                                **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})})
        display.log(f"MLflow run {tracker.parent_id} at {tracker.public_uri} (experiment {cfg.tracking.experiment!r})")
        if tracker.ended_stale:
            display.log(f"MLflow: {len(tracker.ended_stale)} run(s) of {out} left RUNNING by a driver that is gone "
                        "are now KILLED")
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


def _plots(ctx: RunContext) -> list[Path]:
    """The run's PNG plots in ``<output_dir>/plots/``; a plotting problem is reported, not fatal."""
    from orchestrator.plots import write_plots

    try:
        paths = write_plots(ctx.report["models"], {j.key: j.history + j.curves for j in ctx.jobs}, ctx.out / "plots",
                            {j.key: j.selected["step"] for j in ctx.jobs if j.selected} or None)
    except Exception as e:  # the report is already written: don't fail the run for a figure
        ctx.display.log(f"warning: plots not written: {type(e).__name__}: {e}")
        return []
    ctx.display.log("plots: " + ", ".join(str(p) for p in paths))
    return paths
