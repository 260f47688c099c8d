"""Seeds as an axis: a pipeline (or each variant) repeated over unlearning seeds, and the statistics over them.

``spunge run pipe.yaml --seeds 0,1,2`` (or ``seeds: [0, 1, 2]`` at the top of the file) runs every pipeline
once per seed with ``unlearn.seed`` set (the jobs' initialisation of anything random and their data order;
the benchmark, its split and the evaluation stay fixed), each as its own pipeline run in
``<output_dir>/seed<s>`` and its own MLflow run, nested under one MLflow run per variant (``<name>``, or
``<name>/<variant>``) that holds the summary.

The summary (``seeds.json`` beside the seed folders, a table in the terminal, metrics on the variant's
MLflow run), per model (merged, unsplit) and metric: the mean over seeds and a 95% confidence interval
from Student's t (mean +- t(0.975, n-1) x sd / sqrt(n), sd with n-1); and merged vs unsplit per metric: the
mean paired difference, its interval, and the two-sided paired t-test's p-value over seeds
(``scipy.stats.ttest_rel``). With one seed there is no interval and no test (None).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

PAIR = ("merged", "unsplit")
TABLE_METRICS = ("forget_quality", "forget_prob", "retain_prob", "model_utility")


class SeedsError(ValueError):
    pass


def parse_seeds(text: Optional[str]) -> Optional[list[int]]:
    """``--seeds 0,1,2`` (or ``0-4``) as a list of distinct ints; None when not given."""
    if text is None:
        return None
    seeds: list[int] = []
    try:
        for part in (p.strip() for p in text.split(",") if p.strip()):
            lo, _, hi = part.partition("-") if not part.startswith("-") else (part, "", "")
            seeds += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError:
        raise SeedsError(f"--seeds: expected integers like 0,1,2 or 0-4, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise SeedsError(f"--seeds: expected distinct integers like 0,1,2, got {text!r}")
    return seeds


def resolve_seeds(flag: Optional[str], config: Any) -> Optional[list[int]]:
    """The seeds of a run: ``--seeds`` (``flag``) if given, else the file's ``seeds:``; ``ConfigError`` (one
    line) on a bad value."""
    from orchestrator.config.loading import load_seeds
    from orchestrator.config.schema import ConfigError

    try:
        return parse_seeds(flag) if flag is not None else load_seeds(config)
    except SeedsError as e:
        raise ConfigError([str(e)], "spunge run") from None


def seeded(cfg: Any, seed: int) -> Any:
    """``cfg`` for one seed: ``unlearn.seed``, the name ``<name>/seed<s>``, the folder ``<output_dir>/seed<s>``."""
    out = cfg.model_copy(deep=True)
    out.unlearn.seed = seed
    out.name = f"{cfg.name}/seed{seed}"
    out.storage.output_dir = str(Path(cfg.storage.output_dir) / f"seed{seed}")
    return out


def mean_ci(values: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """Mean and the Student-t confidence interval of the mean (None bounds with fewer than 2 values). The mean and
    sd are the statistics module's, exact before the final rounding: equal values give their value and sd 0
    (a float sum / n can miss the value by an ulp and leave an sd of rounding noise, 1e-21 at 3e-6)."""
    from scipy import stats

    xs = [float(v) for v in values]
    n = len(xs)
    mean = statistics.mean(xs) if n else float("nan")
    out: dict[str, Any] = {
        "n": n,
        "mean": mean,
        "sd": None,
        "half_width": None,
        "ci_low": None,
        "ci_high": None,
        "values": xs,
    }
    if n >= 2:
        # nan with a non-finite value, as the float formula gives (Python 3.11's stdev raises on nan)
        sd = statistics.stdev(xs) if all(map(math.isfinite, xs)) else math.nan
        half = float(stats.t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n)
        out.update(sd=sd, half_width=half, ci_low=mean - half, ci_high=mean + half)
    return out


def paired_test(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """``a - b`` over paired seeds: the mean difference, its interval, and the paired t-test (two-sided).
    The p-value is None with fewer than 2 pairs, or when every difference is the same (no variance)."""
    from scipy import stats

    diffs = [float(x) - float(y) for x, y in zip(a, b)]
    out = mean_ci(diffs)
    out.update(t=None, p_value=None)
    if len(diffs) >= 2 and out["sd"]:
        res = stats.ttest_rel(list(map(float, a)), list(map(float, b)))
        out.update(t=float(res.statistic), p_value=float(res.pvalue))
    return out


def summarize(reports: dict[int, dict[str, Any]], models: Sequence[str] = PAIR) -> dict[str, Any]:
    """Per model and metric the mean and interval over ``reports`` (seed -> report.json), and merged vs
    unsplit paired by seed, over the metrics every seed has for the model."""
    seeds = sorted(reports)
    out: dict[str, Any] = {"seeds": seeds, "models": {}, "paired": {}}
    for model in models:
        rows = [reports[s]["models"].get(model) for s in seeds]
        if not rows or any(r is None for r in rows):
            continue
        common = set.intersection(*({k for k, v in r.items() if _number(v)} for r in rows))
        out["models"][model] = {m: mean_ci([r[m] for r in rows]) for m in sorted(common)}
    if all(m in out["models"] for m in PAIR):
        a, b = (out["models"][m] for m in PAIR)
        out["paired"] = {m: paired_test(a[m]["values"], b[m]["values"]) for m in sorted(set(a) & set(b))}
    return out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(s: Optional[dict[str, Any]]) -> str:
    if not s:
        return "-"
    if s["half_width"] is None:
        return f"{s['mean']:.3g}"
    return f"{s['mean']:.3g} ± {s['half_width']:.2g}"


def print_summary(summaries: dict[str, dict[str, Any]], console: Any, metrics: Sequence[str] = TABLE_METRICS) -> None:
    """One table: variant x metric, merged and unsplit mean ± CI half-width, the paired difference, p."""
    from rich.table import Table

    t = Table(title="spunge seeds: mean ± 95% CI over seeds; merged - unsplit, paired t-test", title_justify="left")
    for c in ("variant", "metric", "seeds", "merged", "unsplit", "merged - unsplit", "p"):
        t.add_column(c, justify="left" if c in ("variant", "metric") else "right", no_wrap=c in ("variant", "metric"))
    for name, s in summaries.items():
        for m in metrics:
            merged, unsplit = (s["models"].get(k, {}).get(m) for k in PAIR)
            if merged is None and unsplit is None:
                continue
            pair = s["paired"].get(m)
            p = pair["p_value"] if pair else None
            t.add_row(
                name, m, str(len(s["seeds"])), _fmt(merged), _fmt(unsplit), _fmt(pair), "-" if p is None else f"{p:.3g}"
            )
    console.print(t)


def write_summary(summaries: dict[str, dict[str, Any]], folder: Path) -> Path:
    path = Path(folder) / "seeds.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summaries, indent=2))
    return path


def summary_metrics(s: dict[str, Any]) -> dict[str, float]:
    """The summary as flat MLflow metrics: ``<model>.<metric>.mean|ci_low|ci_high``, ``paired.<metric>.*``."""
    out: dict[str, float] = {}
    for model, per in s["models"].items():
        for m, st in per.items():
            out.update({f"{model}.{m}.{k}": st[k] for k in ("mean", "ci_low", "ci_high") if st[k] is not None})
    for m, st in s["paired"].items():
        out.update({f"paired.{m}.{k}": st[k] for k in ("mean", "ci_low", "ci_high", "p_value") if st[k] is not None})
    return out


def run_seeds(runs: list, seeds: list[int], run: Callable[[Any, str], dict], console: Any, guard: Callable) -> None:
    """Every pipeline of ``runs`` ((variant name, config) pairs) once per seed, ``run(cfg, parent_run_id)``
    each, its MLflow run nested under one run per variant that gets the summary; then the table and
    ``seeds.json``. ``guard()`` turns a tracking or config error into the CLI's exit (one line)."""
    from orchestrator.tracking.tracker import Tracker, tracking_uri

    summaries, groups = {}, []
    for name, cfg in runs:
        with guard():
            group = Tracker(
                tracking_uri(cfg.tracking.uri),
                cfg.tracking.experiment,
                cfg.name,
                tags={"spunge.stage": "seeds", "spunge.seeds": ",".join(map(str, seeds))},
            )
        finished = False
        try:
            reports = {s: run(seeded(cfg, s), group.parent_id) for s in seeds}
            summaries[name or cfg.name] = summary = summarize(reports)
            with guard():
                group.log_metrics(group.parent_id, summary_metrics(summary))
                group.set_tags(group.parent_id, {f"spunge.run.seed{s}": r["mlflow_run_id"] for s, r in reports.items()})
            finished = True
            groups.append(group)
        finally:
            if not finished:
                group.end(group.parent_id, "FAILED")
    print_summary(summaries, console)
    folder = Path(runs[0][1].storage.output_dir)
    path = write_summary(summaries, folder.parent if len(runs) > 1 else folder)
    console.print(f"seeds: {path}", highlight=False, markup=False)
    with guard():
        for group in groups:
            group.log_artifact(group.parent_id, path)
            group.end(group.parent_id)
