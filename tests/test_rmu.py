"""RMU: which layer it steers (a fraction of the depth, or an absolute layer), its steering coefficient (adaptive:
a scale times the frozen model's mean activation norm, measured once; or fixed), which parameters train, the
loss against a hand computation, that it steers forget activations while keeping retain ones, and that the
DeepSpeed loop runs it and touches only the chosen weights."""

import copy
import math

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from jobs.data.format import IGNORE_INDEX, collate, encode_qa
from jobs.models import load_model, load_tokenizer
from jobs.spec import UnlearnSpec
from jobs.unlearn.methods import build_method, method_names
from jobs.unlearn.methods.base import mean_nll
from jobs.unlearn.methods.rmu import RMUParams, activation_mse, capture, decoder_layers, steered_layer, token_mask
from tests.conftest import qa_rows

MLP = ("gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def data(tiny_dir):
    tok = load_tokenizer(tiny_dir / "model")
    rows = qa_rows()
    enc = lambda rs: collate([encode_qa(tok, r["question"], r["answer"]) for r in rs], tok.pad_token_id)
    batch = {
        "forget": enc([r for r in rows if r["era"] == "old"]),
        "retain": enc([r for r in rows if r["era"] == "new"]),
    }
    return tiny_dir / "model", batch, enc(rows)


@pytest.fixture(scope="module")
def memorised(data):
    """The tiny model trained on all 16 QA rows until it knows them (answer NLL ~0.1), so unlearning shows."""
    path, _, everything = data
    torch.manual_seed(0)
    model = load_model(path)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        mean_nll(model, everything).backward()
        opt.step()
    return model.eval()


# ---------------------------------------------------------------- which layer


@pytest.mark.parametrize(
    "n,fraction,want",
    [
        (32, 0.5, 16),
        (30, 0.5, 15),
        (4, 0.5, 2),
        (2, 0.5, 1),
        (1, 0.5, 0),
        (5, 0.5, 2),
        (32, 0.22, 7),
        (16, 0.44, 7),
        (4, 0.25, 1),
        (4, 0.0, 0),
        (4, 1.0, 3),  # 1.0: the last layer, not one past it
    ],
)
def test_layer_from_fraction_is_floor_of_fraction_times_depth(n, fraction, want):
    assert steered_layer(RMUParams(layer_fraction=fraction), n) == want
    if fraction == 0.5:
        assert steered_layer(RMUParams(), n) == n // 2  # the default: the middle layer


def test_an_absolute_layer_wins_over_the_fraction_and_setup_uses_the_fraction(data):
    assert steered_layer(RMUParams(layer=5, layer_fraction=0.9), 32) == 5
    path, _, _ = data
    method = build_method("rmu")  # the tiny model has 2 layers: floor(0.5 * 2) = 1
    method.setup(load_model(path))
    assert method.layer == 1 and method.trainable_layers == [0, 1]
    method = build_method("rmu", {"layer_fraction": 0.25})
    method.setup(load_model(path))
    assert method.layer == 0 and method.trainable_layers == [0]
    with pytest.raises(ValueError, match="layer_fraction"):
        build_method("rmu", {"layer_fraction": 1.5})


# ---------------------------------------------------------------- the steering coefficient


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
    path, batch, _ = data
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
    per_seq = [
        ((hs[i, (part["attention_mask"][i] == 1) & (part["labels"][i] != -100)] - target) ** 2).mean(-1).mean()
        for i in range(hs.shape[0])
    ]
    assert float(out.metrics["forget_loss"]) == pytest.approx(torch.stack(per_seq).mean().item(), rel=1e-5)


def test_adaptive_coefficient_is_measured_once_on_the_reference_model_and_then_kept(data):
    path, batch, _ = data
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
    path, batch, _ = data
    model, ref = load_model(path), load_model(path).eval()
    method = build_method("rmu", {"layer": 0, "steering_coeff": 2.5})
    method.setup(model)
    out = method.loss(model, batch, ref)
    assert float(method.coeff) == 2.5 and float(out.metrics["steering_coeff"]) == 2.5


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_registered_and_params_validated():
    assert "rmu" in method_names()
    with pytest.raises(ValidationError, match="bogus"):
        build_method("rmu", {"bogus": 1})
    with pytest.raises(ValidationError, match="trainable_params"):
        build_method("rmu", {"trainable_params": "attn"})


def test_setup_freezes_everything_but_the_chosen_layers_mlps(data):
    path, _, _ = data
    model = load_model(path)  # 2 decoder layers: default layer 1, trainable layers [0, 1]
    method = build_method("rmu")
    method.setup(model)
    assert method.layer == 1 and method.trainable_layers == [0, 1]
    want = {f"model.layers.{i}.mlp.{m}.weight" for i in (0, 1) for m in MLP}
    assert trainable(model) == want == set(method.trainable_names)

    model = load_model(path)
    build_method("rmu", {"layer": 0, "trainable_params": "down_proj"}).setup(model)
    assert trainable(model) == {"model.layers.0.mlp.down_proj.weight"}

    model = load_model(path)
    build_method("rmu", {"layer": 1, "trainable_layers": [1], "trainable_params": "all"}).setup(model)
    assert trainable(model) == {n for n, _ in model.named_parameters() if n.startswith("model.layers.1.")}

    with pytest.raises(ValueError, match="layer 2 out of range: the model has 2 decoder layers"):
        build_method("rmu", {"layer": 2}).setup(load_model(path))
    with pytest.raises(ValueError, match=r"trainable_layers \[1\] must lie in 0..0"):
        build_method("rmu", {"layer": 0, "trainable_layers": [0, 1]}).setup(load_model(path))


def hand_forget_mse(h: torch.Tensor, part: dict, coeff: float, seed: int, answer_only: bool) -> float:
    """The forget term written out: u from its own generator; per sequence, mean over counted tokens of
    the mean over hidden dims of (h - c u)^2; mean over sequences."""
    g = torch.Generator().manual_seed(seed)
    r = torch.rand(h.shape[-1], generator=g)
    target = coeff * r / r.norm()
    per_seq = []
    for i in range(h.shape[0]):
        keep = part["attention_mask"][i] == 1
        if answer_only:
            keep &= part["labels"][i] != -100
        per_seq.append(((h[i, keep] - target) ** 2).mean(dim=-1).mean())
    return torch.stack(per_seq).mean().item()


@pytest.mark.parametrize("tokens", ["answer", "all"])
def test_loss_with_the_model_as_its_own_reference_is_the_hand_computed_forget_mse(data, tokens):
    path, batch, _ = data
    model = load_model(path)
    method = build_method("rmu", {"layer": 0, "steering_coeff": 2.0, "seed": 3, "alpha": 50.0, "tokens": tokens})
    method.setup(model)
    out = method.loss(model, batch, model)
    assert out.metrics["retain_loss"] == 0.0
    with torch.no_grad():  # hidden_states[1] is layer 0's output: no hooks involved
        h = model(**{k: batch["forget"][k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True)
    want = hand_forget_mse(h.hidden_states[1], batch["forget"], 2.0, 3, answer_only=tokens == "answer")
    assert out.loss.item() == pytest.approx(want, rel=1e-6)
    assert out.metrics["forget_loss"] == out.metrics["unlearn_loss"] == pytest.approx(want, rel=1e-6)
    assert out.metrics["forget_nll"] == pytest.approx(mean_nll(model, batch["forget"]).item(), rel=1e-5)
    assert out.loss.requires_grad


def test_the_hook_captures_the_last_layer_before_the_final_norm(data):
    path, batch, _ = data
    model = load_model(path)
    with torch.no_grad():
        h, out = capture(model, decoder_layers(model)[-1], batch["forget"])
        full = model(**{k: batch["forget"][k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True)
        stopped, none = capture(model, decoder_layers(model)[0], batch["forget"], stop=True)
    assert torch.allclose(model.model.norm(h), full.hidden_states[-1], atol=1e-6)
    assert torch.equal(stopped, full.hidden_states[1]) and none is None


def test_steps_steer_forget_activations_keep_retain_ones_and_raise_forget_nll(data, memorised):
    _, batch, _ = data
    model, ref = copy.deepcopy(memorised).train(), memorised
    method = build_method("rmu", {"alpha": 10.0, "steering_coeff": 6.5})  # layer 1, MLPs of layers 0 and 1; fixed c
    method.setup(model)
    layer, ref_layer = decoder_layers(model)[1], decoder_layers(ref)[1]

    def measure():
        with torch.no_grad():
            f, _ = capture(model, layer, batch["forget"])
            r, _ = capture(model, layer, batch["retain"])
            r_ref, _ = capture(ref, ref_layer, batch["retain"])
            return (
                activation_mse(f, method.target(f, f.shape[-1]), token_mask(batch["forget"])).item(),
                activation_mse(r, r_ref, token_mask(batch["retain"])).item(),
                mean_nll(model, batch["forget"]).item(),
                mean_nll(model, batch["retain"]).item(),
            )

    before = measure()
    assert before[1] == 0.0
    torch.manual_seed(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(20):
        opt.zero_grad()
        method.loss(model, batch, ref).loss.backward()
        opt.step()
    after = measure()
    f_mse0, _, f_nll0, r_nll0 = before
    f_mse1, r_mse1, f_nll1, r_nll1 = after
    assert f_mse1 < 0.6 * f_mse0  # forget activations moved towards steering_coeff * u
    assert r_mse1 < 0.05 * f_mse0  # retain activations stayed near the reference
    assert f_nll1 > f_nll0 + 1.0  # the forget answers are no longer predicted
    assert r_nll1 - r_nll0 < 0.5 * (f_nll1 - f_nll0)
    for (n, p), (_, p0) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, p0) != (n in method.trainable_names)


def test_deepspeed_loop_runs_rmu_and_changes_only_the_trainable_weights(tiny_dir, tmp_path, single_process_dist):
    from jobs.unlearn.loop import run_unlearning

    spec = UnlearnSpec(
        name="subset/old",
        model_path=str(tiny_dir / "model"),
        forget_path=str(tiny_dir / "forget.jsonl"),
        retain_path=str(tiny_dir / "retain.jsonl"),
        method="rmu",
        optimizer={"lr": 3e-3},
        max_steps=3,
        batch_size=4,
        output_dir=str(tmp_path / "out"),
        report_interval_s=0,
        deepspeed={"zero_optimization": {"stage": 0}},
    )
    rows = []
    final = run_unlearning(spec, report=rows.extend)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert {"loss", "forget_loss", "retain_loss", "unlearn_loss", "forget_nll", "steering_coeff", "grad_norm"} <= set(
        final
    )
    assert rows[0]["steering_coeff"] == final["steering_coeff"] > 0  # adaptive (the default): measured once
    assert rows[0]["retain_loss"] == 0.0 and final["retain_loss"] > 0.0  # the reference is the base model
    base = load_file(str(tiny_dir / "model" / "model.safetensors"))
    new = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(base) == set(new)
    moved = {n for n in base if not torch.equal(base[n], new[n])}
    assert moved == {f"model.layers.{i}.mlp.{m}.weight" for i in (0, 1) for m in MLP}
