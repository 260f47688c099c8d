"""The driver on a cluster shaped like a GPU cluster, with real Ray: a local multi-node cluster
(``ray.cluster_utils.Cluster``) whose head node has two fake GPUs (Ray's ``num_gpus`` resource; no CUDA).
What each eval task sees of the GPUs, how many jobs fit, and a pipeline that starts on a cluster without room
for one job, waits while a second node joins (as an autoscaler's would), then completes."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import ray
from rich.console import Console
from safetensors.torch import load_file

from orchestrator.config.parse import parse_config
from orchestrator.config.schema import PipelineConfig
from orchestrator.run.context import PipelineError
from tests.conftest import kill_session

pytestmark = pytest.mark.e2e


@pytest.fixture
def config_file(tiny_dir):
    """A validated pipeline config on the tiny model and data, with ``sections`` replacing its own."""

    def make(**sections) -> PipelineConfig:
        raw = {
            "model": {"path": str(tiny_dir / "model")},
            "data": {"forget": str(tiny_dir / "forget.jsonl"), "retain": str(tiny_dir / "retain.jsonl")},
            "split": {"attribute": "group"},
            "unlearn": {"method": "npo", "optimizer": {"lr": 1e-4}},
        }
        return parse_config({**raw, **sections})

    return make


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    tmp = tempfile.mkdtemp(prefix="/tmp/spg")  # short: Ray's socket paths live under it
    c = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 2, "temp_dir": tmp, "include_dashboard": False}
    )
    ray.init(
        address=c.address,
        log_to_driver=False,
        runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu"}},
    )
    yield c
    ray.shutdown()
    c.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


def test_each_eval_task_sees_the_gpus_it_reserved_and_no_other(cluster, tiny_dir):
    from jobs.spec import EvalSpec
    from orchestrator.remote.runners import eval_task_options, evaluate_task

    spec = EvalSpec(
        model_path=str(tiny_dir / "model"),
        splits={"forget": str(tiny_dir / "forget.jsonl")},
        suites=["qa"],
        max_examples=2,
        batch_size=2,
        max_new_tokens=2,
    ).model_dump()
    refs = {g: evaluate_task.options(**eval_task_options(1, g, f"probe {g}")).remote(spec) for g in (0, 1, 0.5)}
    seen = {g: ray.get(r) for g, r in refs.items()}
    # no GPU reserved: none visible (Ray 2.60 would leave every GPU of the node visible)
    assert seen[0]["visible_devices"] == "" and seen[0]["gpu_ids"] == []
    # one (or part of one) reserved: that one alone
    for g in (1, 0.5):
        assert len(seen[g]["gpu_ids"]) == 1 and seen[g]["visible_devices"] == seen[g]["gpu_ids"][0] in {"0", "1"}
    two = ray.get(evaluate_task.options(**eval_task_options(1, 2, "probe 2")).remote(spec))
    assert sorted(two["visible_devices"].split(",")) == sorted(two["gpu_ids"]) == ["0", "1"]


def test_an_eval_task_reports_rows_scored_and_the_merge_actor_tensors_merged(cluster, tiny_dir, tmp_path):
    """Long stages say where they are: the eval task's rows scored of each pass reach the driver's display
    through the board; the merge actor answers ``progress`` while it merges (a second thread)."""
    from jobs.spec import EvalSpec
    from orchestrator.remote.progress import ProgressBoard
    from orchestrator.remote.runners import eval_task_options, evaluate_task
    from orchestrator.run.display import Display
    from orchestrator.stages.evaluate import show_scoring_progress
    from orchestrator.stages.merge.actor import MergeActor

    board = ProgressBoard.remote()
    spec = EvalSpec(
        model_path=str(tiny_dir / "model"),
        splits={"forget": str(tiny_dir / "forget.jsonl")},
        suites=["qa"],
        max_examples=3,
        batch_size=2,
        max_new_tokens=2,
    ).model_dump()
    ray.get(evaluate_task.options(**eval_task_options(1, 0, "progress")).remote(spec, board=board, key="base"))
    deadline = time.monotonic() + 60  # the task's sends are asynchronous: they may land after its result

    def sent() -> list[dict]:
        return ray.get(board.since.remote({})).get("base", [])

    while sum(r["done"] == r["total"] for r in sent()) < 4:  # the four passes' ends
        assert time.monotonic() < deadline, sent()
        time.sleep(0.2)
    rows = sent()
    # qa's passes over 3 rows: answers, paraphrases and greedy answers, and 3 perturbed answers each; every
    # pass's end is sent (a batch before it only when 2 s have passed since the last send)
    ends = [(r["suite"], r["what"], r["total"]) for r in rows if r["done"] == r["total"]]
    assert sorted(ends) == [("qa", "generated", 3), ("qa", "scored", 3), ("qa", "scored", 3), ("qa", "scored", 9)]
    assert all(0 < r["done"] <= r["total"] for r in rows)
    display = Display(Console(file=io.StringIO(), width=200))
    display.add("eval/base", "eval base", total=1)
    show_scoring_progress(display, board, {}, {"base": {}})
    assert display.state["eval/base"]["info"] == f"qa: 3/3 rows {rows[-1]['what']} (no suite done)"

    actor = MergeActor.remote(str(tiny_dir / "model"), ["a", "b"])
    ray.get([actor.add.remote(n, str(tiny_dir / "model")) for n in ("a", "b")])
    assert ray.get(actor.progress.remote()) == (0, 0)
    ray.get(actor.merge.remote("ties", {"density": 0.5}, {}, "float32", str(tmp_path / "merged")))
    done, total = ray.get(actor.progress.remote())
    assert done == total == len(load_file(str(tmp_path / "merged" / "model.safetensors")))


def test_jobs_that_fit_the_gpus_and_a_job_that_never_will(cluster, config_file):
    from orchestrator.stages.unlearn import job_capacity

    gpu = {"use_gpu": True, "cpus_per_worker": 1, "wait_for_resources_s": 0}
    assert job_capacity(config_file(scaling={**gpu, "num_workers": 1})) == 2
    assert job_capacity(config_file(scaling={**gpu, "num_workers": 2})) == 1
    with pytest.raises(
        PipelineError,
        match=r"one unlearning job needs 3 x \{CPU: 1, GPU: 1\}, more than the cluster "
        r"has \(2 CPU, 2 GPU, \d+ GiB memory\)",
    ):
        job_capacity(config_file(scaling={**gpu, "num_workers": 3}))
    t0 = time.monotonic()
    with pytest.raises(
        PipelineError,
        match=r"scaling.wait_for_resources_s: waited \d+ s for one unlearning job "
        r"\(3 x \{CPU: 1, GPU: 1\}\); the cluster has 2 CPU, 2 GPU",
    ):
        job_capacity(config_file(scaling={**gpu, "num_workers": 3, "wait_for_resources_s": 3}))
    assert time.monotonic() - t0 >= 3


def test_the_pipeline_waits_for_a_node_to_join_then_completes(cluster, config_file, tmp_path):
    """A job of one 3-CPU rank does not fit the 2-CPU head: the pipeline asks the autoscaler and waits; a 4-CPU
    node joins once the pipeline says it waits, the job runs on it, and the run ends with its report. The job
    runs in its runner task (``num_workers: 0``), which reserves what one worker would: the wait is the
    pipeline's, before Ray Train would have been asked for anything."""
    from orchestrator.pipeline import run_pipeline
    from orchestrator.run.display import Display

    cfg = config_file(
        split={"attribute": "group", "groups": {"north": ["north"]}, "baseline": "none"},  # one job
        unlearn={"max_steps": 2, "batch_size": 2},
        scaling={"num_workers": 0, "cpus_per_worker": 3, "wait_for_resources_s": 300},
        eval={"suites": ["qa"], "max_examples": 2, "batch_size": 2, "max_new_tokens": 2},
        tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        storage={"output_dir": str(tmp_path / "out")},
    )
    text = io.StringIO()
    joined: list[str] = []  # what the pipeline had said when the node joined
    node: list[subprocess.Popen] = []

    def join_later() -> None:  # a node joins as an autoscaler's would: `ray start` against the head
        deadline = time.monotonic() + 300
        while "waiting up to" not in text.getvalue() and time.monotonic() < deadline:
            time.sleep(0.5)
        joined.append(text.getvalue())
        node.append(
            subprocess.Popen(
                [
                    str(Path(sys.executable).with_name("ray")),
                    "start",
                    "--address",
                    cluster.address,
                    "--num-cpus",
                    "4",
                    "--num-gpus",
                    "0",
                    "--block",
                ],
                start_new_session=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )

    threading.Thread(target=join_later, daemon=True).start()
    try:
        report = run_pipeline(cfg, display=Display(Console(file=text, width=200)))
    finally:
        for p in node:  # at once (`ray start --block` given SIGTERM stops its node in half a minute)
            kill_session(p)
    log = text.getvalue()
    assert "one unlearning job needs 1 x {CPU: 3}; the cluster has 2 CPU, 2 GPU" in log
    assert "asked the autoscaler, waiting up to 300 s (scaling.wait_for_resources_s)" in log
    assert "waiting: one unlearning job: the cluster grew in" in log and "6 CPU" in log
    assert joined and "asked the autoscaler" in joined[0]  # the node joined a pipeline that was waiting for it
    assert set(report["jobs"]) == {"subset/north"}, report["jobs"]
    assert {"base", "merged"} <= set(report["models"])
