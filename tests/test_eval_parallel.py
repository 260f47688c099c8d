"""Evaluation fans out one Ray task per (model, suite) with real Ray: two suites on three models run as
six tasks, concurrently (timing-free evidence: overlapping task intervals and several worker pids), are
combined per model before the oracle-relative metrics, cached per suite, and logged to MLflow."""

import shutil
from itertools import combinations

import pytest
import ray

from jobs.data.io import load_jsonl, write_jsonl
from orchestrator.config.schema import PipelineConfig
from orchestrator.pipeline import run_stages
from orchestrator.run.cache import file_digest, model_fingerprint
from orchestrator.run.context import Merged, Prepared, RunContext
from orchestrator.run.display import Display
from orchestrator.tracking.tracker import MlflowEvents, Tracker
from tests.conftest import mlflow_uri_kept

pytestmark = pytest.mark.e2e  # the pipeline's eval stage on a real local Ray cluster (conftest's local_ray)

SUITES = ["qa", "mia"]


@pytest.fixture(scope="module")
def setup(tiny_dir, tmp_path_factory, local_ray):
    work = tmp_path_factory.mktemp("evalpar")
    models = {}
    for name in ("base", "oracle", "merged"):  # three model folders (copies: same weights)
        shutil.copytree(tiny_dir / "model", work / name)
        models[name] = (str(work / name), model_fingerprint(str(work / name)))
    files = {
        "forget": str(tiny_dir / "forget.jsonl"),
        "retain": str(tiny_dir / "retain.jsonl"),
        "holdout": str(write_jsonl(work / "holdout.jsonl", load_jsonl(tiny_dir / "retain.jsonl")[:4])),
    }
    cfg = PipelineConfig(
        model={"path": models["base"][0]},
        data={"forget": files["forget"], "retain": files["retain"]},
        split={"attribute": "group"},
        unlearn={"max_length": 64},
        eval={"suites": SUITES, "max_examples": 4, "batch_size": 8, "max_new_tokens": 8, "oracle": models["oracle"][0]},
    )
    prep = Prepared(files, {}, {}, {n: file_digest(p) for n, p in files.items()})
    uri = f"sqlite:///{work / 'mlflow.db'}"

    def evaluate(resume: bool, suites=SUITES):
        with mlflow_uri_kept():
            tracker = Tracker(uri, "evalpar", "evalpar")
        c = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"suites": suites})})
        ctx = RunContext(
            c,
            work / "out",
            resume,
            MlflowEvents(tracker),
            Display(),
            prep=prep,
            merged=Merged(*models["merged"], reused=False),
        )
        run_stages(ctx, ["evaluate"])  # the pipeline's evaluate stage: base, oracle and merged
        tracker.end_all()
        return ctx.results, tracker

    first, tracker = evaluate(False)
    return {"work": work, "first": first, "tracker": tracker, "evaluate": evaluate, "uri": uri}


def test_six_tasks_ran_concurrently_and_were_combined_per_model(setup):
    res = setup["first"]
    assert set(res) == {"base", "oracle", "merged"}
    tasks = [(m, s, r["suites"][s]) for m, r in res.items() for s in SUITES]
    assert len(tasks) == 6 and all(t["pid"] and t["ended"] >= t["started"] for _, _, t in tasks)
    # timing-free evidence of parallel execution: some two tasks were running at the same moment,
    # and the tasks ran in more than one worker process
    overlapping = [
        (a[:2], b[:2])
        for a, b in combinations(tasks, 2)
        if a[2]["started"] < b[2]["ended"] and b[2]["started"] < a[2]["ended"]
    ]
    assert overlapping, [(m, s, t["started"], t["ended"]) for m, s, t in tasks]
    assert len({t["pid"] for _, _, t in tasks}) > 1
    for r in res.values():
        m = r["metrics"]
        assert {"forget_prob", "retain_rouge", "model_utility", "holdout_prob"} <= set(m)  # qa
        assert {"mia_loss_auc", "mia_zlib_auc", "mia_min_k_auc", "mia_min_k_plus_plus_auc"} <= set(m)  # mia
        assert set(r["raw"]) >= {"forget_truth_ratio", "mia_scores"} and r["reused"] is False
        # the oracle-relative metrics need one suite's raw values and the other's AUC: added after combining;
        # identical weights: truth ratios drawn from the same distribution (KS p = 1), no privacy leak
        assert m["forget_quality"] == pytest.approx(1.0)
        assert m["privleak"] == pytest.approx(0.0, abs=1e-9)
    assert len(list((setup["work"] / "out" / "stages" / "eval").glob("*.json"))) == 6


