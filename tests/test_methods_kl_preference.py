"""ga_kl, simnpo and idk_dpo, the methods that compare the model with a reference or with a preferred answer
(a KL to the frozen base on retain targets; NPO's sigmoid over per-sequence likelihoods, simnpo's reference-free,
idk_dpo's against a refusal): losses against hand-computed values, that a few steps unlearn, and that idk_dpo's
refusal view reaches the method through the real loop."""

import math
import random

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from jobs.data.format import IGNORE_INDEX, collate, encode_qa
from jobs.data.io import load_jsonl
from jobs.models import load_model, load_tokenizer
from jobs.spec import UnlearnSpec
from jobs.unlearn.methods import build_method, method_names
from jobs.unlearn.methods.base import mean_nll, sequence_logprob
from jobs.unlearn.methods.idk_dpo import IDK_ANSWERS, dpo_loss
from jobs.unlearn.methods.simnpo import simnpo_loss
from tests.conftest import nll_before_and_after_steps, qa_rows

METHODS = ["ga_kl", "simnpo", "idk_dpo"]


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def with_idk(batch: dict, tok, seed: int = 0) -> dict:
    """The batch plus idk_dpo's refusal view of each forget row, as the loop builds it."""
    method, rng = build_method("idk_dpo"), random.Random(seed)
    views = [method.forget_views(r, rng)["idk"] for r in qa_rows() if r["era"] == "old"]
    return {**batch, "idk": collate([encode_qa(tok, q, a) for q, a in views], tok.pad_token_id)}


@pytest.fixture(scope="module")
def setup(fitted_tiny):
    """(fitted model dir, batch with forget/retain/idk)."""
    out, batch = fitted_tiny
    return out, with_idk(batch, load_tokenizer(out))


def test_the_methods_are_registered_with_their_defaults():
    assert set(METHODS) <= set(method_names())
    assert build_method("ga_kl").params.model_dump() == {"gamma": 1.0, "alpha": 1.0}
    assert build_method("simnpo").params.model_dump() == {"beta": 2.5, "delta": 0.0, "gamma": 1.0, "alpha": 1.0}
    assert build_method("idk_dpo").params.model_dump() == {
        "beta": 0.05,
        "gamma": 1.0,
        "alpha": 1.0,
        "idk_answers": IDK_ANSWERS,
    }
    needs = {n: (build_method(n).needs_reference, build_method(n).needs_retain) for n in METHODS}
    assert needs == {"ga_kl": (True, True), "simnpo": (False, True), "idk_dpo": (True, True)}
    for name, bad in [("simnpo", {"beta": 0}), ("idk_dpo", {"idk_answers": []}), ("ga_kl", {"bogus": 1})]:
        with pytest.raises(ValidationError, match=next(iter(bad))):
            build_method(name, bad)


# ---------------------------------------------------------------- ga_kl


def test_ga_kl_against_itself_is_minus_the_forget_nll(setup):
    path, batch = setup
    model, ref = load_model(path), load_model(path)
    out = build_method("ga_kl", {"gamma": 2.0, "alpha": 5.0}).loss(model, batch, ref)
    f, r = mean_nll(model, batch["forget"]).item(), mean_nll(model, batch["retain"]).item()
    assert out.metrics["kl"] == pytest.approx(0.0, abs=1e-6)
    assert out.loss.item() == pytest.approx(-2.0 * f, rel=1e-5)
    assert out.metrics["forget_loss"] == pytest.approx(f, rel=1e-5)
    assert out.metrics["retain_loss"] == pytest.approx(r, rel=1e-5)


def test_ga_kl_is_the_token_mean_kl_from_the_reference_on_retain_targets(setup, tiny_dir):
    path, batch = setup
    model, ref = load_model(path), load_model(tiny_dir / "model")  # reference: the unfitted model
    out = build_method("ga_kl", {"gamma": 1.0, "alpha": 0.5}).loss(model, batch, ref)
    with torch.no_grad():
        part = batch["retain"]
        lp = F.log_softmax(model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits, -1)
        lq = F.log_softmax(ref(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits, -1)
    kls = [
        F.kl_div(lp[b, t - 1], lq[b, t - 1], log_target=True, reduction="sum").item()  # KL(ref || model)
        for b, t in (part["labels"] != IGNORE_INDEX).nonzero().tolist()
    ]
    want = sum(kls) / len(kls)
    assert want > 0.1 and out.metrics["kl"] == pytest.approx(want, rel=1e-4)
    assert out.loss.item() == pytest.approx(-mean_nll(model, batch["forget"]).item() + 0.5 * want, rel=1e-4)


# ---------------------------------------------------------------- simnpo


def test_simnpo_loss_matches_the_formula():
    # per-sequence mean NLL [2, 3]; beta 2.5, delta 0.5: -(2/2.5) * mean(logsig(2.5 * 1.5), logsig(2.5 * 2.5))
    logp, n = torch.tensor([-4.0, -12.0]), torch.tensor([2, 4])
    want = -(2 / 2.5) * (logsig(2.5 * 1.5) + logsig(2.5 * 2.5)) / 2
    assert simnpo_loss(logp, n, beta=2.5, delta=0.5).item() == pytest.approx(want, rel=1e-6)
    # a forgotten answer (high NLL) costs almost nothing, a known one (NLL 0) costs (2/beta) ln 2
    assert simnpo_loss(torch.tensor([-1e4]), torch.tensor([1]), beta=2.5).item() == pytest.approx(0.0, abs=1e-6)
    assert simnpo_loss(torch.tensor([0.0]), torch.tensor([3]), beta=2.5).item() == pytest.approx(0.8 * math.log(2))


def test_simnpo_on_the_model_is_the_formula_on_its_log_probs_plus_retain(setup):
    path, batch = setup
    model = load_model(path)
    out = build_method("simnpo", {"beta": 3.0, "delta": 0.2, "gamma": 0.5, "alpha": 2.0}).loss(model, batch)
    with torch.no_grad():
        logp, n = sequence_logprob(model, batch["forget"])
        r = mean_nll(model, batch["retain"]).item()
    per_seq = (-logp / n).tolist()
    want = -(2 / 3.0) * sum(logsig(3.0 * (x - 0.2)) for x in per_seq) / len(per_seq)
    assert out.loss.item() == pytest.approx(0.5 * want + 2.0 * r, rel=1e-5)
    assert out.metrics["retain_loss"] == pytest.approx(r, rel=1e-5)
    assert out.metrics["forget_loss"] == pytest.approx(mean_nll(model, batch["forget"]).item(), rel=1e-5)


# ---------------------------------------------------------------- idk_dpo


def test_idk_view_is_the_question_with_a_refusal_drawn_by_the_rng():
    method = build_method("idk_dpo", {"idk_answers": ["No idea.", "Cannot say."]})
    row = qa_rows()[0]
    views = [method.forget_views(row, rng) for rng in [random.Random(s) for s in range(20)]]
    assert all(set(v) == {"idk"} and v["idk"][0] == row["question"] for v in views)
    assert {v["idk"][1] for v in views} == {"No idea.", "Cannot say."}
    assert method.forget_views(row, random.Random(3)) == method.forget_views(row, random.Random(3))


def test_dpo_loss_matches_the_formula():
    # r_w - r_l = (1 - 0) - (-2 - 0) = 3, beta 0.5: -(2/0.5) logsig(1.5)
    got = dpo_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([-2.0]), torch.tensor([0.0]), beta=0.5)
    assert got.item() == pytest.approx(-4 * logsig(1.5), rel=1e-6)


