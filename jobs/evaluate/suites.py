"""Evaluation suites (a registry by name) and ``evaluate_model``, the entry point an eval task runs.

A suite is ``fn(model, tokenizer, data, **options) -> {"metrics": {str: float}, "raw": {str: list}}``
where ``data`` maps a split name ("forget", "retain", "holdout", ...) to its list of records and the
options are ``template``, ``batch_size``, ``max_new_tokens`` and ``max_length``.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Sequence

import numpy as np

from jobs.data.format import DEFAULT_TEMPLATE, PromptLike
from jobs.evaluate import metrics as M

Suite = Callable[..., dict]
SUITES: dict[str, Suite] = {}


def register_suite(name: str) -> Callable[[Suite], Suite]:
    """Decorator: register ``fn`` as the evaluation suite called ``name``."""

    def deco(fn: Suite) -> Suite:
        if name in SUITES and SUITES[name] is not fn:
            raise ValueError(f"evaluation suite {name!r} is already registered")
        SUITES[name] = fn
        return fn

    return deco


def get_suite(name: str) -> Suite:
    """The suite registered as ``name``; ``KeyError`` naming the known suites otherwise."""
    try:
        return SUITES[name]
    except KeyError:
        raise KeyError(f"unknown evaluation suite {name!r}; known suites: {sorted(SUITES)}") from None


def read_jsonl(path: str, max_examples: int | None = None) -> list[dict]:
    """Records of a JSON-lines file (blank lines skipped), the first ``max_examples`` if given."""
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows if max_examples is None else rows[:max_examples]


def is_forget_split(name: str) -> bool:
    """Forget-style splits ("forget", "forget_<subset>") aggregate truth ratios closer-to-1."""
    return name == "forget" or name.startswith("forget_")


def is_qa_split(records: list[dict]) -> bool:
    """Question/answer records (string ``answer``): not multiple-choice rows or plain text."""
    return all(isinstance(r.get("question"), str) and isinstance(r.get("answer"), str) for r in records)


def _has_truth_fields(records: list[dict]) -> bool:
    return all(r.get("paraphrased_answer") and r.get("perturbed_answers") for r in records)


def _truth_ratios(model, tokenizer, records: list[dict], opts: dict) -> np.ndarray:
    """Raw truth ratio per record: paraphrase vs perturbed answers, scored in two batched calls."""
    from jobs.evaluate.scoring import score_answers

    qs = [r["question"] for r in records]
    para_nll, para_n = score_answers(model, tokenizer, qs, [r["paraphrased_answer"] for r in records], **opts)
    perts = [list(r["perturbed_answers"]) for r in records]
    k = max(len(p) for p in perts)
    flat_q = [q for q, p in zip(qs, perts) for _ in p]
    flat_a = [a for p in perts for a in p]
    nll, n = score_answers(model, tokenizer, flat_q, flat_a, **opts)
    pert_nll = np.full((len(records), k), np.nan)
    pert_n = np.zeros((len(records), k))
    pos = 0
    for i, p in enumerate(perts):  # ragged lists: NaN-padded, ignored by truth_ratio_raw
        pert_nll[i, : len(p)], pert_n[i, : len(p)] = nll[pos : pos + len(p)], n[pos : pos + len(p)]
        pos += len(p)
    return M.truth_ratio_raw(para_nll, para_n, pert_nll, pert_n)


@register_suite("qa")
def qa_suite(
    model: Any,
    tokenizer: Any,
    data: dict[str, list[dict]],
    template: PromptLike = DEFAULT_TEMPLATE,
    batch_size: int = 32,
    max_new_tokens: int = 32,
    max_length: int = 128,
    stop: Sequence[str] = (),
) -> dict:
    """TOFU's QA metrics per split.

    ``{split}_prob``: mean answer probability; ``{split}_rouge``: mean ROUGE-L recall of greedy answers
    against ``answer``; ``{split}_truth_ratio``: forget splits ``closer_to_1_better``, others
    ``true_better``, plus ``_median`` and ``_logmean``; ``model_utility``: harmonic mean of retain's
    prob, rouge and truth ratio. A ``holdout`` split gets only ``holdout_prob``; truth ratios need
    ``paraphrased_answer`` and ``perturbed_answers`` in every record. Greedy answers stop at EOS, the chat
    end-of-turn and the ``stop`` strings; ``{split}_gen_tokens`` is their mean length in tokens. ``raw``
    holds the per-example ``{split}_prob`` and ``{split}_truth_ratio`` lists.
    """
    from jobs.evaluate.scoring import generate_answers, score_answers

    opts = dict(batch_size=batch_size, max_length=max_length, template=template)
    out_m: dict[str, float] = {}
    raw: dict[str, list[float]] = {}
    for split, records in data.items():
        if not records or not is_qa_split(records):
            continue  # the mc and general splits belong to other suites
        qs = [r["question"] for r in records]
        refs = [r["answer"] for r in records]
        probs = M.answer_prob(*score_answers(model, tokenizer, qs, refs, **opts))
        out_m[f"{split}_prob"] = float(np.nanmean(probs))
        raw[f"{split}_prob"] = probs.tolist()
        if split == "holdout":
            continue
        gen, lengths = generate_answers(model, tokenizer, qs, max_new_tokens, batch_size, template, stop)
        out_m[f"{split}_rouge"] = float(np.mean(M.rouge_l_recall(gen, refs)))
        out_m[f"{split}_gen_tokens"] = float(np.mean(lengths))
        if _has_truth_fields(records):
            tr = _truth_ratios(model, tokenizer, records, opts)
            agg = M.closer_to_1_better if is_forget_split(split) else M.true_better
            out_m[f"{split}_truth_ratio"] = agg(tr)
            out_m[f"{split}_truth_ratio_median"] = M.truth_ratio_median(tr)
            out_m[f"{split}_truth_ratio_logmean"] = M.truth_ratio_logmean(tr)
            raw[f"{split}_truth_ratio"] = tr.tolist()
    if "retain_truth_ratio" in out_m:
        out_m["model_utility"] = M.model_utility(
            [out_m["retain_prob"], out_m["retain_rouge"], out_m["retain_truth_ratio"]]
        )
    return {"metrics": out_m, "raw": raw}


def evaluate_model(
    model_path: str,
    splits: dict[str, str],
    suites: list[str] = ["qa"],
    template: PromptLike = DEFAULT_TEMPLATE,
    batch_size: int = 32,
    max_new_tokens: int = 32,
    max_length: int = 128,
    max_examples: int | None = None,
    dtype: str = "float32",
    suite_options: dict[str, dict[str, Any]] | None = None,
    attn_implementation: str | None = None,
) -> dict:
    """Load the model folder and score it on every suite over every split (jsonl paths).

    ``suite_options`` maps a suite name to extra keyword arguments for it (e.g. ``{"lmeval": {"tasks":
    [...]}}``, ``{"mc": {"attributes": [...]}}``).

    Self-contained (runs inside a Ray task). Returns ``{"metrics": {str: float}, "raw": {str: list},
    "n_examples": {split: int}, "seconds": float}``. Forget quality needs two models, so the caller
    computes it: ``metrics.forget_quality(raw["forget_truth_ratio"], oracle_raw["forget_truth_ratio"])``.
    """
    import torch

    from jobs.models import load_model, load_tokenizer

    start = time.perf_counter()
    fns = [get_suite(s) for s in suites]  # fail before loading anything
    suite_options = suite_options or {}
    data = {name: read_jsonl(path, max_examples) for name, path in splits.items()}
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path, dtype=dtype, attn_implementation=attn_implementation)
    if torch.cuda.is_available():
        model = model.to("cuda")
    model.eval()
    result: dict[str, Any] = {"metrics": {}, "raw": {}}
    for name, fn in zip(suites, fns):
        res = fn(model, tokenizer, data, template=template, batch_size=batch_size,
                 max_new_tokens=max_new_tokens, max_length=max_length, **suite_options.get(name, {}))
        result["metrics"].update(res.get("metrics", {}))
        result["raw"].update(res.get("raw", {}))
    result["n_examples"] = {name: len(rows) for name, rows in data.items()}
    result["seconds"] = time.perf_counter() - start
    return result


# Suites defined in their own modules register themselves on import (kept last: they import this module).
from jobs.evaluate import memorization as _memorization  # noqa: E402,F401
from jobs.evaluate import mia as _mia  # noqa: E402,F401
from jobs.evaluate import mc as _mc  # noqa: E402,F401
from jobs.evaluate import perplexity as _perplexity  # noqa: E402,F401
from jobs.evaluate import lmeval as _lmeval  # noqa: E402,F401
