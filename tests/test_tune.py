"""``spunge tune``: the tune section (space parsing, path checks), the objective (hand-computed), and one real
search of 3 trials on the tiny offline benchmark (Ray Tune + Ray Train + DeepSpeed + mergekit + MLflow)."""

import csv
import json
import math
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from orchestrator.config.loading import load_config, load_tune
from orchestrator.config.objective import Objective, ObjectiveError, best_trial, objective_value
from orchestrator.config.parse import parse_config
from orchestrator.config.schema import ConfigError
from orchestrator.config.space import search_space
from orchestrator.config.tune import TuneSection, parse_tune
from tests.conftest import cli, spunge


def _pipeline(tiny_dir: Path) -> dict:
    return {
        "model": {"path": str(tiny_dir / "model")},
        "data": {"forget": str(tiny_dir / "forget.jsonl"), "retain": str(tiny_dir / "retain.jsonl")},
        "split": {"attribute": "group"},
        "unlearn": {"method": "npo", "max_steps": 4, "batch_size": 4},
    }


# ---------------------------------------------------------------------------------------------------
# the section


def test_space_becomes_ray_tune_domains():
    from ray.tune.search.sample import Categorical, Float, Integer

    space = search_space(
        {
            "unlearn.optimizer.lr": {"loguniform": [1e-5, 1e-3]},
            "unlearn.max_steps": {"randint": [2, 9]},
            "unlearn.params.beta": {"uniform": [0.05, 0.5]},
            "merge.method": {"choice": ["ties", "linear"]},
            "unlearn.seed": {"grid": [0, 1]},
        }
    )
    lr = space["unlearn.optimizer.lr"]
    assert isinstance(lr, Float) and (lr.lower, lr.upper) == (1e-5, 1e-3) and "LogUniform" in type(lr.sampler).__name__
    steps = space["unlearn.max_steps"]
    assert isinstance(steps, Integer) and (steps.lower, steps.upper) == (2, 9)
    assert all(2 <= steps.sample() < 9 for _ in range(50))
    assert isinstance(space["merge.method"], Categorical) and space["merge.method"].categories == ["ties", "linear"]
    assert space["unlearn.seed"] == {"grid_search": [0, 1]}


@pytest.mark.parametrize(
    "dist, msg",
    [
        ({"uniform": [1, 0]}, "low < high"),
        ({"loguniform": [0, 1]}, "low > 0"),
        ({"randint": [0.5, 3]}, "integers"),
        ({"choice": []}, "non-empty list"),
        ({"normal": [0, 1]}, "expected one of"),
    ],
)
def test_bad_distributions_are_named(dist, msg):
    with pytest.raises(ValidationError) as e:
        TuneSection.model_validate({"space": {"unlearn.optimizer.lr": dist}, "objective": {"metric": "forget_quality"}})
    assert "unlearn.optimizer.lr" in str(e.value) and msg in str(e.value)


def test_paths_are_checked_against_the_pipeline(tiny_dir):
    cfg = parse_config(_pipeline(tiny_dir))
    ok = parse_tune(
        {
            "space": {"unlearn.optimizer.lr": {"choice": [1e-4, 3e-4]}, "unlearn.params.beta": {"uniform": [0.1, 0.5]}},
            "objective": {"metric": "forget_quality"},
            "scheduler": "asha",
        },
        cfg,
    )
    assert ok.scheduler.name == "asha" and ok.search == "random"
    with pytest.raises(ConfigError) as e:
        parse_tune(
            {
                "space": {
                    "unlearn.optimizer.lrr": {"choice": [1e-4]},
                    "unlearn.batch_size": {"choice": [4, 0]},
                    "eval.max_examples": {"choice": [4]},
                    "unlearn.method.x": {"choice": [1]},
                },
                "objective": {"metric": "forget_quality"},
            },
            cfg,
        )
    p = e.value.problems
    assert len(p) == 4, p
    assert p[0].startswith("tune.space.unlearn.optimizer.lrr: no such config field")
    assert p[1].startswith("tune.space.unlearn.batch_size: value 0: unlearn.batch_size: Input should be greater than 0")
    assert p[2].startswith("tune.space.eval.max_examples: cannot be searched")
    assert p[3].startswith("tune.space.unlearn.method.x: no such config field")
    with pytest.raises(ConfigError, match="tune.objective: give exactly one of metric"):
        parse_tune({"space": {"unlearn.seed": {"choice": [1]}}, "objective": {"metric": "a", "weights": {"b": 1}}}, cfg)
    with pytest.raises(ConfigError, match="grid works with search: random only"):
        parse_tune({"space": {"unlearn.seed": {"grid": [1, 2]}}, "objective": {"metric": "a"}, "search": "optuna"}, cfg)


