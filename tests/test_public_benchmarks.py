"""The public benchmarks' example configs, run end to end on their fixture files (tests/fixtures/, the hub's
schema) through the real pipeline with the tiny model: Ray, DeepSpeed, mergekit, MLflow (sqlite).

What is changed from the example is only what the machine forces: the hub sources become the fixture files
(``hub_to_files``), the hub models become the tiny model (which has no chat template: a plain prompt), and
the size (2 steps, no GPU, 2 clusters where the example clusters, no unsplit baseline), and each job runs in its
runner task's process (``scaling.num_workers: 0``): what these tests are about is the example's data, split and
metrics, and a Ray Train job's start-up (its controller and worker actors) would cost more than its 2 steps.
tests/test_e2e.py runs its jobs as Ray Train jobs. Each runs ``spunge run`` in this process on its local Ray
(conftest's ``local_ray``): the command-line run as a subprocess with a Ray of its own is tests/test_e2e.py's."""

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import spunge_here
from tests.test_examples import EXAMPLES_DIR, HUB, hub_to_files

pytestmark = pytest.mark.e2e


def run_here(config: str, folder: Path):
    """``spunge run CONFIG`` in this process, ``folder`` its working folder (``mlflow.db`` is written there)."""
    r = spunge_here("run", config, cwd=folder)
    assert r.exit_code == 0, (r.output[-5000:], r.exception)
    return r


def on_this_machine(example: str, fixtures: str, tiny_dir: Path, tmp_path: Path) -> dict:
    """The example with its hub data on the fixtures, the tiny model for its hub models, and the size of
    this machine: 2 steps in the runner task without a GPU, 2 clusters, no unsplit baseline, short generation."""
    raw = hub_to_files(yaml.safe_load((EXAMPLES_DIR / example).read_text()), *HUB[fixtures])
    model = str(tiny_dir / "model")
    raw["model"] = {"path": model, "dtype": "float32"}
    raw["eval"].update(oracle=model, batch_size=8, max_new_tokens=8)
    raw["split"].update(clusters=2, baseline="none")
    raw["unlearn"].update(max_steps=2, batch_size=4, max_length=64, gradient_checkpointing=False)
    raw["deepspeed"] = {"zero_optimization": {"stage": 0}}
    raw["scaling"] = {"num_workers": 0}
    raw["storage"]["output_dir"] = str(tmp_path / "run")
    raw["tracking"]["log_models"] = False
    raw["ray"] = {"num_cpus": 4}
    return raw


