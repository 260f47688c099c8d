"""Stage 2, unlearn: one Ray Train ``TorchTrainer`` per job (each attribute subset, and the unsplit
baseline), as many at once as the cluster fits; with ``unlearn.eval_every`` the ``StepSelector`` scores each
job's snapshots meanwhile and picks its step (orchestrator/stages/unlearn/selection.py); each finished subset model
goes to the
merge actor."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import ray
from ray import ObjectRef
from ray.actor import ActorHandle

from jobs.data.io import load_jsonl, write_jsonl
from jobs.spec import UnlearnSpec
from jobs.unlearn.outputs import JOB_MARKER, STEPS_FILE
from orchestrator.config.schema import PipelineConfig
from orchestrator.run.cache import claim, file_digest, method_params_key, model_fingerprint, stage_key
from orchestrator.run.context import Job, JobKind, PipelineError, RunContext, root_message
from orchestrator.run.display import Display
from orchestrator.stages.unlearn.selection import StepSelector
from orchestrator.tracking.costs import record_job_cost

GROW_CHECK_S = 10.0  # how often pending jobs look whether the cluster now fits more of them
HISTORY_FILE = "history.jsonl"  # an unlearning job's step rows, written by the driver into the job's folder


def plan_jobs(ctx: RunContext) -> list[Job]:
    """The jobs of ``ctx.kinds``: one per subset, and the unsplit baseline unless ``split.baseline: none``."""
    cfg, prep, u = ctx.cfg, ctx.prep, ctx.cfg.unlearn
    planned: list[tuple[JobKind, Any, str]] = []
    if JobKind.SUBSET in ctx.kinds:
        planned += [(JobKind.SUBSET, value, path) for value, path in prep.subsets.items()]
    if JobKind.UNSPLIT in ctx.kinds and cfg.split.baseline == "unsplit":
        planned.append((JobKind.UNSPLIT, None, prep.files["forget"]))
    base, retain = model_fingerprint(cfg.model.path), prep.files.get(u.retain_source)
    jobs = []
    for kind, subset, path in planned:
        spec = UnlearnSpec(
            **u.training(),
            name=Job.key_of(kind, subset),
            model_path=cfg.model.path,
            dtype=cfg.model.dtype,
            allow_pickle=cfg.model.allow_pickle,
            forget_path=path,
            retain_path=retain,
            forget_format=prep.formats.get("forget", "qa"),
            retain_format="text"
            if u.retain_source == "general" or prep.formats.get(u.retain_source) == "text"
            else "qa",
            method=u.method,
            method_params=u.params,
            prompt=cfg.data.prompt_format(),
            deepspeed=cfg.deepspeed_dict(),
            attn_implementation=cfg.model.attn_implementation,
            threads_per_worker=max(1, int(cfg.scaling.cpus_per_worker)),
            max_shard_size=cfg.storage.max_shard_size,
            output_dir="",
        )
        h = stage_key(
            spec,
            cfg.scaling.ranks,  # num_workers 0 and 1 train the same one rank
            model_path=base,
            forget_path=file_digest(path),
            retain_path=prep.digests.get(u.retain_source),
            method_params=method_params_key(cfg),
        )
        job = Job(kind, spec, h, subset=subset)
        spec.output_dir = str(ctx.out / "stages" / "unlearn" / f"{job.slug}-{h}")
        job.train_dir = ctx.out / "ray_train" / f"{job.slug}-{h}"
        jobs.append(job)
    return jobs


def job_capacity(cfg: PipelineConfig, reserved_memory: int = 0, display: Optional[Display] = None) -> int:
    """How many unlearning jobs fit the cluster at once (each needs num_workers x per-worker resources), beside
    ``reserved_memory`` bytes of Ray's memory held for the whole stage (the merge actor's). When not one fits
    yet, the autoscaler is asked for one job and the cluster waited for (``orchestrator.remote.resources``)."""
    from orchestrator.remote.resources import default_wait_s, wait_until_fits, worker_bundle

    s = cfg.scaling
    if s.max_concurrent_jobs:
        return s.max_concurrent_jobs
    bundle = worker_bundle(s)
    return wait_until_fits(
        lambda res: jobs_fitting(cfg, res, reserved_memory, bundle),
        [bundle] * s.ranks,
        "one unlearning job",
        default_wait_s(s.wait_for_resources_s),
        "scaling.wait_for_resources_s",
        display,
    )


def jobs_fitting(
    cfg: PipelineConfig, res: dict[str, float], reserved_memory: int = 0, bundle: Optional[dict[str, float]] = None
) -> int:
    """Jobs that fit the cluster resources ``res`` at once; 0 when no node has room for one worker."""
    from orchestrator.remote.resources import fits_some_node

    if bundle is not None and not fits_some_node(bundle):
        return 0
    if "memory" in res:
        res = {**res, "memory": max(0, res["memory"] - reserved_memory)}
    fits = _fits(cfg, res)
    if cfg.unlearn.eval_every:  # the snapshots' eval tasks run beside the jobs: one task's resources stay free
        spare = {
            **res,
            "CPU": res.get("CPU", 1) - cfg.eval.cpus_per_task,
            "GPU": res.get("GPU", 0) - cfg.eval.gpus_per_task,
        }
        fits = max(_fits(cfg, spare), min(fits, 1))  # a cluster of one job's size: the tasks wait for it
    return fits


def _fits(cfg: PipelineConfig, res: dict[str, float]) -> int:
    s = cfg.scaling
    fits = int(res.get("CPU", 1) // (s.ranks * s.cpus_per_worker))
    if s.use_gpu:
        fits = min(fits, int(res.get("GPU", 0) // (s.ranks * s.gpus_per_worker)))
    if s.memory_per_worker_gb:
        fits = min(fits, int(res.get("memory", 0) // (s.ranks * s.memory_per_worker_gb * 2**30)))
    return fits


def unlearn(ctx: RunContext) -> None:
    """Plan ``ctx.jobs``, reuse the finished ones (``--resume``), run the rest."""
    from orchestrator.remote.progress import ProgressBoard
    from orchestrator.stages.merge import start_merge_actor

    ctx.jobs = plan_jobs(ctx)
    start_merge_actor(ctx)
    board = ProgressBoard.remote()
    selector = StepSelector(ctx)
    pending: list[Job] = []
    selecting: list[Job] = []
    for job in ctx.jobs:
        ctx.events.job_started(job)
        ctx.display.add(job.key, f"unlearn {job.key}")
        job.reused = claim(Path(job.spec.output_dir), JOB_MARKER, ctx.resume, keep_unfinished=True)
        if job.reused:
            job.result = json.loads((Path(job.spec.output_dir) / JOB_MARKER).read_text())
            _trained(ctx, job, selector, selecting)
            continue
        if ctx.resume:  # Ray Train restores an unfinished job from its latest checkpoint in train_dir
            _restore_history(ctx, job)
        else:
            shutil.rmtree(job.train_dir, ignore_errors=True)
        selector.job_started(job)  # the base model on the job's sample; a resumed job's snapshots so far
        pending.append(job)
    running: dict[Any, Job] = {}
    seen: dict[str, int] = {}
    try:
        _run_jobs(ctx, pending, running, board, seen, selector, selecting)
    finally:  # interrupted or failed: stop every job still running (its workers and placement group go too)
        for ref in running:
            ray.cancel(ref, force=True)
        selector.cancel()


def _trained(ctx: RunContext, job: Job, selector: StepSelector, selecting: list[Job]) -> None:
    """A job's training ended (or was found finished): finish it, or first let the selector choose its step."""
    if not selector.enabled or selector.job_trained(job):
        _finish(ctx, job, selector)
    else:
        ctx.display.update(job.key, info="scoring its last step (unlearn.select)")
        selecting.append(job)


