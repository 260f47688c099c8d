"""One trial of a search, inside a Ray Tune trial actor: the pipeline's own stages, over this trial's jobs
and model only.

The trial applies its sampled values (dotted config paths) to the base pipeline and runs prepare ->
unlearn -> merge -> evaluate in ``<output_dir>/trials/<trial_id>``: with the objective on the merged model,
the subset jobs, the merge and the merged model; on the unsplit model, the unsplit job and its model. Base
and oracle are scored once by the driver for every trial and arrive as pre-computed results. Job steps
reach Tune through ``TrialEvents`` (so ASHA can stop a bad trial); the objective is the last report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from rich.console import Console

from orchestrator.config.objective import objective_value
from orchestrator.config.parse import parse_config
from orchestrator.config.schema import apply_overrides
from orchestrator.config.space import plain
from orchestrator.config.tune import TuneSection
from orchestrator.pipeline import run_stages
from orchestrator.run.context import Events, Job, JobKind, RunContext
from orchestrator.run.display import Display

# What a trial reports while it unlearns (means over its running jobs); what ASHA can rank trials by.
PROGRESS_METRICS = ("loss", "forget_loss", "retain_loss")


class TrialEvents(Events):
    """Forwards the unlearning jobs' steps to Tune. ``unlearn_step`` is the trial's step: the mean over its
    jobs of the steps each has done (a job not started yet counts 0), in a job's steps (0 to
    ``max_steps``), whatever the number of subset jobs and however many run at once. Each time it advances
    the trial reports it with the means over its jobs of their latest losses (what ASHA ranks trials by).
    These reports hold no ``objective``: a trial stopped by ASHA is a pruned trial to the searcher, not a
    NaN; the objective is in the trial's last report only."""

    def __init__(self) -> None:
        self.latest: dict[str, Optional[dict[str, Any]]] = {}  # job key -> its latest row (None: no step yet)
        self.reported = -1.0

    def job_started(self, job: Job) -> None:
        self.latest.setdefault(job.key, None)

    def job_steps(self, job: Any, rows: list[dict[str, Any]]) -> None:
        from ray import tune

        self.latest[job.key] = rows[-1]
        progress = self.progress()
        if progress["unlearn_step"] > self.reported:
            self.reported = progress["unlearn_step"]
            tune.report(progress)

    def progress(self) -> dict[str, float]:
        rows = [r for r in self.latest.values() if r is not None]
        out: dict[str, float] = {"unlearn_step": sum(float(r.get("step", 0)) for r in rows) / max(1, len(self.latest))}
        for k in PROGRESS_METRICS:
            vals = [float(r[k]) for r in rows if isinstance(r.get(k), (int, float))]
            if vals:
                out[k] = sum(vals) / len(vals)
        return out


def run_trial(
    config: dict[str, Any],
    base: dict[str, Any],
    tune_spec: dict[str, Any],
    reference: dict[str, Any],
    out_dir: str,
    max_jobs: int,
) -> None:
    """One trial: the pipeline with ``config``'s values (dotted paths), scored by the objective."""
    from ray import tune

    spec = TuneSection.model_validate(tune_spec)
    config = {k: plain(v) for k, v in config.items()}
    trial_id = tune.get_context().get_trial_id()
    out = Path(out_dir) / "trials" / trial_id
    changes = {**config, "name": f"{base['name']}/{trial_id}", "storage.output_dir": str(out)}
    if not base["scaling"].get("max_concurrent_jobs"):
        changes["scaling.max_concurrent_jobs"] = max_jobs  # this trial's share of the cluster
    cfg = parse_config(apply_overrides(base, changes), out_dir, f"trial {trial_id}")
    out.mkdir(parents=True, exist_ok=True)
    scored = spec.objective.model
    merged = scored == "merged"
    events = TrialEvents()
    with open(out / "trial.log", "w") as log:
        display = Display(Console(file=log, width=160))
        with display:
            ctx = RunContext(
                cfg,
                out,
                events=events,
                display=display,
                kinds=(JobKind.SUBSET,) if merged else (JobKind.UNSPLIT,),
                eval_models=(scored,),
                results={n: dict(r) for n, r in reference.items()},
            )
            run_stages(ctx, ["prepare", "unlearn", *(["merge"] if merged else []), "evaluate"])
    metrics = {
        k: v
        for k, v in ctx.results[scored]["metrics"].items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    final = {**events.progress(), **metrics, **objective_value(spec.objective, metrics, reference["base"]["metrics"])}
    (out / "trial.json").write_text(json.dumps({"trial_id": trial_id, "config": config, "metrics": final}, indent=1))
    tune.report(final)
