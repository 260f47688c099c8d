"""Merging LoRA adapters: equal to mergekit's merge of the adapter-merged full models, as a full model or an adapter."""

import json

import pytest
import torch
from safetensors.torch import load_file

from jobs.merge import MERGE_MARKER, is_adapter_dir, merge_models
from jobs.models import load_model, load_tokenizer, save_model
from jobs.spec import MergeSpec

TOL = 1e-5
ADAPTERS = {  # name -> LoraConfig arguments; the target modules overlap and differ (their union is merged)
    "a": {"target_modules": ["q_proj", "v_proj"]},
    "b": {"target_modules": ["q_proj", "down_proj"], "alpha_pattern": {"down_proj": 4}},
    "c": {"target_modules": ["v_proj", "o_proj", "up_proj"], "use_rslora": True},
}


def make_adapter(base_dir, out, seed, **lora):
    """A peft LoRA adapter (r=4, alpha=8) on base_dir with random nonzero lora_B, saved with the tokenizer."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_model(base_dir), LoraConfig(**{"r": 4, "lora_alpha": 8, **lora}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(str(out))
    load_tokenizer(base_dir).save_pretrained(str(out))
    return str(out)


def merged_full_model(base_dir, adapter_dir, out):
    """What a full-weights job would have saved: the adapter merged into the base (peft's merge_and_unload)."""
    from peft import PeftModel

    save_model(
        PeftModel.from_pretrained(load_model(base_dir), adapter_dir).merge_and_unload(), load_tokenizer(base_dir), out
    )
    return str(out)


def tiny_llama(tiny_dir, out, **config):
    """A random tiny Llama (tokenizer of tiny_dir) with config overrides, saved as safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(tiny_dir / "model")
    torch.manual_seed(3)
    model = LlamaForCausalLM(
        LlamaConfig(
            **{
                "vocab_size": len(tok),
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 4,
                "max_position_embeddings": 64,
                **config,
            }
        )
    )
    save_model(model, tok, out)
    return out


@pytest.fixture(scope="module")
def loras(tiny_dir, tmp_path_factory):
    """(base folder, adapter folders, the same adapters merged into full models)."""
    d = tmp_path_factory.mktemp("lora")
    base = tiny_dir / "model"
    adapters = {n: make_adapter(base, d / f"adapter-{n}", seed, **kw) for seed, (n, kw) in enumerate(ADAPTERS.items())}
    full = {n: merged_full_model(base, path, d / f"full-{n}") for n, path in adapters.items()}
    return str(base), adapters, full


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def merge(base, paths, out, method, progress=None, **kw) -> str:
    return merge_models(
        MergeSpec(base_model_path=base, model_paths=paths, method=method, output_dir=str(out), **kw), progress=progress
    )


CASES = {
    "ties": dict(method="ties", parameters={"density": 0.5, "normalize": True}),
    "task_arithmetic": dict(
        method="task_arithmetic",
        parameters={"lambda": 0.8},
        model_parameters={"a": {"weight": 0.5}, "c": {"weight": 1.5}},
    ),
    "linear": dict(method="linear", model_parameters={"b": {"weight": 2.0}}),
    "linear_unnormalized": dict(method="linear", parameters={"normalize": False, "weight": 0.5}),
    "breadcrumbs_ties": dict(method="breadcrumbs_ties", parameters={"density": 0.5, "gamma": 0.05, "weight": 1.0}),
}


@pytest.mark.parametrize("case", CASES)
def test_adapter_merge_equals_mergekit_on_merged_full_models(loras, tmp_path, case):
    base, adapters, full = loras
    calls = []
    ours = merge(base, adapters, tmp_path / "lora", **CASES[case], progress=lambda *a: calls.append(a))
    theirs = merge(base, full, tmp_path / "mergekit", **CASES[case])
    n = len(load_file(f"{ours}/model.safetensors"))
    assert calls == [(i, n) for i in range(1, n + 1)]  # every tensor of the full output reported
    diff = max_abs_diff(load_file(f"{ours}/model.safetensors"), load_file(f"{theirs}/model.safetensors"))
    print(f"{case}: max abs difference to mergekit {diff:.2e}")
    assert diff < TOL
    marker = json.loads((tmp_path / "lora" / MERGE_MARKER).read_text())
    assert marker["method"] == CASES[case]["method"] and marker["output"] == "full" and marker["seconds"] > 0
    assert marker["models"] == adapters
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(ours) is not None
    assert (tmp_path / "lora" / "tokenizer.json").exists()


def loaded_adapter_state(base, folder) -> dict:
    from peft import PeftModel

    return PeftModel.from_pretrained(load_model(base), folder).merge_and_unload().state_dict()


@pytest.mark.parametrize("case", ["task_arithmetic", "linear"])
def test_adapter_output_is_exact_for_linear_methods(loras, tmp_path, case):
    base, adapters, _ = loras
    full = load_file(f"{merge(base, adapters, tmp_path / 'full', **CASES[case])}/model.safetensors")
    out = merge(base, adapters, tmp_path / "adapter", output="adapter", **CASES[case])
    assert is_adapter_dir(out)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["rank_pattern"]["model.layers.0.self_attn.o_proj"] == 4  # sum of ranks
    diff = max_abs_diff(loaded_adapter_state(base, out), full)
    print(f"{case} adapter output: max abs difference to full output {diff:.2e}")
    assert diff < TOL


def test_ties_adapter_output_is_the_recorded_svd_truncation(loras, tmp_path):
    base, adapters, _ = loras
    full = load_file(f"{merge(base, adapters, tmp_path / 'full', **CASES['ties'])}/model.safetensors")
    calls = []
    out = merge(
        base, adapters, tmp_path / "adapter", output="adapter", **CASES["ties"], progress=lambda *a: calls.append(a)
    )
    merged, base_sd = loaded_adapter_state(base, out), load_model(base).state_dict()
    recorded = json.loads((tmp_path / "adapter" / MERGE_MARKER).read_text())["svd_relative_error"]
    n = len(recorded["modules"])  # each targeted module merged is reported
    assert calls == [(i, n) for i in range(1, n + 1)] and n > 1
    for module, error in recorded["modules"].items():
        k = f"{module}.weight"
        want = full[k] - base_sd[k]
        assert abs((merged[k] - full[k]).norm() / want.norm() - error) < 1e-3
    assert 0 < recorded["mean"] <= recorded["max"] < 1
    untouched = "model.layers.0.self_attn.k_proj.weight"
    torch.testing.assert_close(merged[untouched], base_sd[untouched], atol=0, rtol=0)


def test_tied_embeddings_stay_tied(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    base = tiny_llama(tiny_dir, tmp_path / "tied", tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(base / "model.safetensors")
    adapter = make_adapter(base, tmp_path / "adapter", 7, target_modules=["q_proj", "up_proj"])
    out = merge(str(base), {"a": adapter}, tmp_path / "out", method="task_arithmetic")
    assert "lm_head.weight" not in load_file(f"{out}/model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert max_abs_diff(model.state_dict(), loaded_adapter_state(str(base), adapter)) < TOL


def test_fan_in_fan_out_gpt2(tiny_dir, tmp_path):
    """GPT-2's Conv1D weights are (in, out): peft's fan_in_fan_out adapters, delta = s * (B @ A)^T."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = load_tokenizer(tiny_dir / "model")
    torch.manual_seed(5)
    save_model(
        GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64)),
        tok,
        tmp_path / "gpt2",
    )
    base = str(tmp_path / "gpt2")
    adapters = {
        n: make_adapter(base, tmp_path / f"adapter-{n}", 11 + i, target_modules=targets, fan_in_fan_out=True)
        for i, (n, targets) in enumerate({"a": ["c_attn"], "b": ["c_attn", "c_fc"]}.items())
    }
    full = {n: merged_full_model(base, path, tmp_path / f"full-{n}") for n, path in adapters.items()}
    for method in ("ties", "task_arithmetic"):
        ours = merge(base, adapters, tmp_path / f"lora-{method}", method=method)
        theirs = merge(base, full, tmp_path / f"mergekit-{method}", method=method)
        assert max_abs_diff(load_file(f"{ours}/model.safetensors"), load_file(f"{theirs}/model.safetensors")) < TOL
    out = merge(base, adapters, tmp_path / "adapter", method="task_arithmetic", output="adapter")
    want = load_file(f"{tmp_path}/lora-task_arithmetic/model.safetensors")
    got = {k: v for k, v in loaded_adapter_state(base, out).items() if k in want}  # the state dict adds lm_head
    assert max_abs_diff(got, want) < TOL


