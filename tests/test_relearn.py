"""The relearning attack suite (jobs/evaluate/relearn.py) on the tiny random Llama: no Ray."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from jobs.evaluate.relearn import RelearnOptions, split_rows
from jobs.evaluate.suites import SUITES, SuiteContext, evaluate_model, get_suite, read_jsonl

RELEARN = {"steps": 10, "lr": 1e-3, "batch_size": 4, "fraction": 0.5, "seed": 0}


def _ascend(model, tok, rows, lr: float = 0.5, steps: int = 4) -> None:
    """Gradient ascent on the rows' answer NLL (plain SGD): an 'unlearned' model."""
    from jobs.data.format import collate, encode_qa, sequence_nll

    batch = collate([encode_qa(tok, r["question"], r["answer"]) for r in rows], tok.pad_token_id)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        nll, n = sequence_nll(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                              batch["labels"])
        opt.zero_grad()
        (-(nll.sum() / n.sum())).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()


def _hand_probs(model, tok, rows) -> list[float]:
    """exp(-mean NLL of the answer tokens), one plain forward pass per row."""
    from jobs.data.format import encode_qa

    out = []
    with torch.no_grad():
        for r in rows:
            e = encode_qa(tok, r["question"], r["answer"])
            ids = torch.tensor([e["input_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            labels = torch.tensor(e["labels"][1:])
            keep = labels != -100
            nll = -logp[keep].gather(-1, labels[keep].unsqueeze(-1)).squeeze(-1)
            out.append(math.exp(-float(nll.mean())))
    return out


@pytest.fixture(scope="module")
def unlearned(tiny_dir, tmp_path_factory):
    """(path, tokenizer, forget rows, base forget probs, unlearned forget probs) of the tiny model after gradient
    ascent on its forget rows."""
    from jobs.models import load_model, load_tokenizer, save_model

    tok, model = load_tokenizer(str(tiny_dir / "model")), load_model(str(tiny_dir / "model"))
    rows = read_jsonl(str(tiny_dir / "forget.jsonl"))
    base = _hand_probs(model, tok, rows)
    _ascend(model, tok, rows)
    path = tmp_path_factory.mktemp("relearn") / "unlearned"
    save_model(model, tok, path)
    return path, tok, rows, base, _hand_probs(model, tok, rows)


@pytest.fixture(scope="module")
def attacked(unlearned, tiny_dir):
    path = unlearned[0]
    return evaluate_model(str(path), {"forget": str(tiny_dir / "forget.jsonl")}, suites=["relearn"], batch_size=8,
                          suite_options={"relearn": RELEARN})


def test_suite_is_registered_with_its_options_needs_and_group():
    from jobs.evaluate.suites import metric_group
    from orchestrator.config import EvalConfig

    suite = get_suite("relearn")
    assert "relearn" in SUITES.names()
    assert suite.sources() == ("forget",)
    assert suite.sources(RelearnOptions(train_on="retain")) == ("forget", "retain")
    assert EvalConfig().suite_options("relearn") == {"steps": 10, "lr": 1e-5, "batch_size": 4, "fraction": 0.5,
                                                     "train_on": "forget", "seed": 0, "optimizer": "adamw"}
    assert EvalConfig(relearn={"steps": 3}).suite_options("relearn")["steps"] == 3
    for bad in ({"lr": 0}, {"fraction": 1.0}, {"fraction": 0}, {"train_on": "general"}, {"data": "retain"}, {"bogus": 1}):
        with pytest.raises(ValueError):
            RelearnOptions(**bad)
    assert {metric_group(m) for m in ("relearn_forget_prob", "relearn_before_prob", "relearn_gain")} == {"Robustness"}


def test_relearning_raises_the_held_out_forget_probability(unlearned, attacked):
    _, _, _, base, ascended = unlearned
    assert np.mean(ascended) < np.mean(base)  # the ascent did unlearn
    m = attacked["metrics"]
    assert set(m) == {"relearn_forget_prob", "relearn_before_prob", "relearn_gain"}
    assert m["relearn_forget_prob"] > m["relearn_before_prob"]
    assert m["relearn_gain"] == pytest.approx(m["relearn_forget_prob"] - m["relearn_before_prob"], abs=1e-12)
    after = attacked["raw"]["relearn_forget_prob"]
    assert len(after) == len(attacked["raw"]["relearn_heldout"]) == 4
    assert m["relearn_forget_prob"] == pytest.approx(np.mean(after))


def test_before_prob_is_the_held_out_answer_probability_by_hand(unlearned, attacked):
    ascended = unlearned[4]
    held = attacked["raw"]["relearn_heldout"]
    by_hand = [ascended[i] for i in held]
    assert attacked["raw"]["relearn_before_prob"] == pytest.approx(by_hand, rel=1e-4)
    assert attacked["metrics"]["relearn_before_prob"] == pytest.approx(np.mean(by_hand), rel=1e-4)


def test_split_is_the_seeded_shuffle_and_a_fraction_without_held_out_rows_is_refused(unlearned, attacked):
    order = np.random.default_rng(0).permutation(8)
    attack, held = split_rows(8, 0.5, seed=0)
    assert attack == sorted(order[:4].tolist()) and held == sorted(order[4:].tolist())
    assert not set(attack) & set(held) and sorted(attack + held) == list(range(8))
    assert attacked["raw"]["relearn_heldout"] == held
    assert len(split_rows(50, 0.14)[0]) == 7  # 0.14 * 50 = 7.000000000000001 in floats: 7 rows, not 8
    assert len(split_rows(8, 0.1)[0]) == 1 and len(split_rows(8, 0.8)[1]) == 1
    assert split_rows(8, 0.5, seed=1) != (attack, held)
    with pytest.raises(ValueError, match=r"eval\.relearn\.fraction"):
        split_rows(8, 0.9)  # ceil(7.2) = 8: none held out
    from jobs.models import load_model

    path, tok, rows, _, _ = unlearned
    with pytest.raises(ValueError, match=r"eval\.relearn\.fraction"):
        get_suite("relearn")(SuiteContext(load_model(str(path)), tok), {"forget": rows[:2]}, fraction=0.6)


def test_the_evaluated_model_is_left_unchanged(unlearned, tiny_dir):
    from jobs.models import load_model

    path, tok, rows, _, _ = unlearned
    model = load_model(str(path)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    retain = read_jsonl(str(tiny_dir / "retain.jsonl"))
    res = get_suite("relearn")(SuiteContext(model, tok, batch_size=8), {"forget": rows, "retain": retain},
                               **{**RELEARN, "steps": 3, "train_on": "retain"})
    assert res["metrics"]["relearn_forget_prob"] != res["metrics"]["relearn_before_prob"]  # it did train (a copy)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    with pytest.raises(ValueError, match="retain"):
        get_suite("relearn")(SuiteContext(model, tok), {"forget": rows}, train_on="retain")
