"""MIA (loss, zlib, min-k%, min-k%++, AUC, privleak) and memorization metrics: hand-computed values on tiny
inputs, and the suites on the tiny Llama before and after it memorises the forget rows."""

import math
import zlib

import numpy as np
import pytest
import torch

from jobs.evaluate.memorization import exact_memorization, extraction_strength, split_answer
from jobs.evaluate.mia import (
    ATTACKS,
    answer_token_stats,
    loss_score,
    mia_auc,
    min_k_plus_plus_score,
    min_k_score,
    privleak,
    vocab_logprob_moments,
    zlib_length,
    zlib_score,
)
from jobs.evaluate.suites import SUITES, SuiteContext, evaluate_model
from tests.conftest import qa_rows, write_jsonl

# ------------------------------------------------------------------------------------ pure metrics


def test_loss_and_min_k_on_known_logprobs():
    lp = [-0.1, -2.0, -0.5, -3.0, -1.0]
    assert loss_score(lp) == pytest.approx(6.6 / 5)
    # k=0.4 of 5 tokens -> 2 lowest: -3.0, -2.0 -> score 2.5
    assert min_k_score(lp, 0.4) == pytest.approx(2.5)
    # int(5 * 0.1) = 0 -> at least one token: the lowest
    assert min_k_score(lp, 0.1) == pytest.approx(3.0)
    assert min_k_score(lp, 1.0) == pytest.approx(loss_score(lp))
    assert math.isnan(loss_score([])) and math.isnan(min_k_score([], 0.4))


def test_zlib_ratio_on_known_string():
    text = "aaaaaaaaaa"
    n = len(zlib.compress(text.encode("utf-8")))
    assert zlib_length(text) == n and n > 0
    assert zlib_score([-1.0, -3.0], text) == pytest.approx(2.0 / n)


def test_min_k_plus_plus_on_known_distribution():
    # one position, vocabulary distribution p = (0.5, 0.25, 0.25)
    p = np.array([[0.5, 0.25, 0.25]])
    lp = np.log(p)
    mu, sigma = vocab_logprob_moments(lp)
    exp_mu = 0.5 * math.log(0.5) + 0.5 * math.log(0.25)
    exp_var = 0.5 * math.log(0.5) ** 2 + 0.5 * math.log(0.25) ** 2 - exp_mu**2
    assert mu[0] == pytest.approx(exp_mu) and sigma[0] == pytest.approx(math.sqrt(exp_var))
    mu_t, sigma_t = vocab_logprob_moments(torch.tensor(lp))
    assert float(mu_t[0]) == pytest.approx(exp_mu) and float(sigma_t[0]) == pytest.approx(math.sqrt(exp_var))
    # target token 0 (the likely one): z = (log .5 - mu) / sigma
    z = (math.log(0.5) - exp_mu) / math.sqrt(exp_var)
    assert min_k_plus_plus_score([math.log(0.5)], mu, sigma, 0.4) == pytest.approx(-z)
    # two tokens, z = (1, -2) by construction: k=0.5 keeps -2 -> score 2; k=1 -> mean -0.5 -> 0.5
    assert min_k_plus_plus_score([1.0, -4.0], [0.0, 0.0], [1.0, 2.0], 0.5) == pytest.approx(2.0)
    assert min_k_plus_plus_score([1.0, -4.0], [0.0, 0.0], [1.0, 2.0], 1.0) == pytest.approx(0.5)


def test_auc_orientation_and_privleak():
    # members have LOWER scores (loss): perfectly separated -> 1.0; reversed -> 0.0; identical -> 0.5
    assert mia_auc([0.1, 0.2, 0.3], [1.0, 2.0]) == 1.0
    assert mia_auc([1.0, 2.0], [0.1, 0.2, 0.3]) == 0.0
    assert mia_auc([0.5, 0.5], [0.5, 0.5, 0.5]) == 0.5
    assert mia_auc([1.0, 3.0], [2.0, 4.0]) == pytest.approx(0.75)  # 3 of 4 pairs ordered
    assert math.isnan(mia_auc([], [1.0]))
    # MUSE: (A_model - A_oracle) / A_oracle * 100 with A = 1 - AUC
    assert privleak(0.5, 0.5) == 0.0
    assert privleak(1.0, 0.5) == pytest.approx(-100.0)  # un-unlearned model
    assert privleak(0.3, 0.5) == pytest.approx(40.0)  # over-unlearned: (0.7 - 0.5) / 0.5
    assert privleak(0.8, 0.6) == pytest.approx((0.2 - 0.4) / 0.4 * 100)


