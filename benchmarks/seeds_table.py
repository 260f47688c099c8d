"""The seeded comparison of a ``variants:`` x ``seeds:`` run as a markdown table (docs/results.md).

``spunge run`` prints the same statistics when every pipeline has finished and writes ``seeds.json``; this
reads the finished pipelines' ``report.json`` files instead (``<output_dir>/<variant>/seed<s>/report.json``),
so a run that was stopped part-way can be tabled for the variants whose seeds are all done::

    python benchmarks/seeds_table.py spunge-demo/methods-seeds-tiny --name methods_seeds_tiny

Per variant (only those with every seed of the others' set): merged and unsplit, mean ± half-width of the 95%
Student-t interval over the seeds, the mean paired difference with its interval and the two-sided paired
t-test's p-value (``orchestrator.experiments.seeds.summarize``, the function ``spunge run --seeds`` uses). The reference
rows (base, oracle) are seed 0's: they do not depend on the unlearning seed. Writes
``benchmarks/results/<name>.json`` (the per-seed values are in it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]

from orchestrator.experiments.seeds import TABLE_METRICS, summarize  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def num(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x:.2e}" if x != 0 and abs(x) < 1e-3 else f"{x:.3f}"


def with_ci(s: Optional[dict[str, Any]], signed: bool = False) -> str:
    if not s:
        return "-"
    mean = ("+" if signed and s["mean"] >= 0 else "") + num(s["mean"])
    return mean if s["half_width"] is None else f"{mean} ± {num(s['half_width'])}"


def p_text(p: Optional[float]) -> str:
    if p is None:
        return "-"
    text = f"{p:.2f}" if p >= 0.01 else f"{p:.1e}"
    return f"**{text}**" if p < 0.05 else text


def collect(folder: Path) -> tuple[dict[str, dict[int, dict]], list[int]]:
    """variant -> seed -> report, for the variants that finished the most seeds any variant has."""
    found: dict[str, dict[int, dict]] = {}
    for path in sorted(folder.glob("*/seed*/report.json")):
        seed = int(path.parent.name.removeprefix("seed"))
        found.setdefault(path.parents[1].name, {})[seed] = json.loads(path.read_text())
    if not found:
        raise SystemExit(f"seeds_table: no <variant>/seed<s>/report.json under {folder}")
    seeds = sorted(max((set(r) for r in found.values()), key=len))
    return {v: r for v, r in found.items() if set(seeds) <= set(r)}, seeds


def slim(s: dict[str, Any]) -> dict[str, Any]:
    """The summary's table metrics only (a report carries dozens of per-fact and per-attribute scores)."""
    return {
        "seeds": s["seeds"],
        "paired": {m: v for m, v in s["paired"].items() if m in TABLE_METRICS},
        "models": {k: {m: v for m, v in per.items() if m in TABLE_METRICS} for k, per in s["models"].items()},
    }


def table(summaries: dict[str, dict], reference: dict[str, dict]) -> str:
    lines = ["| method | metric | merged | unsplit | merged − unsplit | p |", "|---|---|---|---|---|---|"]
    for model, scores in reference.items():
        lines.append(
            f"| reference: {model} | | " + ", ".join(f"{m} {num(scores.get(m))}" for m in TABLE_METRICS) + " | | | |"
        )
    for variant, s in summaries.items():
        for m in TABLE_METRICS:
            merged, unsplit = (s["models"].get(k, {}).get(m) for k in ("merged", "unsplit"))
            pair = s["paired"].get(m)
            lines.append(
                f"| {variant} | {m} | {with_ci(merged)} | {with_ci(unsplit)} | {with_ci(pair, signed=True)}"
                f" | {p_text(pair['p_value'] if pair else None)} |"
            )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", type=Path, help="the run's storage.output_dir (one folder per variant in it)")
    ap.add_argument("--name", default=None, help="results file name (default: the folder's name)")
    args = ap.parse_args(argv)
    reports, seeds = collect(args.folder)
    summaries = {v: slim(summarize(r)) for v, r in reports.items()}
    first = next(iter(reports.values()))[seeds[0]]["models"]
    reference = {m: {k: first[m][k] for k in TABLE_METRICS if k in first[m]} for m in ("base", "oracle") if m in first}
    print(f"seeds {seeds}; variants with every seed: {', '.join(reports)}\n")
    print(table(summaries, reference))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{args.name or args.folder.name}.json"
    out.write_text(
        json.dumps(
            {"folder": str(args.folder), "seeds": seeds, "reference": reference, "summaries": summaries}, indent=2
        )
    )
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()
