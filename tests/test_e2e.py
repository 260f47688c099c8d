"""The real pipeline end to end on the tiny offline benchmark: real Ray, DeepSpeed, mergekit, MLflow (sqlite).

Runs `spunge run` as a user would (a subprocess, local Ray, default tracking URI in the working folder),
then `spunge run --resume` with the same config (in this process, on conftest's local Ray), which must start no
new unlearning job. The one run (each costs minutes of Ray Train start-up) serves every check: the demo pipeline
with evaluation during unlearning, best-checkpoint selection, the relearning attack and the cost report switched
on.
"""

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import spunge, spunge_env, spunge_here

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def bench(tiny_bench) -> tuple[Path, dict]:
    return tiny_bench[0], tiny_bench[1]


# secrets a user's environment holds: none may reach MLflow, the report, the logs or the terminal
SECRETS = {
    "HF_TOKEN": "hf_e2eSECRETtoken123",
    "MLFLOW_TRACKING_USERNAME": "alice",
    "MLFLOW_TRACKING_PASSWORD": "mlflowSECRETpw456",
    "RAY_AUTH_TOKEN": "rayauthSECRETtok789ab",
}
STEPS, EVERY = 60, 20
ATTACKS = ["quant", "probes", "lens"]  # with relearn: the robustness gate
# keep the step of the best 1/2 (forget quality + model utility), utility >= 0.5 x base
RULE = {
    "weights": {"forget_quality": 0.5, "model_utility": 0.5},
    "constraints": [{"metric": "model_utility", "min_ratio_to_base": 0.5}],
}


@pytest.fixture(scope="module")
def pipeline(bench, tmp_path_factory, local_ray):
    """The demo config (NPO, TIES, the qa, mc and perplexity suites, the unsplit baseline), with STEPS steps
    scored every EVERY by the RULE, the relearn suite and the other ATTACKS, 16 rows per split, and the
    pretraining tokens for the cost report; run, then resumed."""
    from orchestrator.cli.demo import demo_config

    bench_dir, meta = bench
    work = tmp_path_factory.mktemp("work")
    cfg = demo_config(bench_dir, meta, "tiny", work / "run")
    cfg["name"] = "e2e"
    cfg["unlearn"].update(max_steps=STEPS, eval_every=EVERY, select={"rule": RULE, "suites": ["qa"], "max_examples": 8})
    cfg["eval"].update(
        suites=[*cfg["eval"]["suites"], "relearn", *ATTACKS],
        relearn={"steps": 4, "lr": 3e-4, "fraction": 0.5},
        probes={"in_context_k": 2},
        max_examples=16,
    )
    cfg["report"] = {"pretraining_tokens": 1e9}
    (work / "pipe.yaml").write_text(yaml.safe_dump(cfg))
    peak: list[int] = []
    first = spunge("run", "pipe.yaml", cwd=work, peak=peak, env=spunge_env(**SECRETS))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
    report1 = json.loads((work / "run" / "report.json").read_text())
    mtimes = {k: (Path(j["output_dir"]) / "model.safetensors").stat().st_mtime_ns for k, j in report1["jobs"].items()}
    trainer_runs = sorted(p.name for p in (work / "run" / "ray_train").iterdir())
    scored = {p: p.stat().st_mtime_ns for p in (work / "run").rglob("step_*.eval.json")}
    second = spunge_here("run", "pipe.yaml", "--resume", cwd=work)
    assert second.exit_code == 0, (second.output[-5000:], second.exception)
    report2 = json.loads((work / "run" / "report.json").read_text())
    return {
        "work": work,
        "meta": meta,
        "first": first,
        "report1": report1,
        "report2": report2,
        "scored": scored,
        "mtimes": mtimes,
        "trainer_runs": trainer_runs,
        "peak_ray_processes": max(peak, default=0),
    }


