"""The ``perplexity`` suite on hand-computed values (the bigram model of test_mc) and on a real tiny Llama."""

import math

import numpy as np
import pytest

from jobs.evaluate.perplexity import corpus_perplexity, text_nll
from jobs.evaluate.suites import SuiteContext, evaluate_model, get_suite
from tests.test_mc import Bigram, tok  # noqa: F401  (tok is a fixture)

# "Q A" -> <s> Q A </s>: p(Q|<s>) p(A|Q) p(</s>|A) = 0.5 * 0.5 * 0.45 over 3 targets
# "R"   -> <s> R </s>:   p(R|<s>) p(</s>|R)        = 0.25 * 0.2       over 2 targets
NLL = [-(math.log(0.5) + math.log(0.5) + math.log(0.45)), -(math.log(0.25) + math.log(0.2))]


def test_text_nll_and_corpus_perplexity_by_hand(tok):  # noqa: F811
    for bs in (1, 2):
        nll, n = text_nll(Bigram(), tok, ["Q A", "R"], batch_size=bs)
        np.testing.assert_allclose(nll, NLL, rtol=0, atol=1e-6)
        assert n.tolist() == [3, 2]
    want = math.exp(sum(NLL) / 5)  # corpus-level: total NLL over total tokens, not a mean of perplexities
    assert corpus_perplexity(NLL, [3, 2]) == pytest.approx(want, rel=1e-12)
    assert math.isnan(corpus_perplexity([], []))


def test_suite_scores_text_splits_only(tok):  # noqa: F811
    data = {"general": [{"text": "Q A"}, {"text": "R"}], "forget": [{"question": "Q", "answer": "A"}]}
    res = get_suite("perplexity")(SuiteContext(Bigram(), tok, batch_size=8), data)
    assert set(res["metrics"]) == {"general_ppl"}
    assert res["metrics"]["general_ppl"] == pytest.approx(math.exp(sum(NLL) / 5), rel=1e-6)
    assert res["raw"]["general_tokens"] == [3, 2]
    with pytest.raises(ValueError, match="needs a text split such as 'general'"):
        get_suite("perplexity")(SuiteContext(Bigram(), tok), {"forget": data["forget"]})


def test_evaluate_model_runs_qa_mc_and_perplexity_side_by_side(tiny_dir, tmp_path):
    """Every split goes to every suite: qa must skip the mc and general splits, mc and perplexity find theirs."""
    from tests.conftest import write_jsonl

    general = write_jsonl(tmp_path / "general.jsonl", [{"text": "Ana Lind was born in Oslo."}, {"text": "Bo Chen."}])
    mc = write_jsonl(
        tmp_path / "mc.jsonl",
        [
            {"question": "Where was Ana Lind born?", "choices": ["Oslo.", "Lima.", "Rome."], "answer": 0, "era": "old"},
            {"question": "What does Bo Chen write?", "choices": ["Poems.", "Plays."], "answer": 1, "era": "new"},
        ],
    )
    res = evaluate_model(
        str(tiny_dir / "model"),
        {"forget": str(tiny_dir / "forget.jsonl"), "general": str(general), "mc": str(mc)},
        suites=["qa", "mc", "perplexity"],
        max_new_tokens=4,
    )
    m = res["metrics"]
    assert "forget_prob" in m and "general_prob" not in m and "mc_prob" not in m
    assert {"mc_acc", "mc_acc.era.old", "mc_acc.era.new", "mc_acc_norm", "general_ppl"} <= set(m)
    assert len(res["raw"]["mc_correct"]) == 2
    # a random model over a ~400-token vocabulary is far from certain of anything
    assert 10 < m["general_ppl"] < 10 * 400
