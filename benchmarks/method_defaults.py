"""Method defaults on the demo benchmark: rmu, whp and idk_dpo at their old and their new default parameters.

issue 15 item 3 asks for methods that work at sane defaults on small models: docs/results.md found that at
their untuned defaults ``idk_dpo``, ``rmu`` and ``whp`` left the demo benchmark's forget answers where they
were. For each of the three methods this script runs one unlearning job on the whole forget set of the tiny
demo benchmark (``jobs.data.demo_train.build_benchmark(size="tiny", seed=0)``, built or reused under
``--bench``) twice, with the OLD defaults (spelled out below, so the comparison stays meaningful after the
change) and with the NEW ones (``{}``: whatever the method's ``Params`` default to now), then scores the base
model and both results with ``jobs.evaluate.evaluate_model(..., suites=["qa"])`` on the forget and retain
splits.

Every job runs in this process through the real loop (``jobs.unlearn.loop.run_unlearning``: DeepSpeed ZeRO
stage 0 on the CPU accelerator, gloo, rank 0 of 1) with the demo recipe (``orchestrator.cli.demo.RECIPES["tiny"]``:
lr 3e-4, 150 steps, batch 8, max_length 128; ``--steps`` overrides the step count) and the demo's retain data.
WHP first runs its reinforcement pre-job (``Method.pre_jobs``, as the pipeline's runner does) into
``<job>/reinforced``; both WHP runs use the benchmark's ``data/anchors.json`` (as examples/methods_demo.yaml).

Prints a table (forget_prob, retain_prob, model_utility and their ratio to the base model) and writes
``benchmarks/results/method_defaults.json``::

    python -m benchmarks.method_defaults                         # all three methods, old and new
    python -m benchmarks.method_defaults --methods rmu --steps 60
    python -m benchmarks.method_defaults --sweep                 # the variants behind the choice (SWEEP)
    python -m benchmarks.method_defaults --methods rmu --try '{"adaptive_scale": 2.0}'   # explore, not saved
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.solo import SCORES, fmt, run_job, score, setup_process, tiny_benchmark

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "method_defaults.json"

# The defaults before issue 15 item 3, written out: rmu's middle layer of the 4-layer demo model
# (num_hidden_layers // 2 = 2) with WMDP's fixed zephyr-7b coefficient; whp's hard argmax labels at beta 1;
# idk_dpo as open-unlearning's DPO.yaml.
OLD: dict[str, dict[str, Any]] = {
    "rmu": {"steering": "fixed", "steering_coeff": 6.5, "layer": 2, "alpha": 1000.0},
    "whp": {"beta": 1.0, "targets": "hard", "alpha": 0.0},
    "idk_dpo": {"beta": 0.1, "gamma": 1.0, "alpha": 1.0},
}
METHODS = tuple(OLD)

# The variants measured to choose the new defaults (``--sweep``): (params, steps; None = --steps). Each method's
# new defaults are in its file's docstring, with these numbers.
SWEEP: dict[str, list[tuple[dict[str, Any], Any]]] = {
    "rmu": [
        ({"steering": "fixed", "steering_coeff": 6.5, "alpha": 100.0}, None),  # alpha alone does not help
        ({"alpha": 1000.0}, None),  # adaptive c, open-unlearning's alpha: held in place
        ({"alpha": 10.0}, None),
        ({"layer_fraction": 0.25}, None),
    ],  # layer 1 of 4
    "whp": [
        ({"targets": "hard"}, None),
        ({"targets": "soft", "beta": 20.0}, None),
        ({"alpha": 1.0}, None),
        ({"targets": "hard", "alpha": 1.0}, None),
        ({"beta": 20.0, "alpha": 1.0}, None),
    ],
    "idk_dpo": [({"beta": 0.1}, 50), ({}, 50), ({"beta": 0.07}, None), ({"beta": 0.07}, 50), ({"beta": 0.02}, None)],
}


def table(rows: list[dict], base: dict[str, float]) -> str:
    lines = [
        (
            "| method | defaults | params | steps | forget_prob | retain_prob | model_utility | forget / base | "
            "retain / base | utility / base |"
        ),
        "|" + "---|" * 10,
        "| - | base | - | - | " + " | ".join(fmt(base[k]) for k in SCORES) + " | 1.00 | 1.00 | 1.00 |",
    ]
    for r in rows:
        s = r["scores"]
        shown = {k: v for k, v in r["params"].items() if k != "anchors"}
        lines.append(
            f"| {r['method']} | {r['defaults']} | `{json.dumps(shown)}` | {r['steps']} | "
            + " | ".join(fmt(s[k]) for k in SCORES)
            + " | "
            + " | ".join(f"{s[k] / base[k]:.2f}" for k in SCORES)
            + " |"
        )
    return "\n".join(lines)


def run_rows(plan: list[tuple[str, str, dict, int]], bench: Path, work: Path, threads: int) -> list[dict]:
    """Run and score each (method, label, params, steps) of ``plan``; a job folder already finished is reused."""
    rows = []
    for method, label, params, steps in plan:
        tag = label + ("" if label in ("old", "new") else "-" + "-".join(f"{k}{v}" for k, v in sorted(params.items())))
        out = work / method / f"{tag}-steps{steps}".replace("/", "_").replace(" ", "")
        job = run_job(method, dict(params), bench, out, steps=steps, threads=threads)
        t0 = time.time()
        scores = score(out, bench)
        rows.append(
            {
                "method": method,
                "defaults": label,
                "steps": steps,
                **job,
                "scores": scores,
                "eval_s": round(time.time() - t0, 1),
            }
        )
        print(f"{method} {label} {params} {steps} steps: {scores} (train {job['train_s']}s)", flush=True)
        for r in job["trajectory"]:
            print("   ", " ".join(f"{k}={v:.4g}" for k, v in r.items()), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    from orchestrator.cli.demo import RECIPES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument(
        "--bench",
        type=Path,
        default=Path(tempfile.gettempdir()) / "spunge-method-defaults" / "benchmark",
        help="folder of the tiny demo benchmark (built there once, ~1 min, then reused)",
    )
    ap.add_argument("--work", type=Path, default=None, help="job outputs (default: a fresh temporary folder)")
    ap.add_argument("--steps", type=int, default=RECIPES["tiny"]["max_steps"], help="steps per job (the demo recipe's)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument(
        "--sweep",
        action="store_true",
        help="run SWEEP (the variants behind the chosen defaults) instead; saved under 'sweep' in --out",
    )
    mode.add_argument(
        "--try",
        dest="trial",
        default=None,
        help="JSON params: run only these per method (exploration); results not saved",
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    setup_process(args.threads)
    t_start = time.time()
    meta = tiny_benchmark(args.bench)
    work = args.work or Path(tempfile.mkdtemp(prefix="method-defaults-"))
    base = score(args.bench / "models" / "base", args.bench)
    print(f"base: {base}", flush=True)
    if args.trial:
        plan = [(m, "trial", json.loads(args.trial), args.steps) for m in args.methods]
    elif args.sweep:
        plan = [(m, "sweep", params, steps or args.steps) for m in args.methods for params, steps in SWEEP[m]]
    else:
        plan = [
            (m, label, params, args.steps) for m in args.methods for label, params in (("old", OLD[m]), ("new", {}))
        ]
    rows = run_rows(plan, args.bench, work, args.threads)
    print(table(rows, base))
    if args.trial:
        return 0
    result = json.loads(args.out.read_text()) if args.out.is_file() else {}
    run = {"rows": rows, "wall_s": round(time.time() - t_start, 1), "load_avg_after": os.getloadavg()}
    result.update(
        {
            "benchmark": {"size": "tiny", "seed": 0, "counts": meta["counts"]},
            "recipe": {**RECIPES["tiny"], "max_length": 128, "zero_stage": 0, "threads": args.threads},
            "old_defaults": OLD,
            "base": base,
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        }
    )
    result["sweep" if args.sweep else "defaults"] = run
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
