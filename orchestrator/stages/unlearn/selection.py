"""Evaluation during unlearning and best-checkpoint selection (``unlearn.eval_every``, ``unlearn.select``).

Every ``eval_every`` steps a job's rank 0 writes the model as it stands into
``<job>/snapshots/step_<N>/`` and reports the step; the ``StepSelector`` scores each snapshot with one Ray
eval task (the suites of ``unlearn.select.suites``, on a seeded sample of the job's own forget rows and of
the retain and holdout rows) while training goes on, on the eval tasks' own resources
(``eval.cpus_per_task``). The base model (and the oracle, when set) is scored once per job on the same
sample: its metrics are step 0 of the curves and the base of the rule's ``min_ratio_to_base`` constraints.
When the job ends, its last step (the job's output folder) is scored too, and ``unlearn.select.rule`` picks
the step whose model the merge and the evaluation receive: ``last``, or an objective written like the tune
objective (feasible steps first, then the best value). With ``patience`` the selector asks a running job to
stop (``STOP_FILE``) once that many evaluated steps in a row have not beaten the best.

Every score is kept beside the snapshots (``step_<N>.eval.json``, ``base.eval.json``), and the choice in
``<job>/select.json``: a resumed run (``--resume``, or a job Ray Train restarted from a checkpoint) scores
only the snapshots not scored before. With ``keep: best`` a scored snapshot that is not the best so far is
deleted (a 7B snapshot every N steps would fill the disk).
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import ray

from jobs.data.io import load_jsonl, write_json, write_jsonl
from jobs.evaluate.suites import add_reference_metrics
from jobs.spec import EvalSpec
from jobs.unlearn.outputs import SNAPSHOT_MARKER, SNAPSHOTS_DIR, STOP_FILE, snapshot_dir
from orchestrator.config.checks import SELECT_SPLITS
from orchestrator.config.objective import ObjectiveError, objective_value, rank
from orchestrator.run.context import Job, PipelineError, RunContext, root_message
from orchestrator.tracking.costs import eval_cost

SELECT_FILE = "select.json"  # the job's chosen step, written by the driver


def sample_rows(rows: list[dict], n: int, seed: int) -> list[dict]:
    """``n`` rows drawn without replacement by a seeded shuffle, in their original order (all when fewer)."""
    if len(rows) <= n:
        return list(rows)
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def rank_key(cand: dict[str, Any], mode: str) -> tuple[float, float, int]:
    """How candidates compare: the objective's ``rank`` (as tune ranks trials), then the later step."""
    return (*rank(cand, mode), cand["step"])


def choose_step(candidates: list[dict[str, Any]], rule: Any) -> dict[str, Any]:
    """The winning candidate (rows with ``step``, and ``objective``/``feasible`` unless the rule is last)."""
    if rule == "last":
        return max(candidates, key=lambda c: c["step"])
    return max(candidates, key=lambda c: rank_key(c, rule.mode))


def should_stop(candidates: list[dict[str, Any]], rule: Any, patience: Optional[int]) -> bool:
    """Early stopping: the ``patience`` last evaluated steps (in step order, all scored) came after the best."""
    if not patience or rule == "last" or not candidates:
        return False
    ordered = sorted(candidates, key=lambda c: c["step"])
    best = choose_step(ordered, rule)
    return sum(1 for c in ordered if c["step"] > best["step"]) >= patience


