"""The quantization attack suite (jobs/evaluate/quant.py): bitsandbytes' 8-bit and 4-bit layers on the CPU, the
in-memory swap and its undoing, the same quantization as a reload with BitsAndBytesConfig, and the suite on the tiny
Llama (random, and fitted then slightly unlearned). No Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jobs.evaluate.quant import QuantOptions, quantizable, quantized, quantized_layer, scheme
from jobs.evaluate.suites import SuiteContext

# NF4's 16 code values (bitsandbytes' get_4bit_type("nf4")); the widest gap between neighbours is 1 - 0.6961928 at
# the bottom: a weight rounds to its nearest code, at most half that gap (0.1519036) times its block's absmax away.
NF4 = [-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
       0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0]  # fmt: skip
NF4_HALF_GAP = max(b - a for a, b in zip(NF4, NF4[1:])) / 2


@pytest.fixture(scope="module")
def linear() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(64, 64).eval()


def test_layers_hold_quantized_weights_within_the_schemes_bounds(linear):
    """A seeded random 64x64 Linear (weights uniform in +-1/8, so every absmax is about 0.125), quantized.

    NF4 (blocks of 64 consecutive weights, each with its float32 absmax a): a weight w dequantizes to a * c with c
    the NF4 code nearest w / a, so |w - a * c| <= a * 0.1519036 (half the widest code gap, 0.3038072, between -1
    and -0.6961928): at most 0.019 here. The layer's product is x @ dequantized.T + b in float32 (the CPU's bfloat16
    kernel is off), equal to F.linear with the dequantized weight to float32 rounding.

    LLM.int8 (one scale s per output row): the weight is cast to float16 (relative error <= 2**-11, so
    s <= absmax (1 + 2**-11)), then w16 * 127 / s is rounded to an int8, which dequantizes to q * s / 127:
    |w16 - q s / 127| <= s / 254, hence |w - q s / 127| <= absmax (1 / 254 + 2**-10) for absmax the row's:
    at most 0.00061 here. Its product also quantizes the activations per row to int8 (about 2**-8 of each row's
    absmax): the output stays within 1% of the float one (relative Frobenius error), 4 bits within 10%.

    A float copy would have no error at all: each scheme's largest error is also more than a third of its bound.
    """
    import bitsandbytes as bnb

    w, b = linear.weight.detach(), linear.bias.detach()
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    fp = linear(x).detach()

    q4 = quantized_layer(linear, 4, "nf4")
    assert q4.weight.dtype == torch.uint8 and q4.weight.numel() == 64 * 64 // 2  # two 4-bit codes a byte
    state = q4.weight.quant_state
    assert (state.quant_type, state.blocksize, state.nested) == ("nf4", 64, False)
    absmax = w.reshape(-1, 64).abs().amax(1)
    assert torch.allclose(state.absmax, absmax)
    dq4 = bnb.functional.dequantize_4bit(q4.weight.data, state)
    err4 = (dq4 - w).abs().reshape(-1, 64)
    bound4 = NF4_HALF_GAP * absmax[:, None] + 1e-6
    assert (err4 <= bound4).all() and err4.max() > bound4.max() / 3
    with torch.no_grad():
        out4 = q4(x)
    assert torch.allclose(out4, torch.nn.functional.linear(x, dq4, b), atol=1e-5)
    assert (out4 - fp).norm() / fp.norm() < 0.1

    q8 = quantized_layer(linear, 8)
    assert q8.weight.dtype == torch.int8 and q8.weight.shape == (64, 64)
    scale = q8.weight.SCB
    assert scale.shape == (64,) and torch.allclose(scale, w.half().float().abs().amax(1))
    dq8 = q8.weight.data.float() * scale[:, None] / 127
    err8 = (dq8 - w).abs()
    bound8 = w.abs().amax(1, keepdim=True) * (1 / 254 + 2**-10)
    assert (err8 <= bound8).all() and err8.max() > bound8.max() / 3
    with torch.no_grad():
        out8 = q8(x)
    assert (out8 - fp).norm() / fp.norm() < 0.01
    assert torch.equal(linear.weight.detach(), w)  # the source layer is left as it was


def test_conv1d_is_quantized_as_its_transpose(linear):
    """transformers' Conv1D (GPT-2) computes x @ W + b with W [in, out]: quantized as the Linear whose weight is W.T,
    it gives the same product as that Linear quantized."""
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(64, 64)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.t())
        conv.bias.copy_(linear.bias)
    net = torch.nn.Sequential(conv).eval()
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = quantized_layer(linear, 4)(x)
        with quantized(net, 4):
            assert type(net[0]).__name__ == "Linear4bit"
            out = net(x)
    assert torch.allclose(out, ref, atol=1e-6)
    assert net[0] is conv


def _tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def test_quantized_swaps_every_linear_but_the_head_and_puts_the_model_back():
    """Inside ``quantized`` every Linear of the decoder is a bitsandbytes layer, the tied head is untouched; on exit
    (normal or by an exception) the model holds the very same module and parameter objects with the same values,
    the embeddings still tied, and computes the same logits. A layer with its own accelerate hook (its own place in a
    device map) is replaced by one that moves its inputs to its device."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model = _tied_llama()
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        before_logits = model(input_ids=ids).logits
    modules = dict(model.named_modules())
    params = dict(model.named_parameters(remove_duplicate=False))
    values = {n: p.detach().clone() for n, p in params.items()}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    names = [n for n, _ in quantizable(model)]
    assert len(names) == 2 * 7 and "lm_head" not in names  # q, k, v, o, gate, up, down of each layer
    add_hook_to_module(model.model.layers[0].mlp.down_proj, AlignDevicesHook(execution_device="cpu"))

    with quantized(model, 4, "nf4"), torch.no_grad():
        kinds = {type(m).__name__ for n, m in model.named_modules() if n in names}
        assert kinds == {"Linear4bit"}
        assert model.model.layers[0].mlp.down_proj._forward_pre_hooks  # moves inputs as the accelerate hook did
        assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
        q_logits = model(input_ids=ids).logits
    # 4 bits are coarse for a random model: its logits move by about a fifth (relative norm)
    assert 0 < (q_logits - before_logits).norm() / before_logits.norm() < 0.5
    with pytest.raises(RuntimeError, match="boom"), quantized(model, 8):
        assert type(model.model.layers[1].self_attn.q_proj).__name__ == "Linear8bitLt"
        raise RuntimeError("boom")

    assert dict(model.named_modules()) == modules  # the same objects under the same names
    after = dict(model.named_parameters(remove_duplicate=False))
    assert after.keys() == params.keys() and all(after[n] is params[n] for n in params)
    assert all(torch.equal(after[n].detach(), values[n]) for n in params)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before_logits)
    assert scheme(model, [8, 4]) == (
        f"bitsandbytes {__import__('bitsandbytes').__version__}: 8-bit LLM.int8 (int8 weights and activations, "
        "row-wise absmax, outlier threshold 6.0), 4-bit NF4 (blocksize 64, compute float32); lm_head kept in float32"
    )


