"""Where an eval task puts its model (jobs/evaluate/placement.py): plans on the meta device over fake 80 GB GPUs,
and a tiny model dispatched over the CPU and disk scoring the same as the whole model."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from jobs.evaluate.placement import (
    GiB,
    PlacementError,
    empty_model,
    input_device,
    model_config,
    place_for_eval,
    plan_placement,
    spans_devices,
    summarize,
    usable_bytes,
)

GPU_80GB = 80 * 10**9
LAYER = re.compile(r"^model\.layers\.(\d+)$")


def llama(hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=32000,
    )


CONFIGS = {"llama-2-7b": llama(4096, 32, 11008, 32, 32), "llama-2-70b": llama(8192, 80, 28672, 64, 8)}
# GPUs a bf16 plan of each uses on 80 GB cards (None: the one-line error): the 7B (13.5 GB) fits one; the 70B
# (138 GB) leaves its last layer over on two cards' 69.9 GB each and takes three.
EXPECTED = {("llama-2-7b", n): 1 for n in (1, 2, 4, 8)}
EXPECTED.update({("llama-2-70b", 1): None, ("llama-2-70b", 2): None, ("llama-2-70b", 4): 3, ("llama-2-70b", 8): 3})


@pytest.fixture(scope="module")
def empty_models():
    return {name: empty_model(cfg, "bfloat16") for name, cfg in CONFIGS.items()}


def entries_of(device_map: dict, name: str) -> list[str]:
    """The device-map entries that place ``name``: itself or a module around it."""
    return [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]


def gpus(n: int) -> dict[int, int]:
    return {i: usable_bytes(GPU_80GB) for i in range(n)}


def test_usable_memory_keeps_a_tenth_and_a_fixed_reserve_and_never_more_than_is_free():
    assert usable_bytes(GPU_80GB) == int(0.9 * GPU_80GB) - 2 * GiB
    assert usable_bytes(GPU_80GB, free=10 * GiB) == 8 * GiB
    assert usable_bytes(GPU_80GB, fraction=0.5, reserve=0) == GPU_80GB // 2
    assert usable_bytes(GiB) == 0


@pytest.mark.parametrize("name,n", sorted(EXPECTED))
def test_llama_plans_over_fake_80gb_gpus(empty_models, name, n):
    model, cfg = empty_models[name], CONFIGS[name]
    used = EXPECTED[(name, n)]
    if used is None:
        with pytest.raises(PlacementError) as err:
            plan_placement(model, gpus(n), "bfloat16", name=name)
        msg = str(err.value)
        assert "\n" not in msg
        assert msg.startswith(
            f"model {name} needs 138.0 GB of weights in bfloat16 but does not fit the {n} GPU(s) "
            "reserved (cuda:0 69.9 GB"
        )
        assert msg.endswith("raise eval.gpus_per_task to 3")
        return
    plan = plan_placement(model, gpus(n), "bfloat16", name=name)
    # every module on a GPU, the GPUs needed taken in order from cuda:0
    assert all(isinstance(d, int) for d in plan.device_map.values())
    assert plan.devices == list(range(used))
    # every parameter placed by exactly one entry (the module itself or one around it: "" is the whole model)
    for p, _ in model.named_parameters():
        assert len(entries_of(plan.device_map, p)) == 1, p
    # no decoder layer split: nothing inside a layer has an entry of its own
    assert not [k for k in plan.device_map if k.startswith("model.layers.") and not LAYER.match(k)]
    # layers in order over the GPUs: never back to an earlier one
    order = [plan.device_map[entries_of(plan.device_map, f"model.layers.{i}")[0]] for i in range(cfg.num_hidden_layers)]
    assert order == sorted(order) and set(order) == set(range(used))
    # sizes add up, none over its GPU's budget
    assert sum(plan.device_bytes.values()) == plan.model_bytes
    assert all(b <= usable_bytes(GPU_80GB) for b in plan.device_bytes.values())
    if used > 1:
        assert plan.summary().startswith("model.embed_tokens, model.layers 0-")
        assert plan.summary().endswith("model.norm, model.rotary_emb, lm_head on cuda:2")


def test_the_70b_takes_two_h100s_as_torch_reports_them(empty_models):
    """An H100 "80 GB" reports 85.0e9 bytes (79.2 GiB): 74.4 GB usable a card, and two hold the 70B; one H200
    (140.4 GiB) does not."""
    h100, h200 = usable_bytes(85_029_158_912), usable_bytes(int(140.4 * GiB))
    plan = plan_placement(empty_models["llama-2-70b"], {0: h100, 1: h100}, "bfloat16")
    assert plan.devices == [0, 1]
    with pytest.raises(PlacementError, match=r"\(cuda:0 133\.5 GB usable .*raise eval.gpus_per_task to 2$"):
        plan_placement(empty_models["llama-2-70b"], {0: h200}, "bfloat16")


def test_only_the_devices_given_hold_weights(empty_models):
    model = empty_models["llama-2-70b"]
    # the CPU named: the overflow may go there
    plan = plan_placement(model, {0: usable_bytes(GPU_80GB), "cpu": 200 * 10**9}, "bfloat16")
    assert plan.devices == [0, "cpu"]
    # the CPU full too: disk only with an offload folder
    with pytest.raises(PlacementError, match="does not fit the devices given .*: raise eval.gpus_per_task$"):
        plan_placement(model, {0: usable_bytes(GPU_80GB), "cpu": 10 * 10**9}, "bfloat16")
    plan = plan_placement(model, {0: usable_bytes(GPU_80GB), "cpu": 10 * 10**9}, "bfloat16", offload_folder="/x")
    assert plan.devices == [0, "cpu", "disk"]
    # float32 doubles the bytes: the error also names the smaller dtype
    with pytest.raises(
        PlacementError,
        match=r"needs 275\.9 GB of weights in float32 .* raise eval.gpus_per_task to 4 "
        r"\(or set model.dtype: bfloat16, half the bytes\)$",
    ):
        plan_placement(CONFIGS["llama-2-70b"], {"0": GPU_80GB}, "float32", name="70b")


def test_summary_names_runs_of_layers_as_ranges():
    plan = {
        "model.embed_tokens": 0,
        **{f"model.layers.{i}": 0 for i in range(40)},
        **{f"model.layers.{i}": 1 for i in range(40, 80)},
        "model.norm": 1,
        "lm_head": 1,
    }
    assert (
        summarize(plan) == "model.embed_tokens, model.layers 0-39 on cuda:0; model.layers 40-79, model.norm, "
        "lm_head on cuda:1"
    )
    assert (
        summarize(
            {"model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk", "model.layers.4": "disk"}
        )
        == "model.layers 0 on cpu; model.layers 1-2, model.layers 4 on disk"
    )
    assert summarize({"": 0}) == "all on cuda:0"


def test_inputs_go_to_the_first_module_s_execution_device():
    class Dispatched(torch.nn.Module):
        def __init__(self, plan):
            super().__init__()
            self.hf_device_map = plan

    assert input_device(Dispatched({"embed": 0, "layers.0": 1})) == torch.device("cuda", 0)
    assert spans_devices(Dispatched({"embed": 0, "layers.0": 1}))
    # offloaded modules run on the first GPU (else the CPU)
    assert input_device(Dispatched({"embed": "cpu", "layers.0": 1, "lm_head": "disk"})) == torch.device("cuda", 1)
    assert not spans_devices(Dispatched({"embed": "cpu", "layers.0": 1, "lm_head": "disk"}))
    assert input_device(Dispatched({"embed": "disk", "layers.0": "cpu"})) == torch.device("cpu")
    assert input_device(torch.nn.Linear(2, 2)) == torch.device("cpu")


def test_a_model_too_big_for_the_task_s_gpus_is_refused_before_loading(tiny_dir, tmp_path, monkeypatch):
    """evaluate_model with CUDA (faked: one 80 GB GPU) on a 70B folder (config and tokenizer, no weights)."""
    from jobs.evaluate.suites import evaluate_model
    from jobs.models import load_tokenizer

    folder = tmp_path / "llama-70b"
    CONFIGS["llama-2-70b"].save_pretrained(folder)
    load_tokenizer(tiny_dir / "model").save_pretrained(folder)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (GPU_80GB, GPU_80GB))
    with pytest.raises(PlacementError, match=r"needs 275\.9 GB .* the 1 GPU\(s\) reserved \(cuda:0 69\.9 GB usable"):
        evaluate_model(str(folder), {"forget": str(tiny_dir / "forget.jsonl")})


# ----------------------------------------------------------------------------- dispatched over CPU and disk


def cpu_and_disk(model_dir) -> dict[str, int]:
    """A CPU budget that holds the embedding and layer 0 (accelerate keeps room for the largest module
    besides): layer 1, the norm and the LM head go to disk."""
    from accelerate.utils import compute_module_sizes

    sizes = compute_module_sizes(empty_model(model_config(model_dir)))
    largest = max(sizes[k] for k in ("model.embed_tokens", "lm_head", "model.layers.0"))
    return {"cpu": sizes["model.embed_tokens"] + sizes["model.layers.0"] + largest + 64}


def test_a_model_dispatched_over_cpu_and_disk_scores_the_same(tiny_dir, tmp_path):
    from jobs.evaluate.scoring import generate_answers
    from jobs.evaluate.suites import evaluate_model, read_jsonl
    from jobs.models import load_tokenizer

    model_dir = tiny_dir / "model"
    budget = cpu_and_disk(model_dir)
    plan = plan_placement(model_dir, budget, offload_folder=str(tmp_path / "offload"))
    assert (
        plan.summary() == "model.embed_tokens, model.layers 0 on cpu; model.layers 1, model.norm, "
        "model.rotary_emb, lm_head on disk"
    )

    splits = {
        "forget": str(tiny_dir / "forget.jsonl"),
        "retain": str(tiny_dir / "retain.jsonl"),
        "holdout": str(tiny_dir / "retain.jsonl"),
    }
    kw = dict(
        suites=["qa", "memorization", "mia"], suite_options={"mia": {"gradnorm": False}}, batch_size=4, max_new_tokens=8
    )
    whole = evaluate_model(str(model_dir), splits, max_memory={"cpu": 10**9}, **kw)
    split = evaluate_model(str(model_dir), splits, max_memory=budget, offload_folder=str(tmp_path / "offload"), **kw)
    assert whole["placement"].startswith("all on cpu")
    assert split["placement"].startswith(plan.summary())
    every = sum(p.numel() for p in empty_model(model_config(model_dir)).parameters())
    assert split["params"] == whole["params"] == every  # offloaded weights (on the meta device) count too
    assert split["tokens"] == whole["tokens"]
    assert set(split["metrics"]) == set(whole["metrics"]) and "forget_rouge" in whole["metrics"]
    for k, v in whole["metrics"].items():
        assert split["metrics"][k] == pytest.approx(v, abs=1e-6, nan_ok=True), k
    for k in ("forget_prob", "retain_prob", "forget_truth_ratio"):
        np.testing.assert_allclose(split["raw"][k], whole["raw"][k], rtol=1e-6, atol=1e-7)

    # greedy answers: the same strings
    tok = load_tokenizer(model_dir)
    questions = [r["question"] for r in read_jsonl(splits["forget"])]
    answers = []
    for memory, folder in (({"cpu": 10**9}, None), (budget, str(tmp_path / "offload2"))):
        model, _ = place_for_eval(model_dir, max_memory=memory, offload_folder=folder)
        answers.append(generate_answers(model, tok, questions, max_new_tokens=8, batch_size=4))
    assert answers[0] == answers[1] and any(answers[0][0])


def test_gradnorm_refuses_an_offloaded_model(tiny_dir, tmp_path):
    from jobs.evaluate.mia import gradnorm_scores
    from jobs.evaluate.suites import read_jsonl
    from jobs.models import load_tokenizer

    model_dir = tiny_dir / "model"
    model, _ = place_for_eval(model_dir, max_memory=cpu_and_disk(model_dir), offload_folder=str(tmp_path))
    with pytest.raises(ValueError, match="gradnorm: false"):
        gradnorm_scores(model, load_tokenizer(model_dir), read_jsonl(str(tiny_dir / "forget.jsonl"))[:1])


def test_a_lora_adapter_folder_dispatched_over_cpu_and_disk(tiny_dir, tmp_path):
    import json

    from peft import LoraConfig, get_peft_model

    from jobs.models import load_model

    model_dir = tiny_dir / "model"
    torch.manual_seed(1)
    peft = get_peft_model(load_model(model_dir), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    cfg_file = tmp_path / "adapter" / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "base_model_name_or_path": str(model_dir)}))

    merged = load_model(tmp_path / "adapter")
    model, where = place_for_eval(
        tmp_path / "adapter", max_memory=cpu_and_disk(model_dir), offload_folder=str(tmp_path / "offload")
    )
    assert "on disk" in where and "disk" in model.hf_device_map.values()
    ids = torch.tensor([[1, 5, 7, 9, 11, 13]])
    with torch.no_grad():
        base = load_model(model_dir)(input_ids=ids).logits
        want, got = merged(input_ids=ids).logits, model(input_ids=ids).logits
    assert not torch.allclose(want, base)  # the adapter changes the model
    torch.testing.assert_close(got, want)