def test_tofu_example_runs_on_its_fixtures_and_reports_tofus_metrics(tiny_dir, tmp_path, local_ray):
    from mlflow.tracking import MlflowClient

    raw = on_this_machine("tofu.yaml", "tofu fixtures", tiny_dir, tmp_path)
    raw["data"]["template"] = "Question: {question}\nAnswer:"  # the tiny model has no chat template
    raw["data"].pop("system_prompt")
    (tmp_path / "tofu.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))

    r = run_here("tofu.yaml", tmp_path)
    assert (
        "into 2 clusters (tfidf vectors, seed 0)" in r.stderr and "prepare: cluster c0: " in r.stderr
    )  # the progress display
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    # the clusters: every forget row in one, each with its size and top terms
    clusters = report["clusters"]
    assert set(clusters) == {"c0", "c1"} and sum(c["size"] for c in clusters.values()) == 8
    assert all(c["top_terms"] for c in clusters.values())
    assert set(report["jobs"]) == {"subset/c0", "subset/c1"}
    # retain is scored on retain_perturbed (4 rows, truth ratios), not on the 8 retain90 rows it trains on
    assert report["counts"]["retain"] == 8 and report["counts"]["eval_sets.retain"] == 4
    parts = [f"{s}_{k}" for s in ("retain", "real_authors", "world_facts") for k in ("prob", "rouge", "truth_ratio")]
    assert report["parts"] == {"model_utility": parts}
    for name in ("base", "oracle", "subset/c0", "subset/c1", "merged"):
        m = report["models"][name]
        vals = [m[p] for p in parts]
        assert all(0 <= v <= 1 for v in vals), (name, m)
        assert m["model_utility"] == (pytest.approx(9 / sum(1 / v for v in vals)) if min(vals) > 0 else 0.0)
        assert 0 <= m["forget_quality"] <= 1 and "forget_truth_ratio" in m and "mia_loss_auc" in m
    assert report["models"]["oracle"]["forget_quality"] == pytest.approx(1.0)  # its own samples: p = 1

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.get_run(report["mlflow_run_id"])
    assert parent.info.run_name == "tofu-forget10" and parent.info.status == "FINISHED"
    evals = client.search_runs([parent.info.experiment_id], "attributes.run_name = 'eval/merged'")
    assert evals and evals[0].data.metrics["model_utility"] == pytest.approx(
        report["models"]["merged"]["model_utility"]
    )
    assert "real_authors_prob" in evals[0].data.metrics and "world_facts_truth_ratio" in evals[0].data.metrics
    # the jobs ran in their runner tasks, and their steps still reached the driver and MLflow
    assert not list((tmp_path / "run").rglob(".validate_storage_marker"))  # Ray Train marks each run's storage
    job = client.search_runs([parent.info.experiment_id], "attributes.run_name = 'unlearn/c0'")[0]
    assert [m.step for m in client.get_metric_history(job.info.run_id, "loss")] == [1, 2]


def test_muse_example_unlearns_raw_text_and_reports_muses_metrics(tiny_dir, tmp_path, local_ray):
    from jobs.data.io import load_jsonl

    raw = on_this_machine("muse_news.yaml", "muse fixtures", tiny_dir, tmp_path)
    raw["eval"]["verbmem"]["max_new_tokens"] = 16
    (tmp_path / "muse.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))

    run_here("muse.yaml", tmp_path)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert (
        set(report["jobs"]) == {"subset/c0", "subset/c1"} and sum(c["size"] for c in report["clusters"].values()) == 6
    )
    for key, job in report["jobs"].items():  # unlearning on raw text: every token a target, NPO's loss moved
        steps = load_jsonl(Path(job["output_dir"]) / "history.jsonl")
        assert [s["step"] for s in steps] == [1, 2] and all(s["forget_loss"] > 0 for s in steps), key
    for name in ("base", "oracle", "subset/c0", "subset/c1", "merged"):
        m = report["models"][name]
        for k in ("forget_verbmem_rouge", "knowmem_forget_rouge", "knowmem_retain_rouge", "mia_min_k_auc"):
            assert 0 <= m[k] <= 1, (name, k, m)
        assert "privleak" in m and "forget_prob" not in m  # no qa suite: nothing scored as question/answer
    assert report["models"]["oracle"]["privleak"] == pytest.approx(0.0)  # its own AUC
    # MUSE's privleak from the min-k AUCs (k = 0.4), by hand
    a, o = report["models"]["merged"]["mia_min_k_auc"], report["models"]["oracle"]["mia_min_k_auc"]
    assert report["models"]["merged"]["privleak"] == pytest.approx(((1 - a) - (1 - o)) / (1 - o) * 100)


def test_wmdp_example_splits_the_corpora_by_domain_and_scores_wmdp_and_mmlu_as_multiple_choice(
    tiny_dir, tmp_path, local_ray
):
    raw = on_this_machine("wmdp_spunge.yaml", "wmdp fixtures", tiny_dir, tmp_path)
    del raw["eval"]["oracle"]  # WMDP has no retain-only model
    raw["split"].pop("clusters")
    raw["unlearn"]["params"].update(layer=1, trainable_layers=[0, 1], steering_coeff=2.0)  # the tiny model's 2 layers
    (tmp_path / "wmdp.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))

    run_here("wmdp.yaml", tmp_path)
    variants = json.loads((tmp_path / "run" / "variants.json").read_text())
    assert set(variants["rows"]) == {"rmu/merged", "tvn/merged"}
    for variant in ("rmu", "tvn"):
        report = json.loads((tmp_path / "run" / variant / "report.json").read_text())
        assert set(report["jobs"]) == {"subset/bio", "subset/cyber"}  # SPUNGE: one job per hazard domain
        assert report["counts"]["subset/bio"] == 3 and report["counts"]["subset/cyber"] == 3
        for name in ("base", "subset/bio", "subset/cyber", "merged"):
            m = report["models"][name]
            accs = [m[f"mc_acc.benchmark.{b}"] for b in ("wmdp_bio", "wmdp_cyber", "mmlu")]
            assert all(a in (0.0, 0.5, 1.0) for a in accs), (variant, name, m)  # 2 questions each
            assert m["mc_acc"] == pytest.approx(sum(accs) / 3)  # 6 questions, 2 per benchmark
        rows = [json.loads(line) for line in open(Path(report["jobs"]["subset/bio"]["output_dir"]) / "history.jsonl")]
        assert [s["step"] for s in rows] == [1, 2]
