"""Where the CPU of one ``spunge run`` goes: CPU-seconds of every process it starts, by role.

Runs ``spunge run`` (a subprocess, as a user would, on a fresh local embedded Ray) on the tiny test model with
two subset jobs (``grad_diff``, one worker each), once with ``--short`` steps per job and once with ``--long``,
and reads every process of the run's tree (the driver, the Ray node it starts, every Ray worker) with psutil
every 0.2 s until the run ends. A process's CPU-seconds are its last reading (user + system), so a process
that lives less than 0.2 s is missed. Roles:

- ``driver``               : the ``spunge run`` process
- ``ray node``             : GCS, raylet, dashboard and its modules, dashboard and runtime-env agents, log monitor
- ``ray train actors``     : each job's ``TrainController``, ``PlacementGroupCleaner``, ``SynchronizationActor``,
  ``DatasetManager``, and the cluster's ``_AutoscalingCoordinatorActor``
- ``training workers``     : each job's ``RayTrainWorker`` (imports, model load, DeepSpeed, the steps, saving)
- ``task processes``       : Ray worker processes that ran tasks: the job runners (each calls ``fit``), then the
  evaluation tasks; and any idle one Ray started
- ``spunge actors``        : the merge actor and the progress board

The difference between the two runs is the cost of the extra steps; the rest of a job's cost does not grow
with its steps: ``fixed per job`` (the short run's training workers and Ray Train actors, less its steps at
the long run's cost per step), what a test pays for each Ray Train job whatever it trains. A third run, ``in
process``, is the short one with ``scaling.num_workers: 0``: each job runs in its runner task, without Ray
Train's actors or a worker. Prints a table and writes ``benchmarks/results/pipeline_cpu.json``. Usage::

    python benchmarks/pipeline_cpu.py [--short 1] [--long 201]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent

RAY_TRAIN_ACTORS = {
    "TrainController",
    "PlacementGroupCleaner",
    "SynchronizationActor",
    "DatasetManager",
    "_AutoscalingCoordinatorActor",
}
ROLES = ["driver", "ray node", "ray train actors", "training workers", "task processes", "spunge actors"]
JOBS = 2


def pipeline(tiny: Path, work: Path, steps: int, workers: int = 1) -> Path:
    import yaml

    cfg = {
        "name": "pipeline-cpu",
        "model": {"path": str(tiny / "model")},
        "data": {"forget": str(tiny / "forget.jsonl"), "retain": str(tiny / "retain.jsonl")},
        "split": {"attribute": "group", "baseline": "none"},  # north and south: two subset jobs
        "unlearn": {"method": "grad_diff", "optimizer": {"lr": 1e-3}, "max_steps": steps, "batch_size": 4},
        "scaling": {"num_workers": workers, "cpus_per_worker": 1},
        "eval": {"max_examples": 4, "suites": ["qa"]},
        "storage": {"output_dir": str(work / "run")},
        "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}"},
        "ray": {"num_cpus": 4},
    }
    path = work / "pipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def role(name: str, driver: bool) -> str:
    """The role of a process from its name: ``ray::<actor or task>[.<method>]`` for a Ray worker."""
    if driver:
        return "driver"
    if name.startswith("ray::"):
        actor = name[5:].split(".")[0]  # read early, a title can be cut short: "ray::DatasetMan"
        if len(actor) >= 8 and any(a.startswith(actor) for a in RAY_TRAIN_ACTORS):
            return "ray train actors"
        if actor == "RayTrainWorker":
            return "training workers"
        if actor in ("MergeActor", "ProgressBoard"):
            return "spunge actors"
        if actor in ("DashboardAgent", "RuntimeEnvAgent"):
            return "ray node"
        return "task processes"  # ray::IDLE or ray::<task name>
    return "ray node"  # gcs_server, raylet, the dashboard and its module processes, log monitor


def one_run(config: Path, work: Path, timeout: float) -> dict:
    env = {**os.environ, "RAY_ADDRESS": "local"}  # a Ray of its own, never another cluster on this machine
    env.pop("MLFLOW_TRACKING_URI", None)
    t0 = time.time()
    log = open(work / "run.log", "w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("spunge")), "run", str(config)],
        cwd=work,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    cpu: dict[int, tuple[str, str, float]] = {}  # pid -> (role, name, CPU-seconds)
    root = psutil.Process(proc.pid)
    while proc.poll() is None and time.time() - t0 < timeout:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            break
        for p in procs:
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    cmd = p.cmdline()
                    name = (cmd[0] if cmd and cmd[0].startswith("ray::") else p.name()).split(".")[0]
                    if p.pid in cpu and len(cpu[p.pid][1]) > len(name):
                        name = cpu[p.pid][1]  # the longest title seen: the first reads can be cut short
                    cpu[p.pid] = (role(name, p.pid == proc.pid), name, t.user + t.system)
            except psutil.Error:
                continue
        time.sleep(0.2)
    wall = time.time() - t0
    if proc.poll() is None:
        os.killpg(proc.pid, 9)
        raise SystemExit(f"spunge run did not end in {timeout:.0f}s: {work / 'run.log'}")
    if proc.returncode != 0:
        raise SystemExit(f"spunge run exited {proc.returncode}:\n" + (work / "run.log").read_text()[-3000:])
    by_role: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    by_name: dict[str, float] = defaultdict(float)
    for r, name, c in cpu.values():
        by_role[r] += c
        count[r] += 1
        by_name[name] += c
    return {
        "wall_s": wall,
        "cpu_s": {r: by_role[r] for r in ROLES},
        "processes": {r: count[r] for r in ROLES},
        "cpu_s_by_process_name": dict(sorted(by_name.items(), key=lambda kv: -kv[1])),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--short", type=int, default=1, help="steps per job of the first run")
    ap.add_argument("--long", type=int, default=201, help="steps per job of the second run")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "pipeline_cpu.json")
    args = ap.parse_args()

    from jobs.data.tiny import make_tiny

    runs = {}
    with tempfile.TemporaryDirectory(prefix="spunge-pipeline-cpu-") as tmp:
        tiny = make_tiny(Path(tmp))
        for label, steps, workers in (("short", args.short, 1), ("long", args.long, 1), ("in process", args.short, 0)):
            work = Path(tmp) / label.replace(" ", "_")
            work.mkdir()
            load = os.getloadavg()[0]
            r = one_run(pipeline(tiny, work, steps, workers), work, args.timeout)
            runs[label] = {"steps_per_job": steps, "num_workers": workers, "load_avg_1min_before": load, **r}
            print(
                f"{label}: {steps} steps per job, {sum(r['cpu_s'].values()):.1f} CPU-s in {r['wall_s']:.1f}s "
                f"(load {load:.1f})",
                flush=True,
            )

    short, long, local = runs["short"], runs["long"], runs["in process"]
    per_step = (long["cpu_s"]["training workers"] - short["cpu_s"]["training workers"]) / (
        JOBS * (args.long - args.short)
    )
    fixed_per_job = (
        short["cpu_s"]["training workers"] + short["cpu_s"]["ray train actors"]
    ) / JOBS - args.short * per_step
    total_short = sum(short["cpu_s"].values())
    summary = {
        "cpu_s_per_step": per_step,
        "fixed_cpu_s_per_job": fixed_per_job,
        "fixed_jobs_share_of_short_run": JOBS * fixed_per_job / total_short,
        "steps_per_job_costing_one_fixed_job": fixed_per_job / per_step,
        "run_cpu_s_outside_jobs": total_short - JOBS * fixed_per_job - JOBS * args.short * per_step,
        "in_process_cpu_s_saved_per_job": (total_short - sum(local["cpu_s"].values())) / JOBS,
        "in_process_wall_ratio": short["wall_s"] / local["wall_s"],
    }

    print(f"\nspunge run, tiny model, {JOBS} subset jobs of 1 worker, local embedded Ray: CPU-seconds by role")
    print(f"{'role':<20}" + "".join(f"{k:>14}" for k in runs) + f"{'processes':>11}")
    for r in ROLES:
        print(f"{r:<20}" + "".join(f"{runs[k]['cpu_s'][r]:>13.1f}s" for k in runs) + f"{short['processes'][r]:>11}")
    print(f"{'total':<20}" + "".join(f"{sum(runs[k]['cpu_s'].values()):>13.1f}s" for k in runs))
    print(f"{'wall':<20}" + "".join(f"{runs[k]['wall_s']:>13.1f}s" for k in runs))
    print(
        f"\none step of one job: {per_step * 1000:.0f} ms of CPU; a job's fixed cost (Ray Train's actors, the "
        f"worker's start-up): {fixed_per_job:.1f} CPU-s = {summary['steps_per_job_costing_one_fixed_job']:.0f} steps"
    )
    print(
        f"the {JOBS} jobs' fixed cost is {summary['fixed_jobs_share_of_short_run']:.0%} of the {args.short}-step "
        f"run's {total_short:.0f} CPU-s; the run outside its jobs (driver, Ray node, runners, evaluation, merge): "
        f"{summary['run_cpu_s_outside_jobs']:.0f} CPU-s"
    )
    print(
        f"num_workers: 0 (each job in its runner task): {summary['in_process_cpu_s_saved_per_job']:.1f} CPU-s "
        f"fewer per job, the run's wall {summary['in_process_wall_ratio']:.2f}x shorter"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "pipeline_cpu",
                "jobs": JOBS,
                "runs": runs,
                "summary": summary,
                "machine": {
                    "platform": platform.platform(),
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                },
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
