"""Unlearning jobs in this process on the tiny demo benchmark, and their scores: the shared part of the
benchmarks that compare methods or settings at the demo recipe (method_defaults.py, claims.py).

Every job runs through the real loop (``jobs.unlearn.loop.run_unlearning``: DeepSpeed ZeRO stage 0 on the CPU
accelerator, gloo, rank 0 of 1, no Ray) with the demo recipe (``orchestrator.cli.demo.RECIPES["tiny"]``: lr 3e-4,
150 steps, batch 8, max_length 128) unless told otherwise, and is scored with
``jobs.evaluate.evaluate_model(..., suites=["qa"])`` on the benchmark's forget and retain splits. A job folder
that holds a finished job is reused.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

SCORES = ("forget_prob", "retain_prob", "model_utility")
# what a trajectory row keeps of the loop's report rows
_DROP = ("lr", "tokens_per_s", "elapsed_s", "step_tokens", "params", "total_steps", "epoch")


def setup_process(threads: int) -> None:
    """torch.distributed for this one process (rank 0 of 1) and the torch thread count."""
    import torch

    from jobs.unlearn.solo import single_process_env

    single_process_env()
    torch.set_num_threads(threads)


def tiny_benchmark(bench: Path) -> dict:
    """Build (about a minute) or reuse (well under a second) the tiny demo benchmark in ``bench``."""
    from jobs.data.demo_train import build_benchmark

    t0 = time.time()
    meta = build_benchmark(bench, size="tiny", seed=0)
    print(f"benchmark {bench} ready in {time.time() - t0:.0f}s", flush=True)
    return meta


def recipe() -> dict[str, Any]:
    from orchestrator.cli.demo import RECIPES

    return dict(RECIPES["tiny"])


def run_job(
    method: str,
    params: dict,
    bench: Path,
    out: Path,
    *,
    steps: int,
    threads: int,
    lr: Optional[float] = None,
    seed: int = 0,
    localize: Optional[dict] = None,
    retain: str = "retain",
    forget: Optional[Path] = None,
    trajectory_every: int = 25,
) -> dict:
    """One unlearning job (WHP: its reinforcement pre-job first, as the pipeline's runner does).

    ``retain``: the benchmark's ``retain`` QA (in-distribution) or ``general`` text as the retain data;
    ``forget``: a forget file other than the benchmark's whole forget set."""
    from jobs.spec import UnlearnSpec
    from jobs.unlearn.loop import run_unlearning
    from jobs.unlearn.methods import build_method
    from jobs.unlearn.outputs import JOB_MARKER

    r = recipe()
    data = bench / "data"
    if method == "whp":
        params = {"anchors": str(data / "anchors.json"), **params}
    spec = UnlearnSpec(
        name=f"{method}/{out.name}",
        model_path=str(bench / "models" / "base"),
        forget_path=str(forget or data / "forget.jsonl"),
        retain_path=str(data / f"{retain}.jsonl"),
        retain_format="text" if retain == "general" else "qa",
        method=method,
        method_params=params,
        optimizer={"name": "adamw", "lr": lr or r["lr"]},
        max_steps=steps,
        batch_size=r["batch_size"],
        max_length=128,
        seed=seed,
        localize=localize,
        deepspeed={"zero_optimization": {"stage": 0}},
        threads_per_worker=threads,
        report_interval_s=0,
        output_dir=str(out),
    )
    seen: list[dict] = []
    keep = lambda rows, **_: seen.extend(x for x in rows if x["step"] % trajectory_every == 0 or x["step"] == 1)
    t0 = time.time()
    if (out / JOB_MARKER).exists():  # finished earlier: reuse
        final = json.loads((out / JOB_MARKER).read_text())["final_metrics"]
    else:
        update: dict = {}
        for _suffix, pre, upd in build_method(method, params).pre_jobs(spec):
            if not (Path(pre.output_dir) / JOB_MARKER).exists():
                run_unlearning(pre)
            update.update(upd)
        if update:
            spec = spec.model_copy(update={"method_params": {**spec.method_params, **update}})
        final = run_unlearning(spec, report=keep)
    return {
        "params": params,
        "final_metrics": final,
        "train_s": round(time.time() - t0, 1),
        "trajectory": [{k: v for k, v in x.items() if k not in _DROP} for x in seen],
    }


def score(model: Path, bench: Path) -> dict[str, float]:
    """forget_prob, retain_prob and model_utility of the model folder on the benchmark (qa suite)."""
    from jobs.evaluate import evaluate_model

    data = bench / "data"
    res = evaluate_model(
        str(model), {"forget": str(data / "forget.jsonl"), "retain": str(data / "retain.jsonl")}, suites=["qa"]
    )
    return {k: float(res["metrics"][k]) for k in SCORES}


def fmt(x: float) -> str:
    return f"{x:.3f}" if abs(x) >= 0.01 or x == 0 else f"{x:.1e}"
