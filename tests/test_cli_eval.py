"""`spunge eval MODEL_DIR --suite ... --split NAME=PATH`: the pipeline's per-suite Ray tasks on any model folder."""

import json

import pytest

from tests.conftest import cli, spunge


@pytest.mark.e2e  # `spunge eval` as a subprocess: local Ray, one task per suite
def test_eval_scores_a_model_folder_with_one_ray_task_per_suite(tiny_dir, tmp_path):
    from jobs.evaluate import evaluate_model

    r = spunge(
        "eval",
        str(tiny_dir / "model"),
        "--suite",
        "qa",
        "--suite",
        "memorization",
        "--split",
        f"forget={tiny_dir / 'forget.jsonl'}",
        "--split",
        f"retain={tiny_dir / 'retain.jsonl'}",
        "--max-examples",
        "4",
        "--batch-size",
        "8",
        "-o",
        "res/eval.json",
        cwd=tmp_path,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads((tmp_path / "res" / "eval.json").read_text())
    assert doc["suites"] == ["qa", "memorization"] and set(doc["tasks"]) == {"qa", "memorization"}
    assert all(t["pid"] and t["seconds"] > 0 for t in doc["tasks"].values())
    m = doc["metrics"]
    assert {
        "forget_prob",
        "forget_rouge",
        "retain_prob",
        "model_utility",
        "forget_exact_mem",
        "forget_extraction_strength",
        "forget_verbatim_rouge",
    } <= set(m)
    assert doc["n_examples"] == {"forget": 4, "retain": 4} and len(doc["raw"]["forget_prob"]) == 4
    # the same suite code as in-process evaluate_model gives the same numbers
    ref = evaluate_model(
        str(tiny_dir / "model"), {"forget": str(tiny_dir / "forget.jsonl")}, suites=["qa"], batch_size=8, max_examples=4
    )
    assert m["forget_prob"] == pytest.approx(ref["metrics"]["forget_prob"], rel=1e-5)
    for title in ("spunge eval: Forget", "spunge eval: Utility", "spunge eval: Memorization"):
        assert title in r.stdout
    assert not list((tmp_path / "res").glob(".spunge-eval-*"))  # the canonical split files are cleaned up


@pytest.mark.parametrize(
    "args, message",
    [
        (["{nomodel}", "--split", "forget={forget}"], "is not a Hugging Face model folder"),
        (["{model}", "--split", "forget={tmp}/missing.jsonl"], "--split forget: file not found"),
        (["{model}", "--split", "forget"], "--split: expected NAME=PATH"),
        (["{model}", "--suite", "nope", "--split", "forget={forget}"], "unknown evaluation suite 'nope'; known:"),
        (["{model}"], "--split: give at least one NAME=PATH"),
        (["{model}", "--split", "forget={bad}"], "--split forget"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny_dir, tmp_path, args, message):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n")
    fill = {
        "model": str(tiny_dir / "model"),
        "nomodel": str(tmp_path),
        "forget": str(tiny_dir / "forget.jsonl"),
        "tmp": str(tmp_path),
        "bad": str(tmp_path / "bad.jsonl"),
    }
    r = cli("eval", *(a.format(**fill) for a in args), "-o", tmp_path / "e.json")
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.output
    assert not (tmp_path / "e.json").exists()
