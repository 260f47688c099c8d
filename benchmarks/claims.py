"""Two seed papers' claims, checked on the tiny demo benchmark (docs/results.md, issue 15 item 4).

``localization``: does a mask from an attribution (gradient, activation, WAGLE) beat a random mask of the same
fraction? For each seed, one WGA job per attribution with ``unlearn.localize`` (same fraction and scope; the
random mask drawn with that seed) and one without a mask; the seed is also the job's (data order). Per
attribution: mean ± 95% CI over seeds of forget_prob, retain_prob and model_utility, and the paired
difference to the random mask with the two-sided paired t-test's p-value (``orchestrator.experiments.seeds``).

``lr_grid``: Yao et al. 2024 (Machine Unlearning of Pre-trained LLMs): gradient ascent plus gradient descent on
in-distribution data is more robust to the learning rate than the other methods. Each method they compare
(docs/methods.md maps all seven: ga, random_label, adversarial, and grad_diff / ga_kl with the retain term
on the in-distribution retain QA or on general text) runs at every learning rate of the grid, for each seed; per
method the spread over the grid (max - min of the seed means), the number of learning rates
at which the model collapses (model_utility < 0.5 x base) or keeps the forget answers (forget_prob > 0.5 x
base), and the number at which it does neither ("usable").

Every job is an in-process run of the real loop (``benchmarks/solo.py``: DeepSpeed ZeRO 0 on CPU, the demo
recipe of 150 steps, batch 8), on the whole forget set of the tiny demo benchmark; no job is tuned::

    python -m benchmarks.claims localization --seeds 0,1,2,3,4
    python -m benchmarks.claims lr_grid --seeds 0,1

Prints the tables and writes ``benchmarks/results/claims_<claim>.json``. Finished jobs under ``--work`` are
reused.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.solo import SCORES, fmt, recipe, run_job, score, setup_process, tiny_benchmark
from orchestrator.experiments.seeds import mean_ci, paired_test

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "benchmarks" / "results"
ATTRIBUTIONS = ("gradient", "activation", "wagle", "random")
LOCALIZE = {"fraction": 0.05, "scope": "mlp"}  # LocalizeSpec's defaults, spelled out
LOCALIZE_METHOD = "wga"
# Yao et al.'s seven methods: (row name, method, retain data)
YAO = (
    ("ga", "ga", "retain"),
    ("grad_diff (in-distribution)", "grad_diff", "retain"),
    ("grad_diff (general)", "grad_diff", "general"),
    ("ga_kl (in-distribution)", "ga_kl", "retain"),
    ("ga_kl (general)", "ga_kl", "general"),
    ("random_label", "random_label", "retain"),
    ("adversarial", "adversarial", "retain"),
)
LRS = (3e-5, 1e-4, 3e-4, 1e-3, 3e-3)  # half a decade apart around the demo recipe's 3e-4


def with_ci(s: dict[str, Any]) -> str:
    return fmt(s["mean"]) + (f" ± {fmt(s['half_width'])}" if s.get("half_width") is not None else "")


def diff_p(s: dict[str, Any]) -> str:
    if s.get("p_value") is None:
        return f"{s['mean']:+.3f}"
    p = s["p_value"]
    return f"{s['mean']:+.3f} (p {p:.2f})" if p >= 0.01 else f"{s['mean']:+.3f} (p {p:.1e})"


def scored_job(bench: Path, out: Path, method: str, threads: int, steps: int, **kw: Any) -> dict[str, Any]:
    job = run_job(method, {}, bench, out, steps=steps, threads=threads, **kw)
    scores = score(out, bench)
    print(
        f"{out.relative_to(out.parents[1])}: "
        + " ".join(f"{k}={fmt(v)}" for k, v in scores.items())
        + f" (train {job['train_s']}s)",
        flush=True,
    )
    return {"scores": scores, "train_s": job["train_s"], "final_metrics": job["final_metrics"]}


def localization(bench: Path, work: Path, seeds: list[int], threads: int, steps: int) -> dict[str, Any]:
    runs: dict[str, dict[int, dict]] = {a: {} for a in (*ATTRIBUTIONS, "none")}
    for seed in seeds:
        for a in runs:
            loc = None if a == "none" else {**LOCALIZE, "attribution": a, "seed": seed}
            runs[a][seed] = scored_job(
                bench,
                work / "localization" / f"{a}-seed{seed}",
                LOCALIZE_METHOD,
                threads,
                steps,
                seed=seed,
                localize=loc,
            )
    rows = []
    for a, by_seed in runs.items():
        row: dict[str, Any] = {"attribution": a}
        for k in SCORES:
            vals = [by_seed[s]["scores"][k] for s in seeds]
            row[k] = mean_ci(vals)
            if a not in ("random", "none"):
                row[f"{k}_minus_random"] = paired_test(vals, [runs["random"][s]["scores"][k] for s in seeds])
        rows.append(row)
    return {
        "method": LOCALIZE_METHOD,
        "localize": LOCALIZE,
        "rows": rows,
        "runs": {a: {str(s): r for s, r in v.items()} for a, v in runs.items()},
    }


def localization_table(result: dict[str, Any]) -> str:
    lines = [
        "| mask | forget_prob | retain_prob | model_utility | forget_prob − random | "
        "retain_prob − random | model_utility − random |",
        "|" + "---|" * 7,
    ]
    for r in result["rows"]:
        diff = [diff_p(r[k + "_minus_random"]) if k + "_minus_random" in r else "" for k in SCORES]
        vals = [with_ci(r[k]) for k in SCORES]
        name = "none (every parameter)" if r["attribution"] == "none" else r["attribution"]
        lines.append(f"| {name} | " + " | ".join(vals + diff) + " |")
    return "\n".join(lines)


def lr_grid(bench: Path, work: Path, seeds: list[int], threads: int, steps: int, base: dict) -> dict[str, Any]:
    rows = []
    for name, method, retain in YAO:
        per_lr = []
        for lr in LRS:
            by_seed = {
                s: scored_job(
                    bench,
                    work / "lr_grid" / f"{method}-{retain}-lr{lr:g}-seed{s}",
                    method,
                    threads,
                    steps,
                    lr=lr,
                    seed=s,
                    retain=retain,
                )
                for s in seeds
            }
            means = {k: statistics.fmean(by_seed[s]["scores"][k] for s in seeds) for k in SCORES}
            per_lr.append(
                {
                    "lr": lr,
                    **means,
                    "runs": {str(s): r for s, r in by_seed.items()},
                    "collapsed": means["model_utility"] < 0.5 * base["model_utility"],
                    "kept_forget": means["forget_prob"] > 0.5 * base["forget_prob"],
                }
            )
        spread = {k: max(p[k] for p in per_lr) - min(p[k] for p in per_lr) for k in SCORES}
        rows.append(
            {
                "method": name,
                "unlearn.method": method,
                "retain": retain,
                "per_lr": per_lr,
                "spread": spread,
                "collapsed_lrs": sum(p["collapsed"] for p in per_lr),
                "kept_forget_lrs": sum(p["kept_forget"] for p in per_lr),
                "usable_lrs": sum(not (p["collapsed"] or p["kept_forget"]) for p in per_lr),
            }
        )
    return {"lrs": list(LRS), "rows": rows}


def lr_grid_table(result: dict[str, Any]) -> str:
    lrs = result["lrs"]
    head = " | ".join(f"lr {lr:g}" for lr in lrs)
    lines = [
        f"| method | {head} | spread forget_prob | spread model_utility | collapsed | kept forget | usable |",
        "|" + "---|" * (len(lrs) + 6),
    ]
    for r in result["rows"]:
        cells = [f"{fmt(p['forget_prob'])} / {fmt(p['model_utility'])}" for p in r["per_lr"]]
        lines.append(
            f"| {r['method']} | " + " | ".join(cells) + f" | {r['spread']['forget_prob']:.3f} | "
            f"{r['spread']['model_utility']:.3f} | {r['collapsed_lrs']}/{len(lrs)} | "
            f"{r['kept_forget_lrs']}/{len(lrs)} | {r['usable_lrs']}/{len(lrs)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("claim", choices=("localization", "lr_grid"))
    ap.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds")
    ap.add_argument(
        "--bench",
        type=Path,
        default=Path(tempfile.gettempdir()) / "spunge-method-defaults" / "benchmark",
        help="folder of the tiny demo benchmark (built there once, ~1 min, then reused)",
    )
    ap.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "spunge-claims",
        help="job outputs (finished jobs are reused)",
    )
    ap.add_argument("--steps", type=int, default=recipe()["max_steps"], help="steps per job (the demo recipe's)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]

    setup_process(args.threads)
    t0 = time.time()
    meta = tiny_benchmark(args.bench)
    base = score(args.bench / "models" / "base", args.bench)
    print("base: " + " ".join(f"{k}={fmt(v)}" for k, v in base.items()), flush=True)
    if args.claim == "localization":
        result = localization(args.bench, args.work, seeds, args.threads, args.steps)
        text = localization_table(result)
    else:
        result = lr_grid(args.bench, args.work, seeds, args.threads, args.steps, base)
        text = lr_grid_table(result)
    print(text)
    out = RESULTS / f"claims_{args.claim}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "claim": args.claim,
                "seeds": seeds,
                "base": base,
                **result,
                "table": text,
                "benchmark": {"size": "tiny", "seed": 0, "counts": meta["counts"]},
                "recipe": {
                    **recipe(),
                    "max_steps": args.steps,
                    "max_length": 128,
                    "zero_stage": 0,
                    "threads": args.threads,
                },
                "wall_s": round(time.time() - t0, 1),
                "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
