"""`spunge eval MODEL_DIR --suite ... --split NAME=PATH`: the pipeline's per-suite Ray tasks on any model folder."""

import json

import pytest

from tests.conftest import cli, spunge_here


@pytest.mark.e2e  # `spunge eval` on a real local Ray (conftest's local_ray), one task per (model, suite)
def test_eval_scores_a_model_folder_with_one_ray_task_per_suite_and_the_attacks_against_a_base(
    tiny_bench, tmp_path, local_ray
):
    """The demo's oracle (never trained on the forget set) scored against the demo's base model with --base: every
    suite, the three attack suites included, and each attack's recovery added to the model's metrics. The command
    runs in this process, on its local Ray."""
    from jobs.evaluate import evaluate_model
    from jobs.evaluate.suites import recovery

    bench = tiny_bench[0]
    model, data = bench / "models" / "oracle", bench / "data"
    suites = ["qa", "memorization", "quant", "probes", "lens"]
    r = spunge_here(
        "eval",
        str(model),
        "--base",
        str(bench / "models" / "base"),
        *(a for s in suites for a in ("--suite", s)),
        "--split",
        f"forget={data / 'forget.jsonl'}",
        "--split",
        f"retain={data / 'retain.jsonl'}",
        "--max-examples",
        "4",
        "--batch-size",
        "8",
        "-o",
        "res/eval.json",
        cwd=tmp_path,
    )
    assert r.exit_code == 0, (r.output[-5000:], r.exception)
    doc = json.loads((tmp_path / "res" / "eval.json").read_text())
    assert doc["suites"] == suites and set(doc["tasks"]) == set(suites)
    assert all(t["pid"] and t["seconds"] > 0 for t in doc["tasks"].values())
    m, base = doc["metrics"], doc["base"]["metrics"]
    assert {
        "forget_prob",
        "forget_rouge",
        "retain_prob",
        "model_utility",
        "forget_exact_mem",
        "forget_extraction_strength",
        "forget_verbatim_rouge",
        "quant8_forget_prob",
        "quant4_forget_rouge",
        "quant4_retain_prob",
        "probe_in_context_prob",
        "probe_worst_rouge",
        "lens_max_prob",
        "lens_peak_layer",
    } <= set(m)
    assert doc["n_examples"] == {"forget": 4, "retain": 4} and len(doc["raw"]["forget_prob"]) == 4
    # the same suite code as in-process evaluate_model gives the same numbers
    ref = evaluate_model(
        str(model), {"forget": str(data / "forget.jsonl")}, suites=["qa"], batch_size=8, max_examples=4
    )
    assert m["forget_prob"] == pytest.approx(ref["metrics"]["forget_prob"], rel=1e-5)
    for same in ("quant_fp_forget_prob", "probe_direct_prob", "lens_last_prob"):
        assert m[same] == pytest.approx(m["forget_prob"], abs=1e-6), same
    # the oracle never learned the forget set: below the base, and every recovery is against the base's numbers
    assert m["forget_prob"] < 0.5 * base["forget_prob"]
    a, u = "quant4_forget_prob", "quant_fp_forget_prob"
    assert m["quant4_recovery"] == pytest.approx(recovery(m[a], m[u], base[a], base[u]))
    assert m["lens_recovery"] == pytest.approx(
        recovery(m["lens_max_prob"], m["lens_last_prob"], base["lens_max_prob"], base["lens_last_prob"])
    )
    assert 0 <= m["worst_recovery"] <= 1 and "quant_scheme" in doc["info"]
    for title in (
        "spunge eval: Forget",
        "spunge eval: Utility",
        "spunge eval: Memorization",
        "spunge eval: Robustness",
    ):
        assert title in r.stdout
    assert "bitsandbytes" in r.stdout  # the quantization scheme is named under the tables
    assert not list((tmp_path / "res").glob(".spunge-eval-*"))  # the canonical split files are cleaned up


@pytest.mark.parametrize(
    "args, message",
    [
        (["{nomodel}", "--split", "forget={forget}"], "is not a Hugging Face model folder"),
        (["{model}", "--base", "{nomodel}", "--split", "forget={forget}"], "--base: "),
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
