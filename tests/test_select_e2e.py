"""Evaluation during unlearning, best-checkpoint selection, the relearning attack and the cost report, end to
end on the tiny offline benchmark: `spunge run` (real Ray, DeepSpeed, mergekit, MLflow), then `--resume`."""

import json
from pathlib import Path

import pytest
import yaml

from tests.test_e2e import spunge

pytestmark = pytest.mark.e2e

STEPS, EVERY = 60, 20
# the example: keep the step of the best 1/2 (forget quality + model utility), utility >= 0.5 x base
RULE = {"weights": {"forget_quality": 0.5, "model_utility": 0.5},
        "constraints": [{"metric": "model_utility", "min_ratio_to_base": 0.5}]}


@pytest.fixture(scope="module")
def run(tiny_bench, tmp_path_factory):
    from orchestrator.cli.demo import demo_config

    bench_dir, meta = tiny_bench[0], tiny_bench[1]
    work = tmp_path_factory.mktemp("select")
    cfg = demo_config(bench_dir, meta, "tiny", work / "run")
    cfg["name"] = "select-e2e"
    cfg["unlearn"].update(max_steps=STEPS, eval_every=EVERY, select={"rule": RULE, "suites": ["qa"], "max_examples": 8})
    cfg["eval"].update(suites=["qa", "relearn"], relearn={"steps": 4, "lr": 3e-4, "fraction": 0.5}, max_examples=16)
    cfg["report"] = {"pretraining_tokens": 1e9}
    (work / "pipe.yaml").write_text(yaml.safe_dump(cfg))
    first = spunge("run", "pipe.yaml", cwd=work)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
    report1 = json.loads((work / "run" / "report.json").read_text())
    scored = {p: p.stat().st_mtime_ns for p in (work / "run").rglob("step_*.eval.json")}
    second = spunge("run", "pipe.yaml", "--resume", cwd=work)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-5000:]
    return {"work": work, "meta": meta, "first": first, "report1": report1, "scored": scored,
            "report2": json.loads((work / "run" / "report.json").read_text())}


def test_each_job_keeps_the_step_its_rule_picks_and_the_merge_gets_it(run):
    jobs = run["report1"]["jobs"]
    assert len(jobs) == 3
    merge_dir = next((run["work"] / "run" / "stages").glob("merge-*"))
    merged_from = json.loads((merge_dir / "spunge_merge.json").read_text())["models"]
    for key, job in jobs.items():
        sel = job["selected"]
        cands = sel["candidates"]
        assert [c["step"] for c in cands] == [EVERY, 2 * EVERY, STEPS] and sel["last_step"] == STEPS
        # every candidate's objective is the rule's, and the chosen step is the best feasible one
        for c in cands:
            assert c["objective_raw"] == pytest.approx(0.5 * c["metrics"]["forget_quality"] + 0.5 * c["metrics"]["model_utility"])
        best = max(cands, key=lambda c: (c["feasible"], c["objective"], c["step"]))
        assert sel["step"] == best["step"]
        assert sel["rule"].startswith("max 0.5*forget_quality + 0.5*model_utility s.t. model_utility >= 0.5 x base")
        # the merge and the evaluation received the chosen step's model; keep: best left only that snapshot
        snapshots = Path(job["output_dir"]) / "snapshots"
        kept = sorted(p.name for p in snapshots.glob("step_*") if p.is_dir())
        if sel["step"] == STEPS:
            assert sel["path"] == job["output_dir"] and kept == []
        else:
            assert sel["path"] == str(snapshots / f"step_{sel['step']:07d}") and kept == [f"step_{sel['step']:07d}"]
        if key.startswith("subset/"):
            assert merged_from[key] == sel["path"]


