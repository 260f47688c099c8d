"""The cost report: device-seconds, tokens and estimated FLOPs of every stage, and the ratio of a retraining
estimate to them (Yao et al. 2024, "Machine Unlearning of Pre-trained Large Language Models", compare
unlearning's cost to retraining's the same way: FLOPs of 6 x parameters x tokens).

    prepare   the driver's wall-clock (one CPU); no model work
    unlearn   each job: wall-clock of its Ray Train run x workers x (GPUs or CPUs per worker); tokens: every
              forget and retain token of every step (all ranks); FLOPs 6 x N x tokens
    select    each scored snapshot (``unlearn.eval_every``): the eval task's wall-clock x its CPUs or GPUs;
              tokens: every token position its forward passes took; FLOPs 2 x N x tokens
    merge     the merge's wall-clock (the merge actor's one CPU); FLOPs not counted (element-wise, ~k x N)
    evaluate  each (model, suite) task as in select

A stage reused by ``--resume`` counts what it cost when it ran (a job keeps its cost in ``cost.json``;
an eval task's result keeps its times and tokens). The retraining estimate is 6 x N x D: D from
``report.pretraining_tokens``, else from ``PRETRAINING_TOKENS`` by the model's name. What the estimate
leaves out (a reference model's forward passes, the backward of a relearning attack: 2N per token counted
as a forward) is in docs/evaluation.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from orchestrator.config.schema import ScalingConfig
from orchestrator.run.context import Job, Merged, RunContext

# Published pretraining token counts, matched as a lowercase substring of the model's path or its
# config's name (the longest match wins). Sources: each model card / paper.
PRETRAINING_TOKENS: dict[str, float] = {
    "smollm2-135m": 2e12,
    "smollm2-360m": 4e12,
    "smollm2-1.7b": 11e12,
    "llama-2-7b": 2e12,
    "llama-2-13b": 2e12,
    "llama-2-70b": 2e12,
    "meta-llama-3-8b": 15e12,
    "llama-3.1-8b": 15e12,
    "llama-3.1-70b": 15e12,
    "llama-3.2-1b": 9e12,
    "llama-3.2-3b": 9e12,
    "opt-1.3b": 180e9,
    "opt-2.7b": 180e9,
    "opt-6.7b": 180e9,
    "phi-1_5": 150e9,
    "phi-1.5": 150e9,
    "pythia": 300e9,
    "gpt2": 9e9,
}

COST_FILE = "cost.json"  # a finished job's cost, kept beside its model (a resumed run counts it again)


def known_pretraining_tokens(*names: Optional[str]) -> Optional[tuple[float, str]]:
    """(tokens, the table key) for the first of ``names`` a table key is a substring of (longest key first)."""
    for name in names:
        low = (name or "").lower()
        for key in sorted(PRETRAINING_TOKENS, key=len, reverse=True):
            if key in low:
                return PRETRAINING_TOKENS[key], key
    return None


def _model_names(path: str) -> list[str]:
    names = [path]
    cfg = Path(path) / "config.json"
    if cfg.exists():
        try:
            data = json.loads(cfg.read_text())
            names += [data.get("_name_or_path"), data.get("name_or_path")]
        except (OSError, ValueError):
            pass
    return [n for n in names if n]


def entry(device_s: float = 0.0, tokens: float = 0.0, flops: float = 0.0, **extra: Any) -> dict[str, Any]:
    return {"device_s": float(device_s), "tokens": float(tokens), "flops": float(flops), **extra}


def add(*entries: dict[str, Any]) -> dict[str, Any]:
    """The sum of cost entries (device_s, tokens, flops)."""
    return entry(*(sum(e.get(k, 0.0) for e in entries) for k in ("device_s", "tokens", "flops")))


def eval_cost(res: dict[str, Any], cpus: float, gpus: float) -> dict[str, Any]:
    """One eval task's cost from its result (``started``/``ended`` wall-clock, ``tokens``, ``params``)."""
    seconds = max(0.0, float(res.get("ended") or 0) - float(res.get("started") or 0)) or float(res.get("seconds") or 0)
    tokens = float(res.get("tokens") or 0)
    return entry(seconds * (gpus or cpus), tokens, 2.0 * float(res.get("params") or 0) * tokens)


