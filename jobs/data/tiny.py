"""The tests' tiny model and QA rows, which the benchmarks build too: eight made-up authors and their towns, two
QA facts each (``qa_rows``), and a random 2-layer Llama with a byte-level BPE tokenizer trained on those rows,
saved as a Hugging Face folder beside forget (era ``old``) and retain (era ``new``) files (``make_tiny``).

It is a fixture, not a benchmark of unlearning (the offline demo benchmark is ``jobs.data.demo``): the model is
random, so nothing is memorised; it makes every code path cheap to run. Importing this module imports neither
torch nor transformers.
"""

from __future__ import annotations

from pathlib import Path

from jobs.data.io import write_jsonl

AUTHORS = ["Ana Lind", "Bo Chen", "Cai Moro", "Dee Park", "Eli Voss", "Fay Orr", "Gus Tam", "Hal Ide"]
TOWNS = ["Oslo", "Lima", "Rome", "Kyiv", "Baku", "Bern", "Doha", "Riga"]


def qa_rows() -> list[dict]:
    """16 QA rows, two per author: where they were born and what they write, with a paraphrased answer and three
    perturbed ones (another author's town); ``group`` (north/south) and ``era`` (old/new) split them in halves."""
    rows = []
    for i, (name, town) in enumerate(zip(AUTHORS, TOWNS)):
        for j, (q, a) in enumerate(
            [
                (f"Where was {name} born?", f"{name} was born in {town}."),
                (f"What does {name} write?", f"{name} writes {['poems', 'plays'][i % 2]}."),
            ]
        ):
            rows.append(
                {
                    "id": f"{i}-{j}",
                    "author": name,
                    "group": ["north", "south"][i % 2],
                    "era": ["old", "new"][i // 4],
                    "question": q,
                    "answer": a,
                    "paraphrased_answer": f"It is {a.lower()}",
                    "perturbed_answers": [f"{name} was born in {TOWNS[(i + k) % 8]}." for k in (1, 2, 3)],
                }
            )
    return rows


def train_tokenizer(corpus: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``corpus`` (with <pad>, <s>, </s>, <unk>), as a transformers one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=t, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def make_tiny(d: Path) -> Path:
    """``d/model`` (a random tiny Llama: hidden 32, 2 layers, 4 heads, a 400-token BPE tokenizer),
    ``d/forget.jsonl`` (the era ``old`` rows) and ``d/retain.jsonl`` (era ``new``); returns ``d``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from jobs.models import save_model

    d = Path(d)
    rows = qa_rows()
    corpus = [
        f"Question: {r['question']}\nAnswer: {r['answer']} {r['paraphrased_answer']} "
        + " ".join(r["perturbed_answers"])
        for r in rows
    ]
    tok = train_tokenizer(corpus, vocab_size=400)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=128,
            tie_word_embeddings=False,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )
    save_model(model, tok, d / "model")
    write_jsonl(d / "forget.jsonl", [r for r in rows if r["era"] == "old"])
    write_jsonl(d / "retain.jsonl", [r for r in rows if r["era"] == "new"])
    return d
