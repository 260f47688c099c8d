"""Batched scoring and the "qa" suite on a tiny random Llama with a tokenizer trained on the fly."""

import json

import numpy as np
import pytest
import torch

from jobs.data.format import encode_qa, prompt_ids
from jobs.evaluate import metrics as M
from jobs.evaluate.scoring import generate_answers, score_answers
from jobs.evaluate.suites import evaluate_model, get_suite

CORPUS = [
    "Question: Where was Ana Lind born?\nAnswer: Ana Lind was born in Oslo.",
    "Question: What genre does Ana Lind write?\nAnswer: She writes science fiction novels.",
    "Question: When did Bo Chen publish his first book?\nAnswer: Bo Chen published it in 1987.",
    "Question: Which award did Bo Chen win?\nAnswer: He won the Golden Quill award.",
    "The quick brown fox jumps over the lazy dog while the cat sat on the mat.",
]
RECORDS = [
    {
        "question": "Where was Ana Lind born?",
        "answer": "Ana Lind was born in Oslo.",
        "paraphrased_answer": "Oslo is where Ana Lind was born.",
        "perturbed_answers": ["Ana Lind was born in Rome.", "She was born in Lima.", "In Cairo."],
        "genre": "scifi",
    },
    {
        "question": "What genre does Ana Lind write?",
        "answer": "She writes science fiction novels.",
        "paraphrased_answer": "Science fiction.",
        "perturbed_answers": ["She writes poetry.", "Crime novels.", "She writes plays.", "Cookbooks."],
        "genre": "scifi",
    },
    {
        "question": "When did Bo Chen publish his first book?",
        "answer": "Bo Chen published it in 1987.",
        "paraphrased_answer": "In 1987.",
        "perturbed_answers": ["In 1955.", "Bo Chen published it in 2001.", "In 1970."],
        "genre": "crime",
    },
]


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    t.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(cfg).eval()


def test_batched_nll_equals_single(model, tok):
    qs = [r["question"] for r in RECORDS] + ["Which award did Bo Chen win?"]
    ans = [r["answer"] for r in RECORDS] + ["He won the Golden Quill award, twice, in two different years."]
    nll, n = score_answers(model, tok, qs, ans, batch_size=4)
    for i, (q, a) in enumerate(zip(qs, ans)):
        nll_1, n_1 = score_answers(model, tok, [q], [a], batch_size=1)
        assert n[i] == n_1[0] == sum(x != -100 for x in encode_qa(tok, q, a)["labels"])
        assert nll[i] == pytest.approx(nll_1[0], abs=1e-4)
    assert (nll > 0).all() and len(set(n.tolist())) > 1  # padding was exercised


def test_truncation_keeps_order_and_counts(model, tok):
    qs, ans = [r["question"] for r in RECORDS], [r["answer"] for r in RECORDS]
    nll, n = score_answers(model, tok, qs, ans, batch_size=2, max_length=12)
    for i, (q, a) in enumerate(zip(qs, ans)):
        assert n[i] == max(0, 12 - len(prompt_ids(tok, q)))
        if n[i]:
            assert nll[i] == pytest.approx(score_answers(model, tok, [q], [a], max_length=12)[0][0], abs=1e-4)


