"""The SPUNGE pipeline on Ray: prepare -> unlearn (one TorchTrainer per subset) -> merge actor -> eval tasks -> report."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import ray

from jobs.data.io import load_jsonl, write_json, write_jsonl
from jobs.data.loading import canonical_qa, canonical_text, load_rows
from jobs.data.split import split_rows
from jobs.evaluate.metrics import forget_quality
from jobs.evaluate.mia import privleak
from jobs.spec import EvalSpec, UnlearnSpec
from jobs.unlearn.loop import JOB_MARKER
from jobs.merge import MERGE_MARKER
from orchestrator.config import PipelineConfig, config_yaml, flatten
from orchestrator.display import Display
from orchestrator.report import build_report, write_report
from orchestrator.stages import claim, digest, file_digest, model_fingerprint
from orchestrator.tracking import Tracker, tracking_uri

EVAL_MARKER_SUFFIX = ".json"
HISTORY_FILE = "history.jsonl"  # an unlearning job's step rows, written by the driver into the job's folder


class PipelineError(RuntimeError):
    """A stage failed; the message names the stage and job."""


@dataclass
class Prepared:
    files: dict[str, str]  # forget/retain/holdout/general -> canonical jsonl
    subsets: dict[str, str]  # subset key -> jsonl of that part of the forget set
    counts: dict[str, int]
    digests: dict[str, str] = field(default_factory=dict)


@dataclass
class Job:
    key: str  # "subset/<value>" or "unsplit"
    spec: UnlearnSpec
    hash: str
    reused: bool = False
    result: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # the step rows drained from the board
    logged_step: int = 0  # the last step logged to MLflow (a restarted job replays steps after its checkpoint)


# ---------------------------------------------------------------------------------------------------
# prepare


def load_data(cfg: PipelineConfig) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """Every data source in canonical form, and the forget set split into subsets."""
    cols = cfg.data.columns.model_dump()
    data: dict[str, list[dict]] = {}
    for name in ("forget", "retain", "holdout", "general"):
        src = getattr(cfg.data, name)
        if src is None:
            continue
        rows = load_rows(src.path, src.format, src.name, src.split)
        label = f"data.{name} ({src.path})"
        data[name] = canonical_text(rows, cols, label) if name == "general" else canonical_qa(rows, cols, label)
    if cfg.data.mc is not None:  # multiple-choice rows are kept whole: their other columns are attributes
        from jobs.evaluate.mc import check_mc_records

        src = cfg.data.mc
        data["mc"] = check_mc_records(load_rows(src.path, src.format, src.name, src.split), f"data.mc ({src.path})")
    return data, split_rows(data["forget"], cfg.split.attribute, cfg.split.groups)


def prepare_check(cfg: PipelineConfig) -> dict[str, int]:
    """What ``spunge validate`` checks of the data: it loads, has the columns, and splits; the sizes."""
    return _counts(*load_data(cfg))


def _counts(data: dict[str, list], subsets: dict[str, list]) -> dict[str, int]:
    return {**{n: len(r) for n, r in data.items()}, **{f"subset/{k}": len(r) for k, r in subsets.items()}}


def prepare(cfg: PipelineConfig, out: Path) -> Prepared:
    """Load and split the data (``load_data``); write canonical jsonl files keyed by their content."""
    data, subsets = load_data(cfg)
    h = digest(data, cfg.split.model_dump())
    folder = out / "stages" / f"prepare-{h}"
    files = {}
    for name, rows in data.items():
        files[name] = str(folder / f"{name}.jsonl")
        write_jsonl(files[name], rows)
    subset_files = {}
    for key, rows in subsets.items():
        subset_files[key] = str(folder / "subsets" / f"{key}.jsonl")
        write_jsonl(subset_files[key], rows)
    return Prepared(files, subset_files, _counts(data, subsets), {n: file_digest(p) for n, p in {**files, **subset_files}.items()})


# ---------------------------------------------------------------------------------------------------
# unlearn


def plan_jobs(cfg: PipelineConfig, prep: Prepared, out: Path) -> list[Job]:
    base = model_fingerprint(cfg.model.path)
    ds = cfg.deepspeed_dict()
    u = cfg.unlearn
    forgets = {f"subset/{k}": p for k, p in prep.subsets.items()}
    if cfg.split.baseline == "unsplit":
        forgets["unsplit"] = prep.files["forget"]
    jobs = []
    for key, path in forgets.items():
        h = digest(base, file_digest(path), prep.digests.get(u.retain_source), u.model_dump(exclude={"checkpoint_every"}), ds,
                   cfg.scaling.num_workers, cfg.data.prompt_format().model_dump(), cfg.model.dtype,
                   cfg.model.attn_implementation)
        spec = UnlearnSpec(
            name=key, model_path=cfg.model.path, dtype=cfg.model.dtype, allow_pickle=cfg.model.allow_pickle,
            forget_path=path, retain_path=prep.files.get(u.retain_source),
            retain_format="text" if u.retain_source == "general" else "qa", method=u.method, method_params=u.params,
            optimizer=u.optimizer, localize=u.localize, epochs=u.epochs, max_steps=u.max_steps, batch_size=u.batch_size,
            gradient_accumulation_steps=u.gradient_accumulation_steps, max_length=u.max_length, seed=u.seed,
            prompt=cfg.data.prompt_format(), deepspeed=ds, attn_implementation=cfg.model.attn_implementation,
            gradient_checkpointing=u.gradient_checkpointing, lora=u.lora, threads_per_worker=max(1, int(cfg.scaling.cpus_per_worker)),
            report_interval_s=u.report_interval_s, checkpoint_every=u.checkpoint_every,
            output_dir=str(out / "stages" / "unlearn" / f"{key.replace('/', '-')}-{h}"),
        )
        jobs.append(Job(key, spec, h))
    return jobs


def job_capacity(cfg: PipelineConfig) -> int:
    """How many unlearning jobs fit the cluster at once (each needs num_workers x per-worker resources)."""
    if cfg.scaling.max_concurrent_jobs:
        return cfg.scaling.max_concurrent_jobs
    res = ray.cluster_resources()
    s = cfg.scaling
    fits = int(res.get("CPU", 1) // (s.num_workers * s.cpus_per_worker))
    if s.use_gpu:
        fits = min(fits, int(res.get("GPU", 0) // (s.num_workers * s.gpus_per_worker)))
    if s.memory_per_worker_gb:
        fits = min(fits, int(res.get("memory", 0) // (s.num_workers * s.memory_per_worker_gb * 2**30)))
    if fits < 1:
        raise PipelineError(f"scaling: one job needs {s.num_workers} x {s.cpus_per_worker} CPU"
                            f"{f' and {s.gpus_per_worker} GPU' if s.use_gpu else ''}"
                            f"{f' and {s.memory_per_worker_gb} GiB' if s.memory_per_worker_gb else ''} per worker; "
                            f"the cluster has {res}")
    return fits


def run_unlearning(cfg: PipelineConfig, jobs: list[Job], out: Path, resume: bool, tracker: Tracker,
                   display: Display, merge_actor: Any) -> None:
    from orchestrator.progress import ProgressBoard
    from orchestrator.runners import run_unlearn_job

    board = ProgressBoard.remote()
    pending: list[Job] = []
    for job in jobs:
        run_id = tracker.child(_run_name(job), tags={"spunge.stage": "unlearn", "spunge.stage_hash": job.hash})
        tracker.log_params(run_id, flatten(job.spec.model_dump(exclude={"deepspeed"})))
        display.add(job.key, f"unlearn {job.key}")
        job.reused = claim(Path(job.spec.output_dir), JOB_MARKER, resume)
        if job.reused:
            job.result = json.loads((Path(job.spec.output_dir) / JOB_MARKER).read_text())
            _finish_job(job, tracker, display, merge_actor, reused=True)
        else:
            pending.append(job)
    capacity = job_capacity(cfg)
    running: dict[Any, Job] = {}
    seen: dict[str, int] = {}
    storage = str(out / "ray_train")
    scaling = cfg.scaling.model_dump()
    while pending or running:
        while pending and len(running) < capacity:
            job = pending.pop(0)
            run_name = f"{job.key.replace('/', '-')}-{job.hash}"
            if not resume:  # with --resume, Ray Train restores an unfinished job from its latest checkpoint there
                shutil.rmtree(Path(storage) / run_name, ignore_errors=True)
            ref = run_unlearn_job.remote(job.spec.model_dump(), scaling, storage, run_name, board)
            running[ref] = job
            display.update(job.key, info="starting workers")
        done, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
        _drain_progress(board, seen, jobs, tracker, display)
        for ref in done:
            job = running.pop(ref)
            try:
                job.result = ray.get(ref)
            except Exception as e:
                for other in running:
                    ray.cancel(other, force=True)
                raise PipelineError(f"unlearn {job.key} failed: {_root_message(e)}") from None
            _drain_progress(board, seen, jobs, tracker, display)
            _finish_job(job, tracker, display, merge_actor, reused=False)
        display.heartbeat()


def _drain_progress(board, seen, jobs, tracker: Tracker, display: Display) -> None:
    by_key = {j.key: j for j in jobs}
    for key, rows in ray.get(board.since.remote(seen)).items():
        seen[key] = seen.get(key, 0) + len(rows)
        job = by_key[key]
        fresh = []
        for row in rows:  # after a restart, steps since the checkpoint come again: they replace the old ones
            while job.history and job.history[-1]["step"] >= row["step"]:
                job.history.pop()
            job.history.append(row)
            if row["step"] > job.logged_step:  # MLflow keeps every point: log each step once
                fresh.append(row)
                job.logged_step = row["step"]
        if fresh:
            tracker.log_history(tracker.child(_run_name(job)), fresh)
        last = rows[-1]
        info = " ".join(f"{k}={last[k]:.3g}" for k in ("loss", "forget_loss", "retain_loss") if k in last)
        if last.get("resumed_from"):
            info += f" (restarted from step {int(last['resumed_from'])})"
        display.update(key, done=int(last["step"]), total=int(last["total_steps"]), info=info)


def _run_name(job: Job) -> str:
    return "unlearn/unsplit" if job.key == "unsplit" else f"unlearn/{job.key.removeprefix('subset/')}"


def _finish_job(job: Job, tracker: Tracker, display: Display, merge_actor: Any, reused: bool) -> None:
    run_id = tracker.child(_run_name(job))
    final = job.result.get("final_metrics", {})
    tracker.log_metrics(run_id, {f"final_{k}": v for k, v in final.items()})
    tracker.set_tags(run_id, {"spunge.reused": reused, "spunge.output_dir": job.spec.output_dir})
    tracker.end(run_id)
    hist = Path(job.spec.output_dir) / HISTORY_FILE  # kept beside the checkpoint: a resumed run still plots it
    if reused:
        job.history = load_jsonl(hist) if hist.exists() else []
    else:
        write_jsonl(hist, job.history)
    if job.key.startswith("subset/"):
        ray.get(merge_actor.add.remote(job.key, job.spec.output_dir))
    display.finish(job.key, "reused (resume)" if reused else f"done, final loss {final.get('loss', float('nan')):.3g}")


# ---------------------------------------------------------------------------------------------------
# merge


def run_merge(cfg: PipelineConfig, jobs: list[Job], out: Path, resume: bool, tracker: Tracker,
              display: Display, merge_actor: Any) -> tuple[str, str, bool]:
    subset_hashes = sorted((j.key, j.hash) for j in jobs if j.key.startswith("subset/"))
    h = digest(model_fingerprint(cfg.model.path), subset_hashes, cfg.merge.model_dump(), cfg.model.dtype,
               cfg.unlearn.method, cfg.unlearn.params)
    folder = out / "stages" / f"merge-{h}"
    run_id = tracker.child("merge", tags={"spunge.stage": "merge", "spunge.stage_hash": h})
    tracker.log_params(run_id, flatten({"method": cfg.merge.method, "parameters": cfg.merge.parameters,
                                        "model_parameters": cfg.merge.model_parameters}))
    display.add("merge", f"merge ({cfg.merge.method})")
    reused = claim(folder, MERGE_MARKER, resume)
    if not reused:
        display.update("merge", info="mergekit running")
        t0 = time.perf_counter()
        try:
            ray.get(merge_actor.merge.remote(cfg.merge.method, cfg.merge.parameters, cfg.merge.model_parameters,
                                             cfg.model.dtype, str(folder),
                                             (cfg.unlearn.method, cfg.unlearn.params), cfg.merge.output))
        except Exception as e:
            raise PipelineError(f"merge ({cfg.merge.method}) failed: {_root_message(e)}") from None
        tracker.log_metrics(run_id, {"merge_seconds": time.perf_counter() - t0})
    tracker.log_artifact(run_id, folder / MERGE_MARKER)
    if cfg.tracking.log_models:
        tracker.log_artifact(run_id, folder, "merged_model")
    tracker.set_tags(run_id, {"spunge.reused": reused, "spunge.output_dir": folder})
    tracker.end(run_id)
    display.finish("merge", "reused (resume)" if reused else "done")
    return str(folder), h, reused


# ---------------------------------------------------------------------------------------------------
# evaluate


def run_evaluation(cfg: PipelineConfig, prep: Prepared, models: dict[str, tuple[str, str]], out: Path,
                   resume: bool, tracker: Tracker, display: Display) -> dict[str, dict[str, Any]]:
    """Score every model (name -> (path, stage hash)) on every suite: one Ray task per (model, suite), each
    cached under ``stages/eval/`` by its own key; results are combined per model, then ``forget_quality``
    and ``privleak`` are added against the oracle, and each model's ``eval/<model>`` MLflow run gets them all."""
    e = cfg.eval
    splits = {n: prep.files[n] for n in ("forget", "retain", "holdout", "general", "mc") if n in prep.files}
    folder = out / "stages" / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    tasks = []
    for name, (path, model_hash) in models.items():
        for suite in e.suites:
            spec = EvalSpec(model_path=path, splits=splits, suites=[suite], prompt=cfg.data.prompt_format(),
                            batch_size=e.batch_size, max_new_tokens=e.max_new_tokens,
                            max_length=cfg.unlearn.max_length, max_examples=e.max_examples, dtype=cfg.model.dtype,
                            attn_implementation=cfg.model.attn_implementation,
                            suite_options={suite: e.suite_options(suite)})
            h = digest(model_hash, spec.model_dump(exclude={"model_path", "splits"}),
                       {n: prep.digests[n] for n in splits})
            tasks.append(EvalTask(name, suite, spec, folder / f"{name.replace('/', '-')}-{suite}-{h}{EVAL_MARKER_SUFFIX}"))
    results = run_eval_tasks(tasks, e.cpus_per_task, e.gpus_per_task, resume, display)
    add_reference_metrics(results)
    for name, res in results.items():
        run_id = tracker.child(f"eval/{name}", tags={"spunge.stage": "eval", "spunge.reused": str(res["reused"])})
        tracker.log_params(run_id, {"model_path": models[name][0], "suites": ",".join(e.suites)})
        tracker.log_metrics(run_id, res["metrics"])
        tracker.log_metrics(run_id, {f"seconds.{s}": t["seconds"] for s, t in res["suites"].items()})
        tracker.end(run_id)
    return results


