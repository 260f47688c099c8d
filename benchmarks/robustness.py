"""The robustness gate at each method's tuned point: merged vs unsplit under the quantization, probe, logit-lens and
relearning attacks, over seeds (docs/results.md, "Robustness under attack", issue 33).

Each method runs at the points ``benchmarks/fair_baselines.py`` tuned for the merged and for the unsplit model
(``benchmarks/results/fair_baselines.json``: lr and the method's main coefficient, 150 steps, the tiny demo
benchmark). Per seed: one job per birth decade of the forget set at the merged model's point, merged onto the base
with TIES (density 0.5, normalised; the pipeline's default), and one job on the whole forget set at the unsplit
model's point. Every job is an in-process run of the real loop (``benchmarks/solo.py``: DeepSpeed ZeRO 0 on the
CPU, the demo recipe's batch of 8); the seed is the job's. The base, merged and unsplit models are scored by
``jobs.evaluate.evaluate_model`` on the ``qa``, ``quant``, ``probes``, ``lens`` and ``relearn`` suites (forget and
retain splits) and each attack's recovery is taken against the base (``add_reference_metrics``). The table
compares merged with unsplit: mean ± 95% half-width over seeds, the paired difference by seed and its two-sided
paired t-test (``orchestrator.experiments.seeds``).

    python -m benchmarks.robustness --seeds 0,1,2 --methods npo,grad_diff,simnpo,rmu,tvn,whp
    python -m benchmarks.robustness --table      # docs/results.md's table from benchmarks/results/robustness.json

Writes benchmarks/results/robustness.json after each method; finished jobs and scores under ``--work`` are reused.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from benchmarks.fair_baselines import COEFFICIENTS, ROOT, _num
from benchmarks.solo import run_job, setup_process, tiny_benchmark

METRICS = (
    "forget_prob",
    "model_utility",
    "quant8_recovery",
    "quant4_recovery",
    "probes_recovery",
    "lens_recovery",
    "relearn_recovery",
    "worst_recovery",
)
SUITES = ["qa", "quant", "probes", "lens", "relearn"]
# the relearning attack at the unlearning's own learning rate: at the suite's default (1e-5) ten steps barely move
# the tiny benchmark's model, which was trained at 3e-4
RELEARN = {"steps": 10, "lr": 3.0e-4}
TIES = {"density": 0.5, "normalize": True}
KEPT = ROOT / "benchmarks" / "results" / "robustness.json"
TUNED = ROOT / "benchmarks" / "results" / "fair_baselines.json"


def subset_files(bench: Path, work: Path, attribute: str = "birth_decade") -> dict[str, Path]:
    """The forget set split by ``attribute``, one file per value (the pipeline's subsets)."""
    from jobs.data.io import load_jsonl, write_jsonl

    rows = load_jsonl(bench / "data" / "forget.jsonl")
    values = sorted({r[attribute] for r in rows})
    return {v: write_jsonl(work / "data" / f"forget_{v}.jsonl", [r for r in rows if r[attribute] == v]) for v in values}


def unlearned(method: str, tuned: dict[str, float], bench: Path, out: Path, seed: int, forget: Path, **kw: Any) -> Path:
    """One job at a tuned point (lr and the method's coefficient); its model folder."""
    coef = COEFFICIENTS[method][0]
    params = {coef: tuned[coef]} if coef else {}
    run_job(method, params, bench, out, lr=tuned["lr"], seed=seed, forget=forget, **kw)
    return out


def merged(bench: Path, subsets: dict[str, Path], out: Path) -> Path:
    from jobs.merge import merge_models
    from jobs.spec import MergeSpec

    if not (out / "config.json").exists():
        spec = MergeSpec(
            base_model_path=str(bench / "models" / "base"),
            model_paths={k: str(p) for k, p in subsets.items()},
            method="ties",
            parameters=TIES,
            output_dir=str(out),
        )
        merge_models(spec)
    return out


def scored(model: Path, bench: Path, cache: Path) -> dict[str, Any]:
    """Every suite's metrics of the model folder (cached as JSON in ``cache``)."""
    from jobs.evaluate import evaluate_model

    if cache.exists():
        return json.loads(cache.read_text())
    data = bench / "data"
    splits = {"forget": str(data / "forget.jsonl"), "retain": str(data / "retain.jsonl")}
    res = evaluate_model(str(model), splits, suites=SUITES, suite_options={"relearn": RELEARN})
    keep = {k: res.get(k, {}) for k in ("metrics", "parts", "info", "seconds")}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(keep, indent=2))
    return keep