@pytest.mark.parametrize(
    "bits, quant_type, config",
    [
        (8, "nf4", {"load_in_8bit": True}),
        (4, "fp4", {"load_in_4bit": True}),
        (4, "nf4", {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}),
    ],
    ids=["int8", "fp4", "nf4"],
)
def test_same_quantization_as_a_reload_with_bitsandbytes_config(tiny_dir, bits, quant_type, config):
    """The paper reloads the model with ``BitsAndBytesConfig(load_in_8bit=True)`` or ``(load_in_4bit=True)`` (FP4);
    quantizing the fp32 model in memory gives the same layer types, bit-identical quantized weights and scales, and
    the same logits as that reload (transformers' default 4-bit compute dtype, float32, is the model's here)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from jobs.models import load_model

    path = str(tiny_dir / "model")
    ours = load_model(path).eval()
    reloaded = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=BitsAndBytesConfig(**config), dtype=torch.float32, device_map={"": "cpu"}
    ).eval()
    for m in reloaded.modules():  # bnb's AVX512-BF16 CPU kernel cannot take in_features < 64, and rounds to bf16
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    ids = torch.tensor([[1, 5, 9, 42, 7, 3, 11]])
    with quantized(ours, bits, quant_type), torch.no_grad():
        pairs = list(zip(ours.named_modules(), reloaded.named_modules()))
        assert all(n1 == n2 and type(m1) is type(m2) for (n1, m1), (n2, m2) in pairs)
        layers = [(m1, m2) for (_, m1), (_, m2) in pairs if type(m1).__name__ in ("Linear4bit", "Linear8bitLt")]
        assert len(layers) == 14
        for m1, m2 in layers:
            assert m1.weight.dtype == m2.weight.dtype and torch.equal(m1.weight.data, m2.weight.data)
            if bits == 4:
                assert torch.equal(m1.weight.quant_state.absmax, m2.weight.quant_state.absmax)
            else:
                assert torch.equal(m1.weight.SCB, m2.weight.SCB)
        assert torch.equal(ours(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_offloaded_model_is_refused_and_the_suite_declared():
    from jobs.evaluate.suites import get_suite, metric_group
    from orchestrator.config.schema import EvalConfig

    suite = get_suite("quant")
    assert suite.sources() == ("forget",)  # retain is scored where it is given
    assert [r.metric for r in suite.recoveries] == ["quant8_recovery", "quant4_recovery"]
    assert {metric_group(m) for m in ("quant_fp_forget_prob", "quant4_retain_prob")} == {"Quantization"}
    assert metric_group("quant8_recovery") == "Robustness"  # every attack's recovery sits in one group
    assert EvalConfig().suite_options("quant") == {"bits": [8, 4], "quant_type": "nf4", "stop": []}
    assert EvalConfig(quant={"bits": [4], "quant_type": "fp4"}).suite_options("quant")["bits"] == [4]
    with torch.device("meta"):
        model = _tied_llama()
    with pytest.raises(ValueError, match="offloaded to 'cpu' or 'disk'"), quantized(model, 4):
        pass
    for rows in ([], [{"text": "a raw-text forget row"}]):
        with pytest.raises(ValueError, match="question/answer rows"):
            suite(None, {"forget": rows})
    assert QuantOptions(bits=[4, 4, 8]).bits == [4, 8]
    for bad in ({"bits": [2]}, {"bits": []}, {"quant_type": "int4"}, {"threshold": 6.0}):
        with pytest.raises(ValueError):
            QuantOptions(**bad)


def test_suite_on_the_tiny_model(tiny_dir):
    """The suite beside qa on 4 rows of each split: every metric in [0, 1]; the unquantized scores are qa's to float
    rounding; the random tiny model's answer probabilities (about 1/400 a token) move at 8 bits by at most about 2e-4
    of their value (a row), at 4 bits by at most about 5e-3: under 1% and 5%, and never by nothing."""
    from jobs.evaluate.suites import evaluate_model

    splits = {"forget": str(tiny_dir / "forget.jsonl"), "retain": str(tiny_dir / "retain.jsonl")}
    res = evaluate_model(str(tiny_dir / "model"), splits, suites=["qa", "quant"], max_examples=4, max_new_tokens=4)
    m, raw = res["metrics"], res["raw"]
    names = [f"quant{p}_{s}" for p in ("_fp", "8", "4") for s in ("forget_prob", "forget_rouge", "retain_prob")]
    assert set(names) <= set(m) and all(0 <= m[n] <= 1 for n in names)
    assert abs(m["quant_fp_forget_prob"] - m["forget_prob"]) < 1e-6
    assert abs(m["quant_fp_retain_prob"] - m["retain_prob"]) < 1e-6
    assert m["quant_fp_forget_rouge"] == m["forget_rouge"]
    fp = np.array(raw["quant_fp_forget_prob"])
    q8, q4 = np.array(raw["quant8_forget_prob"]), np.array(raw["quant4_forget_prob"])
    assert len(fp) == len(q8) == len(q4) == 4
    rel8, rel4 = np.abs(q8 / fp - 1), np.abs(q4 / fp - 1)
    assert 0 < rel8.max() < 0.01 and 0 < rel4.max() < 0.05
    assert m["quant8_forget_prob"] != m["quant_fp_forget_prob"]
    assert res["info"]["quant_scheme"].endswith("4-bit NF4 (blocksize 64, compute float32); lm_head kept in float32")


def test_four_bits_bring_back_what_a_small_unlearning_step_hid(fitted_tiny, tiny_dir):
    """The paper's effect in miniature: the tiny model fitted to its rows, then 50 AdamW steps (lr 2e-5) of gradient
    ascent on the forget rows with descent on the retain rows, which move no weight by more than about 0.0013: a
    fraction of a 4-bit step (about a seventh of a block's absmax) and under half an 8-bit one. Quantized to 4 bits
    the unlearned model gets back about half of the answer probability it lost (recovery 0.5 against the fitted
    model quantized alike), at 8 bits almost none (about 0.01)."""
    from jobs.evaluate.suites import add_reference_metrics, get_suite, read_jsonl
    from jobs.models import load_model, load_tokenizer
    from jobs.unlearn.methods.base import mean_nll

    path, batch = fitted_tiny
    tok = load_tokenizer(path)
    data = {"forget": read_jsonl(str(tiny_dir / "forget.jsonl"), 4)}
    suite = get_suite("quant")
    base = load_model(path).eval()
    unlearned = load_model(path)
    opt = torch.optim.AdamW(unlearned.parameters(), lr=2e-5)
    for _ in range(50):
        opt.zero_grad()
        (mean_nll(unlearned, batch["retain"]) - mean_nll(unlearned, batch["forget"])).backward()
        opt.step()
    unlearned.eval()
    results = {
        name: suite(SuiteContext(model, tok, max_new_tokens=4), data)
        for name, model in (("base", base), ("unlearned", unlearned))
    }
    add_reference_metrics(results)
    m = results["unlearned"]["metrics"]
    assert m["quant_fp_forget_prob"] < results["base"]["metrics"]["quant_fp_forget_prob"] - 0.03  # it did unlearn
    assert m["quant4_recovery"] > 0.3 > 0.05 > m["quant8_recovery"]
    assert m["worst_recovery"] == m["quant4_recovery"]
