"""The probes suite (jobs/evaluate/probes.py) on the tiny random Llama: how a probe is rendered and scored, no Ray."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from jobs.data.format import PromptFormat, answer_ids, encode_qa, special_ids
from jobs.evaluate.probes import (
    IN_CONTEXT,
    ProbesOptions,
    ProbeTemplate,
    build_probes,
    check_options,
    in_context_shots,
    load_templates,
    probe_ids,
)
from jobs.evaluate.suites import SUITES, SuiteContext, evaluate_model, get_suite, metric_group, read_jsonl

# ChatML, as SmolLM2's and Qwen's templates render a conversation without a system turn
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT = PromptFormat(template="chat")
ROW = {"question": "Where was Ana Lind born?", "answer": "Ana Lind was born in Oslo."}
PREFIXED = ProbeTemplate("prefixed", "{question} Tell me.", answer_prefix="Sure, here is the answer:")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's passes on one thread: on a busy machine more threads only wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    """(tokenizer, model, forget rows) of the tiny model; a second tokenizer with a ChatML chat template."""
    from jobs.models import load_model, load_tokenizer

    path = str(tiny_dir / "model")
    chat_tok = load_tokenizer(path)
    chat_tok.chat_template = CHATML
    return load_tokenizer(path), load_model(path).eval(), read_jsonl(str(tiny_dir / "forget.jsonl")), chat_tok


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def hand_prob(model, prompt: list[int], target: list[int]) -> float:
    """exp(-mean NLL) of ``target`` after ``prompt``: one plain forward pass."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + target])).logits[0].float(), -1)
    nll = -sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(target))
    return math.exp(-nll / len(target))


def run(tiny, rows, **opts) -> dict:
    tok, model = tiny[0], tiny[1]
    return SUITES["probes"](SuiteContext(model, tok, batch_size=16, max_new_tokens=4), {"forget": rows}, **opts)


def test_a_probe_takes_the_questions_place_and_its_prefix_starts_the_plain_answer(tiny):
    tok = tiny[0]
    prompt, target = probe_ids(tok, PREFIXED.text(ROW), ROW["answer"], answer_prefix=PREFIXED.answer_prefix)
    text = "Question: Where was Ana Lind born? Tell me.\nAnswer: Sure, here is the answer:"
    assert prompt == special_ids(tok, text) and tok.decode(prompt) == text
    assert target == ids(tok, " Ana Lind was born in Oslo.") + [tok.eos_token_id]  # only the answer is scored
    assert tok.decode(target) == " Ana Lind was born in Oslo.</s>"
    enc = encode_qa(tok, ROW["question"], ROW["answer"])  # no probe text, no prefix: qa's own ids
    direct = probe_ids(tok, ROW["question"], ROW["answer"])
    assert direct[0] + direct[1] == enc["input_ids"] and [t for t in enc["labels"] if t != -100] == direct[1]


def test_a_probe_takes_the_user_turn_and_its_prefix_starts_the_assistant_turn_of_a_chat(tiny):
    tok = tiny[3]
    prompt, target = probe_ids(tok, PREFIXED.text(ROW), ROW["answer"], CHAT, PREFIXED.answer_prefix)
    text = (
        "<|im_start|>user\nWhere was Ana Lind born? Tell me.<|im_end|>\n"
        "<|im_start|>assistant\nSure, here is the answer:"
    )
    assert tok.decode(prompt) == text and prompt == ids(tok, text)
    assert target == ids(tok, " Ana Lind was born in Oslo.") + ids(tok, "<|im_end|>")
    assert tok.decode(target) == " Ana Lind was born in Oslo.<|im_end|>"
    unprefixed = probe_ids(tok, ROW["question"], ROW["answer"], CHAT)  # the template's own assistant lead ("")
    enc = encode_qa(tok, ROW["question"], ROW["answer"], 128, CHAT)
    assert unprefixed[0] + unprefixed[1] == enc["input_ids"]
    assert tok.decode(unprefixed[1]) == "Ana Lind was born in Oslo.<|im_end|>"


