"""Stage keys (orchestrator/run/cache.py): what changes a result changes the key; where, how often and how fast a
job writes does not, so ``--resume`` reuses finished jobs after such a change."""

from pathlib import Path

import pytest

from jobs.data.io import load_jsonl, write_jsonl
from orchestrator.config.parse import parse_config
from orchestrator.run.cache import file_digest, stage_key
from orchestrator.run.context import JobKind, Prepared, RunContext
from orchestrator.stages.unlearn import plan_jobs


@pytest.fixture
def plan(tiny_dir, tmp_path):
    forget = load_jsonl(tiny_dir / "forget.jsonl")
    subset = write_jsonl(tmp_path / "north.jsonl", [r for r in forget if r["group"] == "north"])
    files = {"forget": str(tiny_dir / "forget.jsonl"), "retain": str(tiny_dir / "retain.jsonl")}
    prep = Prepared(files, {"north": str(subset)}, {}, {n: file_digest(p) for n, p in files.items()})

    def jobs(out: Path = tmp_path / "out", **unlearn):
        cfg = parse_config(
            {
                "model": {"path": str(tiny_dir / "model")},
                "data": files,
                "split": {"attribute": "group"},
                "unlearn": {"method": "npo", "max_steps": 3, **unlearn},
            }
        )
        return {j.key: j for j in plan_jobs(RunContext(cfg, out, prep=prep))}

    return jobs


def test_the_key_ignores_where_how_often_and_how_fast_a_job_writes(plan, tmp_path):
    base = plan()
    assert set(base) == {"subset/north", "unsplit"} and base["subset/north"].kind is JobKind.SUBSET
    same = plan(tmp_path / "elsewhere", report_interval_s=60, checkpoint_every=2)
    assert {k: j.hash for k, j in same.items()} == {k: j.hash for k, j in base.items()}
    assert same["unsplit"].spec.output_dir != base["unsplit"].spec.output_dir  # the folder moves, the key does not


def test_the_key_follows_the_training_and_the_data_content(plan, tmp_path):
    base = plan()
    for change in ({"optimizer": {"lr": 1e-3}}, {"max_steps": 4}, {"seed": 1}, {"params": {"beta": 0.2}}):
        assert plan(**change)["unsplit"].hash != base["unsplit"].hash, change
    subset = Path(base["subset/north"].spec.forget_path)
    rows = load_jsonl(subset)
    write_jsonl(subset, rows[:-1])  # the same path, other content
    assert plan()["subset/north"].hash != base["subset/north"].hash
    assert plan()["unsplit"].hash == base["unsplit"].hash  # its data did not change


def test_a_fingerprint_must_name_a_field_of_the_spec(plan):
    spec = plan()["unsplit"].spec
    with pytest.raises(KeyError, match="UnlearnSpec has no field"):
        stage_key(spec, bogus="x")


def test_file_parameters_are_keyed_by_their_content(plan, tmp_path):
    """WHP's anchors file: editing it changes the key, moving it does not (a stale result is never reused)."""
    anchors = tmp_path / "anchors.json"
    anchors.write_text('{"Ana Lind": "Jane Doe"}')
    before = plan(method="whp", params={"anchors": str(anchors)})["subset/north"].hash
    moved = tmp_path / "moved.json"
    moved.write_text(anchors.read_text())
    assert plan(method="whp", params={"anchors": str(moved)})["subset/north"].hash == before
    anchors.write_text('{"Ana Lind": "John Roe"}')
    assert plan(method="whp", params={"anchors": str(anchors)})["subset/north"].hash != before


def test_suite_file_options_and_the_deepspeed_file_are_keyed_by_content(tiny_dir, tmp_path):
    from orchestrator.run.cache import suite_options_key
    from orchestrator.stages.evaluate import eval_spec

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "t.yaml").write_text("task: t\n")
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 2}}')
    files = {"forget": str(tiny_dir / "forget.jsonl"), "retain": str(tiny_dir / "retain.jsonl")}
    cfg = parse_config(
        {
            "model": {"path": str(tiny_dir / "model")},
            "data": files,
            "split": {"attribute": "group"},
            "deepspeed": str(tmp_path / "ds.json"),
            "eval": {"suites": ["lmeval"], "lmeval": {"tasks": ["t"], "include_path": str(tasks)}},
        }
    )
    key = lambda: suite_options_key(eval_spec(cfg, "m", files, "lmeval"))
    before = key()
    (tasks / "t.yaml").write_text("task: t\nnum_fewshot: 2\n")
    assert key() != before
    prep = Prepared(files, {}, {}, {n: file_digest(p) for n, p in files.items()})
    job_key = lambda: plan_jobs(RunContext(cfg, tmp_path / "out", prep=prep))[0].hash  # the unsplit job
    before = job_key()
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 3}}')
    assert job_key() != before  # the DeepSpeed file is read into every UnlearnSpec


def test_resume_keeps_an_unfinished_jobs_folder_and_a_fresh_run_clears_it(tmp_path):
    """An unfinished job's folder survives --resume with what it finished (WHP's reinforced pre-job, with its
    own marker, is then reused by the runner); without --resume it is emptied; a finished one is reused."""
    from jobs.unlearn.outputs import JOB_MARKER
    from orchestrator.run.cache import claim

    job = tmp_path / "subset-a-123"
    (job / "reinforced").mkdir(parents=True)
    (job / "reinforced" / JOB_MARKER).write_text("{}")
    (job / "steps.jsonl").write_text('{"step": 1}\n')
    assert claim(job, JOB_MARKER, resume=True, keep_unfinished=True) is False
    assert (job / "reinforced" / JOB_MARKER).exists() and (job / "steps.jsonl").exists()
    assert claim(job, JOB_MARKER, resume=False, keep_unfinished=True) is False and not job.exists()
    job.mkdir()
    (job / JOB_MARKER).write_text("{}")
    assert claim(job, JOB_MARKER, resume=True, keep_unfinished=True) is True
    merge = tmp_path / "merge-1"
    merge.mkdir()
    (merge / "half.safetensors").write_text("")
    assert claim(merge, "spunge_merge.json", resume=True) is False and not merge.exists()  # other stages: cleared
