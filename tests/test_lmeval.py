"""The ``lmeval`` suite (lm-evaluation-harness, offline): our ``mc_acc`` equals lm-eval's ``acc`` on the
same local task, for the tiny demo benchmark's base model (it knows every answer) and its retain-only
oracle (it guesses on the forget questions), so the agreement covers right and wrong picks alike."""

import sys

import pytest

pytest.importorskip("lm_eval")

from jobs.evaluate import lmeval as LE  # noqa: E402
from jobs.evaluate.mc import check_mc_records  # noqa: E402
from jobs.evaluate.suites import SuiteContext, get_suite, read_jsonl  # noqa: E402

N = 60  # questions (240 scored sequences)


@pytest.fixture(scope="module")
def base(tiny_bench):
    from jobs.models import load_model, load_tokenizer

    bench, meta = tiny_bench[0], tiny_bench[1]
    path = str(bench / meta["files"]["base"])
    rows = check_mc_records(read_jsonl(str(bench / meta["files"]["mc"])))
    oracle = load_model(str(bench / meta["files"]["oracle"])).eval()
    return bench, load_model(path).eval(), load_tokenizer(path), rows, oracle


def test_mc_acc_agrees_with_lm_eval_acc(base):
    bench, model, tok, rows, oracle = base
    rows = rows[:: len(rows) // N]  # forget and retain questions alike
    accs = {}
    for name, mdl in (("base", model), ("oracle", oracle)):
        ours = get_suite("mc")(SuiteContext(mdl, tok, batch_size=32), {"mc": rows})["metrics"]
        theirs = get_suite("lmeval")(SuiteContext(mdl, tok, batch_size=16), {"mc": rows})
        m = theirs["metrics"]
        assert set(m) == {"lmeval.spunge_mc.acc", "lmeval.spunge_mc.acc_norm"}
        assert abs(ours["mc_acc"] - m["lmeval.spunge_mc.acc"]) <= 1e-6, name
        assert abs(ours["mc_acc_norm"] - m["lmeval.spunge_mc.acc_norm"]) <= 1e-6, name
        assert theirs["raw"]["lmeval_results"]["spunge_mc"]["acc,none"] == m["lmeval.spunge_mc.acc"]
        accs[name] = ours
    # the oracle never saw the forget authors: it is wrong on some of them, unlike the base model
    assert accs["oracle"]["mc_acc.set.forget"] < accs["base"]["mc_acc.set.forget"]
    assert 0 < accs["oracle"]["mc_acc"] < 1


def test_shipped_task_yaml_runs_offline_from_the_benchmark_folder(base, monkeypatch):
    """The shipped YAML reads data/mc.jsonl relative to the working directory: lm-eval's own include_path."""
    bench, model, tok, rows, _ = base
    monkeypatch.chdir(bench)
    res = LE.run_lm_eval(model, tok, ["spunge_mc"], [str(LE.TASKS_DIR)], limit=N, batch_size=32)
    ours = get_suite("mc")(SuiteContext(model, tok), {"mc": rows[:N]})["metrics"]  # lm-eval's limit takes the first N
    assert abs(res["results"]["spunge_mc"]["acc,none"] - ours["mc_acc"]) <= 1e-6


def test_flatten_results_names():
    res = {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A", "exact_match,strict": 1, "sample_len": 3}}
    assert LE.flatten_results(res) == {"lmeval.t.acc": 0.5, "lmeval.t.exact_match_strict": 1.0}
    assert LE.jinja_prompt("Question: {question}\nAnswer:") == "Question: {{question}}\nAnswer:"


def test_missing_extra_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match=r"pip install 'spunge\[lmeval\]'"):
        get_suite("lmeval")(SuiteContext(None, None), {"mc": []})