def test_exact_memorization_from_chosen_logits():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 2.0], [1.0, 0.0, 0.0]])
    preds = logits.argmax(-1).numpy()  # [1, 0, 2, 0]
    labels = np.array([1, 2, 2, 0])
    assert exact_memorization(preds, labels) == pytest.approx(0.75)
    assert exact_memorization(labels, labels) == 1.0


def test_extraction_strength_and_split():
    y = [5, 6, 7, 8]
    assert extraction_strength([5, 6, 7, 8], y) == 1.0  # m = 0
    assert extraction_strength([0, 6, 7, 8], y) == pytest.approx(0.75)  # m = 1
    assert extraction_strength([5, 6, 0, 8], y) == pytest.approx(0.25)  # m = 3: only the last matches
    assert extraction_strength([5, 6, 7, 0], y) == 0.0  # m = n
    assert split_answer([1, 2, 3, 4, 5]) == ([1, 2], [3, 4, 5])


# ------------------------------------------------------------------------------------ with the model


@pytest.fixture(scope="module")
def model_tok(tiny_dir):
    from jobs.models import load_model, load_tokenizer

    return load_model(tiny_dir / "model"), load_tokenizer(tiny_dir / "model")


@pytest.fixture(scope="module")
def data():
    rows = qa_rows()
    return {"forget": [r for r in rows if r["era"] == "old"], "holdout": [r for r in rows if r["era"] == "new"]}


@pytest.fixture(scope="module")
def trained(model_tok, data):
    """A copy of the tiny model trained to memorise the forget rows only."""
    import copy

    from jobs.data.format import collate, encode_qa

    model, tok = model_tok
    model = copy.deepcopy(model)
    batch = collate([encode_qa(tok, r["question"], r["answer"]) for r in data["forget"]], tok.pad_token_id)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(40):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, tok


def test_token_stats_match_score_answers(model_tok, data):
    from jobs.evaluate.scoring import score_answers

    model, tok = model_tok
    recs = data["forget"][:3]
    qs, ans = [r["question"] for r in recs], [r["answer"] for r in recs]
    stats = answer_token_stats(model, tok, qs, ans, batch_size=2, moments=True)
    nll, n = score_answers(model, tok, qs, ans, batch_size=3)
    for s, a, b in zip(stats, nll, n):
        assert len(s["logp"]) == b and -s["logp"].sum() == pytest.approx(a, rel=1e-4)
        assert (s["sigma"] > 0).all() and (s["logp"] <= 0).all()


def test_mia_auc_rises_after_memorising_forget(model_tok, trained, data):
    base = SUITES["mia"](SuiteContext(*model_tok, batch_size=4), data)
    after = SUITES["mia"](SuiteContext(*trained, batch_size=4), data)
    assert set(base["metrics"]) == {f"mia_{a}_auc" for a in (*ATTACKS, "gradnorm")}
    assert abs(base["metrics"]["mia_loss_auc"] - 0.5) <= 0.3
    assert after["metrics"]["mia_loss_auc"] > 0.8
    assert after["metrics"]["mia_gradnorm_auc"] > 0.8  # fitted members: smaller gradients
    for a in (*ATTACKS, "gradnorm"):
        s = after["raw"]["mia_scores"][a]
        assert len(s["forget"]) == len(data["forget"]) and len(s["holdout"]) == len(data["holdout"])
    # memorised rows: their loss is far below the held-out rows'
    assert np.mean(after["raw"]["mia_scores"]["loss"]["forget"]) < np.mean(
        after["raw"]["mia_scores"]["loss"]["holdout"]
    )
    mem_base = SUITES["memorization"](
        SuiteContext(*model_tok, batch_size=4, max_new_tokens=16), {"forget": data["forget"]}
    )
    mem = SUITES["memorization"](SuiteContext(*trained, batch_size=4, max_new_tokens=16), {"forget": data["forget"]})
    for key in ("forget_exact_mem", "forget_extraction_strength", "forget_verbatim_rouge"):
        assert 0.0 <= mem_base["metrics"][key] <= 1.0 and 0.0 <= mem["metrics"][key] <= 1.0
        assert len(mem["raw"][key]) == len(data["forget"])
    assert mem["metrics"]["forget_exact_mem"] > mem_base["metrics"]["forget_exact_mem"]
    assert mem["metrics"]["forget_exact_mem"] > 0.8


