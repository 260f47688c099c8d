"""Localized unlearning: scopes, attribution formulas, the global top-k mask, and that a masked update
changes nothing outside the mask (plain AdamW, and DeepSpeed ZeRO 0/2/3 in this process)."""

import math

import pytest
import torch
from pydantic import ValidationError

import jobs.localize.mask as localize_mask
from jobs.data.format import collate, encode_qa
from jobs.localize import (
    ATTRIBUTIONS,
    LocalizeSpec,
    MaskedUpdate,
    compute_mask,
    get_attribution,
    mask_stats,
    register_attribution,
    scoped_parameters,
    top_fraction_mask,
)
from jobs.models import load_model, load_tokenizer
from jobs.unlearn.methods.base import mean_nll
from tests.conftest import qa_rows

SCOPES = ["mlp", "attention", "all"]


@pytest.fixture(scope="module")
def data(tiny_dir):
    """(model dir, forget batches, retain batches): two batches of four QA rows each."""
    tok = load_tokenizer(tiny_dir / "model")
    rows = qa_rows()
    enc = lambda rs: collate([encode_qa(tok, r["question"], r["answer"]) for r in rs], tok.pad_token_id)
    forget = [r for r in rows if r["era"] == "old"]
    retain = [r for r in rows if r["era"] == "new"]
    return tiny_dir / "model", [enc(forget[:4]), enc(forget[4:])], [enc(retain[:4]), enc(retain[4:])]


def spec(**kw) -> LocalizeSpec:
    return LocalizeSpec(**kw)


# ----------------------------------------------------------------------------------- spec and scope