@dataclass
class EvalTask:
    """One (model, suite) evaluation: a Ray task running ``evaluate_task`` on ``spec`` (its one suite)."""

    model: str
    suite: str
    spec: EvalSpec
    cache: Optional[Path] = None  # its result file, reused with ``resume``


def run_eval_tasks(tasks: list[EvalTask], cpus: float = 1, gpus: float = 0, resume: bool = False,
                   display: Optional[Display] = None) -> dict[str, dict[str, Any]]:
    """Run every (model, suite) task as its own Ray task, as many at once as the cluster's resources allow
    (``cpus``/``gpus`` each), and combine the suites of each model: ``{model: {"metrics", "raw",
    "n_examples", "seconds", "reused", "suites": {suite: {"pid", "started", "ended", "seconds", "reused"}}}}``."""
    from orchestrator.runners import evaluate_task

    display = display or Display()
    by_model: dict[str, list[EvalTask]] = {}
    for t in tasks:
        by_model.setdefault(t.model, []).append(t)
    parts: dict[str, dict[str, dict[str, Any]]] = {m: {} for m in by_model}
    running: dict[Any, EvalTask] = {}
    for m, ts in by_model.items():
        display.add(f"eval/{m}", f"eval {m}", total=len(ts))
    for t in tasks:
        if resume and t.cache is not None and t.cache.exists():
            parts[t.model][t.suite] = {**json.loads(t.cache.read_text()), "reused": True}
            continue
        ref = evaluate_task.options(num_cpus=cpus, num_gpus=gpus, name=f"eval {t.model} {t.suite}").remote(
            t.spec.model_dump(), threads=max(1, int(cpus)))
        running[ref] = t
    for m in by_model:
        _eval_progress(display, m, parts[m], len(by_model[m]))
    try:
        while running:
            done, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for ref in done:
                t = running.pop(ref)
                try:
                    res = ray.get(ref)
                except Exception as err:
                    raise PipelineError(f"eval {t.model} (suite {t.suite}) failed: {_root_message(err)}") from None
                if t.cache is not None:
                    write_json(t.cache, res)
                parts[t.model][t.suite] = {**res, "reused": False}
                _eval_progress(display, t.model, parts[t.model], len(by_model[t.model]))
            display.heartbeat()
    finally:
        for ref in running:  # only left when one failed
            ray.cancel(ref, force=True)
    return {m: combine_suites({t.suite: parts[m][t.suite] for t in ts}) for m, ts in by_model.items()}