def test_a_tune_file_loads_as_a_pipeline_and_as_a_search(tiny_dir, tmp_path):
    raw = {
        **_pipeline(tiny_dir),
        "tune": {
            "space": {"unlearn.optimizer.lr": {"choice": [1e-4, 3e-4]}},
            "objective": {"metric": "forget_quality"},
            "num_samples": 2,
        },
    }
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(raw))
    assert load_config(tmp_path / "t.yaml").unlearn.max_steps == 4  # spunge run / validate: tune section ignored
    job = load_tune(tmp_path / "t.yaml")
    assert job.tune.num_samples == 2 and job.cfg.unlearn.method == "npo"
    raw["tune"]["space"] = {"unlearn.nope": {"choice": [1]}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="tune.space.unlearn.nope: no such config field"):
        load_config(tmp_path / "bad.yaml")  # spunge validate checks the tune section too


def test_concurrency_leaves_each_trial_room_for_all_its_jobs(tiny_dir):
    from orchestrator.experiments.tune.driver import plan_concurrency

    cfg = parse_config(_pipeline(tiny_dir))  # 1 worker x 1 CPU per job
    spec = TuneSection.model_validate({"space": {"unlearn.seed": {"choice": [1]}}, "objective": {"metric": "x"}})
    assert plan_concurrency(cfg, spec, {"CPU": 6}, 2) == (3, 2)  # 3 trials x 2 subset jobs
    assert plan_concurrency(cfg, spec, {"CPU": 3}, 2) == (1, 2)
    assert plan_concurrency(cfg, spec.model_copy(update={"max_concurrent_trials": 2}), {"CPU": 6}, 3) == (2, 3)
    unsplit = spec.model_copy(update={"objective": Objective(metric="x", model="unsplit")})
    assert plan_concurrency(cfg, unsplit, {"CPU": 4}, 3) == (4, 1)


def test_shipped_tune_example_parses():
    from orchestrator.config.schema import PipelineConfig

    raw = yaml.safe_load((Path(__file__).parent.parent / "examples" / "tune_demo.yaml").read_text())
    spec = TuneSection.model_validate(raw.pop("tune"))
    assert spec.search == "optuna" and spec.scheduler.name == "asha"
    assert spec.objective.constraints[0].min_ratio_to_base == 0.9
    PipelineConfig.model_validate(raw)
    search_space(spec.space)


# ---------------------------------------------------------------------------------------------------
# the objective


def test_objective_with_a_constraint_relative_to_base():
    obj = Objective(metric="forget_quality", constraints=[{"metric": "model_utility", "min_ratio_to_base": 0.9}])
    base = {"model_utility": 0.8, "forget_quality": 0.01}
    ok = objective_value(obj, {"forget_quality": 0.3, "model_utility": 0.75}, base)  # 0.75 >= 0.72
    assert ok == {"objective": 0.3, "objective_raw": 0.3, "feasible": 1.0, "constraint_shortfall": 0.0}
    bad = objective_value(obj, {"forget_quality": 0.5, "model_utility": 0.6}, base)  # bound 0.72: short by 0.12/0.72
    assert bad["feasible"] == 0.0 and bad["constraint_shortfall"] == pytest.approx(0.12 / 0.72)
    assert bad["objective"] == pytest.approx(0.5 - 1000 * 0.12 / 0.72)


