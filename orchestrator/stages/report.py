"""Stage 5, report: the comparison table printed, report.json/report.md and the plots written.

The comparison table: rows are models, metrics grouped (Forget | Utility | Privacy | Memorization | MC |
Quantization | Probes | Logit lens | Robustness | Other, those some model has); printed as one table per group,
written as report.md (same groups) and report.json (every metric, and the robustness summary)."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any, Iterable, Optional

from rich.console import Console
from rich.table import Table

from jobs.evaluate.suites import WORST_RECOVERY
from jobs.evaluate.suites import metric_group as suite_metric_group
from orchestrator.run.context import RunContext

# The headline columns, in order; every other metric follows them in its group (and all are in report.json).
COLUMNS = (
    "forget_prob",
    "forget_rouge",
    "forget_truth_ratio",
    "forget_quality",
    "retain_prob",
    "retain_rouge",
    "model_utility",
    "holdout_prob",
)
ORDER = ("base", "oracle", "merged", "unsplit")

GROUP_ORDER = (
    "Forget",
    "Utility",
    "Privacy",
    "Memorization",
    "MC",
    "Quantization",
    "Probes",
    "Logit lens",
    "Robustness",
    "Other",
)  # "Other" stays last
# Per-value detail metrics (``mc_acc.<attribute>.<value>``): report.json and the attribute plot, not the table.
DETAIL = re.compile(r"^[^.]+\.[^.]+\.")


def _order(name: str) -> tuple[int, str]:
    return (ORDER.index(name) if name in ORDER else len(ORDER), name)


def metric_group(name: str) -> str:
    """The group the evaluation suite that makes ``name`` declares for it (``Suite.groups``), else Other."""
    return suite_metric_group(name) or "Other"


def group_columns(names: Iterable[str]) -> dict[str, list[str]]:
    """Table columns by group (non-empty groups only, in ``GROUP_ORDER``, a group only a suite names before
    Other): headline columns first, then the rest sorted; per-value detail metrics left out."""
    names = {n for n in names if not DETAIL.match(n)}
    rank = {c: i for i, c in enumerate(COLUMNS)}
    groups: dict[str, list[str]] = {}
    for n in sorted(names, key=lambda n: (rank.get(n, len(rank)), n)):
        groups.setdefault(metric_group(n), []).append(n)
    order = [*GROUP_ORDER[:-1], *sorted(set(groups) - set(GROUP_ORDER)), "Other"]
    return {g: groups[g] for g in order if g in groups}


def build_report(
    results: dict[str, dict[str, Any]],
    jobs: list,
    prep: Any,
    run_id: str,
    seconds: float,
    cost: Optional[dict[str, Any]] = None,
) -> dict:
    models = {name: _clean(results[name]["metrics"]) for name in sorted(results, key=_order)}
    return {
        "models": models,
        # what an aggregate metric is made of, e.g. model_utility: TOFU's 9 numbers when every split is there
        "parts": {k: v for name in results for k, v in results[name].get("parts", {}).items()},
        "mlflow_run_id": run_id,
        "counts": prep.counts,
        **({"clusters": prep.clusters} if getattr(prep, "clusters", None) else {}),  # split.by: cluster
        "jobs": {
            j.key: {
                "output_dir": j.spec.output_dir,
                "stage_hash": j.hash,
                "reused": j.reused,
                "attempts": j.result.get("attempts"),  # worker-group starts (None when reused)
                "final_metrics": j.result.get("final_metrics", {}),
                **({"selected": _selected(j.selected)} if j.selected else {}),
            }
            for j in jobs
        },
        "eval_reused": {name: bool(r.get("reused")) for name, r in results.items()},
        **({"relearn": relearn} if (relearn := relearn_summary(models)) else {}),
        **({"robustness": robust} if (robust := robustness_summary(models, results)) else {}),
        **({"cost": cost} if cost else {}),
        "seconds": seconds,
    }


def relearn_summary(models: dict[str, dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The relearn suite's gains of the unlearned models (base and oracle left out) and the model that
    recovers least (the lowest ``relearn_gain``)."""
    gains = {
        n: m["relearn_gain"]
        for n, m in models.items()
        if n not in ("base", "oracle") and isinstance(m.get("relearn_gain"), (int, float))
    }
    if not gains:
        return None
    return {"gain": gains, "least_recovery": min(gains, key=gains.get)}


