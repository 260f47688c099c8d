"""Tokenizer, tiny-Llama training and the cached on-disk build of the demo benchmark.

``build_benchmark(dir, size, seed)`` writes::

    <dir>/data/{forget,retain,holdout,general}.jsonl
    <dir>/models/base/     trained on forget + retain QA + general text
    <dir>/models/oracle/   same recipe on retain QA + general text only
    <dir>/benchmark.json   metadata, written last and atomically

Models are trained with ``jobs.data.format``'s encoding (prompt masked; answer + EOS as targets), so
every evaluator that uses the same functions sees the memorised format. A build is reused when
``benchmark.json`` holds the same fingerprint and every file is present.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from jobs.data import demo
from jobs.data.format import DEFAULT_TEMPLATE, collate, encode_qa, encode_text, sequence_nll
from jobs.data.io import write_json, write_jsonl
from jobs.models import save_model

TRAIN_VERSION = "2"
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
TOKENIZER = {"vocab_size": 1000, "min_frequency": 2}
MODEL = {
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 512,
    "max_position_embeddings": 256,
}
TRAIN = {
    "lr": 3e-3,
    "min_lr_ratio": 0.1,
    "warmup_steps": 20,
    "batch_size": 32,
    "weight_decay": 0.0,
    "betas": (0.9, 0.95),
    "max_epochs": 40,
    "target_prob": 0.9,
    "max_length": 128,
}
REPORT_SECONDS = 5.0  # longest silence of ``progress`` during training (under normal load)
DATA_FILES = ("forget", "retain", "holdout", "general")
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")

Progress = Callable[[str, int, int, dict], None]


def _noop(stage: str, done: int, total: int, info: dict) -> None:
    pass


def train_tokenizer(texts: Sequence[str], vocab_size: int = TOKENIZER["vocab_size"]) -> Any:
    """A byte-level BPE tokenizer trained on ``texts``, wrapped as ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    bos = SPECIAL_TOKENS["bos_token"]  # like Llama's: plain ``tokenizer(text)`` starts with BOS
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, 0)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=TOKENIZER["min_frequency"],
        show_progress=False,
        special_tokens=[SPECIAL_TOKENS[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=MODEL["max_position_embeddings"], **SPECIAL_TOKENS
    )


def corpus_texts(data: dict[str, Any], template: str = DEFAULT_TEMPLATE) -> list[str]:
    """Every string the benchmark holds (holdout included, so all of it tokenizes well)."""
    texts = []
    for split in ("forget", "retain", "holdout"):
        for r in data[split]:
            # answers as encode_qa sees them: after one space
            texts += [template.format(question=r["question"])]
            answers = (r["answer"], r["paraphrased_answer"], *r["perturbed_answers"], *r["wrong_answers"])
            texts += [" " + a for a in answers]
    return texts + [g["text"] for g in data["general"]]


def new_model(tokenizer: Any, seed: int) -> Any:
    """A freshly initialised tiny Llama (``MODEL``) sized to ``tokenizer``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL,
    )
    return LlamaForCausalLM(config)


def encode_records(
    tokenizer: Any,
    qa: Sequence[dict],
    general: Sequence[dict] = (),
    max_length: int = TRAIN["max_length"],
    template: str = DEFAULT_TEMPLATE,
) -> list[dict]:
    """Training examples: QA with the prompt masked, general text with every token a target."""
    out = [encode_qa(tokenizer, r["question"], r["answer"], max_length, template) for r in qa]
    return out + [encode_text(tokenizer, g["text"], max_length) for g in general]


@torch.no_grad()
def answer_probs(
    model: Any,
    tokenizer: Any,
    records: Sequence[dict],
    field: str = "answer",
    batch_size: int = 128,
    template: str = DEFAULT_TEMPLATE,
) -> torch.Tensor:
    """Per record, exp(-mean NLL of the answer tokens) of ``record[field]`` given the question."""
    was_training = model.training
    model.eval()
    probs = [torch.zeros(0)]
    enc = [encode_qa(tokenizer, r["question"], r[field], TRAIN["max_length"], template) for r in records]
    for i in range(0, len(enc), batch_size):
        batch = collate(enc[i : i + batch_size], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll, n = sequence_nll(logits, batch["labels"])
        probs.append(torch.exp(-nll / n.clamp(min=1)))
    model.train(was_training)
    return torch.cat(probs)


def answer_prob(model: Any, tokenizer: Any, records: Sequence[dict], field: str = "answer") -> float:
    """Mean of ``answer_probs``: TOFU's answer probability of a split (NaN when empty)."""
    return answer_probs(model, tokenizer, records, field).mean().item() if records else float("nan")


def train_model(
    tokenizer: Any,
    qa: Sequence[dict],
    general: Sequence[dict] = (),
    target: Sequence[dict] | None = None,
    seed: int = 0,
    stage: str = "train",
    progress: Progress | None = None,
    recipe: dict | None = None,
) -> tuple[Any, dict]:
    """Train a fresh tiny Llama on ``qa`` + ``general`` until ``target`` QA is memorised.

    Stops after the first epoch where the mean answer probability of ``target`` (default ``qa``)
    exceeds ``recipe["target_prob"]``, or after ``max_epochs``. The learning rate warms up, then
    follows a cosine to ``min_lr_ratio`` over ``max_epochs``. ``progress(stage, step, max_steps,
    info)`` is called after every epoch and mid-epoch whenever ``REPORT_SECONDS`` have passed.
    Returns the model (eval mode) and the last epoch's stats.
    """
    rc = {**TRAIN, **(recipe or {})}
    progress = progress or _noop
    target = qa if target is None else target
    model = new_model(tokenizer, seed)
    examples = encode_records(tokenizer, qa, general, rc["max_length"])
    gen = torch.Generator().manual_seed(seed)
    bs = rc["batch_size"]
    steps_per_epoch = math.ceil(len(examples) / bs)
    total = rc["max_epochs"] * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=rc["lr"], betas=tuple(rc["betas"]), weight_decay=rc["weight_decay"])

    def lr_at(step: int) -> float:
        if step < rc["warmup_steps"]:
            return rc["lr"] * (step + 1) / rc["warmup_steps"]
        t = (step - rc["warmup_steps"]) / max(1, total - rc["warmup_steps"])
        return rc["lr"] * (rc["min_lr_ratio"] + (1 - rc["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * t)))

    start = last_report = time.time()
    step, stats = 0, {}
    model.train()
    for epoch in range(1, rc["max_epochs"] + 1):
        order = torch.randperm(len(examples), generator=gen).tolist()
        loss_sum = 0.0
        for b in range(steps_per_epoch):
            batch = collate([examples[i] for i in order[b * bs : (b + 1) * bs]], tokenizer.pad_token_id)
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            loss_sum += loss.item()
            if time.time() - last_report > REPORT_SECONDS:
                last_report = time.time()
                progress(
                    stage, step, total, {"epoch": epoch, "loss": loss.item(), "seconds": round(last_report - start, 2)}
                )
        prob = answer_prob(model, tokenizer, target)
        stats = {
            "epochs": epoch,
            "steps": step,
            "loss": loss_sum / steps_per_epoch,
            "target_prob": prob,
            "seconds": round(time.time() - start, 2),
        }
        last_report = time.time()
        progress(stage, step, total, {"epoch": epoch, **stats})
        if prob > rc["target_prob"]:
            break
    model.eval()
    return model, stats


def fingerprint(size: str, seed: int, params: dict) -> str:
    """sha256 of everything that determines a build: size, seed, parameters, recipes, versions."""
    key = {
        "size": size,
        "seed": seed,
        "params": params,
        "generator": demo.GENERATOR_VERSION,
        "train": TRAIN_VERSION,
        "tokenizer": TOKENIZER,
        "model": MODEL,
        "recipe": TRAIN,
        "template": DEFAULT_TEMPLATE,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _complete(out: Path) -> bool:
    data_ok = all((out / "data" / f"{n}.jsonl").is_file() for n in DATA_FILES)
    models_ok = all((out / "models" / m / f).is_file() for m in ("base", "oracle") for f in MODEL_FILES)
    return data_ok and models_ok


def _usable_cpus() -> int:
    """CPUs this process may run on (affinity-aware where the OS says)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def cached_benchmark(output_dir: str | os.PathLike, size: str = "small", seed: int = 0) -> dict | None:
    """The metadata of a finished build of (size, seed) in ``output_dir``, or None."""
    out = Path(output_dir)
    meta_path = out / "benchmark.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    want = fingerprint(size, seed, demo.resolve_params(size))
    return meta if meta.get("fingerprint") == want and _complete(out) else None


def build_benchmark(
    output_dir: str | os.PathLike, size: str = "small", seed: int = 0, progress: Progress | None = None
) -> dict:
    """Build (or reuse) the demo benchmark in ``output_dir`` and return its metadata.

    ``progress(stage, done, total, info)`` is called after every stage and every training epoch
    (a few seconds apart at most). Reuse takes well under a second.
    """
    progress = progress or _noop
    out = Path(output_dir)
    cached = cached_benchmark(out, size, seed)
    if cached is not None:
        progress("cached", 1, 1, {"path": str(out)})
        return cached
    (out / "benchmark.json").unlink(missing_ok=True)  # a crash from here on leaves no "complete" build
    t0 = time.time()
    threads = torch.get_num_threads()
    torch.set_num_threads(_usable_cpus())
    try:
        data = demo.generate(size, seed)
        for name in DATA_FILES:
            write_jsonl(out / "data" / f"{name}.jsonl", data[name])
        write_jsonl(out / "data" / "mc.jsonl", demo.mc_questions(data, seed))  # multiple-choice eval set
        write_json(out / "data" / "anchors.json", demo.anchor_terms(data, seed))  # WHP anchor dictionary
        progress("generate", 1, 1, {"seconds": round(time.time() - t0, 2)})
        tokenizer = train_tokenizer(corpus_texts(data))
        progress("tokenizer", 1, 1, {"vocab_size": len(tokenizer), "seconds": round(time.time() - t0, 2)})
        stats = {}
        for name, qa, target in (
            ("base", data["forget"] + data["retain"], data["forget"]),
            ("oracle", data["retain"], data["retain"]),
        ):
            model, st = train_model(
                tokenizer, qa, data["general"], target, seed=seed, stage=f"train:{name}", progress=progress
            )
            for split in ("forget", "retain", "holdout"):
                st[f"{split}_prob"] = answer_prob(model, tokenizer, data[split])
            save_model(model, tokenizer, out / "models" / name)
            stats[name] = st
            progress(f"save:{name}", 1, 1, dict(st))
    finally:
        torch.set_num_threads(threads)
    p = data["params"]
    meta = {
        "seed": seed,
        "size": size,
        "sizes": p,
        "forget": {"attribute": demo.FORGET_ATTRIBUTE, "value": data["forget_value"]},
        "split_attribute": demo.SPLIT_ATTRIBUTE,
        "split_values": data["split_values"],
        "counts": {
            "authors": p["authors"],
            "holdout_authors": p["holdout_authors"],
            "forget_authors": len({r["author"] for r in data["forget"]}),
            **{name: len(data[name]) for name in DATA_FILES},
            "split": {v: sum(r[demo.SPLIT_ATTRIBUTE] == v for r in data["forget"]) for v in data["split_values"]},
        },
        "files": {
            **{name: f"data/{name}.jsonl" for name in DATA_FILES},
            "mc": "data/mc.jsonl",
            "anchors": "data/anchors.json",
            "base": "models/base",
            "oracle": "models/oracle",
        },
        "template": DEFAULT_TEMPLATE,
        "stats": stats,
        "build_seconds": round(time.time() - t0, 2),
        "fingerprint": fingerprint(size, seed, p),
    }
    write_json(out / "benchmark.json", meta)
    progress("done", 1, 1, {"seconds": meta["build_seconds"]})
    return meta
