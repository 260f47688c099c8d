"""Plots (orchestrator/tracking/plots.py) and the grouped report (orchestrator/stages/report.py) on hand-made
results."""

import json

import numpy as np
import pytest
from rich.console import Console

from orchestrator.stages.report import group_columns, markdown, metric_group, write_report
from orchestrator.tracking import plots

MODELS = {
    "base": {
        "forget_prob": 0.9,
        "model_utility": 0.6,
        "retain_prob": 0.9,
        "mc_acc": 0.7,
        "mc_acc.genre.poem": 0.8,
        "mc_acc.genre.play": 0.6,
        "mc_acc.era.old": 0.5,
    },
    "merged": {
        "forget_prob": 0.2,
        "model_utility": 0.5,
        "retain_prob": 0.8,
        "mc_acc": 0.4,
        "mc_acc.genre.poem": 0.3,
        "mc_acc.genre.play": 0.5,
        "mc_acc.era.old": 0.25,
    },
    "no-utility": {"forget_prob": 0.5},
}
HISTORIES = {
    "subset/a": [
        {"step": s, "total_steps": 3, "loss": 1.0 - 0.1 * s, "forget_loss": 2.0 + s, "retain_loss": 0.5}
        for s in (1, 2, 3)
    ],
    "unsplit": [
        {"step": s, "total_steps": 2, "loss": 3.0 * s, "forget_loss": 4.0, "retain_loss": float("nan")} for s in (1, 2)
    ],
}


def test_scatter_puts_each_model_at_its_forget_and_utility():
    fig = plots.scatter_figure(MODELS)
    ax = fig.axes[0]
    points = {t.get_text(): tuple(t.xy) for t in ax.texts}
    assert points == {"base": (0.9, 0.6), "merged": (0.2, 0.5)}  # no model_utility: not plotted
    offsets = sorted(tuple(c.get_offsets()[0]) for c in ax.collections)
    assert offsets == [(0.2, 0.5), (0.9, 0.6)]
    assert ax.get_xlabel().startswith("forget_prob") and ax.get_ylabel().startswith("model_utility")


def test_scatter_falls_back_to_retain_prob_and_skips_without_forget_metrics():
    fig = plots.scatter_figure({"m": {"forget_prob": 0.3, "retain_prob": 0.7}})
    assert fig.axes[0].get_ylabel().startswith("retain_prob")
    assert plots.scatter_figure({"m": {"mia_loss_auc": 0.5}}) is None


def test_loss_curves_have_one_line_per_job_per_loss_part():
    fig = plots.loss_curves_figure(HISTORIES)
    assert [ax.get_title() for ax in fig.axes] == ["loss", "forget_loss", "retain_loss"]
    lines = {
        (ax.get_title(), line.get_label()): (list(line.get_xdata()), list(line.get_ydata()))
        for ax in fig.axes
        for line in ax.get_lines()
    }
    assert lines[("loss", "subset/a")] == ([1, 2, 3], pytest.approx([0.9, 0.8, 0.7]))
    assert lines[("loss", "unsplit")] == ([1, 2], [3.0, 6.0])
    assert lines[("forget_loss", "subset/a")][1] == [3.0, 4.0, 5.0]
    assert ("retain_loss", "unsplit") not in lines  # only NaN: no line
    assert plots.loss_curves_figure({}) is None


def test_attribute_bars_hold_each_models_accuracy_per_value():
    fig = plots.attribute_accuracy_figure(MODELS)
    by_title = {ax.get_title(): ax for ax in fig.axes}
    assert set(by_title) == {"MC accuracy by genre", "MC accuracy by era"}
    ax = by_title["MC accuracy by genre"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["play", "poem"]
    heights = {c.get_label(): [p.get_height() for p in c.patches] for c in ax.containers}
    assert heights == {"base": [0.6, 0.8], "merged": [0.5, 0.3]}
    assert plots.attribute_accuracy_figure({"m": {"mc_acc": 0.5, "forget_prob": 0.1}}) is None


def test_write_plots_writes_pngs_and_skips_what_is_absent(tmp_path):
    import matplotlib.image as mpimg

    paths = plots.write_plots(MODELS, HISTORIES, tmp_path / "plots")
    assert [p.name for p in paths] == ["scatter.png", "loss_curves.png", "attribute_accuracy.png"]
    for p in paths:
        img = mpimg.imread(p)
        assert img.ndim == 3 and img.shape[0] > 200 and np.ptp(img) > 0  # a real, non-blank image
    no_mc = {k: {m: v for m, v in d.items() if not m.startswith("mc_")} for k, d in MODELS.items()}
    assert [p.name for p in plots.write_plots(no_mc, {}, tmp_path / "p2")] == ["scatter.png"]


def test_metrics_are_grouped_and_detail_metrics_stay_out_of_the_table():
    names = [
        "forget_prob",
        "forget_quality",
        "forget_exact_mem",
        "retain_prob",
        "model_utility",
        "holdout_prob",
        "mia_loss_auc",
        "privleak",
        "mc_acc",
        "mc_acc.genre.poem",
        "retain_perplexity",
        "weird",
    ]
    assert {n: metric_group(n) for n in names} == {
        "forget_prob": "Forget",
        "forget_quality": "Forget",
        "forget_exact_mem": "Memorization",
        "retain_prob": "Utility",
        "model_utility": "Utility",
        "holdout_prob": "Privacy",
        "mia_loss_auc": "Privacy",
        "privleak": "Privacy",
        "mc_acc": "MC",
        "mc_acc.genre.poem": "MC",
        "retain_perplexity": "Utility",
        "weird": "Other",
    }
    cols = group_columns(names)
    assert list(cols) == ["Forget", "Utility", "Privacy", "Memorization", "MC", "Other"]
    assert cols["Forget"] == ["forget_prob", "forget_quality"]  # headline order
    assert cols["Utility"] == ["retain_prob", "model_utility", "retain_perplexity"]
    assert cols["MC"] == ["mc_acc"]


def test_write_report_prints_group_tables_and_keeps_every_metric_in_json(tmp_path):
    report = {"models": MODELS, "mlflow_run_id": "r1"}
    console = Console(record=True, width=200)
    paths = write_report(report, tmp_path, console)
    text = console.export_text()
    for title in ("spunge report: Forget", "spunge report: Utility", "spunge report: MC"):
        assert title in text
    assert "0.900" in text and "genre" not in text  # per-value detail only in report.json and the plot
    assert json.loads(paths[0].read_text())["models"]["merged"]["mc_acc.era.old"] == 0.25
    md = markdown(report)
    assert "### Forget" in md and "| merged | 0.200 |" in md
