"""Unlearning methods: the registry, their losses against hand-computed values, and that they unlearn."""

import math

import pytest
import torch
from pydantic import ValidationError

from jobs.data.format import collate, encode_qa
from jobs.models import load_model, load_tokenizer
from jobs.unlearn.methods import build_method, get_method, method_names
from jobs.unlearn.methods.base import mean_nll, sequence_logprob
from jobs.unlearn.methods.npo import npo_loss
from tests.conftest import qa_rows


@pytest.fixture(scope="module")
def setup(tiny_dir):
    tok = load_tokenizer(tiny_dir / "model")
    rows = qa_rows()
    enc = lambda rs: collate([encode_qa(tok, r["question"], r["answer"]) for r in rs], tok.pad_token_id)
    batch = {
        "forget": enc([r for r in rows if r["era"] == "old"]),
        "retain": enc([r for r in rows if r["era"] == "new"]),
    }
    return tiny_dir / "model", batch


def test_registry_knows_the_methods_and_rejects_unknown_names():
    assert {"ga", "grad_diff", "npo"} <= set(method_names())
    with pytest.raises(KeyError, match="unknown unlearning method 'nope'; known: .*npo"):
        get_method("nope")


def test_params_are_validated_by_field():
    with pytest.raises(ValidationError, match="beta"):
        build_method("npo", {"beta": -1})
    with pytest.raises(ValidationError, match="bogus"):
        build_method("grad_diff", {"bogus": 1})


def test_ga_and_grad_diff_losses_are_the_signed_nlls(setup):
    path, batch = setup
    model = load_model(path)
    f, r = mean_nll(model, batch["forget"]).item(), mean_nll(model, batch["retain"]).item()
    assert build_method("ga").loss(model, batch).loss.item() == pytest.approx(-f, rel=1e-5)
    gd = build_method("grad_diff", {"gamma": 2.0, "alpha": 0.5}).loss(model, batch)
    assert gd.loss.item() == pytest.approx(-2.0 * f + 0.5 * r, rel=1e-5)
    assert gd.metrics == pytest.approx({"forget_loss": f, "retain_loss": r}, rel=1e-5)


def test_npo_loss_matches_the_formula():
    # log ratio 0 -> -(2/b) log sigmoid(0) = (2/b) ln 2
    assert npo_loss(torch.zeros(3), torch.zeros(3), beta=0.1).item() == pytest.approx(20 * math.log(2), rel=1e-6)
    # log ratios [-10, 10], beta 0.5: mean of -(2/0.5) * log sigmoid(-0.5 * x)
    x = torch.tensor([-10.0, 10.0])
    want = -4.0 * (math.log(1 / (1 + math.exp(-5.0))) + math.log(1 / (1 + math.exp(5.0)))) / 2
    assert npo_loss(x, torch.zeros(2), beta=0.5).item() == pytest.approx(want, rel=1e-6)


def test_npo_with_the_model_as_its_own_reference_is_2ln2_over_beta_plus_retain(setup):
    path, batch = setup
    model, ref = load_model(path), load_model(path)
    out = build_method("npo", {"beta": 0.1, "alpha": 1.0}).loss(model, batch, ref)
    retain = mean_nll(model, batch["retain"]).item()
    assert out.loss.item() == pytest.approx(20 * math.log(2) + retain, rel=1e-5)


@pytest.mark.parametrize("name", ["ga", "grad_diff", "npo"])
def test_a_few_steps_raise_the_forget_loss_more_than_the_retain_loss(setup, name):
    path, batch = setup
    torch.manual_seed(0)
    model, ref = load_model(path), load_model(path).eval()
    method = build_method(name)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    f0, r0 = mean_nll(model, batch["forget"]).item(), mean_nll(model, batch["retain"]).item()
    for _ in range(5):
        opt.zero_grad()
        method.loss(model, batch, ref).loss.backward()
        opt.step()
    f1, r1 = mean_nll(model, batch["forget"]).item(), mean_nll(model, batch["retain"]).item()
    assert f1 > f0 + 0.05
    if name != "ga":  # the retain term holds retain loss back
        assert (r1 - r0) < (f1 - f0)


def test_sequence_logprob_counts_answer_tokens_only(setup):
    path, batch = setup
    model = load_model(path)
    _, n = sequence_logprob(model, batch["forget"])
    assert torch.equal(n, (batch["forget"]["labels"][:, 1:] != -100).sum(1))