def combine_suites(parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One model's result from its per-suite results (in suite order)."""
    out: dict[str, Any] = {"metrics": {}, "raw": {}, "n_examples": {}, "seconds": 0.0, "suites": {}}
    for suite, r in parts.items():
        out["metrics"].update(r.get("metrics", {}))
        out["raw"].update(r.get("raw", {}))
        out["n_examples"].update(r.get("n_examples", {}))
        out["seconds"] += r.get("seconds", 0.0)
        out["suites"][suite] = {k: r.get(k) for k in ("pid", "started", "ended", "seconds", "reused")}
    out["reused"] = all(r.get("reused") for r in parts.values())
    return out


def _eval_progress(display: Display, model: str, parts: dict[str, dict[str, Any]], total: int) -> None:
    key = f"eval/{model}"
    if len(parts) < total:
        display.update(key, done=len(parts), info=f"scoring ({', '.join(parts) or 'no suite'} done)")
    elif all(r.get("reused") for r in parts.values()):
        display.finish(key, "reused (resume)")
    else:
        display.finish(key, "done: " + ", ".join(f"{s} {r['seconds']:.0f}s" for s, r in parts.items()))


def evaluate_folder(model_path: str, splits: dict[str, str], suites: list[str], options: dict[str, Any],
                    cpus: float = 1, gpus: float = 0, address: Optional[str] = None, cfg: Optional[PipelineConfig] = None,
                    display: Optional[Display] = None) -> dict[str, Any]:
    """``spunge eval``: the pipeline's (model, suite) Ray tasks on one model folder (no cache, no MLflow).
    ``options`` are ``EvalSpec`` fields (prompt, batch_size, max_new_tokens, max_length, max_examples, dtype)."""
    if cfg is not None:
        init_ray(cfg, address)
    else:
        start_ray(address, use_gpu=gpus > 0)
    display = display or Display()
    name = Path(model_path).name or model_path
    tasks = [EvalTask(name, s, EvalSpec(model_path=model_path, splits=splits, suites=[s], **options)) for s in suites]
    with display:
        return run_eval_tasks(tasks, cpus, gpus, display=display)[name]


def add_reference_metrics(results: dict[str, dict[str, Any]], reference: str = "oracle") -> None:
    """Metrics relative to the retain-only reference model, added to every model's metrics in place:
    ``forget_quality`` (KS p-value of forget truth ratios, TOFU) and ``privleak`` (MUSE, from the loss-MIA
    AUC of the ``mia`` suite), each when the reference has what it needs."""
    ref = results.get(reference)
    if ref is None:
        return
    ref_tr = ref.get("raw", {}).get("forget_truth_ratio")
    ref_auc = ref["metrics"].get("mia_loss_auc")
    for res in results.values():
        m = res["metrics"]
        if ref_tr is not None and "forget_truth_ratio" in res.get("raw", {}):
            m["forget_quality"] = forget_quality(res["raw"]["forget_truth_ratio"], ref_tr)
        if ref_auc is not None and "mia_loss_auc" in m:
            m["privleak"] = privleak(m["mia_loss_auc"], ref_auc)


# ---------------------------------------------------------------------------------------------------
# the whole pipeline


def init_ray(cfg: PipelineConfig, address: Optional[str]) -> None:
    start_ray(address or cfg.ray.address, cfg.ray.num_cpus, cfg.scaling.use_gpu)


def start_ray(address: Optional[str] = None, num_cpus: Optional[int] = None, use_gpu: bool = False) -> None:
    """Connect to ``address``, or start a local Ray (``num_cpus`` logical CPUs, default 2 x cores)."""
    if ray.is_initialized():
        return
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus or 2 * (os.cpu_count() or 1), include_dashboard=False,
                 runtime_env=env, log_to_driver=False)