def test_report_has_every_model_and_metric(pipeline):
    models = pipeline["report1"]["models"]
    values = pipeline["meta"]["split_values"]
    assert len(values) == 2
    assert set(models) == {"base", "oracle", "merged", "unsplit", *(f"subset/{v}" for v in values)}
    keys = {
        "forget_prob",
        "forget_rouge",
        "forget_truth_ratio",
        "forget_quality",
        "retain_prob",
        "retain_rouge",
        "model_utility",
        "holdout_prob",
    }
    for name, m in models.items():
        assert keys <= set(m), name
        assert 0 <= m["forget_quality"] <= 1


def test_merged_model_forgot_while_retaining(pipeline):
    m = pipeline["report1"]["models"]
    assert m["base"]["forget_prob"] > 0.5
    assert m["merged"]["forget_prob"] < 0.5 * m["base"]["forget_prob"]
    assert m["merged"]["retain_prob"] > 2 * m["merged"]["forget_prob"]
    assert m["unsplit"]["forget_prob"] < 0.5 * m["base"]["forget_prob"]
    for v in pipeline["meta"]["split_values"]:  # each subset job unlearned something
        assert m[f"subset/{v}"]["forget_prob"] < m["base"]["forget_prob"]


def test_table_is_printed_and_files_written(pipeline):
    out = pipeline["first"].stdout + pipeline["first"].stderr
    assert "spunge report" in out and "merged" in out
    run = pipeline["work"] / "run"
    assert (run / "report.md").exists() and (run / "config.resolved.yaml").exists()