class StepSelector:
    """Scores the jobs' snapshots as they appear and picks each job's step (see the module doc)."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx, self.cfg = ctx, ctx.cfg.unlearn.select
        self.enabled = ctx.cfg.unlearn.eval_every is not None
        self.running: dict[Any, tuple[Job, str, int]] = {}  # ref -> (job, "step" | "base" | "oracle", step)
        self.launched: dict[str, set[tuple[str, int]]] = {}
        self.scores: dict[str, dict[int, dict[str, Any]]] = {}  # job -> step -> eval result
        self.refs: dict[str, dict[str, dict[str, Any]]] = {}  # job -> base/oracle -> eval result
        self.final_step: dict[str, int] = {}  # jobs whose training ended: their last step
        self.stopped: set[str] = set()

    # --- what the unlearn stage calls -------------------------------------------------------------
    def job_started(self, job: Job) -> None:
        """Score the base model (and the oracle) on this job's sample, and any snapshot already on disk."""
        if not self.enabled:
            return
        self.launched.setdefault(job.key, set())
        self.scores.setdefault(job.key, {})
        self.refs.setdefault(job.key, {})
        self._launch(job, "base", 0, self.ctx.cfg.model.path)
        if self.ctx.cfg.eval.oracle:
            self._launch(job, "oracle", 0, self.ctx.cfg.eval.oracle)
        self._scan(job)

    def on_rows(self, job: Job, rows: list[dict[str, Any]]) -> None:
        """Step rows of a running job: each ``snapshot`` is scored (once)."""
        for row in rows if self.enabled else ():
            if row.get("snapshot"):
                self._launch(job, "step", int(row["step"]), row["snapshot"])

    def job_trained(self, job: Job) -> bool:
        """The job's training ended: score its last step. Returns True when its choice is already made (a
        ``select.json`` of the same rule, from an earlier run), set on ``job.selected``."""
        saved = Path(job.spec.output_dir) / SELECT_FILE
        if saved.exists():
            prev = json.loads(saved.read_text())
            if prev.get("config") == self._config() and Path(prev["path"]).exists():
                job.selected = prev
                job.select_costs = prev.get("costs", [])  # what scoring its steps cost when it ran
                return True
        self.job_started(job) if job.key not in self.launched else self._scan(job)
        step = int(job.result.get("final_metrics", {}).get("step", 0))
        self.final_step[job.key] = step
        self._launch(job, "step", step, job.spec.output_dir)
        return False

    def ready(self, job: Job) -> bool:
        """Every score of this job (whose training ended) is in."""
        return job.key in self.final_step and not any(j.key == job.key for j, _, _ in self.running.values())

    def poll(self, timeout: float = 0.0) -> None:
        """Take the finished scores; log each step's metrics; prune snapshots; stop jobs past their patience."""
        if not self.running:
            return
        done, _ = ray.wait(list(self.running), num_returns=len(self.running), timeout=timeout)
        for ref in done:
            job, what, step = self.running.pop(ref)
            try:
                res = ray.get(ref)
            except Exception as e:
                raise PipelineError(
                    f"unlearn {job.key}: scoring {what} step {step} for unlearn.select failed: {root_message(e)}"
                ) from None
            write_json(self._score_file(job, what, step), res)
            self._record(job, what, step, res)

    def choose(self, job: Job) -> dict[str, Any]:
        """The job's chosen step (``job.selected``, also ``<job>/select.json``)."""
        cands = self._candidates(job, strict=True)
        if not cands:
            raise PipelineError(f"unlearn {job.key}: no evaluated step to select from")
        best = choose_step(cands, self.cfg.rule)
        final = self.final_step[job.key]
        path = job.spec.output_dir if best["step"] == final else str(snapshot_dir(job.spec.output_dir, best["step"]))
        if not Path(path).exists():
            raise PipelineError(
                f"unlearn {job.key}: the chosen step {best['step']}'s snapshot {path} was deleted "
                "(unlearn.select.keep: best under a changed rule); run without --resume or with keep: all"
            )
        rule = self.cfg.rule
        job.selected = {
            "step": best["step"],
            "last_step": final,
            "path": path,
            "snapshot": best["step"] != final,
            "rule": "last" if rule == "last" else rule.describe().replace(" of job", ""),
            "objective": best.get("objective"),
            "feasible": best.get("feasible"),
            "stopped_early": final if job.key in self.stopped or self._stopped_early(job) else None,
            "candidates": cands,
            "config": self._config(),
            "costs": job.select_costs,
        }
        write_json(Path(job.spec.output_dir) / SELECT_FILE, job.selected)
        self._prune(job, keep=best["step"])
        return job.selected

    def curves(self, job: Job) -> list[dict[str, Any]]:
        """The job's evaluated steps as rows (``step`` and ``eval/<metric>``), step 0 the base model."""
        rows = []
        base = self.refs.get(job.key, {}).get("base")
        if base is not None:
            rows.append({"step": 0, **{f"eval/{k}": v for k, v in base["metrics"].items()}})
        cands = self._candidates(job) or (job.selected or {}).get("candidates", [])  # a choice kept from before
        for c in sorted(cands, key=lambda c: c["step"]):
            rows.append(
                {
                    "step": c["step"],
                    **{f"eval/{k}": v for k, v in c["metrics"].items()},
                    **({"eval/objective": c["objective"]} if "objective" in c else {}),
                }
            )
        return rows

    def cancel(self) -> None:
        for ref in self.running:
            ray.cancel(ref, force=True)
        self.running.clear()

    # --- inside -----------------------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        return self.cfg.model_dump(mode="json")

    def _folder(self, job: Job) -> Path:
        return Path(job.spec.output_dir) / SNAPSHOTS_DIR

    def _score_file(self, job: Job, what: str, step: int) -> Path:
        return self._folder(job) / (f"step_{step:07d}.eval.json" if what == "step" else f"{what}.eval.json")

    def _scan(self, job: Job) -> None:
        """Snapshots on disk (a resumed or restarted job's earlier ones) and their scores."""
        folder = self._folder(job)
        for snap in sorted(folder.glob("step_*")) if folder.is_dir() else ():
            if snap.is_dir() and (snap / SNAPSHOT_MARKER).exists():
                self._launch(job, "step", int(json.loads((snap / SNAPSHOT_MARKER).read_text())["step"]), str(snap))
        for scored in sorted(folder.glob("step_*.eval.json")) if folder.is_dir() else ():
            step = int(scored.name.split("_")[1].split(".")[0])
            if ("step", step) not in self.launched[job.key]:
                self.launched[job.key].add(("step", step))
                self._record(job, "step", step, json.loads(scored.read_text()))

    def _splits(self, job: Job) -> dict[str, str]:
        """The job's sample: ``max_examples`` rows of its forget file and of retain/holdout, written once."""
        folder = self._folder(job) / "sample"
        files = {
            "forget": job.spec.forget_path,
            **{s: self.ctx.prep.files[s] for s in SELECT_SPLITS[1:] if s in self.ctx.prep.files},
        }
        out = {}
        for name, src in files.items():
            path = folder / f"{name}.jsonl"
            if not path.exists():
                write_jsonl(path, sample_rows(load_jsonl(src), self.cfg.max_examples, self.cfg.seed))
            out[name] = str(path)
        return out

    def _launch(self, job: Job, what: str, step: int, model_path: str) -> None:
        from orchestrator.remote.runners import eval_task_options, evaluate_task

        if (what, step) in self.launched[job.key]:
            return
        self.launched[job.key].add((what, step))
        cached = self._score_file(job, what, step)
        if cached.exists():
            self._record(job, what, step, json.loads(cached.read_text()))
            return
        cfg, e = self.ctx.cfg, self.ctx.cfg.eval
        spec = EvalSpec(
            model_path=model_path,
            splits=self._splits(job),
            suites=self.cfg.suites,
            prompt=cfg.data.prompt_format(),
            batch_size=e.batch_size,
            max_new_tokens=e.max_new_tokens,
            max_length=cfg.unlearn.max_length,
            dtype=cfg.model.dtype,
            attn_implementation=cfg.model.attn_implementation,
            suite_options={s: e.suite_options(s) for s in self.cfg.suites},
        )
        ref = evaluate_task.options(
            **eval_task_options(e.cpus_per_task, e.gpus_per_task, f"select {job.key} {what} {step}"),
        ).remote(spec.model_dump(), threads=max(1, int(e.cpus_per_task)))
        self.running[ref] = (job, what, step)

    def _record(self, job: Job, what: str, step: int, res: dict[str, Any]) -> None:
        e = self.ctx.cfg.eval
        job.select_costs.append(eval_cost(res, e.cpus_per_task, e.gpus_per_task))
        if what != "step":
            self.refs[job.key][what] = res
            if what == "base":
                self.ctx.events.job_eval(job, 0, res["metrics"])
            return
        self.scores[job.key][step] = res
        cand = next((c for c in self._candidates(job) if c["step"] == step), None)
        if cand is not None:
            self.ctx.events.job_eval(
                job, step, {**cand["metrics"], **({"objective": cand["objective"]} if "objective" in cand else {})}
            )
        cands = self._candidates(job)
        if self.cfg.keep == "best" and cands:
            self._prune(job, keep=choose_step(cands, self.cfg.rule)["step"])
        running = job.key not in self.final_step
        if running and job.key not in self.stopped and should_stop(cands, self.cfg.rule, self.cfg.patience):
            self.stopped.add(job.key)
            (Path(job.spec.output_dir) / STOP_FILE).write_text(
                json.dumps({"after_step": max(c["step"] for c in cands)})
            )
            self.ctx.display.log(
                f"unlearn {job.key}: stopping early ({self.cfg.patience} evaluated steps since the "
                f"best, step {choose_step(cands, self.cfg.rule)['step']})"
            )

    def _candidates(self, job: Job, strict: bool = False) -> list[dict[str, Any]]:
        """Each scored step with its metrics (the oracle's reference metrics added) and, under a rule, its
        objective; none before the base model is scored when the rule needs it. ``strict``: a metric the rule
        names and no suite makes is an error (else such steps wait)."""
        refs = self.refs.get(job.key, {})
        rule = self.cfg.rule
        if rule != "last" and ("base" not in refs or (self.ctx.cfg.eval.oracle and "oracle" not in refs)):
            return []  # the objective may need the base's or the oracle's metrics: wait for both
        out = []
        for step, res in sorted(self.scores.get(job.key, {}).items()):
            scored = {"metrics": dict(res["metrics"]), "raw": res.get("raw", {})}
            add_reference_metrics(
                {"step": scored, **({"oracle": refs["oracle"]} if "oracle" in refs else {})}, base=refs.get("base")
            )
            metrics = {k: v for k, v in scored["metrics"].items() if isinstance(v, (int, float))}
            cand: dict[str, Any] = {"step": step, "metrics": metrics}
            if rule != "last":
                try:
                    cand.update(objective_value(rule, metrics, refs["base"]["metrics"]))
                except ObjectiveError as err:
                    if strict:
                        raise PipelineError(f"unlearn.select.rule: {err}".replace("objective: ", "")) from None
                    continue
                if not math.isfinite(cand["objective"]):
                    cand.update(objective=-math.inf if rule.mode == "max" else math.inf, feasible=0.0)
            out.append(cand)
        return out

    def _stopped_early(self, job: Job) -> bool:
        return (Path(job.spec.output_dir) / STOP_FILE).exists()

    def _prune(self, job: Job, keep: int) -> None:
        """``keep: best``: delete the scored snapshots other than step ``keep``."""
        if self.cfg.keep != "best":
            return
        for step in self.scores.get(job.key, {}):
            folder = snapshot_dir(job.spec.output_dir, step)
            if step != keep and folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)