def test_weighted_sum_minimised_with_absolute_bounds():
    obj = Objective(
        weights={"forget_prob": 2.0, "retain_prob": -1.0},
        mode="min",
        constraints=[{"metric": "retain_prob", "min": 0.5, "max": 0.8}],
        penalty=10,
    )
    ok = objective_value(obj, {"forget_prob": 0.1, "retain_prob": 0.7}, {})
    assert ok["objective"] == pytest.approx(2 * 0.1 - 0.7) and ok["feasible"] == 1.0
    bad = objective_value(obj, {"forget_prob": 0.1, "retain_prob": 0.9}, {})  # above max 0.8 by 0.1/0.8
    assert bad["objective"] == pytest.approx(2 * 0.1 - 0.9 + 10 * 0.125) and bad["feasible"] == 0.0
    with pytest.raises(ObjectiveError, match="'forget_prob' is not among the merged model's metrics"):
        objective_value(obj, {"retain_prob": 0.7}, {})


def test_best_trial_prefers_feasible_then_objective():
    rows = [
        {"trial_id": "a", "objective": 0.9, "feasible": 0.0},
        {"trial_id": "b", "objective": 0.2, "feasible": 1.0},
        {"trial_id": "c", "objective": 0.4, "feasible": 1.0},
        {"trial_id": "d", "objective": None},
    ]
    assert best_trial(rows, "max")["trial_id"] == "c"
    assert best_trial(rows, "min")["trial_id"] == "b"
    assert best_trial([{"trial_id": "d", "objective": None}], "max") is None


# ---------------------------------------------------------------------------------------------------
# a real search


def tune_config(bench: Path, meta: dict, work: Path) -> dict:
    """The demo pipeline, small: 6 steps per job, the qa suite only (forget_quality and model_utility come from
    it), one subset job per trial (one group of both birth decades: what is asserted holds job by job, and each
    Ray Train job costs its start-up), 1 logical CPU: a trial's job takes it, so trials run one at a time."""
    from orchestrator.cli.demo import demo_config

    cfg = demo_config(bench, meta, "tiny", work / "run")
    cfg["name"] = "tune-asha"
    cfg["split"]["groups"] = {"all": meta["split_values"]}
    cfg["unlearn"]["max_steps"] = 6
    cfg["eval"].update(suites=["qa"], max_examples=24)
    cfg["data"].pop("mc", None)
    cfg["tracking"]["log_models"] = False
    cfg["ray"] = {"num_cpus": 1}
    cfg["tune"] = {
        "space": {"unlearn.optimizer.lr": {"loguniform": [1e-5, 3e-3]}},
        "objective": {
            "metric": "forget_quality",
            "mode": "max",
            "model": "merged",
            "constraints": [{"metric": "model_utility", "min_ratio_to_base": 0.1}],
        },
        "num_samples": 3,
        "search": "optuna",
        "max_concurrent_trials": 1,
        "seed": 0,
        "scheduler": {"name": "asha", "metric": "forget_loss", "mode": "min", "grace_period": 2, "reduction_factor": 2},
    }
    return cfg