def _run_jobs(
    ctx: RunContext,
    pending: list[Job],
    running: dict[ObjectRef, Job],
    board: ActorHandle,
    seen: dict[str, int],
    selector: StepSelector,
    selecting: list[Job],
) -> None:
    """Start jobs as capacity frees up, drain their progress (scoring their snapshots), finish each as it
    ends and its step is chosen."""
    from orchestrator.remote.runners import run_unlearn_job, unlearn_task_options

    capacity = job_capacity(ctx.cfg, ctx.merge_memory, ctx.display)
    scaling = ctx.cfg.scaling.model_dump()
    options = unlearn_task_options(ctx.cfg.scaling)
    grown = time.monotonic()
    while pending or running or selecting:
        if pending and not ctx.cfg.scaling.max_concurrent_jobs and time.monotonic() - grown > GROW_CHECK_S:
            grown = time.monotonic()  # a cluster that grew since (an autoscaler's nodes) runs more jobs at once
            capacity = max(capacity, jobs_fitting(ctx.cfg, dict(ray.cluster_resources()), ctx.merge_memory))
        while pending and len(running) < capacity:
            job = pending.pop(0)
            ref = run_unlearn_job.options(**options).remote(
                job.spec.model_dump(), scaling, str(job.train_dir.parent), job.train_dir.name, board
            )
            running[ref] = job
            ctx.display.update(job.key, info="starting workers" if scaling["num_workers"] else "starting")
        done, _ = ray.wait(list(running), num_returns=1, timeout=1.0) if running else ([], [])
        drain_progress(ctx, board, seen, selector)
        for ref in done:
            job = running.pop(ref)
            try:
                job.result = ray.get(ref)
            except Exception as e:  # the others are stopped by the caller
                raise PipelineError(f"unlearn {job.key} failed: {root_message(e)}") from None
            drain_progress(ctx, board, seen, selector)
            _trained(ctx, job, selector, selecting)
        selector.poll(timeout=0.0 if running else 1.0)
        for job in [j for j in selecting if selector.ready(j)]:
            selecting.remove(job)
            selector.choose(job)
            _finish(ctx, job, selector)
        ctx.display.heartbeat()


