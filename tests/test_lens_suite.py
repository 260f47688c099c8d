"""The ``lens`` suite (jobs/evaluate/lens.py): the logit lens of the forget answers, layer by layer, and its plot."""

import numpy as np
import pytest
import torch

from jobs.evaluate.lens import Lens, final_norm
from jobs.evaluate.suites import SuiteContext, evaluate_model, get_suite, read_jsonl


def _tiny(tiny_dir, randomize_norm: bool = True):
    """The tiny Llama and its tokenizer; its final norm's weights drawn away from 1 (a norm of ones is nearly
    idempotent, so norming twice would go unseen)."""
    from jobs.models import load_model, load_tokenizer

    model, tok = load_model(tiny_dir / "model").eval(), load_tokenizer(tiny_dir / "model")
    if randomize_norm:
        with torch.no_grad():
            torch.manual_seed(0)
            model.model.norm.weight.uniform_(0.3, 3.0)
    return model, tok


def test_the_last_layer_is_the_models_own_answer_probability(tiny_dir):
    res = evaluate_model(
        str(tiny_dir / "model"),
        {"forget": str(tiny_dir / "forget.jsonl")},
        suites=["qa", "lens"],
        max_examples=4,
        max_new_tokens=4,  # qa's greedy answers are not what this compares
    )
    m, raw = res["metrics"], res["raw"]
    assert m["lens_last_prob"] == pytest.approx(m["forget_prob"], abs=1e-6)
    np.testing.assert_allclose(raw["lens_last_prob"], raw["forget_prob"], rtol=0, atol=1e-6)
    assert raw["lens_layers"] == [1, 2] and len(raw["lens_curve"]) == 2 and len(raw["lens_max_prob"]) == 4
    assert raw["lens_curve"][-1] == m["lens_last_prob"]


def test_an_intermediate_layer_by_hand(tiny_dir):
    from jobs.data.format import IGNORE_INDEX, encode_qa

    model, tok = _tiny(tiny_dir)
    rows = read_jsonl(str(tiny_dir / "forget.jsonl"), 3)
    res = get_suite("lens")(SuiteContext(model, tok, batch_size=2), {"forget": rows}, layers=[0, 1])
    assert res["raw"]["lens_layers"] == [0, 1, 2]
    norm, w_u = model.model.norm, model.lm_head.weight
    by_hand = {0: [], 1: []}
    for r in rows:  # one row at a time, no padding: the definition, not the batched code
        e = encode_qa(tok, r["question"], r["answer"])
        labels = torch.tensor(e["labels"])
        pos = (labels[1:] != IGNORE_INDEX).nonzero()[:, 0]  # positions that predict an answer token
        with torch.no_grad():
            hs = model(input_ids=torch.tensor([e["input_ids"]]), output_hidden_states=True).hidden_states
            for layer in (0, 1):
                logp = torch.log_softmax(norm(hs[layer][0, pos]) @ w_u.T, dim=-1)
                nll = -logp.gather(-1, labels[pos + 1][:, None]).mean()
                by_hand[layer].append(float(torch.exp(-nll)))
    assert res["raw"]["lens_curve"][:2] == pytest.approx([np.mean(by_hand[0]), np.mean(by_hand[1])], rel=1e-5)


def test_the_peak_is_the_curves_highest_layer(tiny_dir):
    model, tok = _tiny(tiny_dir)
    rows = read_jsonl(str(tiny_dir / "forget.jsonl"))
    res = get_suite("lens")(SuiteContext(model, tok), {"forget": rows}, layers=[0, 1, 2])
    m, raw = res["metrics"], res["raw"]
    curve, layers = np.array(raw["lens_curve"]), raw["lens_layers"]
    peak = int(np.argmax(curve))
    assert m["lens_peak_layer"] == float(layers[peak]) and m["lens_max_prob"] == curve.max()
    assert m["lens_max_gap"] == pytest.approx(curve.max() - curve[-1]) and m["lens_max_gap"] >= 0
    assert np.mean(raw["lens_max_prob"]) == pytest.approx(m["lens_max_prob"])  # each row at the peak layer
    with pytest.raises(ValueError, match=r"eval.lens.layers: \[3\] not in 0..2"):
        get_suite("lens")(SuiteContext(model, tok), {"forget": rows}, layers=[3])


ARCHS = {  # tiny random models of each architecture the lens knows, on the tiny tokenizer's 400 tokens
    "mistral": ("MistralConfig", "MistralForCausalLM", {"num_key_value_heads": 2}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"num_key_value_heads": 2}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"n_embd": 32, "n_layer": 2, "n_head": 4}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
}


