"""The real pipeline end to end on the tiny offline benchmark: real Ray, DeepSpeed, mergekit, MLflow (sqlite).

Runs `spunge run` as a user would (a subprocess, local Ray, default tracking URI in the working folder),
then `spunge run --resume` with the same config, which must start no new unlearning job.
"""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import psutil
import pytest
import yaml

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def bench(tiny_bench) -> tuple[Path, dict]:
    return tiny_bench[0], tiny_bench[1]


# secrets a user's environment holds: none may reach MLflow, the report, the logs or the terminal
SECRETS = {"HF_TOKEN": "hf_e2eSECRETtoken123", "MLFLOW_TRACKING_USERNAME": "alice",
           "MLFLOW_TRACKING_PASSWORD": "mlflowSECRETpw456", "RAY_AUTH_TOKEN": "rayauthSECRETtok789ab"}


def spunge(*args: str, cwd: Path, peak: Optional[list] = None, secrets: bool = False) -> subprocess.CompletedProcess:
    """Run the CLI as a user would; with ``peak``, also record the most Ray worker processes (``ray::...``)
    under it at once; with ``secrets``, with ``SECRETS`` in its environment."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    if secrets:
        env.update(SECRETS)
    exe = Path(sys.executable).with_name("spunge")
    proc = subprocess.Popen([str(exe), *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    if peak is not None:
        def sample():
            while proc.poll() is None:
                try:
                    kids = psutil.Process(proc.pid).children(recursive=True)
                    n = sum(1 for k in kids if k.cmdline()[:1] and k.cmdline()[0].startswith("ray::"))
                except psutil.Error:
                    n = 0
                peak.append(n)
                time.sleep(0.5)

        threading.Thread(target=sample, daemon=True).start()
    out, err = proc.communicate(timeout=900)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def pipeline(bench, tmp_path_factory):
    from orchestrator.cli.demo import demo_config

    bench_dir, meta = bench
    work = tmp_path_factory.mktemp("work")
    cfg = demo_config(bench_dir, meta, "tiny", work / "run")
    cfg["name"] = "e2e"
    (work / "pipe.yaml").write_text(yaml.safe_dump(cfg))
    peak: list[int] = []
    first = spunge("run", "pipe.yaml", cwd=work, peak=peak, secrets=True)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
    report1 = json.loads((work / "run" / "report.json").read_text())
    mtimes = {k: (Path(j["output_dir"]) / "model.safetensors").stat().st_mtime_ns for k, j in report1["jobs"].items()}
    trainer_runs = sorted(p.name for p in (work / "run" / "ray_train").iterdir())
    second = spunge("run", "pipe.yaml", "--resume", cwd=work)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-5000:]
    report2 = json.loads((work / "run" / "report.json").read_text())
    return {"work": work, "meta": meta, "first": first, "report1": report1, "report2": report2,
            "mtimes": mtimes, "trainer_runs": trainer_runs, "peak_ray_processes": max(peak, default=0)}


def test_report_has_every_model_and_metric(pipeline):
    models = pipeline["report1"]["models"]
    values = pipeline["meta"]["split_values"]
    assert len(values) == 2
    assert set(models) == {"base", "oracle", "merged", "unsplit", *(f"subset/{v}" for v in values)}
    keys = {"forget_prob", "forget_rouge", "forget_truth_ratio", "forget_quality", "retain_prob", "retain_rouge",
            "model_utility", "holdout_prob"}
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
    assert {"report.json", "report.md", "config.resolved.yaml"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_name = {r.info.run_name: r for r in children}
    values = pipeline["meta"]["split_values"]
    want = {"merge", "unlearn/unsplit", *(f"unlearn/{v}" for v in values),
            *(f"eval/{m}" for m in report["models"])}
    assert want <= set(by_name), sorted(by_name)
    job = by_name[f"unlearn/{values[0]}"]
    history = client.get_metric_history(job.info.run_id, "forget_loss")
    assert len(history) == report["jobs"][f"subset/{values[0]}"]["final_metrics"]["total_steps"]
    assert history[-1].value > history[0].value  # unlearning pushes the forget loss up
    assert {"loss", "retain_loss", "grad_norm", "lr", "tokens_per_s"} <= set(job.data.metrics)
    assert "merged_model" in {a.path for a in client.list_artifacts(by_name["merge"].info.run_id)}
    assert by_name["eval/merged"].data.metrics["forget_prob"] == pytest.approx(report["models"]["merged"]["forget_prob"])


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
        rows = [json.loads(l) for l in (Path(job["output_dir"]) / "history.jsonl").read_text().splitlines()]
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
    leaks = [(name, key) for key, value in SECRETS.items() if len(value) > 8
             for name, blob in blobs if value.encode() in blob]
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


def test_a_diverging_job_fails_the_run_with_one_clear_line(tiny_dir, tmp_path):
    cfg = {
        "model": {"path": str(tiny_dir / "model")},
        "data": {"forget": str(tiny_dir / "forget.jsonl"), "retain": str(tiny_dir / "retain.jsonl")},
        "split": {"attribute": "group", "baseline": "none"},
        "unlearn": {"method": "ga", "optimizer": {"name": "sgd", "lr": 1e30}, "max_steps": 20, "batch_size": 4,
                    "checkpoint_every": 2},
        "deepspeed": {"gradient_clipping": 0.0},
        "scaling": {"max_failures": 3},  # restarts for crashes; a diverging loss is not one
        "eval": {"max_examples": 4},
    }
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    r = spunge("run", "bad.yaml", cwd=tmp_path)
    assert r.returncode == 1
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1, r.stderr[-3000:]
    assert "unlearn subset/" in errors[0] and "loss became" in errors[0] and "(method ga" in errors[0]
    assert "Traceback" not in r.stderr and not (tmp_path / "spunge-output" / "report.json").exists()
    attempts = list((tmp_path / "spunge-output" / "stages" / "unlearn").glob("*/attempts.jsonl"))
    assert attempts and all(len(a.read_text().splitlines()) == 1 for a in attempts)  # failed at once, no retry