def test_step_curves_reach_mlflow_and_the_plot(run):
    from mlflow.tracking import MlflowClient

    work, report = run["work"], run["report1"]
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("spunge-demo")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{report['mlflow_run_id']}'")
    by_name = {r.info.run_name: r for r in children}
    for key, job in report["jobs"].items():
        mlrun = by_name["unlearn/" + key.split("/", 1)[-1]]
        curve = {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id, "eval/forget_prob")}
        assert sorted(curve) == [0, EVERY, 2 * EVERY, STEPS]  # step 0: the base model on the job's sample
        by_step = {c["step"]: c for c in job["selected"]["candidates"]}
        assert curve[EVERY] == pytest.approx(by_step[EVERY]["metrics"]["forget_prob"])
        assert curve[0] > curve[STEPS]  # the job unlearned its sample
        objective_steps = [m.step for m in client.get_metric_history(mlrun.info.run_id, "eval/objective")]
        assert sorted(objective_steps) == [EVERY, 2 * EVERY, STEPS]
        assert mlrun.data.tags["spunge.selected_step"] == str(job["selected"]["step"])
    assert (work / "run" / "plots" / "loss_curves.png").exists()


def test_relearn_metrics_per_model_and_the_least_recovered(run):
    models = run["report1"]["models"]
    for name, m in models.items():
        assert m["relearn_gain"] == pytest.approx(m["relearn_forget_prob"] - m["relearn_before_prob"], abs=1e-9), name
    unlearned = {n: m["relearn_gain"] for n, m in models.items() if n not in ("base", "oracle")}
    assert run["report1"]["relearn"]["least_recovery"] == min(unlearned, key=unlearned.get)
    # the attack brings forgotten answers back on the merged model: the held-out forget rows' probability rises
    assert models["merged"]["relearn_gain"] > 0
    out = run["first"].stdout + run["first"].stderr
    assert "recovers least" in out


def test_cost_totals_add_up_and_reach_mlflow(run):
    from mlflow.tracking import MlflowClient

    report = run["report1"]
    cost = report["cost"]
    stages = cost["stages"]
    for k in ("device_s", "tokens", "flops"):
        assert cost["total"][k] == pytest.approx(sum(s[k] for s in stages.values()))
        assert stages["unlearn"][k] == pytest.approx(sum(j[k] for j in cost["jobs"].values()))
    # training: 6 x params x the tokens of every step; every job trained STEPS steps of 8 forget + 8 retain rows
    params = cost["params"]
    for key, job in cost["jobs"].items():
        assert job["flops"] == pytest.approx(6 * params * job["tokens"])
        assert job["tokens"] > STEPS * 16 * 5  # at least 5 tokens per row
    assert stages["select"]["tokens"] > 0 and stages["evaluate"]["tokens"] > 0 and stages["merge"]["device_s"] > 0
    # Yao et al.'s ratio for this run: retraining (6 x params x report.pretraining_tokens) over its FLOPs
    assert cost["retrain_flops"] == pytest.approx(6 * params * 1e9)
    assert cost["retrain_vs_pipeline"] == pytest.approx(cost["retrain_flops"] / cost["total"]["flops"])
    assert cost["retrain_vs_unlearning"] == pytest.approx(
        cost["retrain_flops"] / (stages["unlearn"]["flops"] + stages["select"]["flops"]))
    assert "x the unlearning" in run["first"].stdout + run["first"].stderr
    client = MlflowClient(f"sqlite:///{run['work'] / 'mlflow.db'}")
    parent = client.get_run(report["mlflow_run_id"])
    assert parent.data.metrics["cost.total.flops"] == pytest.approx(cost["total"]["flops"])


def test_resume_reuses_the_choices_without_scoring_again(run):
    r1, r2 = run["report1"], run["report2"]
    assert {k: j["selected"]["step"] for k, j in r1["jobs"].items()} == \
        {k: j["selected"]["step"] for k, j in r2["jobs"].items()}
    assert all(j["reused"] for j in r2["jobs"].values())
    # no snapshot was scored again, and the reused jobs' costs are the ones measured when they ran
    assert {p: p.stat().st_mtime_ns for p in run["scored"]} == run["scored"]
    for stage in ("unlearn", "select"):
        assert r2["cost"]["stages"][stage]["flops"] == pytest.approx(r1["cost"]["stages"][stage]["flops"])
    assert r2["cost"]["stages"]["merge"]["device_s"] > 0  # the reused merge's recorded wall-clock
    assert r2["models"]["merged"]["forget_prob"] == pytest.approx(r1["models"]["merged"]["forget_prob"])