def _random_model(name: str, **extra):
    import transformers

    config_cls, model_cls, kw = ARCHS.get(name, ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8}))
    common = dict(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = getattr(transformers, config_cls)(**{**common, **kw, **extra}, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # a norm of ones and zero bias would hide one norm too many or too few
        norm = final_norm(model)
        norm.weight.uniform_(0.3, 3.0)
        if getattr(norm, "bias", None) is not None:
            norm.bias.uniform_(-1, 1)
    return model


@pytest.mark.parametrize("name", list(ARCHS))
def test_each_architecture_s_last_layer_is_its_answer_probability(tiny_dir, name):
    from jobs.evaluate import metrics as M
    from jobs.evaluate.scoring import score_answers

    model = _random_model(name)
    _, tok = _tiny(tiny_dir, randomize_norm=False)
    rows = read_jsonl(str(tiny_dir / "forget.jsonl"), 3)
    res = get_suite("lens")(SuiteContext(model, tok, batch_size=2), {"forget": rows})
    nll, n = score_answers(model, tok, [r["question"] for r in rows], [r["answer"] for r in rows], batch_size=2)
    np.testing.assert_allclose(res["raw"]["lens_last_prob"], M.answer_prob(nll, n), rtol=1e-5)
    ids = torch.tensor([[5, 9, 23, 41]])
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    lens = Lens(model)
    # transformers hands back the last hidden state normed: the unembedding alone is the model, norming it again isn't
    assert torch.allclose(lens(out.hidden_states[-1][0], norm=False), out.logits[0], atol=1e-5)
    assert not torch.allclose(lens(out.hidden_states[-1][0]), out.logits[0], atol=1e-2)


def test_an_architecture_it_cannot_read_is_one_clear_error(tiny_dir):
    _, tok = _tiny(tiny_dir, randomize_norm=False)
    rows = read_jsonl(str(tiny_dir / "forget.jsonl"), 2)
    # Gemma 2 soft-caps its logits: the norm and unembedding alone do not make them
    capped = _random_model("gemma2", final_logit_softcapping=0.5)
    with pytest.raises(ValueError, match="does not reproduce the logits"):
        get_suite("lens")(SuiteContext(capped, tok), {"forget": rows})
    with pytest.raises(ValueError, match="cannot find the final norm of Linear"):
        final_norm(torch.nn.Linear(2, 2))


def test_a_model_dispatched_over_cpu_and_disk_reads_the_same_lens(tiny_dir, tmp_path):
    from tests.test_placement import cpu_and_disk

    splits, kw = {"forget": str(tiny_dir / "forget.jsonl")}, dict(suites=["lens"], max_examples=4, batch_size=2)
    whole = evaluate_model(str(tiny_dir / "model"), splits, **kw)
    model_dir = tiny_dir / "model"
    split = evaluate_model(
        str(model_dir), splits, max_memory=cpu_and_disk(model_dir), offload_folder=str(tmp_path), **kw
    )
    assert "disk" in split["placement"]  # the final norm and the LM head run from the offload folder
    np.testing.assert_allclose(split["raw"]["lens_curve"], whole["raw"]["lens_curve"], rtol=1e-6)


@pytest.mark.e2e  # the real model (converted once into the cache)
def test_smollm2_with_tied_embeddings_reads_its_own_probability_at_the_last_layer(smollm2):
    from jobs.evaluate import metrics as M
    from jobs.evaluate.scoring import score_answers
    from jobs.models import load_model, load_tokenizer

    model, tok = load_model(smollm2), load_tokenizer(smollm2)
    assert model.config.tie_word_embeddings
    rows = [
        {"question": "What is the capital of France?", "answer": "Paris"},
        {"question": "What is the chemical symbol for gold?", "answer": "Au"},
    ]
    res = get_suite("lens")(SuiteContext(model, tok), {"forget": rows})
    nll, n = score_answers(model, tok, [r["question"] for r in rows], [r["answer"] for r in rows])
    np.testing.assert_allclose(res["raw"]["lens_last_prob"], M.answer_prob(nll, n), rtol=1e-6)
    assert res["raw"]["lens_layers"] == list(range(1, 31)) and res["metrics"]["lens_peak_layer"] >= 1


def test_the_lens_plot_draws_every_model_s_curve_and_skips_without_one(tmp_path):
    import matplotlib.image as mpimg

    from orchestrator.tracking import plots

    raws = {
        "base": {"lens_curve": [0.1, 0.5, 0.9], "lens_layers": [1, 2, 3], "forget_prob": [0.9]},
        "merged": {"lens_curve": [0.1, 0.4, 0.05], "lens_layers": [1, 2, 3]},
        "subset/a": {"lens_curve": [0.2, 0.3, 0.1], "lens_layers": [1, 2, 3]},
        "oracle": {"forget_prob": [0.1]},  # no lens: no line
    }
    fig = plots.lens_figure(raws)
    lines = {line.get_label(): list(line.get_ydata()) for line in fig.axes[0].get_lines()}
    assert lines["base"] == [0.1, 0.5, 0.9] and lines["merged"] == [0.1, 0.4, 0.05] and "subset/a" in lines
    assert "oracle" not in lines
    paths = plots.write_plots({}, {}, tmp_path / "plots", raws=raws)
    assert [p.name for p in paths] == ["lens.png"]
    img = mpimg.imread(paths[0])
    assert img.ndim == 3 and img.shape[0] > 200 and np.ptp(img) > 0
    assert plots.write_plots({}, {}, tmp_path / "p2", raws={"base": {"forget_prob": [0.5]}}) == []