def test_spec_defaults_and_validation():
    s = LocalizeSpec()
    assert (s.attribution, s.fraction, s.scope, s.seed) == ("gradient", 0.05, "mlp", 0)
    assert {"gradient", "activation", "wagle", "random"} <= set(ATTRIBUTIONS)
    for bad in ({"fraction": 0}, {"fraction": 1.5}, {"scope": "ffn"}, {"bogus": 1}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            LocalizeSpec(**bad)
    with pytest.raises(ValidationError, match="unknown attribution 'nope'; known: activation, gradient"):
        LocalizeSpec(attribution="nope")
    with pytest.raises(KeyError, match="unknown attribution"):
        get_attribution("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_attribution("random")(lambda *a: {})


def test_scope_rules(data):
    model = load_model(data[0])
    names = {s: set(scoped_parameters(model, s)) for s in SCOPES}
    assert names["mlp"] and all(".mlp." in n and n.endswith("_proj.weight") for n in names["mlp"])
    assert names["attention"] and all(".self_attn." in n for n in names["attention"])
    assert names["all"] == names["mlp"] | names["attention"]  # Llama: every other matrix is an embedding
    assert not any("embed" in n or "lm_head" in n or "norm" in n for n in names["all"])
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # frozen by a method: out of scope
    assert "model.layers.0.mlp.up_proj.weight" not in scoped_parameters(model, "mlp")


# ------------------------------------------------------------------------------------- attributions


@pytest.mark.parametrize("attribution", ["gradient", "activation", "wagle", "random"])
def test_each_attribution_scores_exactly_the_scope_and_leaves_the_model_as_it_was(data, attribution):
    path, fb, rb = data
    model = load_model(path).train()
    for scope in SCOPES:
        params = scoped_parameters(model, scope)
        scores = get_attribution(attribution)(model, fb, rb, spec(attribution=attribution, scope=scope))
        assert list(scores) == list(params)
        for n, p in params.items():
            assert scores[n].shape == p.shape and scores[n].dtype == torch.float32
            assert torch.isfinite(scores[n]).all() and (scores[n] >= 0).all()
        if attribution != "random":
            assert sum(float(s.sum()) for s in scores.values()) > 0
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())


def test_gradient_scores_are_abs_grad_of_the_mean_forget_nll(data):
    path, fb, _ = data
    model = load_model(path)
    scores = get_attribution("gradient")(model, fb, [], spec(scope="all"))
    name = "model.layers.1.self_attn.v_proj.weight"
    p = dict(model.named_parameters())[name]
    loss = sum(mean_nll(model, b) for b in fb) / len(fb)
    (grad,) = torch.autograd.grad(loss, [p])
    torch.testing.assert_close(scores[name], grad.abs(), rtol=1e-5, atol=1e-9)


def test_activation_scores_are_wanda_on_forget_tokens(data):
    path, fb, _ = data
    model = load_model(path)
    scores = get_attribution("activation")(model, fb, [], spec(scope="mlp"))
    layer = model.model.layers[1].mlp.down_proj
    seen = []
    handle = layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        for b in fb:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    handle.remove()
    x = torch.cat([s[b["attention_mask"].bool()] for s, b in zip(seen, fb)])  # non-padding tokens only
    want = layer.weight.abs() * x.pow(2).mean(0).sqrt()[None, :]
    torch.testing.assert_close(scores["model.layers.1.mlp.down_proj.weight"], want, rtol=1e-5, atol=1e-9)


def test_wagle_scores_follow_the_closed_form(data):
    path, fb, rb = data
    model = load_model(path)
    s = spec(attribution="wagle", scope="mlp", wagle_gamma=0.5)
    scores = get_attribution("wagle")(model, fb, rb, s)
    name = "model.layers.0.mlp.gate_proj.weight"
    p = dict(model.named_parameters())[name]
    (g_f,) = torch.autograd.grad(sum(mean_nll(model, b) for b in fb) / 2, [p])
    (g_r,) = torch.autograd.grad(sum(mean_nll(model, b) for b in rb) / 2, [p])
    torch.testing.assert_close(scores[name], ((p.detach() - g_r / 0.5) * g_f).abs(), rtol=1e-4, atol=1e-10)
    with pytest.raises(ValueError, match="needs retain data"):
        compute_mask(model, fb, [], s)


def test_random_scores_are_deterministic_per_seed(data):
    path, fb, _ = data
    model = load_model(path)
    a, b, c = (get_attribution("random")(model, fb, [], spec(attribution="random", seed=s)) for s in (0, 0, 1))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not any(torch.equal(a[n], c[n]) for n in a)
    ma, mb, mc = (compute_mask(model, fb, [], spec(attribution="random", seed=s)) for s in (3, 3, 4))
    assert all(torch.equal(ma[n], mb[n]) for n in ma) and not all(torch.equal(ma[n], mc[n]) for n in ma)


# ------------------------------------------------------------------------------------------ the mask


@pytest.mark.parametrize("attribution", ["gradient", "activation", "wagle", "random"])
@pytest.mark.parametrize("scope,fraction", [("mlp", 0.05), ("attention", 0.3), ("all", 0.001), ("all", 1.0)])
def test_global_mask_keeps_exactly_round_fraction_of_in_scope_entries(data, attribution, scope, fraction):
    path, fb, rb = data
    model = load_model(path)
    s = spec(attribution=attribution, scope=scope, fraction=fraction)
    mask = compute_mask(model, fb, rb, s)
    params = scoped_parameters(model, scope)
    assert list(mask) == list(params)
    assert all(m.dtype == torch.bool and m.shape == params[n].shape for n, m in mask.items())
    n = sum(p.numel() for p in params.values())
    kept = sum(int(m.sum()) for m in mask.values())
    assert kept == max(1, math.floor(fraction * n + 0.5))
    # the kept entries are the highest scores: every kept score >= every dropped score
    scores = get_attribution(attribution)(model, fb, rb, s)
    lowest_kept = min(float(scores[k][m].min()) for k, m in mask.items() if m.any())
    highest_dropped = max((float(scores[k][~m].max()) for k, m in mask.items() if (~m).any()), default=-1.0)
    assert lowest_kept >= highest_dropped
    stats = mask_stats(mask, model)
    assert stats["kept"] == kept and stats["in_scope"] == n and stats["fraction"] == pytest.approx(kept / n)
    assert 0 < stats["model_fraction"] < stats["fraction"] or fraction == 1.0 and scope == "all"


def test_ties_go_to_the_earliest_entries_and_bisection_agrees_with_kthvalue(monkeypatch):
    tied = {"a": torch.zeros(3, 4), "b": torch.zeros(5)}
    m = top_fraction_mask(tied, 0.5)  # k = round(8.5) = 9: all of "a" (12 > 9) up to its 9th entry
    assert int(m["a"].sum()) == 9 and m["a"].reshape(-1)[:9].all() and not m["b"].any()
    g = torch.Generator().manual_seed(0)
    scores = {f"p{i}": torch.randint(0, 7, (31, 17), generator=g).float() * 0.25 - 0.5 for i in range(4)}
    scores["p0"][0, 0] = -0.0
    exact = top_fraction_mask(scores, 0.37)
    monkeypatch.setattr(localize_mask, "EXACT_SELECT_LIMIT", 0)
    bisect = top_fraction_mask(scores, 0.37)
    assert all(torch.equal(exact[n], bisect[n]) for n in scores)
    assert sum(int(v.sum()) for v in exact.values()) == math.floor(0.37 * 4 * 31 * 17 + 0.5)


def test_mask_stats_groups_by_module_and_layer():
    mask = {
        "model.layers.0.mlp.up_proj.weight": torch.tensor([True, False, False, False]),
        "model.layers.1.mlp.up_proj.weight": torch.tensor([True, True, False, False]),
    }
    stats = mask_stats(mask)
    assert stats["group/mlp.up_proj"] == pytest.approx(3 / 8)
    assert stats["layer/0"] == pytest.approx(0.25) and stats["layer/1"] == pytest.approx(0.5)
    assert stats["kept"] == 3 and stats["in_scope"] == 8 and "model_fraction" not in stats


# ------------------------------------------------------------------------------------ masked update


def assert_only_masked_entries_changed(before: dict, after: dict, mask: dict) -> None:
    """Bit-identical outside the mask, tensor by tensor; some entry inside changed."""
    changed_inside = 0
    for name, old in before.items():
        new = after[name].detach().cpu()
        m = mask.get(name)
        if m is None:
            assert torch.equal(new, old), f"{name} has no mask entry but changed"
            continue
        assert torch.equal(new[~m], old[~m]), f"{name}: {int((new[~m] != old[~m]).sum())} masked-out entries changed"
        changed_inside += int((new[m] != old[m]).sum())
    assert changed_inside > 0


def ga_steps(model, forget, step_fn, steps):
    for i in range(steps):
        loss = -mean_nll(model, forget[i % len(forget)])
        step_fn(loss)


def test_masked_adamw_gradient_ascent_changes_only_masked_entries(data):
    path, fb, rb = data
    model = load_model(path)
    mask = compute_mask(model, fb, rb, spec(attribution="gradient", scope="mlp", fraction=0.05))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masked = MaskedUpdate(model, mask)
    assert set(masked.frozen) == set(before) - set(mask) and set(masked.partial) == set(mask)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in mask)
    # every parameter in the optimizer, frozen or not: AdamW's weight decay must still not leak out
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)

    def step(loss):
        opt.zero_grad()
        loss.backward()
        opt.step()

    ga_steps(model, fb, step, 1)
    for n, p in model.named_parameters():  # the hooks: exact zeros outside the mask, no grad when frozen
        assert p.grad is None if n not in mask else (p.grad[~mask[n]] == 0).all() and p.grad[mask[n]].abs().sum() > 0
    name = masked.partial[0]
    p = dict(model.named_parameters())[name]
    assert not torch.equal(p.detach()[~mask[name]], before[name][~mask[name]])  # weight decay moved them...
    masked.restore(model)  # ...and restore puts them back
    assert torch.equal(p.detach()[~mask[name]], before[name][~mask[name]])

    def step_and_restore(loss):
        step(loss)
        masked.restore(model)

    f0 = mean_nll(model, fb[0]).item()
    ga_steps(model, fb, step_and_restore, 5)
    assert mean_nll(model, fb[0]).item() > f0
    assert_only_masked_entries_changed(before, dict(model.named_parameters()), mask)
    masked.remove()