def one_line_error(call) -> str:
    with pytest.raises(ValueError) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_errors_are_one_line(loras, tiny_dir, tmp_path):
    base, adapters, full = loras
    msg = one_line_error(lambda: merge(base, adapters, tmp_path / "x", method="slerp"))
    assert "merge.method" in msg and "slerp" in msg and "ties" in msg
    msg = one_line_error(lambda: merge(base, {"a": adapters["a"], "b": full["b"]}, tmp_path / "x", method="ties"))
    assert "mixes" in msg and "a" in msg and "b" in msg
    msg = one_line_error(lambda: merge(base, full, tmp_path / "x", method="ties", output="adapter"))
    assert "merge.output" in msg
    unnormalized = CASES["linear_unnormalized"]
    msg = one_line_error(lambda: merge(base, adapters, tmp_path / "x", output="adapter", **unnormalized))
    assert "normalize" in msg and "output: full" in msg
    other = tiny_llama(tiny_dir, tmp_path / "wide", intermediate_size=96)
    wide = make_adapter(other, tmp_path / "wide-adapter", 9, target_modules=["up_proj"])
    msg = one_line_error(lambda: merge(base, {"a": adapters["a"], "w": wide}, tmp_path / "x", method="ties"))
    assert wide in msg and "different base" in msg
