"""Time to first step of ``spunge run`` on a local embedded Ray, split into its phases.

Runs ``spunge run`` (a subprocess, as a user would) on the tiny test model with one subset job, reads the
time each phase ends from what the run itself writes, and stops the run (SIGTERM: its MLflow runs end
KILLED) once the first step is on disk:

- ``cli``       : the command starts -> the driver prints ``prepare:`` (Python, CLI imports, config, data check)
- ``ray``       : -> ``Ray at ...`` (the embedded Ray node started and connected)
- ``mlflow``    : -> ``MLflow run ...`` (the tracking store opened, parent run created)
- ``workers``   : -> the job's worker entered its loop (``attempts.jsonl``: Ray Train's controller and worker
  group started)
- ``job setup`` : -> the first step's row (``steps.jsonl``): the worker's imports, process group, model and
  tokenizer load, DeepSpeed init, and one optimizer step of a tiny model (milliseconds). Its parts are the
  worker's own figures (``setup.json``, written by rank 0 at its first step).

Prints a table and writes ``benchmarks/results/first_step.json``. Each run starts from a cold driver
(fresh process, fresh Ray); the OS file cache is warm after the first, so the first of ``--repeat`` runs is
reported apart. Usage::

    python benchmarks/first_step.py [--repeat 2] [--workers 1] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from jobs.unlearn.outputs import SETUP_FILE

ROOT = Path(__file__).resolve().parent

PHASES = ["cli", "ray", "mlflow", "workers", "job setup"]
MARKS = {"prepare:": "cli", "Ray at ": "ray", "MLflow run ": "mlflow"}


def pipeline(tiny: Path, work: Path, workers: int) -> Path:
    import yaml

    cfg = {
        "name": "first-step",
        "model": {"path": str(tiny / "model")},
        "data": {"forget": str(tiny / "forget.jsonl"), "retain": str(tiny / "retain.jsonl")},
        "split": {"attribute": "group", "groups": {"all": ["north", "south"]}, "baseline": "none"},
        "unlearn": {
            "method": "grad_diff",
            "optimizer": {"lr": 1e-3},
            "max_steps": 1000,
            "batch_size": 4,
            "report_interval_s": 0,
        },
        "scaling": {"num_workers": workers, "cpus_per_worker": 1},
        "eval": {"max_examples": 4},
        "storage": {"output_dir": str(work / "run")},
        "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}"},
    }
    path = work / "pipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def one_run(config: Path, work: Path, timeout: float) -> dict:
    """Seconds from the command's start to the end of each phase; the worker's setup parts if written."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    t0 = time.time()
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("spunge")), "run", str(config)],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    ends: dict[str, float] = {}
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            for mark, phase in MARKS.items():
                if mark in line and phase not in ends:
                    ends[phase] = time.time() - t0

    threading.Thread(target=read, daemon=True).start()
    out = work / "run" / "stages" / "unlearn"
    try:
        while time.time() - t0 < timeout and proc.poll() is None:
            attempts = list(out.glob("*/attempts.jsonl"))
            steps = [p for p in out.glob("*/steps.jsonl") if p.stat().st_size]
            if steps:
                first = json.loads(attempts[0].read_text().splitlines()[0])
                ends["workers"] = first["started"] - t0
                ends["job setup"] = steps[0].stat().st_mtime - t0
                setup = json.loads((steps[0].parent / SETUP_FILE).read_text())["setup_s"]
                break
            time.sleep(0.05)
        else:
            raise SystemExit(f"no first step after {time.time() - t0:.0f}s:\n" + "".join(lines[-40:]))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    missing = [p for p in PHASES if p not in ends]
    if missing:
        raise SystemExit(f"phases not seen: {missing}:\n" + "".join(lines[-40:]))
    durations, last = {}, 0.0
    for p in PHASES:
        durations[p] = ends[p] - last
        last = ends[p]
    return {"first_step_s": ends["job setup"], "phases_s": durations, "worker_setup_s": setup}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2, help="runs, each from a cold driver and a fresh Ray")
    ap.add_argument("--workers", type=int, default=1, help="scaling.num_workers of the job")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "first_step.json")
    args = ap.parse_args()

    from jobs.data.tiny import make_tiny

    runs = []
    with tempfile.TemporaryDirectory(prefix="spunge-first-step-") as tmp:
        tiny = make_tiny(Path(tmp))
        for i in range(args.repeat):
            work = Path(tmp) / f"run{i}"
            work.mkdir()
            load = os.getloadavg()[0]
            r = one_run(pipeline(tiny, work, args.workers), work, args.timeout)
            runs.append({**r, "load_avg_1min_before": load})
            print(f"run {i + 1}: first step after {r['first_step_s']:.1f}s (load {load:.1f})", flush=True)

    print(f"\nspunge run -> first reported step, tiny model, {args.workers} worker(s), local embedded Ray")
    print(f"{'phase':<20}" + "".join(f"{'run ' + str(i + 1):>10}" for i in range(len(runs))) + f"{'share':>8}")
    for p in PHASES:
        share = runs[-1]["phases_s"][p] / runs[-1]["first_step_s"]
        print(f"{p:<20}" + "".join(f"{r['phases_s'][p]:>9.1f}s" for r in runs) + f"{share:>8.0%}")
        if p == "job setup":
            for part in runs[-1]["worker_setup_s"]:
                print(f"  {part:<18}" + "".join(f"{r['worker_setup_s'].get(part, float('nan')):>9.1f}s" for r in runs))
    print(f"{'total':<20}" + "".join(f"{r['first_step_s']:>9.1f}s" for r in runs))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "first_step",
                "goal_s": 30,
                "workers": args.workers,
                "runs": runs,
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
