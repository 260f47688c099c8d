"""issue 15 item 3, method defaults that work on small models: RMU's adaptive steering coefficient and its layer
chosen relative to depth, WHP's soft targets, each against a hand computation."""

import copy
import math

import pytest
import torch

from jobs.data.format import IGNORE_INDEX, collate, encode_qa
from jobs.models import load_model, load_tokenizer
from jobs.unlearn.methods import build_method
from jobs.unlearn.methods.rmu import RMUParams, steered_layer
from jobs.unlearn.methods.whp import generic_kl
from tests.conftest import qa_rows


@pytest.fixture(scope="module")
def data(tiny_dir):
    tok = load_tokenizer(tiny_dir / "model")
    rows = qa_rows()
    enc = lambda rs: collate([encode_qa(tok, r["question"], r["answer"]) for r in rs], tok.pad_token_id)
    return tiny_dir / "model", {"forget": enc([r for r in rows if r["era"] == "old"]),
                                "retain": enc([r for r in rows if r["era"] == "new"])}


# ---------------------------------------------------------------- RMU: which layer

@pytest.mark.parametrize("n,fraction,want", [
    (32, 0.5, 16), (30, 0.5, 15), (4, 0.5, 2), (2, 0.5, 1), (1, 0.5, 0), (5, 0.5, 2),
    (32, 0.22, 7), (16, 0.44, 7), (4, 0.25, 1), (4, 0.0, 0), (4, 1.0, 3),  # 1.0: the last layer, not one past it
])
def test_layer_from_fraction_is_floor_of_fraction_times_depth(n, fraction, want):
    assert steered_layer(RMUParams(layer_fraction=fraction), n) == want
    if fraction == 0.5:
        assert steered_layer(RMUParams(), n) == n // 2  # the default: the middle layer, as before issue 15


def test_an_absolute_layer_wins_over_the_fraction_and_setup_uses_the_fraction(data):
    assert steered_layer(RMUParams(layer=5, layer_fraction=0.9), 32) == 5
    path, _ = data
    method = build_method("rmu")  # the tiny model has 2 layers: floor(0.5 * 2) = 1
    method.setup(load_model(path))
    assert method.layer == 1 and method.trainable_layers == [0, 1]
    method = build_method("rmu", {"layer_fraction": 0.25})
    method.setup(load_model(path))
    assert method.layer == 0 and method.trainable_layers == [0]
    with pytest.raises(ValueError, match="layer_fraction"):
        build_method("rmu", {"layer_fraction": 1.5})


# ---------------------------------------------------------------- RMU: the steering coefficient

def test_steering_is_adaptive_by_default_and_fixed_when_a_coefficient_is_given():
    assert build_method("rmu").params.steering == "adaptive"
    assert build_method("rmu").params.adaptive_scale == 5.0
    assert build_method("rmu", {"steering_coeff": 6.5}).params.steering == "fixed"  # WMDP configs keep their meaning
    assert build_method("rmu", {"steering": "fixed"}).params.steering_coeff == 6.5
    assert build_method("rmu", {"steering": "adaptive", "steering_coeff": 3.0}).params.steering == "adaptive"
    with pytest.raises(ValueError, match="steering"):
        build_method("rmu", {"steering": "scaled"})


def hand_mean_norm(h: torch.Tensor, part: dict) -> float:
    """Per sequence, the mean over its answer tokens of the L2 norm of h_t; then the mean over sequences."""
    per_seq = []
    for i in range(h.shape[0]):
        keep = (part["attention_mask"][i] == 1) & (part["labels"][i] != IGNORE_INDEX)
        norms = [math.sqrt(sum(float(x) ** 2 for x in h[i, t])) for t in range(h.shape[1]) if keep[t]]
        per_seq.append(sum(norms) / len(norms))
    return sum(per_seq) / len(per_seq)


