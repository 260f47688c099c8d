"""The Ray side of the driver: one TorchTrainer (or one in-process job) per unlearning job, one Ray task per
evaluation."""

from __future__ import annotations

import os
import time
from typing import Any

import ray

from jobs.spec import EvalSpec, UnlearnSpec
from orchestrator.config.schema import ScalingConfig
from orchestrator.remote.resources import worker_bundle

# How often a job's Ray Train controller polls its workers (Ray's RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by
# default; a value in the environment wins). Each worker's ``ray.train.report`` waits until the controller has
# taken the previous one, and the controller sees a finished job at its next poll: at 2 s, reports more often
# than every 2 s cost up to 2 s each and each job's end waits for it.
# docs/benchmarks.md "Ray Train's poll interval" has the figures; docs/scaling.md when to raise it.
TRAIN_POLL_INTERVAL_S = "0.2"


@ray.remote(num_cpus=0)
def run_unlearn_job(
    spec: dict[str, Any], scaling: dict[str, Any], storage_path: str, run_name: str, board: Any
) -> dict[str, Any]:
    """Build and fit one ``TorchTrainer`` running ``jobs.unlearn.loop.train_loop_per_worker``, or with
    ``num_workers: 0`` run the job in this process (``jobs.unlearn.solo.run_in_process``).

    Launched as a zero-CPU task so that several jobs' ``fit()`` run concurrently; the workers hold the
    CPUs/GPUs (``unlearn_task_options``: the task itself holds one worker's when the job runs in it). Returns
    the job's output folder and final metrics."""
    import json
    from pathlib import Path

    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train import ScalingConfig as TrainScaling
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs.unlearn.loop import NonFiniteLossError, train_loop_per_worker
    from jobs.unlearn.methods import build_method
    from jobs.unlearn.outputs import ATTEMPTS_FILE, FAILED_MARKER, JOB_MARKER
    from orchestrator.remote.progress import ProgressCallback

    started = time.perf_counter()
    # read by TorchTrainer.fit() here and handed to the controller it starts (Ray Train propagates its env vars)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", TRAIN_POLL_INTERVAL_S)
    s = UnlearnSpec(**spec)
    resources = worker_bundle(ScalingConfig(**scaling))  # Ray's memory resource too: jobs that would not fit wait

    def fit(s: UnlearnSpec, storage_path: str, run_name: str, progress: bool) -> dict[str, Any]:
        out = Path(s.output_dir)
        (out / FAILED_MARKER).unlink(missing_ok=True)
        if scaling["num_workers"] == 0:  # the job in this task's process (its options hold the resources)
            from jobs.unlearn.solo import run_in_process

            def push(rows: list[dict[str, Any]]) -> None:
                if progress:  # what ProgressCallback does on a Ray Train controller
                    board.push.remote(s.name, rows)

            run_in_process(s, push, Path(storage_path) / run_name)
        else:
            TorchTrainer(
                train_loop_per_worker,
                train_loop_config={"spec": s.model_dump()},
                torch_config=TorchConfig(backend="nccl" if scaling["use_gpu"] else "gloo"),
                scaling_config=TrainScaling(
                    num_workers=scaling["num_workers"], use_gpu=scaling["use_gpu"], resources_per_worker=resources
                ),
                run_config=RunConfig(
                    name=run_name,
                    storage_path=storage_path,
                    callbacks=[ProgressCallback(board, s.name)] if progress else [],
                    # a failed worker group restarts from the latest checkpoint (unlearn.checkpoint_every)
                    failure_config=FailureConfig(max_failures=_max_failures(scaling, s)),
                    checkpoint_config=CheckpointConfig(num_to_keep=2),
                ),
            ).fit()
        if (out / FAILED_MARKER).exists():  # failed in a way a restart cannot mend: no retries were made
            raise NonFiniteLossError(json.loads((out / FAILED_MARKER).read_text())["error"])
        marker = out / JOB_MARKER
        if not marker.exists():
            raise RuntimeError(f"job {s.name}: finished without writing {marker}")
        done = json.loads(marker.read_text())
        attempts = out / ATTEMPTS_FILE
        done["attempts"] = len(attempts.read_text().splitlines()) if attempts.exists() else 1
        return done

    # a method's own training jobs first (Method.pre_jobs, e.g. WHP's reinforced model), each a TorchTrainer
    # whose Ray Train run lives inside this job's run folder; a finished one (its marker exists) is reused
    pre_metrics: dict[str, Any] = {}
    for suffix, pre, update in build_method(s.method, s.method_params).pre_jobs(s):
        marker = Path(pre.output_dir) / JOB_MARKER
        done = (
            json.loads(marker.read_text())
            if marker.exists()
            else fit(pre, str(Path(storage_path) / run_name), suffix, progress=False)
        )
        pre_metrics.update(
            {f"{suffix}/{k}": v for k, v in done.get("final_metrics", {}).items() if isinstance(v, (int, float))}
        )
        s = s.model_copy(update={"method_params": {**s.method_params, **update}})
    result = fit(s, storage_path, run_name, progress=True)
    result["final_metrics"] = {**result.get("final_metrics", {}), **pre_metrics}
    result["seconds"] = time.perf_counter() - started  # with the method's own jobs: the cost report's wall-clock
    return {"name": s.name, "output_dir": s.output_dir, **result}