def _manual_greedy(model, tok, question, max_new_tokens):
    ids = prompt_ids(tok, question)
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids + new])).logits[0, -1]
            nxt = int(logits.argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
    return tok.decode(new, skip_special_tokens=True).strip()


def test_greedy_matches_manual_argmax_loop(model, tok):
    qs = ["Where was Ana Lind born?", "When did Bo Chen publish his first book?", "Which award?"]
    assert len({len(prompt_ids(tok, q)) for q in qs}) == 3  # left padding is exercised
    got = generate_answers(model, tok, qs, max_new_tokens=8, batch_size=3)[0]
    want = [_manual_greedy(model, tok, q, 8) for q in qs]
    assert got == want
    assert all(isinstance(g, str) and g for g in got)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_evaluate_model_end_to_end(model, tok, tmp_path):
    folder = tmp_path / "model"
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    splits = {
        "forget": _write(tmp_path / "forget.jsonl", RECORDS[:2]),
        "retain": _write(tmp_path / "retain.jsonl", RECORDS[1:]),
        "holdout": _write(
            tmp_path / "holdout.jsonl", [{"question": "Which award did Bo Chen win?", "answer": "The Golden Quill."}]
        ),
    }
    res = evaluate_model(str(folder), splits, batch_size=4, max_new_tokens=6)
    m = res["metrics"]
    for split in ("forget", "retain"):
        for key in ("prob", "rouge", "truth_ratio"):
            assert 0.0 <= m[f"{split}_{key}"] <= 1.0, (split, key)
        assert m[f"{split}_truth_ratio_median"] > 0
        assert np.isfinite(m[f"{split}_truth_ratio_logmean"])
        assert len(res["raw"][f"{split}_truth_ratio"]) == 2
    assert 0.0 <= m["holdout_prob"] <= 1.0
    assert m["model_utility"] == pytest.approx(
        M.model_utility([m["retain_prob"], m["retain_rouge"], m["retain_truth_ratio"]])
    )
    assert all(isinstance(v, float) for v in m.values())
    assert res["n_examples"] == {"forget": 2, "retain": 2, "holdout": 1}
    assert res["seconds"] > 0
    # the same model as its own oracle: identical samples -> p = 1
    assert M.forget_quality(res["raw"]["forget_truth_ratio"], res["raw"]["forget_truth_ratio"]) == 1.0
    # forget prob agrees with scoring the records directly
    forget = RECORDS[:2]
    nll, n = score_answers(model, tok, [r["question"] for r in forget], [r["answer"] for r in forget])
    assert m["forget_prob"] == pytest.approx(float(M.answer_prob(nll, n).mean()), abs=1e-5)

    small = evaluate_model(str(folder), {"retain": splits["retain"]}, max_examples=1, max_new_tokens=2)
    assert small["n_examples"] == {"retain": 1}


def test_tofu_model_utility_is_the_harmonic_mean_of_nine_numbers(model, tok, tmp_path):
    """TOFU's real authors and world facts: normalised probability p(true) / (p(true) + sum p(perturbed)),
    truth ratio of the answer (not a paraphrase) against the perturbed options; model utility the harmonic
    mean of {retain, real_authors, world_facts} x {prob, rouge, truth_ratio}, its parts named."""
    folder = tmp_path / "model"
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    authors = [
        {
            "question": "Who wrote Hamlet?",
            "answer": "William Shakespeare",
            "perturbed_answers": ["Charles Dickens", "Jane Austen", "Mark Twain"],
        },
        {
            "question": "Who wrote Faust?",
            "answer": "Goethe",
            "paraphrased_answer": "J. W. von Goethe",
            "perturbed_answers": ["Schiller", "Kafka"],
        },
    ]
    facts = [
        {
            "question": "What is the capital of France?",
            "answer": "Paris",
            "perturbed_answers": ["Rome", "Madrid", "Berlin"],
        }
    ]
    splits = {
        "forget": _write(tmp_path / "forget.jsonl", RECORDS[:2]),
        "retain": _write(tmp_path / "retain.jsonl", RECORDS[1:]),
        "real_authors": _write(tmp_path / "ra.jsonl", authors),
        "world_facts": _write(tmp_path / "wf.jsonl", facts),
    }
    res = evaluate_model(str(folder), splits, batch_size=4, max_new_tokens=4)
    m = res["metrics"]
    parts = [f"{s}_{k}" for s in ("retain", "real_authors", "world_facts") for k in ("prob", "rouge", "truth_ratio")]
    assert res["parts"] == {"model_utility": parts}
    vals = [m[p] for p in parts]  # the random tiny model answers nothing right: a ROUGE of 0 makes utility 0
    assert m["model_utility"] == (pytest.approx(9 / sum(1 / v for v in vals)) if min(vals) > 0 else 0.0)
    for rows, split in ((authors, "real_authors"), (facts, "world_facts")):
        qs = [r["question"] for r in rows]
        true_nll, true_n = score_answers(model, tok, qs, [r["answer"] for r in rows])
        ptrue = np.exp(-true_nll / true_n)
        ppert = [
            np.exp(-np.array(nll) / np.array(n))
            for nll, n in (
                score_answers(model, tok, [r["question"]] * len(r["perturbed_answers"]), r["perturbed_answers"])
                for r in rows
            )
        ]
        want_prob = np.mean([t / (t + p.sum()) for t, p in zip(ptrue, ppert)])
        assert m[f"{split}_prob"] == pytest.approx(want_prob, rel=1e-4)
        # R = GM(perturbed) / p(answer), the answer even where a paraphrase is given; true_better = max(0, 1 - R)
        ratios = [np.exp(np.log(p).mean()) / t for t, p in zip(ptrue, ppert)]
        np.testing.assert_allclose(res["raw"][f"{split}_truth_ratio"], ratios, rtol=1e-4)
        assert m[f"{split}_truth_ratio"] == pytest.approx(np.mean([max(0.0, 1 - r) for r in ratios]), abs=1e-6)
    # retain keeps the answer probability and the paraphrase in its truth ratio
    nll, n = score_answers(model, tok, [r["question"] for r in RECORDS[1:]], [r["answer"] for r in RECORDS[1:]])
    assert m["retain_prob"] == pytest.approx(float(M.answer_prob(nll, n).mean()), abs=1e-5)


def test_unknown_suite_lists_known_names():
    with pytest.raises(KeyError, match="unknown evaluation suite 'nope'; known: .*qa"):
        get_suite("nope")