def test_idk_dpo_with_the_model_as_its_own_reference_is_2ln2_over_beta_plus_retain(setup):
    path, batch = setup
    model, ref = load_model(path), load_model(path)
    out = build_method("idk_dpo", {"beta": 0.1, "gamma": 0.5, "alpha": 2.0}).loss(model, batch, ref)
    r = mean_nll(model, batch["retain"]).item()
    assert out.loss.item() == pytest.approx(0.5 * 20 * math.log(2) + 2.0 * r, rel=1e-5)
    assert out.metrics["dpo_loss"] == pytest.approx(20 * math.log(2), rel=1e-6)
    assert out.metrics["forget_loss"] == pytest.approx(mean_nll(model, batch["forget"]).item(), rel=1e-5)
    assert out.metrics["idk_loss"] == pytest.approx(mean_nll(model, batch["idk"]).item(), rel=1e-5)
    with pytest.raises(KeyError, match="idk"):
        build_method("idk_dpo").loss(model, {k: v for k, v in batch.items() if k != "idk"}, ref)


# ---------------------------------------------------------------- they unlearn


@pytest.mark.parametrize(
    "name,params,spares_retain",
    [
        pytest.param("ga_kl", {}, True, id="ga_kl"),
        pytest.param("simnpo", {}, True, id="simnpo"),
        pytest.param("idk_dpo", {}, True, id="idk_dpo"),
    ],
)
def test_a_few_steps_raise_the_forget_loss_more_than_the_retain_loss(setup, name, params, spares_retain):
    path, batch = setup
    (f0, r0), (f1, r1), _ = nll_before_and_after_steps(path, batch, name, params)
    assert f1 > f0 + 0.05
    if spares_retain:
        assert (r1 - r0) < (f1 - f0)


# ---------------------------------------------------------------- the loop hands idk_dpo its view


def test_the_loop_hands_idk_dpo_the_refusal_view(tiny_dir, tmp_path, single_process_dist):
    from jobs.unlearn.loop import run_unlearning

    spec = UnlearnSpec(
        name="subset/old",
        model_path=str(tiny_dir / "model"),
        forget_path=str(tiny_dir / "forget.jsonl"),
        retain_path=str(tiny_dir / "retain.jsonl"),
        method="idk_dpo",
        optimizer={"lr": 3e-3},
        max_steps=3,
        batch_size=8,
        report_interval_s=0,
        seed=3,
        output_dir=str(tmp_path / "out"),
    )
    batches = []
    run_unlearning(spec, report=batches.append)
    rows = [r for b in batches for r in b]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # one batch holds all 8 forget rows: step 1 scores exactly the refusals the method drew per row with the
    # loop's rng (random.Random(seed), rows in file order), under the base model
    tok, base = load_tokenizer(tiny_dir / "model"), load_model(tiny_dir / "model")
    method, rng = build_method("idk_dpo"), random.Random(spec.seed)
    views = [method.forget_views(r, rng)["idk"] for r in load_jsonl(tiny_dir / "forget.jsonl")]
    with torch.no_grad():
        want = mean_nll(base, collate([encode_qa(tok, q, a) for q, a in views], tok.pad_token_id)).item()
    assert rows[0]["idk_loss"] == pytest.approx(want, rel=1e-4)
    # the model starts as its own reference: the DPO term is (2/beta) ln 2
    assert rows[0]["loss"] == pytest.approx(40 * math.log(2) + rows[0]["retain_loss"], rel=1e-4)
    assert rows[-1]["idk_loss"] < rows[0]["idk_loss"] and rows[-1]["dpo_loss"] < rows[0]["dpo_loss"]