def test_mlflow_parent_run_has_nested_stage_runs(pipeline):
    from mlflow.tracking import MlflowClient

    work, report = pipeline["work"], pipeline["report1"]
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("spunge-demo")
    parent = client.get_run(report["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.info.run_name == "e2e"
    assert parent.data.params["unlearn.method"] == "npo" and parent.data.params["merge.method"] == "ties"
    assert parent.data.metrics["merged.forget_prob"] == pytest.approx(report["models"]["merged"]["forget_prob"])
    assert {"report.json", "report.md", "config.resolved.yaml"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)
    }
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_name = {r.info.run_name: r for r in children}
    values = pipeline["meta"]["split_values"]
    want = {"merge", "unlearn/unsplit", *(f"unlearn/{v}" for v in values), *(f"eval/{m}" for m in report["models"])}
    assert want <= set(by_name), sorted(by_name)
    job = by_name[f"unlearn/{values[0]}"]
    history = client.get_metric_history(job.info.run_id, "forget_loss")
    assert len(history) == report["jobs"][f"subset/{values[0]}"]["final_metrics"]["total_steps"]
    assert history[-1].value > history[0].value  # unlearning pushes the forget loss up
    assert {"loss", "retain_loss", "grad_norm", "lr", "tokens_per_s"} <= set(job.data.metrics)
    assert "merged_model" in {a.path for a in client.list_artifacts(by_name["merge"].info.run_id)}
    assert by_name["eval/merged"].data.metrics["forget_prob"] == pytest.approx(
        report["models"]["merged"]["forget_prob"]
    )


def test_eval_ran_one_cached_task_per_model_and_suite(pipeline):
    suites = yaml.safe_load((pipeline["work"] / "pipe.yaml").read_text())["eval"]["suites"]
    assert len(suites) > 1
    cached = sorted(p.name for p in (pipeline["work"] / "run" / "stages" / "eval").glob("*.json"))
    assert len(cached) == len(pipeline["report1"]["models"]) * len(suites), cached
    for suite in suites:
        assert sum(f"-{suite}-" in name for name in cached) == len(pipeline["report1"]["models"])


def test_report_groups_columns_and_plots_are_written_and_logged(pipeline):
    from mlflow.tracking import MlflowClient

    run = pipeline["work"] / "run"
    out = pipeline["first"].stdout + pipeline["first"].stderr
    assert "spunge report: Forget" in out and "spunge report: Utility" in out
    assert "### Forget" in (run / "report.md").read_text()
    models = pipeline["report1"]["models"]
    want = {"scatter.png", "loss_curves.png"}
    if any(k.startswith("mc_acc.") for m in models.values() for k in m):
        want.add("attribute_accuracy.png")
    assert want <= {p.name for p in (run / "plots").glob("*.png")}
    client = MlflowClient(f"sqlite:///{pipeline['work'] / 'mlflow.db'}")
    for report in (pipeline["report1"], pipeline["report2"]):  # the resumed run plots the reused jobs' curves
        logged = {a.path for a in client.list_artifacts(report["mlflow_run_id"], "plots")}
        assert {f"plots/{n}" for n in want} <= logged, logged
    for job in pipeline["report1"]["jobs"].values():  # each job's step rows, kept for the plots of later runs
        rows = [json.loads(line) for line in (Path(job["output_dir"]) / "history.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, job["final_metrics"]["total_steps"] + 1))


def test_ray_stays_quiet_and_bounded_by_the_work(pipeline):
    """Ray's own lines go to <output_dir>/logs/driver.log, not over the display; the Ray worker processes at
    once stay within what the jobs need (Ray Train runs about 7 per job: the job task, its controller,
    worker, synchronisation, placement-group cleaner and dataset actors) plus the pipeline's few actors."""
    out = pipeline["first"].stdout + pipeline["first"].stderr
    assert "(raylet)" not in out and "Started a local Ray instance" not in out and "Token authentication" not in out
    log = (pipeline["work"] / "run" / "logs" / "driver.log").read_text()
    assert "Started a local Ray instance" in log
    jobs = len(pipeline["report1"]["jobs"])  # all run at once on this cluster (4 logical CPUs, 1 per job)
    assert 0 < pipeline["peak_ray_processes"] <= 8 * jobs + 8, pipeline["peak_ray_processes"]


def test_no_secret_of_the_environment_reaches_any_output(pipeline):
    """Every file the runs wrote (report, plots, logs, stage folders, the MLflow store and artifacts) and
    what they printed, searched for the secret values that were in the first run's environment."""
    work = pipeline["work"]
    blobs = [(str(f), f.read_bytes()) for f in work.rglob("*") if f.is_file()]
    blobs.append(("terminal", (pipeline["first"].stdout + pipeline["first"].stderr).encode()))
    assert len(blobs) > 50 and any(name.endswith("mlflow.db") for name, _ in blobs)
    leaks = [
        (name, key)
        for key, value in SECRETS.items()
        if len(value) > 8
        for name, blob in blobs
        if value.encode() in blob
    ]
    assert leaks == []


def test_resume_starts_no_new_unlearning_job(pipeline):
    r1, r2 = pipeline["report1"], pipeline["report2"]
    assert all(j["reused"] for j in r2["jobs"].values())
    assert all(r2["eval_reused"].values())
    for key, job in r2["jobs"].items():
        assert (Path(job["output_dir"]) / "model.safetensors").stat().st_mtime_ns == pipeline["mtimes"][key]
    assert sorted(p.name for p in (pipeline["work"] / "run" / "ray_train").iterdir()) == pipeline["trainer_runs"]
    assert r2["models"] == r1["models"]
    assert r2["mlflow_run_id"] != r1["mlflow_run_id"]


# ---------------------------------------------------------------------------------------------------
# evaluation during unlearning, best-checkpoint selection, the relearning attack, the cost report


def test_each_job_keeps_the_step_its_rule_picks_and_the_merge_gets_it(pipeline):
    jobs = pipeline["report1"]["jobs"]
    assert len(jobs) == 3
    merge_dir = next((pipeline["work"] / "run" / "stages").glob("merge-*"))
    merged_from = json.loads((merge_dir / "spunge_merge.json").read_text())["models"]
    for key, job in jobs.items():
        sel = job["selected"]
        cands = sel["candidates"]
        assert [c["step"] for c in cands] == [EVERY, 2 * EVERY, STEPS] and sel["last_step"] == STEPS
        # every candidate's objective is the rule's, and the chosen step is the best feasible one
        for c in cands:
            assert c["objective_raw"] == pytest.approx(
                0.5 * c["metrics"]["forget_quality"] + 0.5 * c["metrics"]["model_utility"]
            )
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


def test_step_curves_reach_mlflow_and_the_plot(pipeline):
    from mlflow.tracking import MlflowClient

    work, report = pipeline["work"], pipeline["report1"]
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


def test_relearn_metrics_per_model_and_the_least_recovered(pipeline):
    models = pipeline["report1"]["models"]
    for name, m in models.items():
        assert m["relearn_gain"] == pytest.approx(m["relearn_forget_prob"] - m["relearn_before_prob"], abs=1e-9), name
    unlearned = {n: m["relearn_gain"] for n, m in models.items() if n not in ("base", "oracle")}
    assert pipeline["report1"]["relearn"]["least_recovery"] == min(unlearned, key=unlearned.get)
    # the attack brings forgotten answers back on the merged model: the held-out forget rows' probability rises
    assert models["merged"]["relearn_gain"] > 0
    out = pipeline["first"].stdout + pipeline["first"].stderr
    assert "recovers least" in out


def test_every_attack_is_a_recovery_against_the_base_in_the_robustness_summary(pipeline):
    from jobs.evaluate.suites import recovery

    report, work = pipeline["report1"], pipeline["work"]
    models, rb = report["models"], report["robustness"]
    base, merged = models["base"], models["merged"]
    # each suite's unattacked value is the qa suite's forget_prob on the same 16 rows
    for name, m in models.items():
        for same in ("quant_fp_forget_prob", "probe_direct_prob", "lens_last_prob"):
            assert m[same] == pytest.approx(m["forget_prob"], abs=1e-6), (name, same)
    # the recoveries by hand from the report's own numbers
    for bits in (8, 4):
        a, u = f"quant{bits}_forget_prob", "quant_fp_forget_prob"
        assert merged[f"quant{bits}_recovery"] == pytest.approx(recovery(merged[a], merged[u], base[a], base[u]))
    assert merged["lens_recovery"] == pytest.approx(
        recovery(merged["lens_max_prob"], merged["lens_last_prob"], base["lens_max_prob"], base["lens_last_prob"])
    )
    # the attack kinds: every probe of the answer (the reverse query, which scores the question, is reported only)
    kinds = [
        k
        for k in merged
        if k.startswith("probe_") and k.endswith("_prob") and k not in ("probe_direct_prob", "probe_worst_prob")
    ]
    assert {"probe_prefix_injection_prob", "probe_in_context_prob", "probe_reverse_query_prob"} <= set(kinds)
    kinds.remove("probe_reverse_query_prob")
    assert set(report["parts"]["probes_recovery"]) == set(kinds)
    by_kind = [recovery(merged[k], merged["probe_direct_prob"], base[k], base["probe_direct_prob"]) for k in kinds]
    assert merged["probes_recovery"] == pytest.approx(max(v for v in by_kind if v is not None))
    names = ("quant8_recovery", "quant4_recovery", "probes_recovery", "lens_recovery", "relearn_recovery")
    for name in ("merged", "unsplit"):
        got = {k: models[name][k] for k in names if models[name].get(k) is not None}
        assert got and all(0 <= v <= 1 for v in got.values()), name
        assert models[name]["worst_recovery"] == pytest.approx(max(got.values()))
        assert rb["recovery"][name]["worst_recovery"] == models[name]["worst_recovery"]
    assert "base" not in rb["recovery"] and rb["most_robust"] in rb["recovery"]
    assert "bitsandbytes" in rb["info"]["quant_scheme"]
    assert f"probe_{rb['recovery']['merged']['info']['probe_worst_kind']}_prob" in kinds
    out = pipeline["first"].stdout + pipeline["first"].stderr
    assert "robustness: worst recovery under attack" in out and "Robustness" in out
    assert (work / "run" / "plots" / "lens.png").exists()


def test_cost_totals_add_up_and_reach_mlflow(pipeline):
    from mlflow.tracking import MlflowClient

    report = pipeline["report1"]
    cost = report["cost"]
    stages = cost["stages"]
    for k in ("device_s", "tokens", "flops"):
        assert cost["total"][k] == pytest.approx(sum(s[k] for s in stages.values()))
        assert stages["unlearn"][k] == pytest.approx(sum(j[k] for j in cost["jobs"].values()))
    # training: 6 x params x the tokens of every step; every job trained STEPS steps of 8 forget + 8 retain rows
    params = cost["params"]
    for job in cost["jobs"].values():
        assert job["flops"] == pytest.approx(6 * params * job["tokens"])
        assert job["tokens"] > STEPS * 16 * 5  # at least 5 tokens per row
    assert stages["select"]["tokens"] > 0 and stages["evaluate"]["tokens"] > 0 and stages["merge"]["device_s"] > 0
    # Yao et al.'s ratio for this run: retraining (6 x params x report.pretraining_tokens) over its FLOPs
    assert cost["retrain_flops"] == pytest.approx(6 * params * 1e9)
    assert cost["retrain_vs_pipeline"] == pytest.approx(cost["retrain_flops"] / cost["total"]["flops"])
    assert cost["retrain_vs_unlearning"] == pytest.approx(
        cost["retrain_flops"] / (stages["unlearn"]["flops"] + stages["select"]["flops"])
    )
    assert "x the unlearning" in pipeline["first"].stdout + pipeline["first"].stderr
    client = MlflowClient(f"sqlite:///{pipeline['work'] / 'mlflow.db'}")
    parent = client.get_run(report["mlflow_run_id"])
    assert parent.data.metrics["cost.total.flops"] == pytest.approx(cost["total"]["flops"])


def test_resume_reuses_the_choices_without_scoring_again(pipeline):
    r1, r2 = pipeline["report1"], pipeline["report2"]
    assert {k: j["selected"]["step"] for k, j in r1["jobs"].items()} == {
        k: j["selected"]["step"] for k, j in r2["jobs"].items()
    }
    assert all(j["reused"] for j in r2["jobs"].values())
    # no snapshot was scored again, and the reused jobs' costs are the ones measured when they ran
    assert {p: p.stat().st_mtime_ns for p in pipeline["scored"]} == pipeline["scored"]
    for stage in ("unlearn", "select"):
        assert r2["cost"]["stages"][stage]["flops"] == pytest.approx(r1["cost"]["stages"][stage]["flops"])
    assert r2["cost"]["stages"]["merge"]["device_s"] > 0  # the reused merge's recorded wall-clock
    assert r2["models"]["merged"]["forget_prob"] == pytest.approx(r1["models"]["merged"]["forget_prob"])


def test_a_diverging_job_fails_the_run_with_one_clear_line(tiny_dir, tmp_path, local_ray):
    """``spunge run`` in this process on its local Ray (conftest's ``local_ray``)."""
    cfg = {
        "model": {"path": str(tiny_dir / "model")},
        "data": {"forget": str(tiny_dir / "forget.jsonl"), "retain": str(tiny_dir / "retain.jsonl")},
        "split": {"attribute": "group", "groups": {"north": ["north"]}, "baseline": "none"},  # one job
        "unlearn": {
            "method": "ga",
            "optimizer": {"name": "sgd", "lr": 1e30},
            "max_steps": 20,
            "batch_size": 4,
            "checkpoint_every": 2,
        },
        "deepspeed": {"gradient_clipping": 0.0},
        "scaling": {"max_failures": 3},  # restarts for crashes; a diverging loss is not one
        "eval": {"max_examples": 4},
    }
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    r = spunge_here("run", "bad.yaml", cwd=tmp_path)
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.exception  # the CLI's exit, no other error
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr[-3000:]
    assert "unlearn subset/north" in errors[0] and "loss became" in errors[0] and "(method ga" in errors[0]
    assert "Traceback" not in r.stderr and not (tmp_path / "spunge-output" / "report.json").exists()
    attempts = list((tmp_path / "spunge-output" / "stages" / "unlearn").glob("*/attempts.jsonl"))
    assert len(attempts) == 1 and len(attempts[0].read_text().splitlines()) == 1  # failed at once, no retry