def run_method(method: str, tuned: dict[str, Any], bench: Path, work: Path, seeds: list[int], **kw: Any) -> dict:
    from jobs.evaluate.suites import add_reference_metrics
    from orchestrator.experiments.seeds import paired_test

    files = subset_files(bench, work)
    base = scored(bench / "models" / "base", bench, work / "scores" / "base.json")
    per: dict[str, Any] = {
        m: {"tuned": tuned[m]["tuned"], "values": {k: [] for k in METRICS}} for m in ("merged", "unsplit")
    }
    for seed in seeds:
        t0 = time.time()
        folder = work / method / f"seed{seed}"
        subsets = {
            v: unlearned(method, tuned["merged"]["tuned"], bench, folder / f"subset-{v}", seed, f, **kw)
            for v, f in files.items()
        }
        models = {
            "merged": merged(bench, subsets, folder / "merged"),
            "unsplit": unlearned(
                method,
                tuned["unsplit"]["tuned"],
                bench,
                folder / "unsplit",
                seed,
                bench / "data" / "forget.jsonl",
                **kw,
            ),
        }
        results = {"base": json.loads(json.dumps(base))}
        results.update({m: scored(p, bench, folder / f"{m}.scores.json") for m, p in models.items()})
        add_reference_metrics(results)
        for m in ("merged", "unsplit"):
            for k in METRICS:
                per[m]["values"][k].append(results[m]["metrics"].get(k))
            per[m].setdefault("probe_worst_kind", []).append(results[m]["info"].get("probe_worst_kind"))
        per.setdefault("info", results["merged"]["info"].get("quant_scheme"))
        print(f"{method} seed {seed}: {time.time() - t0:.0f}s", flush=True)
    per["base"] = {k: base["metrics"].get(k) for k in ("forget_prob", "model_utility")}
    per["paired"] = {
        k: paired_test(per["merged"]["values"][k], per["unsplit"]["values"][k])
        for k in METRICS
        if all(v is not None for m in ("merged", "unsplit") for v in per[m]["values"][k])
    }
    return per


def markdown_table(results: dict[str, Any]) -> str:
    """Per method and metric: merged and unsplit mean ± 95% half-width over seeds, the paired difference by seed
    and its p-value (bold < 0.05); "n/a" where a seed's model has no recovery (it forgot nothing by that metric)."""
    from orchestrator.experiments.seeds import mean_ci

    lines = ["| method | metric | merged | unsplit | merged − unsplit | p |", "|---|---|---|---|---|---|"]

    def spread(values: list) -> str:
        if any(v is None for v in values):
            return "n/a"
        s = mean_ci(values)
        return _num(s["mean"]) + (f" ± {_num(s['half_width'])}" if s["half_width"] is not None else "")

    for method, per in results["methods"].items():
        for i, k in enumerate(METRICS):
            p = per["paired"].get(k)
            pv = None if p is None else p["p_value"]
            shown = "-" if pv is None else (f"**{pv:.2g}**" if pv < 0.05 else f"{pv:.2g}")
            diff = "-" if p is None else f"{p['mean']:+.3g} ± {_num(p['half_width'])}"
            lines.append(
                f"| {method if i == 0 else ''} | {k} | {spread(per['merged']['values'][k])} | "
                f"{spread(per['unsplit']['values'][k])} | {diff} | {shown} |"
            )
    return "\n".join(lines)


def main() -> None:
    from orchestrator.experiments.seeds import parse_seeds

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", type=Path, default=ROOT / "spunge-demo" / "tiny" / "benchmark")
    ap.add_argument("--work", type=Path, default=ROOT / "spunge-demo" / "robustness")
    ap.add_argument("--methods", default="npo,grad_diff,simnpo,rmu,tvn,whp")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=150, help="unlearning steps per job (the tuned budget)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--table", action="store_true", help="print the table from benchmarks/results/robustness.json")
    args = ap.parse_args()
    if args.table:
        print(markdown_table(json.loads(KEPT.read_text())))
        return
    setup_process(args.threads)
    seeds = parse_seeds(args.seeds)
    bench = args.bench.resolve()
    tiny_benchmark(bench)
    tuned_all = json.loads(TUNED.read_text())["methods"]
    results: dict[str, Any] = {"suites": SUITES, "relearn": RELEARN, "steps": args.steps, "seeds": seeds, "methods": {}}
    if KEPT.exists():
        earlier = json.loads(KEPT.read_text())
        if all(earlier.get(k) == results[k] for k in ("suites", "relearn", "steps", "seeds")):
            results["methods"] = earlier.get("methods", {})
    for method in args.methods.split(","):
        if method not in tuned_all:
            raise SystemExit(f"--methods: {method!r} has no tuned point in {TUNED}; run benchmarks/fair_baselines.py")
        results["methods"][method] = run_method(
            method, tuned_all[method], bench, args.work.resolve(), seeds, steps=args.steps, threads=args.threads
        )
        KEPT.write_text(json.dumps(results, indent=2))
        print(f"{method}: wrote {KEPT}", flush=True)
    print(markdown_table(results))


if __name__ == "__main__":
    main()
