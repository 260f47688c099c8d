"""The one encoding (jobs/data/format.py) on word-level tokenizers whose special tokens are known: a BOS
only where the tokenizer adds one itself, never two, no trailing EOS on a prompt, answer EOS by choice."""

import pytest
import torch

from jobs.data.format import IGNORE_INDEX, PromptFormat, answer_ids, encode_qa, encode_text, prompt_ids
from jobs.evaluate.scoring import cut_answer

VOCAB = ["<pad>", "<s>", "</s>", "Q:", "A:", "x", "y", "z", "\n"]
ID = {t: i for i, t in enumerate(VOCAB)}


def word_tokenizer(single: str | None):
    """Whitespace word-level tokenizer; ``single`` is its post-processor template (None: adds nothing)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel(ID, unk_token="<pad>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if single is not None:
        t.post_processor = processors.TemplateProcessing(single=single, special_tokens=[("<s>", 1), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.mark.parametrize(
    "single,want",
    [
        (None, ["Q:", "x"]),  # SmolLM2/Qwen-style: the tokenizer adds nothing, neither do we
        ("<s> $A", ["<s>", "Q:", "x"]),  # Llama-style: its own BOS, once
        ("<s> $A </s>", ["<s>", "Q:", "x"]),  # a tokenizer that also appends EOS: a prompt continues, so no EOS
    ],
)
def test_the_prompt_carries_exactly_the_tokenizers_own_bos(single, want):
    tok = word_tokenizer(single)
    assert prompt_ids(tok, "x", "Q: {question}") == [ID[t] for t in want]


def test_a_template_that_spells_out_the_bos_does_not_get_a_second_one():
    tok = word_tokenizer("<s> $A")
    assert prompt_ids(tok, "x", "<s> Q: {question}") == [ID["<s>"], ID["Q:"], ID["x"]]


def test_answer_eos_is_a_choice_and_labels_cover_the_answer_only():
    tok = word_tokenizer("<s> $A")
    on, off = PromptFormat(template="Q: {question} A:"), PromptFormat(template="Q: {question} A:", answer_eos=False)
    assert answer_ids(tok, "y z", on) == [ID["y"], ID["z"], ID["</s>"]]
    assert answer_ids(tok, "y z", off) == [ID["y"], ID["z"]]
    enc = encode_qa(tok, "x", "y z", 128, on)
    assert enc["input_ids"] == [ID[t] for t in ["<s>", "Q:", "x", "A:", "y", "z", "</s>"]]
    assert enc["labels"] == [IGNORE_INDEX] * 4 + [ID["y"], ID["z"], ID["</s>"]]
    assert encode_qa(tok, "x", "y z", 128, off)["labels"] == [IGNORE_INDEX] * 4 + [ID["y"], ID["z"]]
    # a plain template string is the default format: answers end with EOS
    assert encode_qa(tok, "x", "y z", 128, "Q: {question} A:") == enc


def test_a_document_gets_the_tokenizers_bos_and_ends_with_eos():
    assert encode_text(word_tokenizer(None), "x y")["input_ids"] == [ID["x"], ID["y"], ID["</s>"]]
    assert encode_text(word_tokenizer("<s> $A </s>"), "x y")["input_ids"] == [ID["<s>"], ID["x"], ID["y"], ID["</s>"]]


def test_generated_rows_are_cut_at_stop_tokens_and_strings_with_their_lengths():
    tok = word_tokenizer(None)
    pad, eos = ID["<pad>"], ID["</s>"]
    assert cut_answer(tok, [ID["y"], ID["z"], eos, pad], [eos], [], pad) == ("y z", 3)  # EOS counts, pad does not
    assert cut_answer(tok, [ID["y"], ID["z"], pad, pad], [eos], [], pad) == ("y z", 2)
    assert cut_answer(tok, [ID["y"], ID["\n"], ID["z"]], [eos], ["\n"], pad) == ("y", 2)  # stopped at the newline
    assert cut_answer(tok, [ID["y"]] * 4, [eos], ["\n"], pad) == ("y y y y", 4)  # ran to max_new_tokens


def test_stop_strings_end_generation_early(tiny_dir):
    """A random tiny Llama never says EOS: without a stop it runs to max_new_tokens, with the string of its
    own first generated token as the stop it ends after one token."""
    from jobs.evaluate.scoring import generate_answers
    from jobs.models import load_model, load_tokenizer

    tok, model = load_tokenizer(tiny_dir / "model"), load_model(tiny_dir / "model")
    torch.manual_seed(0)
    qs = ["Where was Ana Lind born?", "What does Bo Chen write?"]
    texts, lengths = generate_answers(model, tok, qs, max_new_tokens=6)
    assert lengths == [6, 6]
    first = tok.decode(
        model.generate(
            torch.tensor([prompt_ids(tok, qs[0])]), max_new_tokens=1, do_sample=False, pad_token_id=tok.pad_token_id
        )[0, -1:]
    )
    texts, lengths = generate_answers(model, tok, qs[:1], max_new_tokens=6, stop=[first])
    assert lengths == [1] and texts == [""]
