"""LoRA unlearning (``unlearn.lora``) through the real DeepSpeed loop, for every registered method, and the
frozen reference model under ZeRO-3 (a sharded engine, not a full copy per worker)."""

import json
import math

import pytest
import torch

from jobs.models import is_adapter_dir, load_model
from jobs.spec import UnlearnSpec
from jobs.unlearn.loop import run_unlearning
from jobs.unlearn.methods import method_names

LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}
PARAMS = {"rmu": {"layer": 1, "steering_coeff": 5.0}}  # the tiny model has 2 layers


def spec(tiny_dir, tmp_path, method, **kw) -> UnlearnSpec:
    params = PARAMS.get(method, {})
    if method == "whp":  # the reinforced model is given: the pre-job is the runner's (tests/test_whp.py)
        params = {"reinforced": str(tiny_dir / "model")}
    base = dict(
        name=f"subset/{method}",
        model_path=str(tiny_dir / "model"),
        forget_path=str(tiny_dir / "forget.jsonl"),
        retain_path=str(tiny_dir / "retain.jsonl"),
        method=method,
        method_params=params,
        optimizer={"lr": 1e-2},
        max_steps=3,
        batch_size=4,
        report_interval_s=0,
        lora=LORA,
        output_dir=str(tmp_path / method),
    )
    return UnlearnSpec(**{**base, **kw})


@pytest.mark.parametrize("method", method_names())
def test_every_method_trains_only_the_adapter_and_saves_it(tiny_dir, tmp_path, single_process_dist, method):
    s = spec(tiny_dir, tmp_path, method)
    rows = []
    run_unlearning(s, report=rows.extend)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)
    out = tmp_path / method
    marker = json.loads((out / "spunge_job.json").read_text())
    # tvn's output is the negated full model (its trained adapter in trained/); every other method saves an adapter
    adapter = out / "trained" if method == "tvn" else out
    assert is_adapter_dir(adapter) and marker["output"] == ("full" if method == "tvn" else "adapter")
    base = load_model(tiny_dir / "model").state_dict()
    trained = load_model(adapter).state_dict()  # the adapter merged onto its base
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    assert changed, f"{method}: the adapter did not move"
    assert all(k.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight")) for k in changed), changed
    if method == "tvn":  # base - (trained - base), on the adapted weights only
        negated = load_model(out).state_dict()
        for k in changed:
            torch.testing.assert_close(negated[k], 2 * base[k] - trained[k])


@pytest.mark.parametrize("stage", [0, 3])
def test_the_lora_reference_is_the_model_with_its_adapter_disabled(tiny_dir, tmp_path, single_process_dist, stage):
    """NPO's term is (2/beta) ln 2 while the model equals its reference: at step 1 (B = 0), and at every step
    if the reference were the adapted model itself. After a few steps it moves: the reference stayed the base."""
    s = spec(
        tiny_dir,
        tmp_path,
        "npo",
        method_params={"beta": 0.1},
        max_steps=4,
        deepspeed={"zero_optimization": {"stage": stage}},
    )
    rows = []
    run_unlearning(s, report=rows.extend)
    assert rows[0]["npo_loss"] == pytest.approx(20 * math.log(2), rel=1e-5)
    assert rows[-1]["npo_loss"] < rows[0]["npo_loss"] - 0.01  # NPO pushes log pi below log pi_ref
    assert is_adapter_dir(tmp_path / "npo")


def test_under_zero3_the_reference_model_is_a_sharded_engine(tiny_dir, tmp_path, single_process_dist):
    import deepspeed

    from jobs.unlearn.engine import deepspeed_config
    from jobs.unlearn.reference import reference_model

    s = spec(tiny_dir, tmp_path, "npo", lora=None, deepspeed={"zero_optimization": {"stage": 3}})
    cfg = deepspeed_config(s, world_size=1)
    model = load_model(tiny_dir / "model")
    engine = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3), config=cfg)[0]
    ref = reference_model(engine, s, cfg)
    assert isinstance(ref, deepspeed.DeepSpeedEngine) and ref.zero_optimization_stage() == 3
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload

    assert type(ref.optimizer) is DeepSpeedZeRoOffload  # parameter partitioning only: no optimizer states
    params = list(ref.module.parameters())
    assert params and all(p.numel() == 0 and p.ds_numel > 0 for p in params)  # partitioned, nothing held whole
    assert not any(p.requires_grad for p in params)
    batch = {"input_ids": torch.tensor([[1, 5, 6, 7]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        want = load_model(tiny_dir / "model")(**batch).logits
        got = ref(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_zero3_reference_pass_through_the_trained_layers_leaves_them_releasable(
    tiny_dir, tmp_path, single_process_dist
):
    """DeepSpeed releases a ZeRO-3 layer in backward once ``ds_grads_remaining`` counts down to 0, and resets it
    at every forward: the LoRA reference's no-grad pass through the same layers (and a second loss term) would
    leave it where the backward drives it negative, keeping every layer gathered. The loop's counted forwards
    keep one count per graph input: 1 after the forget pass and the reference pass, 0 after the backward."""
    import deepspeed

    from jobs.unlearn.engine import deepspeed_config
    from jobs.unlearn.methods.base import sequence_logprob
    from jobs.unlearn.partitioned import count_every_forward, reset_backward_counts
    from jobs.unlearn.reference import AdapterDisabled, add_lora, load_trained

    s = spec(tiny_dir, tmp_path, "npo", deepspeed={"zero_optimization": {"stage": 3}})
    cfg = deepspeed_config(s, world_size=1)
    model = add_lora(load_trained(s, cfg), s)
    engine = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3),
        config=cfg,
    )[0]
    batch = {
        "input_ids": torch.tensor([[1, 5, 6, 7, 8]]),
        "attention_mask": torch.ones(1, 5, dtype=torch.long),
        "labels": torch.tensor([[-100, -100, 6, 7, 8]]),
    }
    down = next(m for n, m in engine.module.named_modules() if n.endswith("layers.1.mlp.down_proj.base_layer"))

    def counts_after_forget_and_reference(reference):
        reset_backward_counts(engine.module)
        logp, _ = sequence_logprob(engine, batch)
        reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return logp, down.ds_grads_remaining

    def uncounted(**inputs):  # the same reference pass straight through DeepSpeed's hooks
        with engine.module.disable_adapter(), torch.no_grad():
            return engine.module(**inputs)

    logp, raw = counts_after_forget_and_reference(uncounted)
    assert raw == 0  # DeepSpeed's own count: the reference pass reset it; the backward would drive it to -1
    engine.backward(-logp.sum())
    count_every_forward(engine)
    logp, counted = counts_after_forget_and_reference(AdapterDisabled(engine.module))
    assert counted == 1
    engine.backward(-logp.sum())
    assert down.ds_grads_remaining == 0