def test_mia_requires_holdout(model_tok, data):
    with pytest.raises(ValueError, match="holdout"):
        SUITES["mia"](SuiteContext(*model_tok), {"forget": data["forget"]})


def test_evaluate_model_returns_new_keys(tiny_dir, data, tmp_path):
    splits = {name: str(write_jsonl(tmp_path / f"{name}.jsonl", rows)) for name, rows in data.items()}
    res = evaluate_model(
        str(tiny_dir / "model"), splits, suites=["qa", "mia", "memorization"], batch_size=8, max_new_tokens=8
    )
    m = res["metrics"]
    for key in [
        "forget_prob",
        "holdout_prob",
        "mia_loss_auc",
        "mia_zlib_auc",
        "mia_min_k_auc",
        "mia_min_k_plus_plus_auc",
        "forget_exact_mem",
        "forget_extraction_strength",
        "forget_verbatim_rouge",
    ]:
        assert key in m and np.isfinite(m[key]), key
    assert set(res["raw"]["mia_scores"]) == {*ATTACKS, "gradnorm"}


def test_gradnorm_score_is_the_mean_per_tensor_norm_of_the_loss_gradient(model_tok, data):
    from jobs.data.format import collate, encode_qa
    from jobs.evaluate.mia import gradnorm_scores

    model, tok = model_tok
    rec = data["forget"][0]
    batch = collate([encode_qa(tok, rec["question"], rec["answer"])], tok.pad_token_id)
    model.zero_grad()
    model(**batch).loss.backward()  # HF's loss: the mean NLL over the answer tokens
    by_hand = {p: torch.stack([q.grad.norm(p) for q in model.parameters()]).mean().item() for p in (1.0, 2.0)}
    model.zero_grad(set_to_none=True)
    for p in (1.0, 2.0):
        assert gradnorm_scores(model, tok, [rec], p)[0] == pytest.approx(by_hand[p], rel=1e-5)
    assert all(q.grad is None for q in model.parameters())  # no gradient left behind


def test_reference_attack_against_a_given_model_and_against_the_oracle(model_tok, trained, data, tiny_dir):
    from jobs.evaluate.mia import MiaOptions, privleak_vs_oracle, reference_vs_oracle

    opts = MiaOptions(gradnorm=False, reference_model=str(tiny_dir / "model"))  # the untrained model
    after = SUITES["mia"].fn(SuiteContext(*trained, batch_size=4), data, opts)
    # loss(trained) - loss(reference) per example: the memorised forget rows fell far more
    s = after["raw"]["mia_scores"]
    ref_loss = {
        k: SUITES["mia"].fn(SuiteContext(*model_tok, batch_size=4), data, MiaOptions(gradnorm=False))["raw"][
            "mia_scores"
        ]["loss"][k]
        for k in ("forget", "holdout")
    }
    np.testing.assert_allclose(
        s["reference"]["forget"], np.subtract(s["loss"]["forget"], ref_loss["forget"]), rtol=1e-6
    )
    assert after["metrics"]["mia_reference_auc"] > 0.8
    assert reference_vs_oracle(after, after) is None  # scored in the task already

    # against the oracle (no reference_model): from both runs' raw loss scores, by hand
    model = {
        "metrics": {"mia_min_k_auc": 0.9, "mia_loss_auc": 0.7},
        "raw": {"mia_scores": {"loss": {"forget": [1.0, 2.0], "holdout": [3.0, 1.5]}}, "mia_privleak_attack": "min_k"},
    }
    oracle = {
        "metrics": {"mia_min_k_auc": 0.6, "mia_loss_auc": 0.5},
        "raw": {"mia_scores": {"loss": {"forget": [2.0, 2.0], "holdout": [2.5, 2.5]}}},
    }
    # differences: forget [-1, 0], holdout [0.5, -1]: pairs (holdout > forget): 0.5>-1, 0.5>0, -1=-1 (tie, 1/2),
    # -1<0 -> (1 + 1 + 0.5 + 0) / 4
    assert reference_vs_oracle(model, oracle) == pytest.approx(2.5 / 4)
    # privleak from the chosen attack (MUSE: min-k): (1 - 0.9 - (1 - 0.6)) / (1 - 0.6) * 100
    assert privleak_vs_oracle(model, oracle) == pytest.approx((0.1 - 0.4) / 0.4 * 100)
    model["raw"]["mia_privleak_attack"] = "loss"
    assert privleak_vs_oracle(model, oracle) == pytest.approx((0.3 - 0.5) / 0.5 * 100)