def test_masked_update_rejects_a_mask_of_the_wrong_model(data):
    model = load_model(data[0])
    with pytest.raises(ValueError, match="does not have"):
        MaskedUpdate(model, {"nope.weight": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="has shape"):
        MaskedUpdate(model, {"model.layers.0.mlp.up_proj.weight": torch.ones(2, dtype=torch.bool)})


@pytest.mark.parametrize(
    "stage,zero",
    [(0, {}), (2, {}), (3, {}), (3, {"stage3_param_persistence_threshold": 0})],
    ids=["zero0", "zero2", "zero3", "zero3-partitioned"],
)
def test_deepspeed_zero_stage_trains_only_masked_entries(data, single_process_dist, stage, zero):
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo")
    path, fb, rb = data
    model = load_model(path)
    model.config.use_cache = False
    mask = compute_mask(model, fb, rb, spec(attribution="wagle", scope="all", fraction=0.05))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masked = MaskedUpdate(model, mask)
    leaks = []  # a hook registered after MaskedUpdate's sees the gradient DeepSpeed will reduce
    for n in masked.partial:
        dict(model.named_parameters())[n].register_hook(
            lambda g, m=mask[n]: leaks.append(tuple(g.shape) != tuple(m.shape) or bool(g[~m].ne(0).any()))
        )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "train_batch_size": 4,
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": stage, **zero},
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)

    def step(loss):
        boundary = engine.is_gradient_accumulation_boundary()
        engine.backward(loss)
        engine.step()
        if boundary:
            masked.restore(engine)

    ga_steps(engine, fb, step, 4)
    assert len(leaks) == 4 * len(masked.partial) and not any(leaks)
    if zero:  # the partitioned path really ran: parameters are ZeRO-3 partitions outside a gather
        assert all(p.ds_tensor is not None and p.data.numel() == 0 for n, p in model.named_parameters() if n in mask)
    if stage == 3:
        after = engine._zero3_consolidated_16bit_state_dict()
    else:
        after = dict(engine.module.named_parameters())
    assert_only_masked_entries_changed(before, after, mask)
