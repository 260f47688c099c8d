"""wga, satimp, undial, ce_u, pdu, the methods whose loss is a mean over target tokens of a per-token term
(a detached weight times the NLL, a cross-entropy to a fixed target distribution, PDU's flattened logits), as
open-unlearning has them: losses against hand-computed values on the tiny model, their logit gradients on a
fake model (which parts are detached), that a few steps unlearn, and PDU's dual variable."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from jobs.data.format import IGNORE_INDEX
from jobs.models import load_model
from jobs.unlearn.methods import build_method, method_names
from jobs.unlearn.methods.base import mean_nll
from jobs.unlearn.methods.ce_u import drop_first_targets
from tests.conftest import nll_before_and_after_steps

METHODS = ["wga", "undial", "ce_u", "satimp", "pdu"]


@pytest.fixture(scope="module")
def setup(fitted_tiny, tiny_dir):
    """(fitted model dir, unfitted model dir, batch with forget/retain)."""
    out, batch = fitted_tiny
    return out, tiny_dir / "model", batch


def targets(part: dict) -> list[tuple[int, int, int]]:
    """(row, position predicting the target, target id) for every target token of a batch, by hand."""
    labels = part["labels"]
    return [(b, t - 1, int(labels[b, t])) for b, t in (labels != IGNORE_INDEX).nonzero().tolist() if t > 0]


def logprobs(model, part: dict) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits
    return F.log_softmax(logits.float(), -1)


class FakeLM(torch.nn.Module):
    """A "model" whose logits are a parameter: the gradient of a loss with respect to the logits, directly."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())

    def forward(self, input_ids=None, attention_mask=None):
        return SimpleNamespace(logits=self.logits)