def test_adaptive_coefficient_is_scale_times_the_frozen_models_mean_activation_norm(data):
    path, batch = data
    layer = 0  # hidden_states[1]; the last layer's entry in hidden_states is taken after the final norm
    model, ref = load_model(path), load_model(path).eval()
    method = build_method("rmu", {"layer": layer, "adaptive_scale": 3.0, "seed": 1})
    method.setup(model)
    with torch.no_grad():  # hidden_states[layer + 1] is the output of decoder layer `layer`: no hooks
        h = ref(**{k: batch["forget"][k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True)
    want = 3.0 * hand_mean_norm(h.hidden_states[layer + 1], batch["forget"])
    out = method.loss(model, batch, ref)
    assert float(method.coeff) == pytest.approx(want, rel=1e-5)
    assert float(out.metrics["steering_coeff"]) == pytest.approx(want, rel=1e-5)
    # the forget term steers towards c * u with that c: the loss's forget MSE by hand
    g = torch.Generator().manual_seed(1)
    r = torch.rand(h.hidden_states[layer + 1].shape[-1], generator=g)
    target = want * r / r.norm()
    part, hs = batch["forget"], h.hidden_states[layer + 1]
    per_seq = [((hs[i, (part["attention_mask"][i] == 1) & (part["labels"][i] != -100)] - target) ** 2).mean(-1).mean()
               for i in range(hs.shape[0])]
    assert float(out.metrics["forget_loss"]) == pytest.approx(torch.stack(per_seq).mean().item(), rel=1e-5)


def test_adaptive_coefficient_is_measured_once_on_the_reference_model_and_then_kept(data):
    path, batch = data
    model, ref = load_model(path), load_model(path).eval()
    method = build_method("rmu", {"layer": 1, "alpha": 1.0})
    method.setup(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    coeffs = []
    for _ in range(3):
        opt.zero_grad()
        out = method.loss(model, batch, ref)
        out.loss.backward()
        opt.step()
        coeffs.append(float(out.metrics["steering_coeff"]))
    assert coeffs[0] == coeffs[1] == coeffs[2] > 0
    # read on the reference model: a fresh method on the now trained model measures the same c
    fresh = build_method("rmu", {"layer": 1, "alpha": 1.0})
    fresh.loss(model, batch, ref)
    assert float(fresh.coeff) == pytest.approx(coeffs[0], rel=1e-6)
    with torch.no_grad():
        trained_c = build_method("rmu", {"layer": 1})
        trained_c.loss(model, batch, model)  # the trained model as its own reference: its activations moved
    assert float(trained_c.coeff) != pytest.approx(coeffs[0], rel=1e-3)
    # a fresh method whose first batch is the retain batch measures a different c: it reads the batch it gets
    other = build_method("rmu", {"layer": 1, "alpha": 1.0})
    other.setup(copy.deepcopy(ref))
    other.loss(copy.deepcopy(ref), {"forget": batch["retain"], "retain": batch["retain"]}, ref)
    assert float(other.coeff) != pytest.approx(coeffs[0], rel=1e-6)
    assert "coeff" in method.state_attrs  # a resumed job keeps it (loop.py checkpoints state_attrs)


def test_fixed_steering_uses_the_coefficient_as_given(data):
    path, batch = data
    model, ref = load_model(path), load_model(path).eval()
    method = build_method("rmu", {"layer": 0, "steering_coeff": 2.5})
    method.setup(model)
    out = method.loss(model, batch, ref)
    assert float(method.coeff) == 2.5 and float(out.metrics["steering_coeff"]) == 2.5


# ---------------------------------------------------------------- WHP: soft targets

def test_soft_target_loss_is_the_kl_to_the_generic_distribution_by_hand():
    base = torch.tensor([[[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 1.0, 4.0]]])
    reinf = torch.tensor([[[4.0, 1.0, -1.0], [0.0, 3.5, 1.0], [1.0, 2.0, 4.0]]])
    model = torch.tensor([[[0.5, 0.0, 1.0], [1.0, 1.0, 0.0], [9.0, 9.0, 9.0]]])
    labels = torch.tensor([[-100, 7, 8]])  # positions 0 and 1 predict the two targets; position 2 predicts none

    def softmax(v):
        e = [math.exp(x) for x in v]
        return [x / sum(e) for x in e]

    kls = []
    for t in (0, 1):
        g = [b - 2.0 * max(0.0, r - b) for b, r in zip(base[0, t].tolist(), reinf[0, t].tolist())]
        q, p = softmax(g), softmax(model[0, t].tolist())
        kls.append(sum(qi * math.log(qi / pi) for qi, pi in zip(q, p)))
    assert generic_kl(model, base, reinf, labels, 2.0).item() == pytest.approx(sum(kls) / 2, rel=1e-6)
    # only target positions count; no target: 0
    one = torch.tensor([[-100, -100, 8]])
    assert generic_kl(model, base, reinf, one, 2.0).item() == pytest.approx(kls[1], rel=1e-6)
    assert generic_kl(model, base, reinf, torch.full((1, 3), -100), 2.0).item() == 0.0
    # the model at the generic distribution: KL 0
    g = base - 2.0 * torch.relu(reinf - base)
    assert generic_kl(g, base, reinf, labels, 2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_whp_defaults_and_the_soft_loss_through_the_method(data):
    p = build_method("whp").params
    assert (p.targets, p.beta, p.alpha) == ("soft", 5.0, 0.0)
    path, batch = data
    model, base = load_model(path), load_model(path).eval()
    torch.manual_seed(1)
    reinforced = load_model(path).eval()
    with torch.no_grad():
        for w in reinforced.parameters():
            w.add_(0.05 * torch.randn_like(w))
    whp_batch = {"forget": batch["forget"], "generic": batch["forget"]}
    for targets in ("soft", "hard"):
        method = build_method("whp", {"reinforced": "given", "targets": targets, "beta": 5.0})
        method.reinforced_model = reinforced
        out = method.loss(model, whp_batch, base)
        ids = {k: batch["forget"][k] for k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            zb, zr, zm = base(**ids).logits, reinforced(**ids).logits, model(**ids).logits
        if targets == "soft":
            want = generic_kl(zm, zb, zr, batch["forget"]["labels"], 5.0)
        else:
            from jobs.unlearn.methods.base import token_mean_nll
            from jobs.unlearn.methods.whp import generic_labels
            want = token_mean_nll(zm, generic_labels(zb, zr, batch["forget"]["labels"], 5.0))
        assert out.loss.item() == pytest.approx(want.item(), rel=1e-5)
        assert out.metrics["generic_loss"] == pytest.approx(want.item(), rel=1e-5) and out.loss.requires_grad