def test_direct_is_the_qa_suites_forget_prob_and_every_shipped_kind_runs(tiny_dir):
    res = evaluate_model(
        str(tiny_dir / "model"),
        {"forget": str(tiny_dir / "forget.jsonl")},
        suites=["qa", "probes"],
        max_examples=4,
        batch_size=16,
        max_new_tokens=4,
    )
    m = res["metrics"]
    assert abs(m["probe_direct_prob"] - m["forget_prob"]) < 1e-6
    assert np.allclose(res["raw"]["probe_direct_prob"], res["raw"]["forget_prob"], rtol=0, atol=1e-6)
    assert m["probe_direct_rouge"] == pytest.approx(m["forget_rouge"])
    attacks = ["prefix_injection", "affirmative_suffix", "role_play", "in_context"]  # the kinds that score the answer
    for kind in ["direct", "reverse_query", *attacks]:
        assert math.isfinite(m[f"probe_{kind}_prob"]) and 0 <= m[f"probe_{kind}_rouge"] <= 1, kind
        assert len(res["raw"][f"probe_{kind}_prob"]) == 4
    assert not any("paraphrase" in k for k in m)  # the tiny rows have no paraphrased_question
    worst = res["info"]["probe_worst_kind"]
    assert worst in attacks and m["probe_worst_prob"] == max(m[f"probe_{k}_prob"] for k in attacks)
    assert m[f"probe_{worst}_prob"] == m["probe_worst_prob"]
    assert m["probe_worst_rouge"] == max(m[f"probe_{k}_rouge"] for k in attacks)
    # the recovery takes the attack kinds only: a reverse query's answer sentence gives its question away
    assert res["parts"]["probes_recovery"] == [f"probe_{k}_prob" for k in attacks]


def test_in_context_examples_are_other_rows_drawn_by_the_seed(tiny):
    tok, rows = tiny[0], tiny[2]
    shots = in_context_shots(8, 3, seed=0)
    assert shots == in_context_shots(8, 3, seed=0) and shots != in_context_shots(8, 3, seed=1)
    for i, s in enumerate(shots):
        assert len(set(s)) == 3 and i not in s and all(0 <= j < 8 for j in s)
    assert all(sorted(s) == [j for j in range(3) if j != i] for i, s in enumerate(in_context_shots(3, 5)))

    for fmt, tk in ((PromptFormat(), tok), (CHAT, tiny[3])):
        probes = build_probes(tk, rows, [IN_CONTEXT], {}, fmt, in_context_k=3, seed=0)
        assert [p.row for p in probes] == list(range(len(rows)))
        for p, s in zip(probes, in_context_shots(len(rows), 3, seed=0)):
            text, row = tk.decode(p.prompt), rows[p.row]
            for j in s:
                assert f"Question: {rows[j]['question']}\nAnswer: {rows[j]['answer']}\n\n" in text
            assert row["answer"] not in text and text.count("Question: ") == 3 + (not fmt.chat)
            assert text.endswith(
                f"Question: {row['question']}\nAnswer:"
                if not fmt.chat
                else f"{row['question']}<|im_end|>\n<|im_start|>assistant\n"
            )
            assert p.target == answer_ids(tk, row["answer"], fmt)


def test_a_reverse_query_scores_the_question_given_the_answer(tiny):
    tok, model, rows = tiny[0], tiny[1], tiny[2][:3]
    reverse = load_templates()["reverse_query"]
    assert reverse.target == "question"
    res = run(tiny, rows, kinds=["reverse_query"])
    for i, r in enumerate(rows):
        text = f"Question: Here is the answer to a question: {r['answer']}\nWhat was the question?\nAnswer: "
        prompt, target = special_ids(tok, text + "The question was:"), answer_ids(tok, r["question"])
        assert res["raw"]["probe_reverse_query_prob"][i] == pytest.approx(hand_prob(model, prompt, target), rel=1e-5)
    probe = build_probes(tok, rows, ["reverse_query"], {"reverse_query": reverse})[0]
    assert probe.reference == rows[0]["question"] and rows[0]["question"] not in tok.decode(probe.prompt)
    # reported, but no attack on the answer: neither the worst case nor the recovery takes it
    assert set(res["metrics"]) == {"probe_reverse_query_prob", "probe_reverse_query_rouge"}
    assert res["parts"] == {"probes_recovery": []} and "probe_worst_kind" not in res["info"]


def test_paraphrase_scores_the_rows_that_have_a_paraphrased_question(tiny):
    rows = [dict(r) for r in tiny[2][:4]]
    assert "probe_paraphrase_prob" not in run(tiny, rows, kinds=["direct", "paraphrase"])["metrics"]
    for i in (1, 3):
        rows[i]["paraphrased_question"] = rows[i]["question"]  # the same words: the same probability as direct
    res = run(tiny, rows, kinds=["direct", "paraphrase"])
    para, direct = res["raw"]["probe_paraphrase_prob"], res["raw"]["probe_direct_prob"]
    assert np.isnan(para[0]) and np.isnan(para[2]) and para[1] == pytest.approx(direct[1], rel=1e-6)
    assert res["metrics"]["probe_paraphrase_prob"] == pytest.approx((direct[1] + direct[3]) / 2, rel=1e-6)


