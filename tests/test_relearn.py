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
        nll, n = sequence_nll(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
        )
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
    return evaluate_model(
        str(path),
        {"forget": str(tiny_dir / "forget.jsonl")},
        suites=["relearn"],
        batch_size=8,
        suite_options={"relearn": RELEARN},
    )


def test_suite_is_registered_with_its_options_needs_and_group():
    from jobs.evaluate.suites import metric_group
    from orchestrator.config.schema import EvalConfig

    suite = get_suite("relearn")
    assert "relearn" in SUITES.names()
    assert suite.sources() == ("forget",)
    assert suite.sources(RelearnOptions(train_on="retain")) == ("forget", "retain")
    assert EvalConfig().suite_options("relearn") == {
        "steps": 10,
        "lr": 1e-5,
        "batch_size": 4,
        "fraction": 0.5,
        "train_on": "forget",
        "seed": 0,
        "optimizer": "adamw",
    }
    assert EvalConfig(relearn={"steps": 3}).suite_options("relearn")["steps"] == 3
    for bad in (
        {"lr": 0},
        {"fraction": 1.0},
        {"fraction": 0},
        {"train_on": "general"},
        {"data": "retain"},
        {"bogus": 1},
    ):
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
    res = get_suite("relearn")(
        SuiteContext(model, tok, batch_size=8),
        {"forget": rows, "retain": retain},
        **{**RELEARN, "steps": 3, "train_on": "retain"},
    )
    assert res["metrics"]["relearn_forget_prob"] != res["metrics"]["relearn_before_prob"]  # it did train (a copy)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    with pytest.raises(ValueError, match="retain"):
        get_suite("relearn")(SuiteContext(model, tok), {"forget": rows}, train_on="retain")


def _bf16_and_fp32(path):
    """The unlearned model loaded as bf16, and the very same (bf16-representable) weights as an fp32 model."""
    import copy

    from jobs.models import load_model

    bf16 = load_model(str(path), dtype="bfloat16").eval()
    return bf16, copy.deepcopy(bf16).float()


def test_a_bf16_model_is_attacked_through_an_fp32_copy(unlearned):
    import jobs.evaluate.relearn as R

    path, tok, rows, _, _ = unlearned
    bf16, _ = _bf16_and_fp32(path)
    before = {k: v.clone() for k, v in bf16.state_dict().items()}
    train = [rows[i] for i in split_rows(len(rows), 0.5)[0]]
    attacked = R.fp32_copy(bf16)
    assert {p.dtype for p in attacked.parameters()} == {torch.float32} and not attacked.training
    R.relearn(attacked, SuiteContext(bf16, tok), train, RelearnOptions())  # the defaults: 10 AdamW steps of lr 1e-5
    pairs = list(zip(attacked.parameters(), bf16.parameters()))
    moved = sum(int((a != b.float()).sum()) for a, b in pairs) / sum(b.numel() for _, b in pairs)
    # measured 99.9% (every element with a gradient; AdamW's weight decay moves most of the rest). The old bf16
    # fine-tune moved 10%: its steps of ~lr = 1e-5 are below half a bf16 unit (6e-5 at 0.02) of most weights
    assert moved > 0.9
    assert all(p.grad is None for p in attacked.parameters()) and not attacked.training
    assert all(torch.equal(before[k], v) for k, v in bf16.state_dict().items())  # the model itself is untouched
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


def test_bf16_relearn_gain_at_the_defaults_is_the_fp32_runs(unlearned, monkeypatch):
    import copy

    import jobs.evaluate.relearn as R

    path, tok, rows, _, _ = unlearned
    bf16, fp32 = _bf16_and_fp32(path)

    def metrics(model) -> dict:  # the suite's default lr (1e-5) and steps (10)
        return get_suite("relearn")(SuiteContext(model, tok, batch_size=8), {"forget": rows})["metrics"]

    m32, m16 = metrics(fp32), metrics(bf16)
    g32 = m32["relearn_gain"]
    assert g32 > 3e-5  # measured 5.64e-5 (before the attack the held-out probability is 1.65e-3)
    # Tolerance, 1e-6 of the gain. Casting bf16 to fp32 is exact, so both runs score and train the same fp32 weights
    # with the same fp32 operations on the same batches: on the CPU's deterministic kernels the numbers are equal
    # bit for bit (as measured); 1e-6 leaves room only for a reordered fp32 sum (~1e-7 relative, as a GPU's atomic
    # adds give), nothing of a half-precision step: scoring in bf16 alone moves the before probability by ~2**-9 of
    # it (3e-6, 6% of the gain), and the old fine-tune (a bf16 copy, AdamW on its bf16 weights, both probabilities
    # scored in bf16) gives 7.2e-6, 87% below (with fp32 master weights rounded into the bf16 copy: 3.5e-5, 39%).
    tolerance = 1e-6 * g32
    assert m16["relearn_gain"] == pytest.approx(g32, abs=tolerance)
    assert m16["relearn_before_prob"] == pytest.approx(m32["relearn_before_prob"], rel=1e-6)
    monkeypatch.setattr(R, "fp32_copy", lambda model: copy.deepcopy(model).eval())  # the old attack: a bf16 copy
    assert abs(metrics(bf16)["relearn_gain"] - g32) > tolerance  # fails the check above


def test_the_fp32_copy_of_a_dispatched_flash_attention_model(unlearned):
    """Accelerate's hooks (a device map) come with the deep copy and drive its own modules; flash attention (fp16 /
    bf16 only) becomes sdpa on the copy; a model with modules offloaded to the meta device is refused."""
    from copy import deepcopy

    from accelerate import dispatch_model
    from transformers import AutoConfig, AutoModelForCausalLM

    import jobs.evaluate.relearn as R

    path, tok, rows, _, _ = unlearned
    plain, _ = _bf16_and_fp32(path)
    names = ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "model.rotary_emb", "lm_head"]
    device_map = dict.fromkeys(names, "cpu")
    model = dispatch_model(deepcopy(plain), device_map, main_device="cpu", force_hooks=True)
    model.hf_device_map = device_map  # as from_pretrained(device_map=...) sets it
    model.config._attn_implementation = "flash_attention_2"  # not installed here: only the config names it
    copy = R.fp32_copy(model)
    layer = copy.model.layers[0]
    assert layer._hf_hook is not model.model.layers[0]._hf_hook and layer.forward.args[0] is layer
    assert "to" not in vars(copy) and "to" in vars(model)  # accelerate's .to wrapper would move `model`
    assert copy.config._attn_implementation == "sdpa" and model.config._attn_implementation == "flash_attention_2"
    del copy
    model.config._attn_implementation = "sdpa"

    def gain(m) -> float:
        return get_suite("relearn")(SuiteContext(m, tok, batch_size=8), {"forget": rows}, **{**RELEARN, "steps": 3})[
            "metrics"
        ]["relearn_gain"]

    assert gain(model) == gain(plain)  # the same numbers through the hooks
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path)))
    with pytest.raises(ValueError, match="offloaded"):
        R.fp32_copy(meta)