def test_eval_runs_in_mlflow_hold_every_suites_metrics(setup):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(setup["uri"])
    tracker = setup["tracker"]
    for name, r in setup["first"].items():
        run = client.get_run(tracker.children[f"eval/{name}"])
        assert run.data.tags["mlflow.parentRunId"] == tracker.parent_id and run.info.status == "FINISHED"
        assert run.data.params["suites"] == "qa,mia"
        assert run.data.metrics["forget_prob"] == pytest.approx(r["metrics"]["forget_prob"])
        assert run.data.metrics["mia_loss_auc"] == pytest.approx(r["metrics"]["mia_loss_auc"])
        assert {"seconds.qa", "seconds.mia", "forget_quality", "privleak"} <= set(run.data.metrics)


def test_resume_reuses_each_model_suite_result_on_its_own(setup):
    again, _ = setup["evaluate"](True)
    assert all(r["reused"] for r in again.values())
    for name, r in again.items():
        assert r["metrics"] == setup["first"][name]["metrics"]
    only_qa, _ = setup["evaluate"](True, ["qa"])  # the qa results are cached apart from mia's
    assert all(r["reused"] and list(r["suites"]) == ["qa"] for r in only_qa.values())
    assert "mia_loss_auc" not in only_qa["merged"]["metrics"] and "forget_quality" in only_qa["merged"]["metrics"]


def _kill_when_running(name: str, done) -> int:
    """SIGKILL the first process of this test whose title names ``name`` (a Ray task or actor), once there."""
    import os
    import signal
    import time

    import psutil

    while not done():
        for p in psutil.Process().children(recursive=True):
            try:
                if name in " ".join(p.cmdline()):
                    os.kill(p.pid, signal.SIGKILL)
                    return p.pid
            except psutil.Error:
                pass
        time.sleep(0.05)
    raise AssertionError(f"no process {name!r} was seen before the stage ended")


def test_a_killed_eval_worker_reruns_its_task_only(setup):
    """A worker killed in the middle of one (model, suite) task: Ray runs that task again; the stage ends with
    every result, none of them from the killed process."""
    import threading

    box = {}
    t = threading.Thread(target=lambda: box.update(res=setup["evaluate"](False, ["qa"])[0]))
    t.start()
    killed = _kill_when_running("ray::eval ", lambda: not t.is_alive())
    t.join(timeout=600)
    res = box["res"]
    assert set(res) == {"base", "oracle", "merged"}
    assert killed not in {r["suites"]["qa"]["pid"] for r in res.values()}
    for name, r in res.items():
        assert r["metrics"]["forget_prob"] == pytest.approx(setup["first"][name]["metrics"]["forget_prob"])


def test_a_killed_merge_actor_reruns_the_merge_only(setup, tiny_dir):
    """The merge actor's process killed before it merges: the merge stage starts a new actor, hands it the
    finished jobs' folders again and merges; nothing is unlearned again (there is no unlearn stage here)."""
    import json
    from pathlib import Path

    from jobs.merge import MERGE_MARKER
    from jobs.spec import UnlearnSpec
    from orchestrator.run.context import Job, JobKind
    from orchestrator.stages.merge import start_merge_actor

    work = setup["work"]
    cfg = PipelineConfig(
        model={"path": str(tiny_dir / "model")},
        split={"attribute": "group"},
        data={"forget": str(tiny_dir / "forget.jsonl")},
    )
    jobs = []
    for v, folder in (("north", "oracle"), ("south", "merged")):  # two finished subset jobs: copies of the model
        spec = UnlearnSpec(
            name=f"subset/{v}", model_path="m", forget_path="f", method="ga", output_dir=str(work / folder)
        )
        jobs.append(Job(JobKind.SUBSET, spec, f"h{v}", subset=v))
    ctx = RunContext(cfg, work / "merge-out", jobs=jobs)
    start_merge_actor(ctx)
    ray.get([ctx.merge_actor.add.remote(j.key, j.spec.output_dir) for j in jobs])
    first = ctx.merge_actor
    killed = _kill_when_running("ray::MergeActor", lambda: False)
    assert killed
    lines = []
    ctx.display.log = lines.append
    run_stages(ctx, ["merge"])
    assert ctx.merge_actor is not first and any("the merge actor died" in line for line in lines)
    marker = Path(ctx.merged.path) / MERGE_MARKER
    assert marker.exists() and set(json.loads(marker.read_text())["models"]) == {"subset/north", "subset/south"}