def run_pipeline(cfg: PipelineConfig, resume: bool = False, address: Optional[str] = None,
                 display: Optional[Display] = None) -> dict[str, Any]:
    out = Path(cfg.storage.output_dir).resolve()  # Ray Train's storage_path must be absolute
    out.mkdir(parents=True, exist_ok=True)
    display = display or Display()
    t0 = time.perf_counter()
    with display:
        display.log(f"prepare: loading data, splitting forget set by {cfg.split.attribute!r}")
        prep = prepare(cfg, out)
        display.log("prepare: " + ", ".join(f"{k}={v}" for k, v in prep.counts.items()))
        jobs = plan_jobs(cfg, prep, out)
        init_ray(cfg, address)
        tracker = Tracker(tracking_uri(cfg.tracking.uri), cfg.tracking.experiment, cfg.name,
                          tags={"spunge.output_dir": str(out), "spunge.resume": str(resume)})
        display.log(f"MLflow run {tracker.parent_id} at {tracker.uri} (experiment {cfg.tracking.experiment!r})")
        try:
            tracker.log_params(tracker.parent_id, flatten(cfg.model_dump(mode="json")))
            cfg_file = out / "config.resolved.yaml"
            cfg_file.write_text(config_yaml(cfg))
            tracker.log_artifact(tracker.parent_id, cfg_file)
            from orchestrator.merge_actor import MergeActor

            subset_keys = [j.key for j in jobs if j.key.startswith("subset/")]
            merge_actor = MergeActor.options(num_cpus=0).remote(cfg.model.path, subset_keys)
            run_unlearning(cfg, jobs, out, resume, tracker, display, merge_actor)
            merged_path, merged_hash, _ = run_merge(cfg, jobs, out, resume, tracker, display, merge_actor)
            models = {"base": (cfg.model.path, model_fingerprint(cfg.model.path))}
            if cfg.eval.oracle:
                models["oracle"] = (cfg.eval.oracle, model_fingerprint(cfg.eval.oracle))
            models.update({j.key: (j.spec.output_dir, j.hash) for j in jobs})
            models["merged"] = (merged_path, merged_hash)
            results = run_evaluation(cfg, prep, models, out, resume, tracker, display)
            report = build_report(results, jobs, prep, tracker.parent_id, time.perf_counter() - t0)
            paths = write_report(report, out, display.console)
            for p in paths:
                tracker.log_artifact(tracker.parent_id, p)
            for p in _plots(report, jobs, out, display):
                tracker.log_artifact(tracker.parent_id, p, "plots")
            for model, metrics in report["models"].items():
                tracker.log_metrics(tracker.parent_id, {f"{model.replace('/', '.')}.{k}": v for k, v in metrics.items()})
            tracker.end_all("FINISHED")
        except BaseException:
            tracker.end_all("FAILED")
            raise
    return report


def _plots(report: dict[str, Any], jobs: list[Job], out: Path, display: Display) -> list[Path]:
    """The run's PNG plots in ``<output_dir>/plots/``; a plotting problem is reported, not fatal."""
    from orchestrator.plots import write_plots

    try:
        paths = write_plots(report["models"], {j.key: j.history for j in jobs}, out / "plots")
    except Exception as e:  # the report is already written: don't fail the run for a figure
        display.log(f"warning: plots not written: {type(e).__name__}: {e}")
        return []
    display.log("plots: " + ", ".join(str(p) for p in paths))
    return paths


def _root_message(e: BaseException) -> str:
    """The innermost useful line of a Ray error (RayTaskError wraps the worker's exception)."""
    cause = getattr(e, "cause", None) or e.__cause__
    while cause is not None and (getattr(cause, "cause", None) or cause.__cause__) is not None:
        cause = getattr(cause, "cause", None) or cause.__cause__
    text = str(cause or e).strip()
    lines = [l for l in text.splitlines() if l.strip()]
    return lines[-1] if lines else type(e).__name__
