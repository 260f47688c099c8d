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
from typing import Any

from rich.console import Console

from orchestrator.config import apply_overrides, parse_config
from orchestrator.context import JobKind, RunContext
from orchestrator.display import Display
from orchestrator.events import Events
from orchestrator.pipeline import run_stages
from orchestrator.tune.objective import objective_value
from orchestrator.tune.section import TuneSection
from orchestrator.tune.space import plain

# What a trial reports while it unlearns (means over its running jobs); what ASHA can rank trials by.
PROGRESS_METRICS = ("loss", "forget_loss", "retain_loss")


class TrialEvents(Events):
    """Forwards the unlearning jobs' steps to Tune: each batch of rows becomes one ``ray.tune.report`` of the
    means over jobs of their latest loss values, at ``unlearn_steps`` (steps done by all jobs). ``objective``
    is NaN until the trial's last report (Tune checks the searcher's metric on every result)."""

    def __init__(self) -> None:
        self.latest: dict[str, dict[str, Any]] = {}

    def job_steps(self, job: Any, rows: list[dict[str, Any]]) -> None:
        from ray import tune

        self.latest[job.key] = rows[-1]
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


def run_trial(config: dict[str, Any], base: dict[str, Any], tune_spec: dict[str, Any], reference: dict[str, Any],
              out_dir: str, max_jobs: int) -> None:
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
            ctx = RunContext(cfg, out, events=events, display=display,
                             kinds=(JobKind.SUBSET,) if merged else (JobKind.UNSPLIT,), eval_models=(scored,),
                             results={n: dict(r) for n, r in reference.items()})
            run_stages(ctx, ["prepare", "unlearn", *(["merge"] if merged else []), "evaluate"])
    metrics = {k: v for k, v in ctx.results[scored]["metrics"].items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    final = {**events.progress(), **metrics, **objective_value(spec.objective, metrics, reference["base"]["metrics"])}
    (out / "trial.json").write_text(json.dumps({"trial_id": trial_id, "config": config, "metrics": final}, indent=1))
    tune.report(final)