def robustness_summary(models: dict[str, dict[str, Any]], results: dict[str, dict[str, Any]]) -> Optional[dict]:
    """The attacks' recoveries of every model but the base (``jobs.evaluate.suites.Recovery``): ``recovery``
    {model: {metric: value}} with ``worst_recovery`` (the largest) and ``worst_attack`` (its metric),
    ``relearn_gain`` where the relearn suite ran, ``most_robust`` (the unlearned model, neither base nor
    oracle, with the lowest worst recovery) and ``info`` (how the attacks measured where every model shares it,
    e.g. the quantization scheme; each model's own, e.g. its worst probe kind, in its ``recovery`` entry)."""
    recovery: dict[str, dict[str, Any]] = {}
    for name, m in models.items():
        found = {k: v for k, v in m.items() if k.endswith("_recovery") and k != WORST_RECOVERY and v is not None}
        if found and name != "base":
            worst = max(found, key=found.get)
            own = results.get(name, {}).get("info", {})
            recovery[name] = {
                **found,
                WORST_RECOVERY: found[worst],
                "worst_attack": worst,
                **({"info": own} if own else {}),
            }
    if not recovery:
        return None
    unlearned = {n: r[WORST_RECOVERY] for n, r in recovery.items() if n not in ("base", "oracle")}
    gains = {n: m["relearn_gain"] for n, m in models.items() if n in recovery and m.get("relearn_gain") is not None}
    # what every model's attacks share (the quantization scheme); a model's own (its worst probe) is in its entry
    infos = [r.get("info", {}) for r in results.values() if r.get("info")]
    info = {k: v for k, v in (infos[0] if infos else {}).items() if all(i.get(k) == v for i in infos)}
    return {
        "recovery": recovery,
        **({"relearn_gain": gains} if gains else {}),
        **({"most_robust": min(unlearned, key=unlearned.get)} if unlearned else {}),
        **({"info": info} if info else {}),
    }


def _selected(sel: dict[str, Any]) -> dict[str, Any]:
    """What report.json says of a job's chosen step: the step and the model, the rule, and every evaluated
    step's objective and metrics."""
    keep = ("step", "last_step", "path", "rule", "objective", "feasible", "stopped_early")
    return {
        **_clean({k: sel.get(k) for k in keep}),
        "candidates": [
            {**_clean({k: v for k, v in c.items() if k != "metrics"}), "metrics": _clean(c["metrics"])}
            for c in sel.get("candidates", [])
        ],
    }


