"""Ray Train's poll interval: one unlearning job at Ray's default (2 s) against spunge's (0.2 s).

A job's Ray Train controller polls its workers every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``. A worker's
``ray.train.report`` hands its result over through a queue of one, which the controller empties at each poll,
so a report made before the previous one was taken waits for the next poll; and the controller sees that the
job has finished at its next poll. ``orchestrator.remote.runners`` sets the interval to ``TRAIN_POLL_INTERVAL_S``
unless the environment sets it. This script runs the pipeline's own job (``run_unlearn_job``: one
``TorchTrainer``, one worker, DeepSpeed ZeRO 0, the tests' tiny model, grad_diff) at each interval, each
interval in a fresh local Ray of its own, two ways:

- **every step reports** (``report_interval_s: 0``, as the fault-tolerance tests and a job that checkpoints
  often do): the figure is the training time per step (first to last step's row);
- **reports every 5 s** (the default): the figure is the job's wall (``fit`` to return) and its tail, the
  wall after the last step less the start-up before the first (what the end of a job costs).

ratio = the figure at 2 s / at 0.2 s, measured in the same run. It also reads the controller process's
CPU-seconds (``ray::TrainController``), the cost of polling more often. Prints a table and writes
``benchmarks/results/train_poll.json``. Usage::

    python -m benchmarks.train_poll [--steps 30] [--long-steps 300] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from orchestrator.remote.runners import TRAIN_POLL_INTERVAL_S  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "train_poll.json"
INTERVALS = ("2.0", TRAIN_POLL_INTERVAL_S)  # Ray's default, spunge's


def controller_cpu() -> dict[int, float]:
    """CPU-seconds of every ``ray::TrainController`` process alive now (this machine's, by pid)."""
    import psutil

    out = {}
    for p in psutil.process_iter(["cmdline", "cpu_times"]):
        try:
            if " ".join(p.info["cmdline"] or []).startswith("ray::TrainController"):
                out[p.pid] = p.info["cpu_times"].user + p.info["cpu_times"].system
        except psutil.Error:
            pass
    return out


def one_interval(interval: str, args, work: Path) -> list[dict]:
    """Every job of one interval, in a fresh local Ray started with the interval in its environment."""
    import threading
    import time

    import ray

    from benchmarks.fan_out import launch, subsets
    from benchmarks.train_overhead import model_dir, start_bench_ray
    from jobs.spec import UnlearnSpec
    from orchestrator.config.schema import ScalingConfig
    from orchestrator.remote.progress import ProgressBoard

    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = interval
    model = model_dir("tiny", work)
    (forget,), retain = subsets(work, 1, 16)
    start_bench_ray(2)
    seen: dict[int, float] = {}
    stop = threading.Event()

    def sample() -> None:  # a controller's last reading before it exits is its CPU-seconds
        while not stop.is_set():
            seen.update(controller_cpu())
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    scaling = ScalingConfig(num_workers=1, cpus_per_worker=1).model_dump()
    rows = []
    try:
        board = ProgressBoard.remote()
        for kind, steps, every in [("every step", args.steps, 0.0), ("every 5 s", args.long_steps, 5.0)]:
            for i in range(args.repeat):
                out = work / f"poll{interval}" / f"{kind.replace(' ', '-')}-{i}"
                spec = UnlearnSpec(
                    name=f"bench/{out.name}",
                    model_path=str(model),
                    forget_path=str(forget),
                    retain_path=str(retain),
                    method="grad_diff",
                    optimizer={"lr": 1e-5},
                    max_steps=steps,
                    batch_size=4,
                    max_length=64,
                    output_dir=str(out),
                    deepspeed={"zero_optimization": {"stage": 0}},
                    report_interval_s=every,
                )
                before = set(seen)
                job = launch([spec], scaling, work / "ray", board)[0]
                time.sleep(0.5)
                setup = sum(v for k, v in job.items() if k.startswith("setup."))
                rows.append(
                    {
                        "interval_s": float(interval),
                        "reports": kind,
                        "repeat": i,
                        **job,
                        "train_per_step_s": job["train_s"] / max(job["steps"] - 1, 1),
                        "tail_s": job["wall_s"] - job["workers_s"] - setup - job["train_s"],
                        "controller_cpu_s": sum(v for k, v in seen.items() if k not in before),
                    }
                )
    finally:
        stop.set()
        ray.shutdown()
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="steps of the job whose every step reports")
    ap.add_argument("--long-steps", type=int, default=300, help="steps of the job that reports every 5 s")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--work", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="train-poll-"))
    if args.child:  # one interval in this process: Ray reads the environment once, at its start
        os.environ["DS_ACCELERATOR"] = "cpu"
        (work / f"rows{args.child}.json").write_text(json.dumps(one_interval(args.child, args, work)))
        return {}
    rows = []
    for interval in INTERVALS:
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                interval,
                "--steps",
                str(args.steps),
                "--long-steps",
                str(args.long_steps),
                "--repeat",
                str(args.repeat),
                "--work",
                str(work),
            ],
            check=True,
        )
        rows += json.loads((work / f"rows{interval}.json").read_text())

    def mean(interval: str, reports: str, key: str) -> float:
        xs = [r[key] for r in rows if r["interval_s"] == float(interval) and r["reports"] == reports]
        return sum(xs) / len(xs)

    slow, fast = INTERVALS
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load": os.getloadavg()},
        "steps": args.steps,
        "long_steps": args.long_steps,
        "repeat": args.repeat,
        "rows": rows,
        "ratios": {
            "train_per_step_every_step": mean(slow, "every step", "train_per_step_s")
            / mean(fast, "every step", "train_per_step_s"),
            "wall_every_5s": mean(slow, "every 5 s", "wall_s") / mean(fast, "every 5 s", "wall_s"),
            "tail_every_5s": mean(slow, "every 5 s", "tail_s") / mean(fast, "every 5 s", "tail_s"),
        },
    }
    cols = ["wall_s", "workers_s", "train_s", "train_per_step_s", "tail_s", "controller_cpu_s"]
    print("| poll s | reports | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 2) + "|")
    for interval in INTERVALS:
        for reports in ("every step", "every 5 s"):
            print(f"| {interval} | {reports} | " + " | ".join(f"{mean(interval, reports, c):.3f}" for c in cols) + " |")
    print(f"ratios ({slow} s / {fast} s): " + ", ".join(f"{k} {v:.2f}" for k, v in result["ratios"].items()))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
