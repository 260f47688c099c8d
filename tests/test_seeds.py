"""Seeds as an axis: the statistics over seeds against hand-computed values, and `spunge run --seeds` through
the real CLI, seeds loop, pipeline driver and MLflow, its stages stubbed with canned reports (the pipeline
itself is tests/test_e2e.py's)."""

import json
import math
from pathlib import Path

import pytest
import yaml

from orchestrator.experiments.seeds import SeedsError, mean_ci, paired_test, parse_seeds, seeded, summarize
from tests.conftest import cli, spunge_here

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
    reports = {
        s: {
            "models": {
                "merged": {"forget_prob": f, "model_utility": 0.8, "only_some": 1.0 if s else None},
                "unsplit": {"forget_prob": u, "model_utility": 0.7},
                "base": {"forget_prob": 0.9},
            }
        }
        for s, f, u in ((0, 0.10, 0.20), (1, 0.30, 0.50), (2, 0.20, 0.25))
    }
    s = summarize(reports)
    assert s["seeds"] == [0, 1, 2] and set(s["models"]) == {"merged", "unsplit"}
    assert set(s["models"]["merged"]) == {"forget_prob", "model_utility"}  # a metric some seeds lack is left out
    assert s["models"]["merged"]["forget_prob"]["mean"] == pytest.approx(0.2)
    assert s["paired"]["forget_prob"]["p_value"] == pytest.approx(
        paired_test([0.1, 0.3, 0.2], [0.2, 0.5, 0.25])["p_value"]
    )
    assert s["paired"]["model_utility"]["p_value"] is None  # a constant difference


def test_seed_lists_and_seeded_configs(tmp_path):
    from orchestrator.config.schema import PipelineConfig

    assert parse_seeds("0,1,2") == [0, 1, 2] and parse_seeds("0-3") == [0, 1, 2, 3] and parse_seeds(None) is None
    for bad in ("a", "1,1", ""):
        with pytest.raises(SeedsError, match="--seeds: expected"):
            parse_seeds(bad)
    cfg = PipelineConfig.model_validate(
        {
            "name": "p",
            "model": {"path": "m"},
            "data": {"forget": {"path": "f"}},
            "split": {"by": "attribute", "attribute": "a"},
            "storage": {"output_dir": str(tmp_path / "out")},
        }
    )
    c = seeded(cfg, 3)
    assert (c.unlearn.seed, c.name, c.storage.output_dir) == (3, "p/seed3", str(tmp_path / "out" / "seed3"))
    assert cfg.unlearn.seed == 0  # the original is untouched


def test_a_bad_seeds_value_exits_2_with_one_line(tmp_path):
    cfg = tmp_path / "pipe.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": {"path": "org/m"},
                "data": {"forget": "/nope.jsonl"},
                "split": {"by": "attribute", "attribute": "a"},
                "seeds": [0, 0],
            }
        )
    )
    res = cli("validate", cfg)
    assert res.exit_code == 2 and "seeds: expected a list of distinct integers" in res.stderr
    res = cli("run", cfg, "--seeds", "x")
    assert res.exit_code == 2 and "--seeds: expected integers" in res.stderr


# `spunge run --seeds` in this process on the tiny data, every stage after prepare replaced by canned reports:
# forget_prob of the merged and the unsplit model per seed (test_paired_test_by_hand's numbers)
CANNED = {0: (0.10, 0.20), 1: (0.30, 0.50), 2: (0.20, 0.25)}