# ------------------------------------------------------------------------------- MUSE: verbmem, knowmem


def test_rouge_l_f1_by_hand():
    from jobs.evaluate.metrics import rouge_l_f1

    # LCS("the cat sat", "the cat sat on the mat") = 3: precision 3/3, recall 3/6 -> F1 = 2 * 1 * 0.5 / 1.5
    np.testing.assert_allclose(
        rouge_l_f1(["the cat sat", "a dog"], ["the cat sat on the mat", "the mat"]), [2 / 3, 0.0]
    )


def test_knowmem_prompt_is_few_shot_raw_text():
    from jobs.evaluate.knowmem import few_shot_prompt

    icl = [{"question": "Q1?", "answer": "A1."}, {"question": "Q2?", "answer": "A2."}]
    assert (
        few_shot_prompt(icl, "Q?")
        == "Question: Q1?\nAnswer: A1.\n\nQuestion: Q2?\nAnswer: A2.\n\nQuestion: Q?\nAnswer:"
    )
    assert few_shot_prompt([], "Q?") == "Question: Q?\nAnswer:"


def test_verbmem_and_knowmem_rise_on_a_model_that_memorised_the_text(model_tok, trained, data):
    from jobs.evaluate.metrics import rouge_l_f1
    from jobs.evaluate.scoring import generate_answers
    from jobs.evaluate.verbmem import RAW

    # the trained model saw "Question: q\nAnswer: a": the prompt as a verbmem prefix, the answer as its truth
    verb = [{"prompt": f"Question: {r['question']}\nAnswer:", "gt": r["answer"]} for r in data["forget"]]
    know = {
        "knowmem_forget": data["forget"][1:],
        "knowmem_forget_icl": data["forget"][:1],
        "knowmem_retain": data["holdout"],
    }
    split = {"verbmem": verb, **know}
    base = {s: SUITES[s](SuiteContext(*model_tok, batch_size=4), split) for s in ("verbmem", "knowmem")}
    after = {s: SUITES[s](SuiteContext(*trained, batch_size=4), split) for s in ("verbmem", "knowmem")}
    assert (
        after["verbmem"]["metrics"]["forget_verbmem_rouge"] > 0.8 > base["verbmem"]["metrics"]["forget_verbmem_rouge"]
    )
    assert after["knowmem"]["metrics"]["knowmem_forget_rouge"] > base["knowmem"]["metrics"]["knowmem_forget_rouge"]
    assert set(after["knowmem"]["metrics"]) == {"knowmem_forget_rouge", "knowmem_retain_rouge"}
    # the metric is the mean F1 of the model's own 128-token greedy continuations, computed here by hand
    gen, _ = generate_answers(*trained, [v["prompt"] for v in verb], 128, 4, RAW)
    assert after["verbmem"]["raw"]["forget_verbmem_rouge"] == pytest.approx(
        rouge_l_f1(gen, [v["gt"] for v in verb]).tolist()
    )
    with pytest.raises(ValueError, match="eval set 'verbmem' row 1: column 'gt': expected a non-empty string"):
        SUITES["verbmem"](SuiteContext(*model_tok), {"verbmem": [{"prompt": "x", "gt": ""}]})


def test_mia_scores_raw_text_rows_on_every_token(model_tok):
    from jobs.data.format import encode_text
    from jobs.evaluate.mia import mia_scores

    model, tok = model_tok
    rows = [{"text": "Ana Lind was born in Oslo."}, {"text": "Bo Chen writes crime novels."}]
    scores = mia_scores(model, tok, rows)
    for r, got in zip(rows, scores["loss"]):
        enc = encode_text(tok, r["text"])
        with torch.no_grad():
            want = model(input_ids=torch.tensor([enc["input_ids"]]), labels=torch.tensor([enc["labels"]])).loss
        assert got == pytest.approx(float(want), rel=1e-5)
