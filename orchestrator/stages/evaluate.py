"""Stage 4, evaluate: one Ray task per (model, suite), as many at once as the cluster fits, each cached
under ``stages/eval/`` by its own key; then the metrics relative to the oracle."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import ray
from ray.actor import ActorHandle

from jobs.data.io import write_json
from jobs.data.sources import SOURCE_NAMES
from jobs.evaluate.suites import add_reference_metrics
from jobs.spec import EvalSpec
from orchestrator.config.schema import PipelineConfig
from orchestrator.remote.resources import default_wait_s
from orchestrator.run.cache import model_fingerprint, stage_key, suite_options_key
from orchestrator.run.context import PipelineError, RunContext, root_message
from orchestrator.run.display import Display
from orchestrator.stages.prepare import eval_set_key


def eval_splits(cfg: PipelineConfig, files: dict[str, str]) -> dict[str, str]:
    """What each split is scored on: split name -> its prepared file's key (``Prepared.files``). An eval set
    takes the place of the source of the same name (TOFU's retain_perturbed for retain90); the others are
    splits of their own."""
    return {**{n: n for n in SOURCE_NAMES if n in files}, **{n: eval_set_key(n) for n in cfg.data.eval_sets}}


def models_to_score(ctx: RunContext) -> dict[str, tuple[str, str]]:
    """Every model of the run, name -> (path, stage hash): base, the oracle, each job's model, the merged
    model; narrowed to ``ctx.eval_models``, less those already scored (``ctx.results``)."""
    cfg = ctx.cfg
    models = {"base": (cfg.model.path, model_fingerprint(cfg.model.path))}
    if cfg.eval.oracle:
        models["oracle"] = (cfg.eval.oracle, model_fingerprint(cfg.eval.oracle))
    models.update({j.key: (j.model_dir, j.model_hash) for j in ctx.jobs})
    if ctx.merged is not None:
        models["merged"] = (ctx.merged.path, ctx.merged.hash)
    return {
        n: m for n, m in models.items() if (ctx.eval_models is None or n in ctx.eval_models) and n not in ctx.results
    }


def eval_spec(cfg: PipelineConfig, model_path: str, splits: dict[str, str], suite: str) -> EvalSpec:
    e = cfg.eval
    return EvalSpec(
        model_path=model_path,
        splits=splits,
        suites=[suite],
        prompt=cfg.data.prompt_format(),
        batch_size=e.batch_size,
        max_new_tokens=e.max_new_tokens,
        max_length=cfg.unlearn.max_length,
        max_examples=e.max_examples,
        dtype=cfg.model.dtype,
        attn_implementation=cfg.model.attn_implementation,
        suite_options={suite: e.suite_options(suite)},
    )


def evaluate(ctx: RunContext) -> None:
    """Score ``models_to_score`` on every suite into ``ctx.results``; then ``forget_quality`` and
    ``privleak`` against the oracle for every model."""
    cfg, prep = ctx.cfg, ctx.prep
    keys = eval_splits(cfg, prep.files)
    splits = {n: prep.files[k] for n, k in keys.items()}
    folder = ctx.out / "stages" / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    ctx.models = models_to_score(ctx)
    tasks = []
    for name, (path, model_hash) in ctx.models.items():
        for suite in cfg.eval.suites:
            spec = eval_spec(cfg, path, splits, suite)
            h = stage_key(
                spec,
                model_path=model_hash,
                splits={n: prep.digests[k] for n, k in keys.items()},
                suite_options=suite_options_key(spec),
            )
            tasks.append(EvalTask(name, suite, spec, folder / f"{name.replace('/', '-')}-{suite}-{h}.json"))
    ctx.results.update(
        run_eval_tasks(
            tasks,
            cfg.eval.cpus_per_task,
            cfg.eval.gpus_per_task,
            ctx.resume,
            ctx.display,
            default_wait_s(cfg.scaling.wait_for_resources_s),
        )
    )
    add_reference_metrics(ctx.results)


@dataclass
class EvalTask:
    """One (model, suite) evaluation: a Ray task running ``evaluate_task`` on ``spec`` (its one suite)."""

    model: str
    suite: str
    spec: EvalSpec
    cache: Optional[Path] = None  # its result file, reused with ``resume``


def run_eval_tasks(
    tasks: list[EvalTask],
    cpus: float = 1,
    gpus: float = 0,
    resume: bool = False,
    display: Optional[Display] = None,
    wait_s: float = 0,
) -> dict[str, dict[str, Any]]:
    """Run every (model, suite) task as its own Ray task, as many at once as the cluster's resources allow
    (``cpus``/``gpus`` each; a cluster without room for one is waited for ``wait_s`` seconds), and combine the
    suites of each model: ``{model: {"metrics", "raw",
    "n_examples", "seconds", "reused", "suites": {suite: {"pid", "started", "ended", "seconds", "reused"}}}}``.
    The tasks are scheduled on the whole cluster, never in a caller's placement group (a tune trial's holds
    no CPU)."""
    from orchestrator.remote.progress import ProgressBoard
    from orchestrator.remote.resources import fits_some_node, task_bundle, wait_until_fits
    from orchestrator.remote.runners import eval_task_options, evaluate_task

    display = display or Display()
    if any(not (resume and t.cache is not None and t.cache.exists()) for t in tasks):
        bundle = task_bundle(cpus, gpus)
        wait_until_fits(
            lambda res: int(all(res.get(k, 0) >= v for k, v in bundle.items()) and fits_some_node(bundle)),
            [bundle],
            "one eval task",
            wait_s,
            "scaling.wait_for_resources_s",
            display,
        )
    by_model: dict[str, list[EvalTask]] = {}
    for t in tasks:
        by_model.setdefault(t.model, []).append(t)
    parts: dict[str, dict[str, dict[str, Any]]] = {m: {} for m in by_model}
    running: dict[Any, EvalTask] = {}
    board, seen = None, {}
    for m, ts in by_model.items():
        display.add(f"eval/{m}", f"eval {m}", total=len(ts))
    for t in tasks:
        if resume and t.cache is not None and t.cache.exists():
            parts[t.model][t.suite] = {**json.loads(t.cache.read_text()), "reused": True}
            continue
        board = board or ProgressBoard.remote()
        ref = evaluate_task.options(**eval_task_options(cpus, gpus, f"eval {t.model} {t.suite}")).remote(
            t.spec.model_dump(), threads=max(1, int(cpus)), board=board, key=t.model
        )
        running[ref] = t
    for m in by_model:
        _eval_progress(display, m, parts[m], len(by_model[m]))
    try:
        while running:
            done, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            if board is not None:
                show_scoring_progress(display, board, seen, parts)
            for ref in done:
                t = running.pop(ref)
                try:
                    res = ray.get(ref)
                except Exception as err:
                    raise PipelineError(f"eval {t.model} (suite {t.suite}) failed: {root_message(err)}") from None
                if t.cache is not None:
                    write_json(t.cache, res)
                parts[t.model][t.suite] = {**res, "reused": False}
                if ";" in res.get("placement", ""):  # spread over several devices: where each part went
                    display.log(f"eval {t.model} ({t.suite}): {res['placement']}")
                _eval_progress(display, t.model, parts[t.model], len(by_model[t.model]))
            display.heartbeat()
    finally:
        for ref in running:  # only left when one failed
            ray.cancel(ref, force=True)
    return {m: combine_suites({t.suite: parts[m][t.suite] for t in ts}) for m, ts in by_model.items()}


def show_scoring_progress(display: Display, board: ActorHandle, seen: dict[str, int], parts: dict[str, dict]) -> None:
    """The rows scored that each model's running tasks reported since last time, on its display line."""
    for model, rows in ray.get(board.since.remote(seen)).items():
        seen[model] = seen.get(model, 0) + len(rows)
        last = rows[-1]
        done = ", ".join(parts[model]) or "no suite"
        display.update(
            f"eval/{model}", info=f"{last['suite']}: {last['done']}/{last['total']} rows {last['what']} ({done} done)"
        )


