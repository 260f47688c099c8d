"""Seeds as an axis: the statistics over seeds against hand-computed values, and `spunge run --seeds` end to end."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.experiments.seeds import SeedsError, mean_ci, paired_test, parse_seeds, seeded, summarize

T_975_DF2 = 4.302652729911275  # Student's t, 97.5th percentile, 2 degrees of freedom (tables)


def test_mean_and_interval_by_hand():
    s = mean_ci([0.1, 0.2, 0.3])
    assert s["mean"] == pytest.approx(0.2) and s["sd"] == pytest.approx(0.1)  # sqrt((0.01 + 0 + 0.01) / 2)
    assert s["half_width"] == pytest.approx(T_975_DF2 * 0.1 / math.sqrt(3))
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((0.2 - s["half_width"], 0.2 + s["half_width"]))
    x = 2.83729618060969e-06  # sum([x] * 3) / 3 != x: an sd of 1e-21 would be rounding noise
    equal = mean_ci([x] * 3)
    assert equal["mean"] == x and equal["sd"] == 0 and equal["half_width"] == 0
    assert paired_test([2 * x] * 3, [x] * 3)["p_value"] is None  # every difference equal: no test
    assert math.isnan(mean_ci([math.nan, 0.1, 0.2])["half_width"])  # a diverged seed shows, it does not raise
    one = mean_ci([0.4])
    assert one["mean"] == 0.4 and one["half_width"] is None and one["ci_low"] is None


def test_paired_test_by_hand():
    merged, unsplit = [0.10, 0.30, 0.20], [0.20, 0.50, 0.25]
    d = [-0.10, -0.20, -0.05]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    t = mean / (sd / math.sqrt(3))
    p = 1 - abs(t) / math.sqrt(2 + t * t)  # the two-sided p of Student's t with 2 degrees of freedom, closed form
    res = paired_test(merged, unsplit)
    assert res["mean"] == pytest.approx(mean) and res["t"] == pytest.approx(t) and res["p_value"] == pytest.approx(p)
    assert res["half_width"] == pytest.approx(T_975_DF2 * sd / math.sqrt(3))
    assert paired_test([1.0, 2.0], [0.0, 1.0])["p_value"] is None  # every difference equal: no test
    assert paired_test([1.0], [0.0])["p_value"] is None


def test_summary_over_seeds_pairs_merged_with_unsplit_by_seed():
    reports = {s: {"models": {"merged": {"forget_prob": f, "model_utility": 0.8, "only_some": 1.0 if s else None},
                              "unsplit": {"forget_prob": u, "model_utility": 0.7}, "base": {"forget_prob": 0.9}}}
               for s, f, u in ((0, 0.10, 0.20), (1, 0.30, 0.50), (2, 0.20, 0.25))}
    s = summarize(reports)
    assert s["seeds"] == [0, 1, 2] and set(s["models"]) == {"merged", "unsplit"}
    assert set(s["models"]["merged"]) == {"forget_prob", "model_utility"}  # a metric some seeds lack is left out
    assert s["models"]["merged"]["forget_prob"]["mean"] == pytest.approx(0.2)
    assert s["paired"]["forget_prob"]["p_value"] == pytest.approx(paired_test([0.1, 0.3, 0.2], [0.2, 0.5, 0.25])["p_value"])
    assert s["paired"]["model_utility"]["p_value"] is None  # a constant difference


def test_seed_lists_and_seeded_configs(tmp_path):
    from orchestrator.config.schema import PipelineConfig

    assert parse_seeds("0,1,2") == [0, 1, 2] and parse_seeds("0-3") == [0, 1, 2, 3] and parse_seeds(None) is None
    for bad in ("a", "1,1", ""):
        with pytest.raises(SeedsError, match="--seeds: expected"):
            parse_seeds(bad)
    cfg = PipelineConfig.model_validate({"name": "p", "model": {"path": "m"}, "data": {"forget": {"path": "f"}},
                                         "split": {"by": "attribute", "attribute": "a"},
                                         "storage": {"output_dir": str(tmp_path / "out")}})
    c = seeded(cfg, 3)
    assert (c.unlearn.seed, c.name, c.storage.output_dir) == (3, "p/seed3", str(tmp_path / "out" / "seed3"))
    assert cfg.unlearn.seed == 0  # the original is untouched


def test_a_bad_seeds_value_exits_2_with_one_line(tmp_path):
    exe = Path(sys.executable).with_name("spunge")
    cfg = tmp_path / "pipe.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"path": "org/m"}, "data": {"forget": "/nope.jsonl"},
                                   "split": {"by": "attribute", "attribute": "a"}, "seeds": [0, 0]}))
    res = subprocess.run([str(exe), "validate", str(cfg)], capture_output=True, text=True)
    assert res.returncode == 2 and "seeds: expected a list of distinct integers" in res.stderr
    res = subprocess.run([str(exe), "run", str(cfg), "--seeds", "x"], capture_output=True, text=True)
    assert res.returncode == 2 and "--seeds: expected integers" in res.stderr


@pytest.mark.e2e
def test_run_over_seeds_nests_each_seed_under_the_variant_and_summarizes(tiny_bench, tmp_path):
    from mlflow.tracking import MlflowClient

    from orchestrator.cli.demo import demo_config
    from tests.test_e2e import spunge

    bench_dir, meta = tiny_bench[0], tiny_bench[1]
    cfg = demo_config(bench_dir, meta, "tiny", tmp_path / "run")
    cfg["name"] = "seeds-e2e"
    cfg["unlearn"]["max_steps"] = 10
    cfg["eval"].update(suites=["qa"], max_examples=12)
    (tmp_path / "pipe.yaml").write_text(yaml.safe_dump(cfg))
    res = spunge("run", "pipe.yaml", "--seeds", "0,1", cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    reports = {s: json.loads((tmp_path / "run" / f"seed{s}" / "report.json").read_text()) for s in (0, 1)}
    jobs = [{k: j["stage_hash"] for k, j in r["jobs"].items()} for r in reports.values()]
    assert all(jobs[0][k] != jobs[1][k] for k in jobs[0])  # the seed is an input of every job
    summary = json.loads((tmp_path / "run" / "seeds.json").read_text())["seeds-e2e"]
    assert summary["seeds"] == [0, 1]
    fp = [reports[s]["models"]["merged"]["forget_prob"] for s in (0, 1)]
    assert summary["models"]["merged"]["forget_prob"]["mean"] == pytest.approx(sum(fp) / 2)
    up = [reports[s]["models"]["unsplit"]["forget_prob"] for s in (0, 1)]
    assert summary["paired"]["forget_prob"]["p_value"] == pytest.approx(paired_test(fp, up)["p_value"])
    assert "spunge seeds" in res.stdout + res.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("spunge-demo")
    group = client.search_runs([exp.experiment_id], "attributes.run_name = 'seeds-e2e'")[0]
    assert group.info.status == "FINISHED"
    assert group.data.metrics["merged.forget_prob.mean"] == pytest.approx(sum(fp) / 2)
    for s in (0, 1):  # each seed is its own pipeline run, nested under the variant's run
        run = client.get_run(reports[s]["mlflow_run_id"])
        assert run.data.tags["mlflow.parentRunId"] == group.info.run_id and run.info.run_name == f"seeds-e2e/seed{s}"
        assert run.data.params["unlearn.seed"] == str(s)
    assert "seeds.json" in {a.path for a in client.list_artifacts(group.info.run_id)}