@pytest.fixture
def seeds_run(tiny_dir, tmp_path, monkeypatch):
    """``spunge run pipe.yaml --seeds 0-2``: the real CLI, seeds loop and ``run_pipeline`` with real MLflow
    (sqlite in the working folder) and the real prepare stage; no Ray, and in place of the unlearn, merge,
    evaluate and report stages the jobs ``plan_jobs`` plans for the seed's config and a canned report.
    Returns (CLI result, {seed: (the seed's config, its report)})."""
    import orchestrator.pipeline as P
    import orchestrator.remote.ray_init as R
    from orchestrator.stages.unlearn import plan_jobs

    cfg = {
        "name": "seeds-e2e",
        "model": {"path": str(tiny_dir / "model")},
        "data": {"forget": str(tiny_dir / "forget.jsonl"), "retain": str(tiny_dir / "retain.jsonl")},
        "split": {"attribute": "group"},
        "storage": {"output_dir": "run"},
    }
    (tmp_path / "pipe.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.setattr(R, "init_ray", lambda *a, **k: None)
    monkeypatch.setattr(R, "ray_address", lambda: "(none: stubbed)")
    real_stages, seen = P.run_stages, {}

    def stages(ctx, names=tuple(P.STAGES)):
        if list(names) == ["prepare"]:
            return real_stages(ctx, names)
        merged, unsplit = CANNED[ctx.cfg.unlearn.seed]
        ctx.report = {
            "models": {
                "merged": {"forget_prob": merged, "model_utility": 0.8},
                "unsplit": {"forget_prob": unsplit, "model_utility": 0.7},
                "base": {"forget_prob": 0.9, "model_utility": 0.8},
            },
            "jobs": {j.key: {"stage_hash": j.hash} for j in plan_jobs(ctx)},
            "mlflow_run_id": ctx.run_id,
        }
        seen[ctx.cfg.unlearn.seed] = (ctx.cfg, ctx.report)
        return ctx

    monkeypatch.setattr(P, "run_stages", stages)
    return spunge_here("run", "pipe.yaml", "--seeds", "0-2", cwd=tmp_path), seen


def test_run_over_seeds_nests_each_seed_under_the_variant_and_summarizes(seeds_run, tmp_path):
    from mlflow.tracking import MlflowClient

    res, seen = seeds_run
    assert res.exit_code == 0, res.output[-5000:]
    assert sorted(seen) == [0, 1, 2] and "spunge seeds" in res.output
    for s, (cfg, _) in seen.items():  # each seed a pipeline of its own: seed, name, folder
        assert (cfg.unlearn.seed, cfg.name, Path(cfg.storage.output_dir).name) == (s, f"seeds-e2e/seed{s}", f"seed{s}")
    # the seed is an input of every job: plan_jobs gives every job a stage hash of its own per seed
    jobs = {s: report["jobs"] for s, (_, report) in seen.items()}
    assert set(jobs[0]) == {"subset/north", "subset/south", "unsplit"}
    for key in jobs[0]:
        assert len({jobs[s][key]["stage_hash"] for s in jobs}) == 3, key
    # the summary: mean, sd and Student-t interval over the seeds, merged vs unsplit paired by seed
    summary = json.loads((tmp_path / "run" / "seeds.json").read_text())["seeds-e2e"]
    assert summary["seeds"] == [0, 1, 2] and set(summary["models"]) == {"merged", "unsplit"}
    fp, up = ([CANNED[s][i] for s in (0, 1, 2)] for i in (0, 1))
    st = summary["models"]["merged"]["forget_prob"]
    half = T_975_DF2 * 0.1 / math.sqrt(3)
    assert (st["mean"], st["sd"], st["half_width"]) == pytest.approx((0.2, 0.1, half))
    assert (st["ci_low"], st["ci_high"]) == pytest.approx((0.2 - half, 0.2 + half))
    assert summary["models"]["unsplit"]["forget_prob"]["mean"] == pytest.approx(sum(up) / 3)
    assert summary["paired"]["forget_prob"]["p_value"] == pytest.approx(paired_test(fp, up)["p_value"])
    assert summary["paired"]["model_utility"]["p_value"] is None  # a constant difference
    # MLflow: one run for the variant holding the summary, each seed's pipeline run nested under it
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("spunge")
    group = client.search_runs([exp.experiment_id], "attributes.run_name = 'seeds-e2e'")[0]
    assert group.info.status == "FINISHED"
    assert group.data.metrics["merged.forget_prob.mean"] == pytest.approx(0.2)
    assert group.data.metrics["merged.forget_prob.ci_high"] == pytest.approx(0.2 + half)
    assert group.data.metrics["paired.forget_prob.p_value"] == pytest.approx(paired_test(fp, up)["p_value"])
    assert "seeds.json" in {a.path for a in client.list_artifacts(group.info.run_id)}
    for s, (_, report) in seen.items():
        run = client.get_run(report["mlflow_run_id"])
        assert run.data.tags["mlflow.parentRunId"] == group.info.run_id and run.info.run_name == f"seeds-e2e/seed{s}"
        assert run.data.params["unlearn.seed"] == str(s) and run.info.status == "FINISHED"
        assert group.data.tags[f"spunge.run.seed{s}"] == run.info.run_id