def combine_suites(parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One model's result from its per-suite results (in suite order)."""
    out: dict[str, Any] = {
        "metrics": {},
        "raw": {},
        "parts": {},
        "info": {},
        "n_examples": {},
        "seconds": 0.0,
        "suites": {},
    }
    for suite, r in parts.items():
        for key in ("metrics", "raw", "parts", "info", "n_examples"):
            out[key].update(r.get(key, {}))
        out["seconds"] += r.get("seconds", 0.0)
        out["suites"][suite] = {
            k: r.get(k)
            for k in (
                "pid",
                "started",
                "ended",
                "seconds",
                "reused",
                "tokens",
                "params",
                "placement",
                "visible_devices",
                "gpu_ids",
            )
        }
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


def evaluate_folder(
    model_path: str,
    splits: dict[str, str],
    suites: list[str],
    options: dict[str, Any],
    cpus: float = 1,
    gpus: float = 0,
    address: Optional[str] = None,
    cfg: Optional[PipelineConfig] = None,
    display: Optional[Display] = None,
    base_path: Optional[str] = None,
) -> dict[str, dict[str, Any]]:
    """``spunge eval``: the pipeline's (model, suite) Ray tasks on one model folder (no cache, no MLflow), and on
    ``base_path`` too when given (``{"model": ..., "base": ...}``; each attack's recovery against the base added
    to the model's metrics). ``options`` are ``EvalSpec`` fields (prompt, batch_size, max_new_tokens,
    max_length, max_examples, dtype)."""
    from orchestrator.remote.ray_init import init_ray, start_ray

    if cfg is not None:
        init_ray(cfg, address)
    else:
        start_ray(address, use_gpu=gpus > 0)
    display = display or Display()
    models = {"model": model_path, **({"base": base_path} if base_path else {})}
    tasks = [
        EvalTask(name, s, EvalSpec(model_path=path, splits=splits, suites=[s], **options))
        for name, path in models.items()
        for s in suites
    ]
    with display:
        results = run_eval_tasks(
            tasks, cpus, gpus, display=display, wait_s=default_wait_s(cfg.scaling.wait_for_resources_s if cfg else None)
        )
    add_reference_metrics(results)
    return results