def _clean(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


def _fmt(v: Any, key: str) -> str:
    if v is None:
        return "-"
    if not isinstance(v, (int, float)):
        return str(v)
    if key == "forget_quality" or (isinstance(v, float) and v != 0 and not 1e-3 <= abs(v) < 1e5):
        return f"{v:.2e}"
    return f"{v:.3f}"


def _header(metric: str, group: str) -> str:
    """Drop the prefix the group already says (``forget_prob`` under Forget shows as ``prob``)."""
    prefix = {"Forget": "forget_", "MC": "mc_", "Probes": "probe_", "Logit lens": "lens_"}.get(group)
    short = metric[len(prefix) :] if prefix and metric.startswith(prefix) else metric
    return short.replace("_", "\n", 1) if len(short) > 10 else short


def tables(models: dict[str, dict[str, Any]], title: str = "spunge report") -> list[Table]:
    """One rich table per metric group, rows the models (in report order)."""
    cols = group_columns({k for m in models.values() for k in m})
    out = []
    for group, names in cols.items():
        t = Table(title=f"{title}: {group}", title_justify="left")
        t.add_column("model", style="bold")
        for c in names:
            t.add_column(_header(c, group), justify="right")
        for name, m in models.items():
            t.add_row(name, *(_fmt(m.get(c), c) for c in names))
        out.append(t)
    return out


def table(report: dict) -> list[Table]:
    """The report's tables (one per group)."""
    return tables(report["models"])


def print_tables(models: dict[str, dict[str, Any]], console: Console, title: str = "spunge report") -> None:
    for t in tables(models, title):
        console.print(t)


def markdown(report: dict) -> str:
    models = report["models"]
    parts = []
    for group, names in group_columns({k for m in models.values() for k in m}).items():
        lines = [f"### {group}", "", "| model | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for name, m in models.items():
            lines.append(f"| {name} | " + " | ".join(_fmt(m.get(c), c) for c in names) + " |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def summary_lines(report: dict) -> list[str]:
    """The lines under the tables: each job's chosen step (unlearn.select), the relearning attack's least
    recovered model, the cost."""
    from orchestrator.tracking.costs import describe

    lines = [
        f"{key}: step {s['step']} of {s['last_step']} chosen by {s['rule']}"
        + (f" (stopped early at step {s['stopped_early']})" if s.get("stopped_early") else "")
        for key, j in report.get("jobs", {}).items()
        if (s := j.get("selected"))
    ]
    if rl := report.get("relearn"):
        lines.append(
            f"relearn: {rl['least_recovery']} recovers least (relearn_gain "
            f"{rl['gain'][rl['least_recovery']]:.3g}; " + ", ".join(f"{n} {g:.3g}" for n, g in rl["gain"].items()) + ")"
        )
    if rb := report.get("robustness"):
        worst = ", ".join(
            f"{n} {r[WORST_RECOVERY]:.3g} ({r['worst_attack'].removesuffix('_recovery')})"
            for n, r in rb["recovery"].items()
        )
        best = f"; {rb['most_robust']} is the most robust" if rb.get("most_robust") else ""
        lines.append(f"robustness: worst recovery under attack {worst}{best}")
        lines += [f"{k}: {v}" for k, v in rb.get("info", {}).items()]
    if report.get("cost"):
        lines.append(describe(report["cost"]))
    return lines


def write_report(report: dict, out: Path, console: Console) -> list[Path]:
    """Print the grouped tables; write report.json and report.md into ``out`` (returned for MLflow)."""
    print_tables(report["models"], console)
    for line in summary_lines(report):
        console.print(line, markup=False)
    js, md = out / "report.json", out / "report.md"
    js.write_text(json.dumps(report, indent=2))
    md.write_text(markdown(report) + "".join(f"\n{line}\n" for line in summary_lines(report)))
    console.print(f"report: {js}  (MLflow run {report['mlflow_run_id']})", markup=False)
    return [js, md]


VARIANT_COLUMNS = ("forget_quality", "forget_prob", "retain_prob", "model_utility")


def write_variants(reports: dict[str, dict], out: Path, console: Console) -> Path:
    """One table over the variants of a config: variant x (merged, unsplit) x headline metrics."""
    t = Table(title="spunge variants", title_justify="left")
    for c in ("variant", "model", *VARIANT_COLUMNS):
        t.add_column(c.replace("_", "\n", 1), justify="left" if c in ("variant", "model") else "right")
    rows = {}
    for name, report in reports.items():
        for model in ("merged", "unsplit"):
            m = report["models"].get(model)
            if m is not None:
                rows[f"{name}/{model}"] = {c: m.get(c) for c in VARIANT_COLUMNS}
                t.add_row(name, model, *(_fmt(m.get(c), c) for c in VARIANT_COLUMNS))
    console.print(t)
    path = out / "variants.json"
    path.write_text(
        json.dumps({"rows": rows, "mlflow_run_ids": {n: r["mlflow_run_id"] for n, r in reports.items()}}, indent=2)
    )
    return path


def report(ctx: RunContext) -> None:
    """``ctx.report``: the tables printed, report.json/report.md and the plots written (``ctx.artifacts``)."""
    from orchestrator.tracking.costs import cost_report

    ctx.report = build_report(
        ctx.results, ctx.jobs, ctx.prep, ctx.run_id, time.perf_counter() - ctx.started, cost_report(ctx)
    )
    ctx.artifacts += [(p, None) for p in write_report(ctx.report, ctx.out, ctx.display.console)]
    ctx.artifacts += [(p, "plots") for p in _plots(ctx)]


def _plots(ctx: RunContext) -> list[Path]:
    """The run's PNG plots in ``<output_dir>/plots/``; a plotting problem is reported, not fatal."""
    from orchestrator.tracking.plots import write_plots

    try:
        paths = write_plots(
            ctx.report["models"],
            {j.key: j.history + j.curves for j in ctx.jobs},
            ctx.out / "plots",
            {j.key: j.selected["step"] for j in ctx.jobs if j.selected} or None,
            {name: res.get("raw", {}) for name, res in ctx.results.items()},
        )
    except Exception as e:  # the report is already written: don't fail the run for a figure
        ctx.display.log(f"warning: plots not written: {type(e).__name__}: {e}")
        return []
    ctx.display.log("plots: " + ", ".join(str(p) for p in paths))
    return paths
