"""random_label and adversarial, the methods that train on wrong labels (Yao et al. 2024): each target token
replaced by a seeded random other token, or by one of the model's own top-k wrong tokens; the labels and the
losses against hand-computed values, and that a few steps unlearn."""

import pytest
import torch
from pydantic import ValidationError

from jobs.data.format import IGNORE_INDEX
from jobs.models import load_model
from jobs.unlearn.methods import build_method, method_names
from jobs.unlearn.methods.adversarial import adversarial_labels
from jobs.unlearn.methods.base import mean_nll
from jobs.unlearn.methods.random_label import random_labels
from tests.conftest import nll_before_and_after_steps

METHODS = ["random_label", "adversarial"]


@pytest.fixture(scope="module")
def setup(fitted_tiny):
    """(fitted model dir, batch with forget/retain)."""
    return fitted_tiny


def test_the_methods_are_registered_with_their_defaults():
    assert set(METHODS) <= set(method_names())
    assert build_method("random_label").params.model_dump() == {"seed": 0, "alpha": 0.0}
    assert build_method("adversarial").params.model_dump() == {"k": 5, "seed": 0, "alpha": 0.0}
    needs = {n: (build_method(n).needs_reference, build_method(n).needs_retain) for n in METHODS}
    assert needs == {"random_label": (False, False), "adversarial": (False, False)}
    with pytest.raises(ValidationError, match="k"):
        build_method("adversarial", {"k": 0})


# ---------------------------------------------------------------- random_label


def test_random_labels_are_wrong_tokens_exactly_where_targets_are(setup):
    _, batch = setup
    labels, target = batch["forget"]["labels"], batch["forget"]["labels"] != IGNORE_INDEX
    g = torch.Generator().manual_seed(0)
    a, b = random_labels(labels, 400, g), random_labels(labels, 400, g)
    for fake in (a, b):
        assert torch.equal(fake == IGNORE_INDEX, ~target)
        assert (fake[target] != labels[target]).all()
        assert fake[target].min() >= 0 and fake[target].max() < 400
    assert (a[target] != b[target]).float().mean() > 0.9  # the generator advances
    assert torch.equal(a, random_labels(labels, 400, torch.Generator().manual_seed(0)))  # and is seeded


def test_random_label_loss_is_the_nll_of_the_seeded_random_labels(setup):
    path, batch = setup
    model = load_model(path)
    method = build_method("random_label", {"seed": 7, "alpha": 0.5})
    out1, out2 = method.loss(model, batch), method.loss(model, batch)
    g = torch.Generator().manual_seed(7)
    vocab = model.config.vocab_size
    with torch.no_grad():
        r = mean_nll(model, batch["retain"]).item()
        for out in (out1, out2):  # each call draws the next labels
            fake = {**batch["forget"], "labels": random_labels(batch["forget"]["labels"], vocab, g)}
            assert out.loss.item() == pytest.approx(mean_nll(model, fake).item() + 0.5 * r, rel=1e-5)
    assert out1.loss.item() != out2.loss.item()
    assert out1.metrics["forget_loss"] == pytest.approx(mean_nll(model, batch["forget"]).item(), rel=1e-5)


# ---------------------------------------------------------------- adversarial


def test_adversarial_labels_are_top_k_wrong_tokens(setup):
    path, batch = setup
    model, part = load_model(path), batch["forget"]
    with torch.no_grad():
        logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits
    labels, target = part["labels"], part["labels"] != IGNORE_INDEX
    g = torch.Generator().manual_seed(0)
    for k in (1, 3):
        fake = adversarial_labels(logits, labels, k, g)
        assert torch.equal(fake == IGNORE_INDEX, ~target)
        for b, t in target.nonzero().tolist():
            row, truth = logits[b, t - 1].clone(), labels[b, t].item()
            assert fake[b, t].item() != truth
            row[truth] = float("-inf")
            assert fake[b, t].item() in row.topk(k).indices.tolist()
            if k == 1:
                assert fake[b, t].item() == row.argmax().item()
    picks = adversarial_labels(logits, labels, 5, g)[target]
    assert len(set(picks.tolist())) > 5  # a random choice among the top 5, not always the first


def test_adversarial_loss_is_the_nll_of_the_drawn_wrong_tokens(setup):
    path, batch = setup
    model = load_model(path)
    out = build_method("adversarial", {"k": 3, "seed": 4}).loss(model, batch)
    with torch.no_grad():
        logits = model(input_ids=batch["forget"]["input_ids"], attention_mask=batch["forget"]["attention_mask"]).logits
        fake = adversarial_labels(logits, batch["forget"]["labels"], 3, torch.Generator().manual_seed(4))
        want = mean_nll(model, {**batch["forget"], "labels": fake}).item()
    assert out.loss.item() == pytest.approx(want, rel=1e-5)
    assert "retain_loss" not in out.metrics  # alpha 0: no retain term
    assert out.metrics["forget_loss"] == pytest.approx(mean_nll(model, batch["forget"]).item(), rel=1e-5)


# ---------------------------------------------------------------- they unlearn


# random_label and adversarial alone (alpha 0, as in Yao et al.) raise forget and retain NLL almost alike on
# this 16-row toy (its answers share most tokens): with alpha 0 only the forget rise is asserted
@pytest.mark.parametrize(
    "name,params,spares_retain",
    [
        pytest.param("random_label", {}, False, id="random_label"),
        pytest.param("random_label", {"alpha": 1.0}, True, id="random_label+retain"),
        pytest.param("adversarial", {}, False, id="adversarial"),
        pytest.param("adversarial", {"alpha": 1.0}, True, id="adversarial+retain"),
    ],
)
def test_a_few_steps_raise_the_forget_loss_more_than_the_retain_loss(setup, name, params, spares_retain):
    path, batch = setup
    (f0, r0), (f1, r1), _ = nll_before_and_after_steps(path, batch, name, params)
    assert f1 > f0 + 0.05
    if spares_retain:
        assert (r1 - r0) < (f1 - f0)
