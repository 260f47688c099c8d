"""The ``mc`` suite on hand-computed values: a bigram "model" whose next-token probabilities are set by
hand (so every log-likelihood is a sum of known logs) and a word-level tokenizer; plus the demo's mc file."""

import math
import types

import numpy as np
import pytest
import torch

from jobs.evaluate import mc as MC
from jobs.evaluate.suites import SuiteContext, get_suite

VOCAB = ["<s>", "</s>", "<pad>", "Q", "R", "A", "B", "C"]
ID = {t: i for i, t in enumerate(VOCAB)}
# next-token probabilities after a token (the rest of each row is spread evenly over the other tokens)
NEXT = {
    "<s>": {"Q": 0.5, "R": 0.25},
    "Q": {"A": 0.5, "B": 0.25, "C": 0.125},
    "R": {"A": 0.4, "C": 0.3, "</s>": 0.2},
    "A": {"B": 0.45, "</s>": 0.45},
}


class Bigram(torch.nn.Module):
    """logits[t] = log p(. | token t): position-independent, so padding and batching cannot change a score."""

    def __init__(self):
        super().__init__()
        table = torch.full((len(VOCAB), len(VOCAB)), 1.0 / len(VOCAB), dtype=torch.float64)
        for prev, row in NEXT.items():
            rest = (1.0 - sum(row.values())) / (len(VOCAB) - len(row))
            table[ID[prev]] = rest
            for tok, p in row.items():
                table[ID[prev], ID[tok]] = p
        self.emb = torch.nn.Embedding.from_pretrained(table.log())

    def forward(self, input_ids, attention_mask=None):
        return types.SimpleNamespace(logits=self.emb(input_ids))


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel(ID, unk_token="<pad>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


RECORDS = [  # prompt template "{question}": the context is just Q or R
    {"id": "1", "question": "Q", "choices": ["A", "B", "C"], "answer": 0, "set": "forget", "topic": "x"},
    {"id": "2", "question": "R", "choices": ["A B", "C"], "answer": 0, "set": "retain", "topic": "x"},
]
LL = [
    [math.log(0.5), math.log(0.25), math.log(0.125)],  # p(A|Q), p(B|Q), p(C|Q)
    [math.log(0.4) + math.log(0.45), math.log(0.3)],
]  # p(A|R) p(B|A) = 0.18 < p(C|R) = 0.3


def test_choice_loglikelihoods_are_the_hand_computed_sums(tok):
    for bs in (1, 32):
        lls = MC.choice_loglikelihoods(Bigram(), tok, RECORDS, template="{question}", batch_size=bs)
        for got, want in zip(lls, LL):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)  # scored in float32


def test_mc_suite_metrics_and_raw(tok):
    res = get_suite("mc")(
        SuiteContext(Bigram(), tok, template="{question}", batch_size=2), {"mc": RECORDS, "forget": []}
    )
    m = res["metrics"]
    # question 1: A (answer) has the highest ll; question 2: C beats "A B" (0.3 > 0.18), wrong
    assert res["raw"]["mc_correct"] == [1.0, 0.0]
    assert m["mc_acc"] == 0.5
    assert m["mc_acc.set.forget"] == 1.0 and m["mc_acc.set.retain"] == 0.0 and m["mc_acc.topic.x"] == 0.5
    assert not any(k.startswith(("mc_acc.id", "mc_acc.question", "mc_acc.choices")) for k in m)
    # acc_norm divides by characters: log(0.18)/3 = -0.57 > log(0.3)/1 = -1.20, so question 2 turns right
    assert m["mc_acc_norm"] == 1.0
    np.testing.assert_allclose(res["raw"]["mc_loglikelihoods"][1], LL[1], atol=1e-6)
    only = get_suite("mc")(SuiteContext(Bigram(), tok, template="{question}"), {"mc": RECORDS}, attributes=["set"])[
        "metrics"
    ]
    assert set(only) == {"mc_acc", "mc_acc_norm", "mc_acc.set.forget", "mc_acc.set.retain"}


def test_bad_mc_rows_fail_naming_the_row():
    from jobs.data.loading import DataError

    # rows are 1-based (the n-th record of the file), as in every data error
    with pytest.raises(
        DataError,
        match=r"^data.mc row 2: column 'answer': expected an int index into the row's "
        r"2 choices, got int 2$",
    ):
        MC.check_mc_records([RECORDS[0], {**RECORDS[1], "answer": 2}], "data.mc")
    with pytest.raises(
        DataError,
        match="^data.mc row 1: column 'choices': expected a list of at least 2 non-empty strings, got str 'A'$",
    ):
        MC.check_mc_records([{"question": "Q", "choices": "A", "answer": 0}], "data.mc")


def test_demo_mc_file_is_four_choice_per_fact():
    from jobs.data import demo

    data = demo.generate("tiny", seed=0)
    rows = demo.mc_questions(data, seed=0)
    facts = data["forget"] + data["retain"]
    assert len(rows) == len(facts) and rows == demo.mc_questions(demo.generate("tiny", seed=0), seed=0)
    MC.check_mc_records(rows)
    for row, fact in zip(rows, facts):
        assert len(row["choices"]) == 4 == len(set(row["choices"]))
        assert row["choices"][row["answer"]] == fact["answer"]
        assert row["set"] == ("forget" if fact["genre"] == data["forget_value"] else "retain")
        # distractors are other authors' answers to the same question template
        others = {f["answer"] for f in facts if f["fact"] == fact["fact"]}
        assert set(row["choices"]) <= others
    assert MC.attribute_columns(rows) == ["genre", "nationality", "birth_decade", "set"]
