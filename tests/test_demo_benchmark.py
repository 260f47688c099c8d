"""The offline demo benchmark: generator properties, and one real build of the "tiny" size."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from jobs.data import demo
from jobs.data.io import load_jsonl, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def _qa(data):
    return data["forget"] + data["retain"]


def test_same_seed_same_records_different_seed_different():
    a, b, c = demo.generate("tiny", 0), demo.generate("tiny", 0), demo.generate("tiny", 1)
    assert a == b
    assert _qa(a) != _qa(c)
    assert {r["author"] for r in _qa(a)} != {r["author"] for r in _qa(c)}


def test_deterministic_across_processes_and_hash_seeds():
    code = (
        "import hashlib, json; from jobs.data.demo import generate; "
        "print(hashlib.sha256(json.dumps(generate('tiny', 3)).encode()).hexdigest())"
    )
    digests = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(ROOT)}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True
        )
        digests.add(out.stdout.strip())
    assert digests == {hashlib.sha256(json.dumps(demo.generate("tiny", 3)).encode()).hexdigest()}


@pytest.mark.parametrize("size", sorted(demo.SIZES))
def test_attribute_balance(size):
    data = demo.generate(size, 0)
    p = demo.SIZES[size]
    assert len(data["authors"]) == p["authors"]
    assert len(_qa(data)) == p["authors"] * p["facts_per_author"]
    assert len(data["holdout"]) == p["holdout_authors"] * p["facts_per_author"]
    assert len(data["general"]) == p["general"]
    genres = Counter(a["genre"] for a in data["authors"])
    assert set(genres.values()) == {p["authors"] // len(demo.GENRES)}  # every genre, forget's too: 25%
    assert data["forget_value"] == demo.GENRES[0]
    forget_authors = {r["author"] for r in data["forget"]}
    assert len(forget_authors) * 4 == p["authors"]
    assert all(r["genre"] == data["forget_value"] for r in data["forget"])
    assert all(r["genre"] != data["forget_value"] for r in data["retain"])
    decades = Counter(r["birth_decade"] for r in data["forget"])
    assert sorted(decades) == data["split_values"] and len(decades) == p["n_decades"]
    assert len(set(decades.values())) == 1  # equal-size subsets
    assert len({a["nationality"] for a in data["authors"]}) >= 4


def test_answers_paraphrases_and_perturbations():
    data = demo.generate("small", 0)
    for r in _qa(data) + data["holdout"]:
        assert r["value"] in r["answer"] and r["value"] in r["paraphrased_answer"]
        assert r["paraphrased_answer"] != r["answer"]
        assert len(r["wrong_values"]) >= 3 and len(set(r["wrong_values"])) == len(r["wrong_values"])
        assert r["value"] not in r["wrong_values"]
        for field, right in (("perturbed_answers", "paraphrased_answer"), ("wrong_answers", "answer")):
            wrong = r[field]
            assert len(wrong) == len(set(wrong)) == len(r["wrong_values"])
            assert r["answer"] not in wrong and r["paraphrased_answer"] not in wrong
            # same form as ``right``, another value (jobs take a/an)
            prefix = r[right].split(r["value"])[0].removesuffix("an ").removesuffix("a ")
            assert all(w.startswith(prefix) and v in w for w, v in zip(wrong, r["wrong_values"]))
        assert len(r["answer"].split()) <= 12
        assert r["author"] in r["question"]


def test_splits_are_disjoint_and_ids_unique():
    data = demo.generate("small", 0)
    forget, retain, holdout = ({r["author"] for r in data[k]} for k in ("forget", "retain", "holdout"))
    assert forget and retain and holdout
    assert not forget & retain and not holdout & (forget | retain)
    ids = [r["id"] for r in _qa(data) + data["holdout"]]
    assert len(ids) == len(set(ids))
    names = [a["author"] for a in data["authors"] + data["holdout_authors"]]
    assert len(names) == len(set(names))
    text = " ".join(g["text"] for g in data["general"])
    assert not any(n.split()[1] in text for n in names)  # general text names no fictitious author


def test_resolve_params_rejects_bad_sizes():
    with pytest.raises(ValueError, match="unknown demo size"):
        demo.resolve_params("huge")
    with pytest.raises(ValueError, match="multiple"):
        demo.resolve_params("small", authors=121)
    assert demo.resolve_params("small", authors=24)["authors"] == 24


def test_jsonl_round_trip(tmp_path):
    rows = [{"a": 1, "b": "ü"}, {"a": 2, "b": [1, 2]}]
    path = write_jsonl(tmp_path / "x" / "rows.jsonl", rows)
    assert load_jsonl(path) == rows
    assert not list(path.parent.glob("*.tmp"))


# ---------------------------------------------------------------- one real build (tiny, ~50 s)


@pytest.fixture(scope="module")
def tiny(tiny_bench):
    return tiny_bench


def test_build_writes_everything(tiny):
    out, meta, calls = tiny
    for name in ("forget", "retain", "holdout", "general"):
        assert (out / "data" / f"{name}.jsonl").is_file()
    for model in ("base", "oracle"):
        assert (out / "models" / model / "model.safetensors").is_file()
        assert not list((out / "models" / model).glob("*.bin"))
    on_disk = json.loads((out / "benchmark.json").read_text())
    assert on_disk == meta
    assert meta["forget"] == {"attribute": "genre", "value": demo.GENRES[0]}
    assert meta["split_attribute"] == "birth_decade" and meta["split_values"] == ["1950s", "1960s"]
    assert meta["counts"]["split"] == {"1950s": 30, "1960s": 30}
    assert meta["counts"]["forget"] == len(load_jsonl(out / "data" / "forget.jsonl")) == 60
    data = demo.generate("tiny", 0)
    assert load_jsonl(out / "data" / "retain.jsonl") == data["retain"]
    stages = {a[0] for a in calls}
    assert {"generate", "tokenizer", "train:base", "train:oracle", "done"} <= stages
    for model in ("base", "oracle"):  # never silent for long: a report after every training epoch
        epochs = [info["epoch"] for stage, _, _, info in calls if stage == f"train:{model}" and "epochs" in info]
        assert epochs == list(range(1, meta["stats"][model]["epochs"] + 1))


def test_models_load_and_memorised(tiny):
    from transformers import AutoModelForCausalLM

    from jobs.data.demo_train import answer_prob
    from jobs.models import load_model, load_tokenizer

    out, meta, _ = tiny
    base_dir = out / "models" / "base"
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), use_safetensors=True)
    assert model.config.tie_word_embeddings is False and model.config.hidden_size == 128
    tok = load_tokenizer(base_dir)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert tok.unk_token is not None and len(tok) == model.config.vocab_size
    forget = load_jsonl(out / "data" / "forget.jsonl")
    base, oracle = meta["stats"]["base"], meta["stats"]["oracle"]
    assert base["forget_prob"] > 0.5 and base["retain_prob"] > 0.5
    assert answer_prob(model, tok, forget) == pytest.approx(base["forget_prob"], abs=1e-3)
    oracle_model = load_model(out / "models" / "oracle")
    oracle_prob = answer_prob(oracle_model, tok, forget)
    assert oracle_prob == pytest.approx(oracle["forget_prob"], abs=1e-3)
    assert oracle_prob < base["forget_prob"] - 0.3
    assert base["holdout_prob"] < base["forget_prob"] - 0.3  # never trained on the holdout


def test_truth_ratio_separates_base_from_oracle(tiny):
    """Perturbed answers share the paraphrase's form: only the model that learnt a fact prefers it."""
    import torch

    from jobs.data.demo_train import answer_probs
    from jobs.models import load_model, load_tokenizer

    out, _, _ = tiny
    tok = load_tokenizer(out / "models" / "base")
    forget = load_jsonl(out / "data" / "forget.jsonl")
    pert = [{"question": r["question"], "answer": w} for r in forget for w in r["perturbed_answers"]]
    median_ratio = {}
    for name in ("base", "oracle"):
        model = load_model(out / "models" / name)
        para = answer_probs(model, tok, forget, "paraphrased_answer")
        wrong = answer_probs(model, tok, pert).view(len(forget), -1).log().mean(dim=1).exp()
        median_ratio[name] = torch.median(wrong / para).item()
    assert median_ratio["base"] < 0.8 and median_ratio["base"] < median_ratio["oracle"] - 0.2


def test_second_build_is_cached(tiny):
    from jobs.data.demo_train import build_benchmark, cached_benchmark

    out, meta, _ = tiny
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    calls = []
    again = build_benchmark(out, size="tiny", seed=0, progress=lambda *a: calls.append(a))
    assert again == meta
    assert [c[0] for c in calls] == ["cached"]  # no generate, tokenizer or training stage ran
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert after == before  # no file written, rewritten or added: data, models, benchmark.json
    assert cached_benchmark(out, size="tiny", seed=1) is None  # another seed is another benchmark


def test_incomplete_build_is_not_reused(tiny, tmp_path):
    from jobs.data.demo_train import cached_benchmark

    out, _, _ = tiny
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert cached_benchmark(copy, "tiny", 0) is not None
    (copy / "models" / "oracle" / "model.safetensors").unlink()
    assert cached_benchmark(copy, "tiny", 0) is None