def fake_batch(seed: int = 0, b: int = 2, t: int = 6, v: int = 11):
    """(FakeLM, forget part): random logits, labels with a prompt (-100) of 2 and one padded position."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[:, :2] = IGNORE_INDEX
    labels[1, -1] = IGNORE_INDEX
    part = {
        "input_ids": torch.zeros(b, t, dtype=torch.long),
        "attention_mask": torch.ones(b, t, dtype=torch.long),
        "labels": labels,
    }
    return FakeLM(3 * torch.randn(b, t, v, generator=g)), part


def logit_grad(method, model, part, ref=None) -> torch.Tensor:
    model.zero_grad()
    method.loss(model, {"forget": part, "retain": None}, ref).loss.backward()
    return model.logits.grad.clone()


def test_the_methods_are_registered_with_their_defaults():
    assert set(METHODS) <= set(method_names())
    dump = lambda n: build_method(n).params.model_dump()
    assert dump("wga") == {"beta": 1.0, "gamma": 1.0, "alpha": 1.0}
    assert dump("undial") == {"beta": 10.0, "gamma": 1.0, "alpha": 0.0}
    assert dump("ce_u") == {"ignore_first_n": 1, "alpha": 0.0}
    assert dump("satimp") == {"beta1": 5.0, "beta2": 1.0, "gamma": 0.1, "alpha": 1.0}
    assert dump("pdu") == {"epsilon": None, "alpha": 100.0, "dual_lr": 1.0, "dual_warmup": 0, "gamma": 1.0}
    needs = {n: (build_method(n).needs_reference, build_method(n).uses_retain()) for n in METHODS}
    assert needs == {
        "wga": (False, True),
        "undial": (True, False),
        "ce_u": (False, False),
        "satimp": (False, True),
        "pdu": (False, True),
    }
    assert build_method("undial", {"alpha": 1.0}).uses_retain() and build_method("ce_u", {"alpha": 0.5}).uses_retain()
    for name, bad in [
        ("wga", {"beta": -1}),
        ("satimp", {"beta2": -1}),
        ("ce_u", {"ignore_first_n": -1}),
        ("pdu", {"dual_lr": -1}),
        ("undial", {"bogus": 1}),
    ]:
        with pytest.raises(ValidationError, match=next(iter(bad))):
            build_method(name, bad)


# ---------------------------------------------------------------- wga and satimp (token-weighted ascent)

WEIGHTS = {
    "wga": lambda p, prm: p ** prm["beta"],
    "satimp": lambda p, prm: p ** prm["beta1"] * (1 - p) ** prm["beta2"],
}


@pytest.mark.parametrize(
    "name,params",
    [
        ("wga", {"beta": 0.7, "gamma": 2.0, "alpha": 0.5}),
        ("satimp", {"beta1": 2.0, "beta2": 1.5, "gamma": 0.3, "alpha": 2.0}),
    ],
)
def test_weighted_ascent_is_minus_the_token_mean_of_weight_times_nll_plus_retain(setup, name, params):
    path, _, batch = setup
    model = load_model(path)
    out = build_method(name, params).loss(model, batch)
    lp = logprobs(model, batch["forget"])
    terms, nlls = [], []
    for b, t, y in targets(batch["forget"]):
        logp = lp[b, t, y].item()
        terms.append(WEIGHTS[name](math.exp(logp), params) * -logp)
        nlls.append(-logp)
    forget = -sum(terms) / len(terms)
    r = mean_nll(model, batch["retain"]).item()
    assert out.loss.item() == pytest.approx(params["gamma"] * forget + params["alpha"] * r, rel=1e-5)
    assert out.metrics[f"{name}_loss"] == pytest.approx(forget, rel=1e-5)
    assert out.metrics["forget_loss"] == pytest.approx(sum(nlls) / len(nlls), rel=1e-5)
    assert out.metrics["retain_loss"] == pytest.approx(r, rel=1e-5)


def test_wga_with_beta_0_is_gradient_ascent(setup):
    path, _, batch = setup
    model = load_model(path)
    out = build_method("wga", {"beta": 0.0, "alpha": 0.0}).loss(model, batch)
    assert out.loss.item() == pytest.approx(-mean_nll(model, batch["forget"]).item(), rel=1e-5)


@pytest.mark.parametrize(
    "name,params",
    [
        ("wga", {"beta": 0.5}),
        ("satimp", {"beta1": 2.0, "beta2": 3.0, "gamma": 1.0}),
    ],
)
def test_the_token_weights_are_detached(name, params):
    """d/dz of -mean(w * nll) with w a constant: -(w / N) * (softmax(z) - onehot(y)) at each target position."""
    model, part = fake_batch()
    grad = logit_grad(build_method(name, {**params, "alpha": 0.0}), model, part)
    want = torch.zeros_like(grad)
    rows = targets(part)
    for b, t, y in rows:
        p = torch.softmax(model.logits[b, t].detach(), -1)
        want[b, t] = -(WEIGHTS[name](p[y].item(), params) / len(rows)) * (p - F.one_hot(torch.tensor(y), p.numel()))
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- undial


def test_undial_is_the_cross_entropy_to_the_adjusted_reference_distribution(setup):
    path, base, batch = setup
    model, ref = load_model(path), load_model(base)  # reference: the unfitted model, so the two differ
    params = {"beta": 3.0, "gamma": 0.5, "alpha": 2.0}
    out = build_method("undial", params).loss(model, batch, ref)
    lp, lq = logprobs(model, batch["forget"]), logprobs(ref, batch["forget"])
    ces, kls = [], []
    for b, t, y in targets(batch["forget"]):
        z = lq[b, t].clone()  # log-probs: softmax is shift-invariant, so they stand for the logits
        z[y] -= 3.0
        q = torch.softmax(z, -1)
        ces.append(-(q * lp[b, t]).sum().item())
        kls.append((q * (q.log() - lp[b, t])).sum().item())
    ce, kl = sum(ces) / len(ces), sum(kls) / len(kls)
    r = mean_nll(model, batch["retain"]).item()
    assert out.loss.item() == pytest.approx(0.5 * ce + 2.0 * r, rel=1e-5)
    assert out.metrics["undial_loss"] == pytest.approx(kl, rel=1e-4, abs=1e-6)
    assert out.metrics["forget_loss"] == pytest.approx(mean_nll(model, batch["forget"]).item(), rel=1e-5)


def test_undial_against_itself_with_no_adjustment_is_its_own_entropy(setup):
    path, _, batch = setup
    model, ref = load_model(path), load_model(path)
    out = build_method("undial", {"beta": 0.0}).loss(model, batch, ref)
    assert out.metrics["undial_loss"] == pytest.approx(0.0, abs=1e-5)
    assert "retain_loss" not in out.metrics  # alpha 0 by default
    lp = logprobs(model, batch["forget"])
    ents = [-(lp[b, t].exp() * lp[b, t]).sum().item() for b, t, _ in targets(batch["forget"])]
    assert out.loss.item() == pytest.approx(sum(ents) / len(ents), rel=1e-5)


def test_undial_gradient_is_softmax_minus_the_fixed_target():
    model, part = fake_batch(1)
    ref = FakeLM(torch.randn_like(model.logits))
    grad = logit_grad(build_method("undial", {"beta": 2.0}), model, part, ref)
    want = torch.zeros_like(grad)
    rows = targets(part)
    for b, t, y in rows:
        z = ref.logits[b, t].detach().clone()
        z[y] -= 2.0
        want[b, t] = (torch.softmax(model.logits[b, t].detach(), -1) - torch.softmax(z, -1)) / len(rows)
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-7)
    assert ref.logits.grad is None


# ---------------------------------------------------------------- ce_u


def test_drop_first_targets_masks_the_first_n_targets_of_each_row():
    labels = torch.tensor([[-100, -100, 5, 6, 7], [-100, 8, 9, -100, -100]])
    assert drop_first_targets(labels, 1).tolist() == [[-100, -100, -100, 6, 7], [-100, -100, 9, -100, -100]]
    assert drop_first_targets(labels, 0).tolist() == labels.tolist()
    assert (drop_first_targets(labels, 5) == -100).all()


def ce_u_by_hand(logits: torch.Tensor, rows: list) -> float:
    vals = []
    for b, t, y in rows:
        z = logits[b, t].detach().float().clone()
        lp = F.log_softmax(z, -1)
        z[y] = float("-inf")
        q = torch.softmax(z, -1)
        assert q[y] == 0
        vals.append(-(q * lp).sum().item())
    return sum(vals) / len(vals)


def test_ce_u_is_the_cross_entropy_to_the_model_without_its_true_token(setup):
    path, _, batch = setup
    model = load_model(path)
    part = batch["forget"]
    with torch.no_grad():
        logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits
    all_rows = targets(part)
    first = {b: min(t for bb, t, _ in all_rows if bb == b) for b, _, _ in all_rows}
    kept = [(b, t, y) for b, t, y in all_rows if t != first[b]]  # the first answer token of each row is left out
    want = ce_u_by_hand(logits, kept)
    out = build_method("ce_u", {"alpha": 0.5}).loss(model, batch)
    r = mean_nll(model, batch["retain"]).item()
    assert out.loss.item() == pytest.approx(want + 0.5 * r, rel=1e-5)
    assert out.metrics["ce_u_loss"] == pytest.approx(want, rel=1e-5)
    assert out.metrics["forget_loss"] == pytest.approx(mean_nll(model, part).item(), rel=1e-5)
    every = build_method("ce_u", {"ignore_first_n": 0}).loss(model, batch)
    assert every.loss.item() == pytest.approx(ce_u_by_hand(logits, all_rows), rel=1e-5)


def test_ce_u_gradient_is_softmax_minus_the_target_without_the_true_token():
    model, part = fake_batch(2)
    grad = logit_grad(build_method("ce_u", {"ignore_first_n": 0}), model, part)
    want = torch.zeros_like(grad)
    rows = targets(part)
    for b, t, y in rows:
        z = model.logits[b, t].detach().clone()
        p = torch.softmax(z, -1)
        z[y] = float("-inf")
        want[b, t] = (p - torch.softmax(z, -1)) / len(rows)
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-7)
    b, t, y = map(torch.tensor, zip(*rows))
    assert (grad[b, t, y] > 0).all()  # descent lowers every true token's logit


# ---------------------------------------------------------------- pdu


def test_pdu_loss_is_flattening_plus_lambda_times_the_retain_slack(setup):
    path, _, batch = setup
    model = load_model(path)
    method = build_method("pdu", {"epsilon": 0.25, "alpha": 3.0, "gamma": 0.5, "dual_lr": 0.0})
    out = method.loss(model, batch)
    part = batch["forget"]
    with torch.no_grad():
        logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits
    flat = [(logits[b, t].max() - logits[b, t].mean()).item() ** 2 for b, t, _ in targets(part)]
    f = sum(flat) / len(flat)
    r = mean_nll(model, batch["retain"]).item()
    assert out.loss.item() == pytest.approx(0.5 * f + 3.0 * (r - 0.25), rel=1e-5)
    assert out.metrics["pdu_loss"] == pytest.approx(f, rel=1e-5)
    assert out.metrics["retain_loss"] == pytest.approx(r, rel=1e-5)
    assert out.metrics["pdu_lambda"] == pytest.approx(3.0)
    assert out.metrics["forget_loss"] == pytest.approx(mean_nll(model, part).item(), rel=1e-5)
    assert method.loss(model, batch).metrics["pdu_lambda"] == pytest.approx(3.0)  # dual_lr 0: lambda stays


def test_pdu_lambda_rises_while_retain_loss_exceeds_epsilon_and_stays_0_below(setup):
    path, _, batch = setup
    model = load_model(path)
    r = mean_nll(model, batch["retain"]).item()
    assert r > 0.1
    # above the bound: lambda grows by dual_lr * (R - eps) per call, from alpha; the loss uses the current one
    up = build_method("pdu", {"epsilon": r - 0.1, "alpha": 1.0, "dual_lr": 2.0})
    lams = [up.loss(model, batch).metrics["pdu_lambda"].item() for _ in range(3)]
    assert lams == pytest.approx([1.0, 1.2, 1.4], abs=1e-4)
    assert up.lam.item() == pytest.approx(1.6, abs=1e-4)
    # below the bound: lambda shrinks to 0 and stays there (max(0, .)), so the loss is the forget term alone
    down = build_method("pdu", {"epsilon": r + 0.5, "alpha": 0.6, "dual_lr": 1.0})
    outs = [down.loss(model, batch) for _ in range(4)]
    assert [o.metrics["pdu_lambda"].item() for o in outs] == pytest.approx([0.6, 0.1, 0.0, 0.0], abs=1e-4)
    assert outs[-1].loss.item() == pytest.approx(outs[-1].metrics["pdu_loss"].item(), rel=1e-6)
    zero = build_method("pdu", {"epsilon": r + 0.5, "alpha": 0.0})
    assert all(zero.loss(model, batch).metrics["pdu_lambda"].item() == 0.0 for _ in range(3))


def test_pdu_warmup_and_the_default_epsilon(setup, tiny_dir):
    path, _, batch = setup
    model = load_model(path)
    warm = build_method("pdu", {"epsilon": 0.0, "alpha": 1.0, "dual_warmup": 2})
    r = mean_nll(model, batch["retain"]).item()
    assert [warm.loss(model, batch).metrics["pdu_lambda"].item() for _ in range(4)] == pytest.approx(
        [1.0, 1.0, 1.0, 1.0 + r], rel=1e-5
    )  # moves after the 2 warmup calls
    # epsilon None: the first batch's retain loss is the bound; the same batch keeps lambda where it is
    auto = build_method("pdu", {"alpha": 5.0})
    out = auto.loss(model, batch)
    assert auto.epsilon.item() == pytest.approx(r, rel=1e-5)
    assert out.loss.item() == pytest.approx(out.metrics["pdu_loss"].item(), rel=1e-5)  # retain slack 0
    assert auto.loss(model, batch).metrics["pdu_lambda"].item() == pytest.approx(5.0)
    # a worse retain batch (the unfitted model's) pushes it up
    worse = load_model(tiny_dir / "model")
    auto.loss(worse, batch)
    assert auto.lam.item() > 5.0 + 1.0


# ---------------------------------------------------------------- they unlearn


@pytest.mark.parametrize(
    "name,params",
    [
        pytest.param("wga", {}, id="wga"),
        pytest.param("satimp", {}, id="satimp"),
        pytest.param("undial", {}, id="undial"),
        pytest.param("ce_u", {}, id="ce_u"),
        pytest.param("pdu", {}, id="pdu"),
    ],
)
def test_a_few_steps_lower_the_forget_probability(setup, name, params):
    path, _, batch = setup
    (f0, r0), (f1, r1), method = nll_before_and_after_steps(path, batch, name, params)
    assert f1 > f0 + 0.05, (f0, f1, r0, r1)
    if method.uses_retain():
        assert (r1 - r0) < (f1 - f0), (f0, f1, r0, r1)


def test_pdu_dual_state_travels_with_the_checkpoint_rng_state():
    """A job restored from a checkpoint goes on with the lambda (and epsilon) it had reached."""
    from jobs.unlearn.methods import build_method
    from jobs.unlearn.outputs import rng_state, set_rng_state

    m = build_method("pdu", {"alpha": 1.0, "dual_lr": 1.0, "epsilon": 0.5})
    m.dual_step(torch.tensor(2.0))
    m.dual_step(torch.tensor(2.0))  # lambda 1 -> 2.5 -> 4.0
    state = rng_state(m)
    fresh = build_method("pdu", {"alpha": 1.0, "dual_lr": 1.0, "epsilon": 0.5})
    set_rng_state(state, fresh)
    assert float(fresh.lam) == pytest.approx(4.0) and fresh.calls == 2 and float(fresh.epsilon) == 0.5