def add_steps(job: Job, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows into ``job.history`` in step order: after a restart the steps since the checkpoint come again and
    replace the old ones. Returns the rows of steps not emitted before (each step is emitted once)."""
    fresh = []
    for row in rows:
        while job.history and job.history[-1]["step"] >= row["step"]:
            job.history.pop()
        job.history.append(row)
        if row["step"] > job.logged_step:
            fresh.append(row)
            job.logged_step = row["step"]
    return fresh


def steps_reported(job: Job) -> list[dict[str, Any]]:
    """Every step row the job's workers wrote (``STEPS_FILE``: across restarts and drivers), in order."""
    path = Path(job.spec.output_dir) / STEPS_FILE
    rows = load_jsonl(path) if path.exists() else []
    probe = Job(job.kind, job.spec, job.hash)
    add_steps(probe, rows)
    return probe.history


def _restore_history(ctx: RunContext, job: Job) -> None:
    """The steps this unfinished job reported before the earlier driver died become its history again and
    reach the events: the restored job reports only the steps after its checkpoint, and no step is lost."""
    fresh = add_steps(job, steps_reported(job))
    if fresh:
        ctx.events.job_steps(job, fresh)
        ctx.display.log(f"unlearn {job.key}: resuming; steps 1-{job.logged_step} were reported before")


def drain_progress(
    ctx: RunContext, board: ActorHandle, seen: dict[str, int], selector: Optional[StepSelector] = None
) -> None:
    """Take the step rows the jobs reported since last time into each ``job.history``; emit the new steps;
    hand them to the ``selector`` (which scores the snapshots they name)."""
    by_key = {j.key: j for j in ctx.jobs}
    for key, rows in ray.get(board.since.remote(seen)).items():
        seen[key] = seen.get(key, 0) + len(rows)
        job = by_key[key]
        fresh = add_steps(job, rows)
        if fresh:
            ctx.events.job_steps(job, fresh)
        if selector is not None:
            selector.on_rows(job, rows)
        last = rows[-1]
        info = " ".join(f"{k}={last[k]:.3g}" for k in ("loss", "forget_loss", "retain_loss") if k in last)
        if last.get("resumed_from"):
            info += f" (restarted from step {int(last['resumed_from'])})"
        ctx.display.update(key, done=int(last["step"]), total=int(last["total_steps"]), info=info)


def _finish(ctx: RunContext, job: Job, selector: StepSelector) -> None:
    hist = Path(job.spec.output_dir) / HISTORY_FILE  # kept beside the checkpoint: a resumed run still plots it
    if job.reused and hist.exists():
        job.history = load_jsonl(hist)
    else:  # a driver killed between the job's end and this point left only the workers' steps
        job.history = job.history if not job.reused else steps_reported(job)
        write_jsonl(hist, job.history)
    if selector.enabled:
        job.curves = selector.curves(job)
    job.cost = record_job_cost(job, ctx.cfg.scaling)
    ctx.events.job_done(job)
    if job.kind is JobKind.SUBSET:
        ray.get(ctx.merge_actor.add.remote(job.key, job.model_dir))
    final = job.result.get("final_metrics", {})
    chosen = f"; step {job.selected['step']} of {job.selected['last_step']} chosen" if job.selected else ""
    ctx.display.finish(
        job.key,
        ("reused (resume)" if job.reused else f"done, final loss {final.get('loss', float('nan')):.3g}") + chosen,
    )
