"""PNG plots of a run (matplotlib, Agg backend): forget-vs-utility scatter of every model, loss curves of
each unlearning job, per-attribute multiple-choice accuracy bars, the logit lens's per-layer curves. Written to
``<output_dir>/plots/`` and logged to the parent MLflow run by the pipeline.

Each ``*_figure`` function returns a matplotlib ``Figure`` (or ``None`` when the run has nothing to plot);
``write_plots`` saves those that exist.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

FORGET_KEYS = ("forget_prob", "forget_quality")
UTILITY_KEYS = ("model_utility", "retain_prob")
LOSS_KEYS = ("loss", "forget_loss", "retain_loss")
# unlearn.eval_every: the scored steps (step 0: the base model on the same sample), drawn with markers
EVAL_KEYS = ("eval/forget_prob", "eval/forget_quality", "eval/model_utility", "eval/retain_prob", "eval/objective")
ATTRIBUTE_METRIC = re.compile(r"^mc_acc\.([^.]+)\.(.+)$")
MAIN_MODELS = ("base", "oracle", "merged", "unsplit")  # drawn bold in the lens plot; the job models thin


def _num(v: Any) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def scatter_figure(models: dict[str, dict[str, Any]]) -> Optional[Figure]:
    """Forget (x: ``forget_prob``, else ``forget_quality``) against utility (y: ``model_utility``, else
    ``retain_prob``), one labelled point per model that has both."""
    for xk in FORGET_KEYS:
        for yk in UTILITY_KEYS:
            pts = {n: (_num(m.get(xk)), _num(m.get(yk))) for n, m in models.items()}
            pts = {n: p for n, p in pts.items() if None not in p}
            if pts:
                break
        if pts:
            break
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for name, (x, y) in pts.items():
        ax.scatter([x], [y], s=40, zorder=3)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel(f"{xk} ({'lower' if xk == 'forget_prob' else 'higher'} is better)")
    ax.set_ylabel(f"{yk} (higher is better)")
    ax.set_title("forget vs utility")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def loss_curves_figure(
    histories: dict[str, list[dict[str, Any]]], selected: Optional[dict[str, int]] = None
) -> Optional[Figure]:
    """One panel per loss part present (loss, forget_loss, retain_loss) and per eval curve present
    (``EVAL_KEYS``: rows of ``unlearn.eval_every``), one line per unlearning job, over step; a job's step
    chosen by ``unlearn.select`` (``selected``) is a star on its eval curves."""
    keys = [
        k
        for k in (*LOSS_KEYS, *EVAL_KEYS)
        if any(_num(r.get(k)) is not None for rows in histories.values() for r in rows)
    ]
    if not keys:
        return None
    cols = min(len(keys), 4)
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.6 * nrows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, key in zip(flat, keys):
        for job, rows in histories.items():
            pts = [(int(r["step"]), _num(r.get(key))) for r in rows if "step" in r and _num(r.get(key)) is not None]
            if not pts:
                continue
            (line,) = ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                label=job,
                linewidth=1.2,
                marker="o" if key in EVAL_KEYS else None,
                markersize=3,
            )
            best = (selected or {}).get(job)
            if key in EVAL_KEYS and best is not None and best in dict(pts):
                ax.plot([best], [dict(pts)[best]], marker="*", markersize=12, color=line.get_color())
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in flat[len(keys) :]:
        ax.set_visible(False)
    flat[0].legend(fontsize=8)
    fig.suptitle("unlearning loss curves" + (" and scored steps (star: the chosen step)" if selected else ""))
    fig.tight_layout()
    return fig


def attribute_accuracy_figure(models: dict[str, dict[str, Any]]) -> Optional[Figure]:
    """Grouped bars of ``mc_acc.<attribute>.<value>``: one panel per attribute, one bar per model per value."""
    data: dict[str, dict[str, dict[str, float]]] = {}  # attribute -> value -> model -> acc
    for name, m in models.items():
        for k, v in m.items():
            hit = ATTRIBUTE_METRIC.match(k)
            if hit and _num(v) is not None:
                data.setdefault(hit[1], {}).setdefault(hit[2], {})[name] = float(v)
    if not data:
        return None
    names = [n for n in models if any(n in per for vals in data.values() for per in vals.values())]
    fig, axes = plt.subplots(1, len(data), figsize=(max(5.0, 1.2 * len(names)) * len(data), 4), squeeze=False)
    width = 0.8 / len(names)
    for ax, (attr, vals) in zip(axes[0], sorted(data.items())):
        values = sorted(vals)
        for i, name in enumerate(names):
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(values))]
            ax.bar(xs, [vals[v].get(name, float("nan")) for v in values], width, label=name)
        ax.set_xticks(range(len(values)), values, rotation=30 if len(values) > 4 else 0)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.set_title(f"MC accuracy by {attr}")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def lens_figure(raws: dict[str, dict[str, Any]]) -> Optional[Figure]:
    """The ``lens`` suite's curve of every model that has one (``raw["lens_curve"]`` over ``raw["lens_layers"]``):
    the forget answers' mean probability read from each layer; base, oracle, merged and unsplit bold, the job
    models thin, each curve's peak a dot."""
    curves = {}
    for name, raw in raws.items():
        ys = raw.get("lens_curve") if isinstance(raw, dict) else None
        if ys:
            xs = raw.get("lens_layers") or list(range(1, len(ys) + 1))
            pts = [(int(x), y) for x, y in zip(xs, ys) if _num(y) is not None]
            if pts:
                curves[name] = pts
    if not curves:
        return None
    order = [n for n in MAIN_MODELS if n in curves] + sorted(n for n in curves if n not in MAIN_MODELS)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in order:
        pts, main = curves[name], name in MAIN_MODELS
        (line,) = ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            label=name,
            linewidth=2 if main else 0.8,
            alpha=1 if main else 0.6,
            marker="o" if main else None,
            markersize=3,
        )
        peak = max(pts, key=lambda p: p[1])
        ax.plot([peak[0]], [peak[1]], marker="o", markersize=7, color=line.get_color(), alpha=0.8)
    ax.set_xlabel("layer (its residual stream through the final norm and unembedding)")
    ax.set_ylabel("forget answer probability")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("logit lens: what each layer knows of the forget answers (last layer: the output)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_plots(
    models: dict[str, dict[str, Any]],
    histories: dict[str, list[dict[str, Any]]],
    folder: Path,
    selected: Optional[dict[str, int]] = None,
    raws: Optional[dict[str, dict[str, Any]]] = None,
) -> list[Path]:
    """Save ``scatter.png``, ``loss_curves.png``, ``attribute_accuracy.png`` and ``lens.png`` (from the models'
    ``raws``) into ``folder``, each when there is something to plot; return the files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for fname, fig in (
        ("scatter.png", scatter_figure(models)),
        ("loss_curves.png", loss_curves_figure(histories, selected)),
        ("attribute_accuracy.png", attribute_accuracy_figure(models)),
        ("lens.png", lens_figure(raws or {})),
    ):
        if fig is None:
            continue
        path = folder / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