def unlearn_task_options(scaling: ScalingConfig) -> dict[str, Any]:
    """Ray options of a job's ``run_unlearn_job`` task: none (its Ray Train workers hold the resources), or one
    worker's resources when the job runs in the task (``num_workers: 0``), on the whole cluster (never a
    caller's placement group)."""
    if scaling.num_workers:
        return {}
    bundle = worker_bundle(scaling)
    opts: dict[str, Any] = {"num_cpus": bundle["CPU"], "scheduling_strategy": "DEFAULT"}
    if "GPU" in bundle:
        # a fresh process for each GPU job: CUDA and the NCCL group bind to the GPU a process saw first
        opts.update(num_gpus=bundle["GPU"], max_calls=1)
    if "memory" in bundle:
        opts["memory"] = bundle["memory"]
    return opts


def _max_failures(scaling: dict[str, Any], spec: UnlearnSpec) -> int:
    """``scaling.max_failures``; by default 2 restarts when the job checkpoints, none when it does not."""
    if scaling.get("max_failures") is not None:
        return scaling["max_failures"]
    return 2 if spec.checkpoint_every else 0


def eval_task_options(cpus: float, gpus: float, name: str) -> dict[str, Any]:
    """Ray options of an eval task: its CPUs and GPUs, on the whole cluster (never a caller's placement group).
    On a cluster with GPUs, a task that reserved none has them hidden: Ray 2.60 no longer hides them, and torch
    would put the model on a cuda:0 that a training worker holds."""
    opts: dict[str, Any] = {"num_cpus": cpus, "num_gpus": gpus, "name": name, "scheduling_strategy": "DEFAULT"}
    if not gpus and ray.cluster_resources().get("GPU"):
        opts["runtime_env"] = {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}}
    return opts


PROGRESS_EVERY_S = 2.0  # how often an eval task sends its rows scored to the driver


@ray.remote
def evaluate_task(spec: dict[str, Any], threads: int = 1, board: Any = None, key: str = "") -> dict[str, Any]:
    """Score one model on its suites (``jobs.evaluate.evaluate_model``) inside a Ray task. The pipeline
    runs one task per (model, suite); ``pid`` and the wall-clock ``started``/``ended`` stamps say where
    and when it ran. With a ``board`` (``orchestrator.remote.progress.ProgressBoard``), its rows scored of each
    pass go there under ``key`` every ``PROGRESS_EVERY_S`` seconds and at each pass's end."""
    import time

    started = time.time()
    import torch

    from jobs.evaluate import evaluate_model

    torch.set_num_threads(max(1, int(threads)))
    s = EvalSpec(**spec)
    sent = [0.0]

    def progress(suite: str, what: str, done: int, total: int) -> None:
        if done == total or time.time() - sent[0] >= PROGRESS_EVERY_S:
            sent[0] = time.time()
            board.push.remote(key, [{"suite": suite, "what": what, "done": done, "total": total}])

    out = evaluate_model(
        s.model_path,
        s.splits,
        suites=s.suites,
        template=s.prompt,
        batch_size=s.batch_size,
        max_new_tokens=s.max_new_tokens,
        max_length=s.max_length,
        max_examples=s.max_examples,
        dtype=s.dtype,
        suite_options=s.suite_options,
        attn_implementation=s.attn_implementation,
        max_memory=s.max_memory,
        offload_folder=s.offload_folder,
        progress=progress if board is not None else None,
    )
    out.update(
        pid=os.getpid(),
        started=started,
        ended=time.time(),
        visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        gpu_ids=[str(g) for g in ray.get_gpu_ids()],
    )
    return out