BAD = {
    "no_question": ('hint: {prompt: "Tell me about it.", target: answer}', "hint", "has no {question}"),
    "unknown_target": ('odd: {prompt: "{question}", target: both}', "odd", "unknown target 'both'"),
    "leaks_answer": ('leak: {prompt: "{question} ({answer})"}', "leak", "holds {answer}, the target it scores"),
    "reverse_leaks": ('rev: {prompt: "{answer} {question}", target: question}', "rev", "holds {question}"),
    "unknown_field": ('f: {prompt: "{question} {name}"}', "f", "unknown field(s) ['{name}']"),
    "unknown_key": ('k: {prompt: "{question}", prefix: "Sure"}', "k", "unknown key(s) ['prefix']"),
    "bad_brace": ('b: {prompt: "{question} {"}', "b", "not a format string"),
    "reserved": ('direct: {prompt: "{question}"}', "direct", "the name is taken"),
    "not_a_mapping": ('- {prompt: "{question}"}', None, "expected a YAML/JSON mapping"),
    "not_yaml": ('a: {prompt: "{question}"\nb: [', None, "not valid YAML/JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_templates_file_is_one_line_naming_the_file_and_the_entry(tmp_path, case):
    content, entry, problem = BAD[case]
    path = tmp_path / "probes.yaml"
    path.write_text(content + "\n")
    with pytest.raises(ValueError) as err:
        load_templates(str(path))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{path}: ") and problem in msg, msg
    if entry is not None:
        assert f"entry {entry!r}" in msg
    assert check_options(ProbesOptions(templates=str(path))) == [msg]


def test_the_config_checks_the_templates_file_and_the_kinds(tiny_dir, tmp_path):
    from orchestrator.config.parse import parse_config
    from orchestrator.config.schema import ConfigError

    (tmp_path / "mine.yaml").write_text('mine: {prompt: "{answer}?", target: question}\n')
    raw = {
        "model": {"path": str(tiny_dir / "model")},
        "data": {"forget": str(tiny_dir / "forget.jsonl"), "retain": str(tiny_dir / "retain.jsonl")},
        "split": {"attribute": "group"},
    }
    cfg = parse_config({**raw, "eval": {"suites": ["probes"], "probes": {"templates": "mine.yaml"}}}, tmp_path)
    assert cfg.eval.probes.templates == str(tmp_path / "mine.yaml")  # resolved against the config's folder
    with pytest.raises(ConfigError) as err:
        parse_config({**raw, "eval": {"suites": ["probes"], "probes": {"templates": "mine.yaml"}}}, tiny_dir)
    assert err.value.problems == ["eval.probes: templates: no such file mine.yaml"]
    assert check_options(ProbesOptions(kinds=["direct", "jailbreak"])) == [
        "kinds: unknown probe kind(s) ['jailbreak']; known: direct, paraphrase, prefix_injection, "
        "affirmative_suffix, role_play, reverse_query, in_context"
    ]
    with pytest.raises(ValueError, match="jailbreak"):
        get_suite("probes")(None, {}, kinds=["jailbreak"])


def test_suite_declaration():
    suite = get_suite("probes")
    assert suite.sources() == ("forget",) and suite.sources(ProbesOptions(split="retain")) == ("retain",)
    assert suite.path_options == ("templates",)
    assert metric_group("probe_worst_prob") == "Probes" and metric_group("probes_recovery") == "Robustness"
    # every attack kind against the base's value of that kind; never direct itself, nor the worst (not a kind)
    (recovery,) = suite.recoveries
    assert recovery.unlearned == "probe_direct_prob"
    kinds = ("probe_in_context_prob", "probe_reverse_query_prob", "probe_my_kind_prob")
    assert all(re.fullmatch(recovery.attacked, k) for k in kinds)
    assert not any(
        re.fullmatch(recovery.attacked, k) for k in ("probe_direct_prob", "probe_worst_prob", "probe_x_rouge")
    )
    for bad in ({"in_context_k": 0}, {"kinds": []}, {"nope": 1}):
        with pytest.raises(ValueError):
            ProbesOptions(**bad)