def job_cost(history: list[dict[str, Any]], result: dict[str, Any], scaling: ScalingConfig) -> dict[str, Any]:
    """One unlearning job's cost: its run's wall-clock x its workers' devices; the tokens of its steps."""
    tokens = sum(float(r.get("step_tokens") or 0) for r in history)
    params = float(result.get("final_metrics", {}).get("params") or 0)
    per_worker = scaling.gpus_per_worker if scaling.use_gpu else scaling.cpus_per_worker
    seconds = float(result.get("seconds") or 0)
    return entry(seconds * scaling.ranks * per_worker, tokens, 6.0 * params * tokens, seconds=seconds, params=params)


def record_job_cost(job: Job, scaling: ScalingConfig) -> dict[str, Any]:
    """``job``'s cost: measured now (and kept in ``<job>/cost.json``), or the kept one when it was reused."""
    path = Path(job.spec.output_dir) / COST_FILE
    if job.reused and path.exists():
        return {**json.loads(path.read_text()), "reused": True}
    cost = job_cost(job.history, job.result, scaling)
    path.write_text(json.dumps(cost))
    return cost


def _merge_seconds(merged: Optional[Merged]) -> float:
    """The merge's wall-clock: this run's, or the one its marker kept when ``--resume`` reused it."""
    if merged is None:
        return 0.0
    if merged.seconds is not None:
        return merged.seconds
    from jobs.merge import MERGE_MARKER

    marker = Path(merged.path) / MERGE_MARKER
    return float(json.loads(marker.read_text()).get("seconds") or 0.0) if marker.exists() else 0.0


def cost_report(ctx: RunContext) -> dict[str, Any]:
    """The run's costs by stage and job, the total, and the retraining estimate's ratio to them."""
    cfg, e = ctx.cfg, ctx.cfg.eval
    jobs = {j.key: j.cost for j in ctx.jobs if j.cost}
    select = {j.key: add(*j.select_costs) for j in ctx.jobs if j.select_costs}
    evals = {
        name: add(*(eval_cost(s, e.cpus_per_task, e.gpus_per_task) for s in res.get("suites", {}).values()))
        for name, res in ctx.results.items()
        if name in ctx.models
    }
    stages = {
        "prepare": entry(ctx.stage_seconds.get("prepare", 0.0)),
        "unlearn": add(*jobs.values()),
        "select": add(*select.values()),
        "merge": entry(_merge_seconds(ctx.merged)),
        "evaluate": add(*evals.values()),
    }
    total = add(*stages.values())
    params = max([c.get("params", 0.0) for c in jobs.values()] or [0.0])
    if cfg.report.pretraining_tokens:
        tokens, source = float(cfg.report.pretraining_tokens), "report.pretraining_tokens"
    else:
        known = known_pretraining_tokens(*_model_names(cfg.model.path))
        tokens, source = (known[0], f"table: {known[1]}") if known else (None, None)
    out: dict[str, Any] = {
        "device": "gpu" if cfg.scaling.use_gpu else "cpu",
        "stages": stages,
        "jobs": jobs,
        "select": select,
        "evaluate": evals,
        "total": total,
        "params": params,
        "pretraining_tokens": tokens,
        "pretraining_tokens_source": source,
    }
    if tokens and params:
        retrain = 6.0 * params * tokens
        unlearning = stages["unlearn"]["flops"] + stages["select"]["flops"]
        out["retrain_flops"] = retrain
        out["retrain_vs_pipeline"] = retrain / total["flops"] if total["flops"] else None
        out["retrain_vs_unlearning"] = retrain / unlearning if unlearning else None
    return out


def describe(cost: dict[str, Any]) -> str:
    """The report's one line on cost."""
    t = cost["total"]
    parts = ", ".join(
        f"{s} {cost['stages'][s]['flops']:.3g}"
        for s in ("unlearn", "select", "evaluate")
        if s != "select" or cost["stages"][s]["flops"]
    )
    line = (
        f"cost: {t['device_s']:.0f} {cost['device']}-seconds, {t['tokens']:.3g} tokens, {t['flops']:.3g} FLOPs "
        f"({parts})"
    )
    if cost.get("retrain_flops"):
        line += (
            f"; retraining {cost['params']:.3g} params on {cost['pretraining_tokens']:.3g} tokens "
            f"({cost['pretraining_tokens_source']}) = {cost['retrain_flops']:.3g} FLOPs, "
            f"{cost['retrain_vs_unlearning']:.3g}x the unlearning, {cost['retrain_vs_pipeline']:.3g}x the pipeline"
        )
    else:
        line += "; no retraining estimate (set report.pretraining_tokens)"
    return line
