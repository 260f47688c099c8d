"""What a search leaves: the trials table (terminal, trials.csv, trials.md) and ``best_config.yaml``."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from orchestrator.config.objective import best_trial
from orchestrator.config.parse import parse_config
from orchestrator.config.schema import PipelineConfig, apply_overrides, config_yaml
from orchestrator.config.space import plain
from orchestrator.config.tune import TuneSection


def trial_rows(grid, spec: TuneSection, status: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    for res in grid:
        m = res.metrics or {}
        found = re.search(r"_([0-9a-f]{5}_\d{5})_", Path(res.path).name)  # <trainable>_<trial_id>_<n>_...
        tid = m.get("trial_id") or (found.group(1) if found else Path(res.path).name)
        row: dict[str, Any] = {"trial_id": tid, **{p: plain(res.config.get(p)) for p in spec.space}}
        final = "objective_raw" in m
        row["status"] = "ERROR" if res.error else status.get(tid, "TERMINATED" if final else "STOPPED")
        for k in ("objective", "feasible", "objective_raw", *spec.objective.metrics(), "unlearn_step"):
            v = m.get(k)
            row[k] = v if final or k == "unlearn_step" else None
        if res.error:
            row["error"] = str(res.error).strip().splitlines()[-1][:300]
        rows.append(row)
    return sorted(rows, key=lambda r: r["trial_id"])


def write_trials(rows: list[dict[str, Any]], spec: TuneSection, out: Path, console: Console) -> list[Path]:
    """Print the trials table (rich) and write trials.csv and trials.md."""
    if not rows:
        return []
    cols = list(dict.fromkeys(k for r in rows for k in r if k != "error"))
    best = best_trial(rows, spec.objective.mode)
    table = Table(title=f"spunge tune: {spec.objective.describe()}", title_justify="left")
    for c in cols:
        table.add_column(c, justify="left" if c in ("trial_id", "status") else "right")
    fmt = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
    for r in rows:
        table.add_row(*[fmt(r.get(c)) for c in cols], style="bold green" if r is best else None)
    console.print(table)
    csv_path = out / "trials.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols + ["error"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    md = out / "trials.md"
    md.write_text(
        f"# spunge tune: {spec.objective.describe()}\n\n| "
        + " | ".join(cols)
        + " |\n|"
        + "---|" * len(cols)
        + "\n"
        + "".join("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |\n" for r in rows)
    )
    return [csv_path, md]


def write_best_config(cfg: PipelineConfig, best: dict[str, Any], spec: TuneSection, out: Path) -> Path:
    """``<output_dir>/best_config.yaml``: the base pipeline with the best trial's values, runnable as is
    (``spunge run``), writing to ``<output_dir>/best`` under the name ``<name>-best``."""
    values = {p: best[p] for p in spec.space}
    raw = apply_overrides(
        cfg.model_dump(mode="json"), {**values, "name": f"{cfg.name}-best", "storage.output_dir": str(out / "best")}
    )
    best_cfg = parse_config(raw, out, "best_config.yaml")
    path = out / "best_config.yaml"
    header = [
        f"# spunge tune best config: trial {best['trial_id']} of {cfg.name!r}",
        f"# objective: {spec.objective.describe()}",
        f"# objective value {best['objective']:.6g} (raw {best['objective_raw']:.6g}, "
        f"{'feasible' if best['feasible'] else 'INFEASIBLE'})",
        *[f"# {p}: {v!r}" for p, v in values.items()],
        "# run it: spunge run best_config.yaml",
    ]
    path.write_text("\n".join(header) + "\n" + config_yaml(best_cfg))
    return path