@pytest.mark.e2e
def test_optuna_with_asha_prunes_stopped_trials_frees_their_workers_and_writes_a_runnable_best_config(
    tiny_bench, tmp_path, local_ray
):
    """One real search (one search serves every check: each costs minutes of Ray Train start-up on 2 cores),
    with another Ray running on the machine (this process's local_ray: Ray's state API, which Ray Train's
    placement-group cleaner asks, must still find the search's own cluster). Optuna + ASHA, one trial at a time
    on 1 logical CPU: a trial's job takes it, so the next trial starts only if a stopped one released its
    worker. A stopped trial is STOPPED with no objective (pruned for Optuna, never a NaN); a finished one merges
    and is evaluated; the search ends with a best config that validates, a trials table, and an MLflow parent
    run with one child per trial."""
    from mlflow.tracking import MlflowClient

    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(tune_config(tiny_bench[0], tiny_bench[1], tmp_path)))
    r = spunge("tune", "tune.yaml", cwd=tmp_path, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "Configuration for experiment" not in r.stdout + r.stderr  # Tune's own tables go to the log file
    assert "spunge tune" in r.stdout and "best trial" in r.stdout  # the printed trials table
    run = tmp_path / "run"
    summary = json.loads((run / "tune.json").read_text())
    rows = summary["trials"]
    assert len(rows) == 3 and {row["status"] for row in rows} <= {"TERMINATED", "STOPPED"}
    assert all(1e-5 <= row["unlearn.optimizer.lr"] <= 3e-3 for row in rows)
    stopped = [row for row in rows if row["status"] == "STOPPED"]
    finished = [row for row in rows if row["status"] == "TERMINATED"]
    assert stopped and finished, rows  # (seeded: the same trials are stopped on every run)
    for row in stopped:  # stopped at a rung (its step: where the rung was passed), before merge and evaluation
        assert row["objective"] is None and row["unlearn_step"] >= 2
        assert not list((run / "trials" / row["trial_id"] / "stages").glob("merge-*/*.safetensors"))
    for row in finished:  # its subset job did 6 steps, then merge and evaluation
        assert math.isfinite(row["objective"]) and row["unlearn_step"] == 6
        assert 0 <= row["forget_quality"] <= 1 and row["model_utility"] > 0
        trial = run / "trials" / row["trial_id"]
        assert (trial / "trial.json").exists() and list((trial / "stages").glob("merge-*/*.safetensors"))
    with open(run / "trials.csv") as f:
        assert len(list(csv.DictReader(f))) == 3
    best = summary["best"]
    assert best == best_trial(rows, "max") and best["status"] == "TERMINATED"

    text = (run / "best_config.yaml").read_text()
    assert text.startswith("# spunge tune best config") and f"objective value {best['objective']:.6g}" in text
    best_cfg = yaml.safe_load(text)
    assert "tune" not in best_cfg and best_cfg["unlearn"]["optimizer"]["lr"] == best["unlearn.optimizer.lr"]
    assert best_cfg["storage"]["output_dir"] == str(run / "best")
    for path in (run / "best_config.yaml", tmp_path / "tune.yaml"):
        v = cli("validate", path)
        assert v.exit_code == 0, v.output[-3000:]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("spunge-demo")
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.run_name == "tune/tune-asha" and parent.info.status == "FINISHED"
    assert parent.data.metrics["best_objective"] == pytest.approx(best["objective"])
    assert "base.model_utility" in parent.data.metrics
    assert {"trials.csv", "trials.md", "best_config.yaml"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)
    }
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == sorted(f"trial/{row['trial_id']}" for row in rows)
    status = {c.data.tags["spunge.trial_id"]: (c.data.tags["spunge.trial_status"], c.info.status) for c in children}
    assert status == {
        row["trial_id"]: ("STOPPED", "KILLED") if row["status"] == "STOPPED" else ("TERMINATED", "FINISHED")
        for row in rows
    }
    by_id = {row["trial_id"]: row for row in rows}
    for c in children:
        row = by_id[c.data.tags["spunge.trial_id"]]
        assert float(c.data.params["unlearn.optimizer.lr"]) == pytest.approx(row["unlearn.optimizer.lr"])
        assert len(client.get_metric_history(c.info.run_id, "loss")) >= 1  # unlearning progress, as it went
        if row["status"] == "TERMINATED":
            assert c.data.metrics["objective"] == pytest.approx(row["objective"])
            assert c.data.metrics["forget_quality"] == pytest.approx(row["forget_quality"])
