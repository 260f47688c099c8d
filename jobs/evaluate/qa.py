"""TOFU's question-answering metrics (the ``qa`` suite): answer probability, ROUGE-L of greedy answers,
truth ratio, model utility; and forget quality against the retain-only oracle."""

from __future__ import annotations

from typing import Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from jobs.evaluate import metrics as M
from jobs.evaluate.suites import Reference, SuiteContext, is_forget_split, is_qa_split, register_suite


class QaOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stop: list[str] = Field(
        default_factory=list,
        description="strings that end a greedy answer (EOS and a chat end-of-turn always do), e.g. ['\\n']",
    )
    normalized_prob: list[str] = Field(
        default_factory=lambda: ["real_authors", "world_facts"],
        description="options-style splits (TOFU's real authors and world facts): {split}_prob is TOFU's p(true) / "
        "(p(true) + sum p(perturbed)) and the truth ratio compares the answer (not a paraphrase) "
        "with the perturbed ones",
    )
    utility: list[str] = Field(
        default_factory=lambda: ["retain", "real_authors", "world_facts"],
        description="splits whose prob, ROUGE and truth ratio make model_utility (their harmonic mean; those "
        "evaluated): TOFU's 9 numbers with retain, real_authors and world_facts",
    )


def truth_answers(records: list[dict], options_style: bool = False) -> Optional[str]:
    """Which field is the true answer of a truth ratio, or None (no truth ratio: a record lacks perturbed
    answers). ``answer`` on an options-style split (TOFU's real authors and world facts: the answer against
    the perturbed options) or where a record has no paraphrase; else ``paraphrased_answer`` (TOFU's forget
    and retain sets)."""
    if not all(r.get("perturbed_answers") for r in records):
        return None
    if options_style or not all(r.get("paraphrased_answer") for r in records):
        return "answer"
    return "paraphrased_answer"


def score_perturbed(ctx: SuiteContext, records: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL and token counts of every record's perturbed answers, ``[N, K]``; a record with fewer than
    K answers is padded with NaN / 0 (left out by the metrics)."""
    from jobs.evaluate.scoring import score_answers

    perts = [list(r["perturbed_answers"]) for r in records]
    k = max(len(p) for p in perts)
    flat_q = [r["question"] for r, p in zip(records, perts) for _ in p]
    flat_a = [a for p in perts for a in p]
    nll, n = score_answers(ctx.model, ctx.tokenizer, flat_q, flat_a, ctx.batch_size, ctx.max_length, ctx.template)
    pert_nll, pert_n = np.full((len(records), k), np.nan), np.zeros((len(records), k))
    pos = 0
    for i, p in enumerate(perts):
        pert_nll[i, : len(p)], pert_n[i, : len(p)] = nll[pos : pos + len(p)], n[pos : pos + len(p)]
        pos += len(p)
    return pert_nll, pert_n


def forget_quality_vs_oracle(result: dict, oracle: dict) -> Optional[float]:
    """TOFU's forget quality: the KS-test p-value of the model's forget truth ratios against the oracle's."""
    mine, ref = result.get("raw", {}).get("forget_truth_ratio"), oracle.get("raw", {}).get("forget_truth_ratio")
    return None if mine is None or ref is None else M.forget_quality(mine, ref)


@register_suite(
    "qa",
    needs=("forget",),
    options=QaOptions,
    groups=(
        ("Privacy", r"^holdout_"),
        ("Forget", r"^forget(_.*)?$"),
        ("Utility", r"^((retain|real_authors|world_facts)_.*|model_utility)$"),
    ),
    references=(Reference("forget_quality", forget_quality_vs_oracle),),
)
def qa_suite(ctx: SuiteContext, data: dict[str, list[dict]], opts: QaOptions) -> dict:
    """TOFU's QA metrics per split.

    ``{split}_prob``: mean answer probability (on the ``normalized_prob`` splits TOFU's normalised
    p(true) / (p(true) + sum p(perturbed))); ``{split}_rouge``: mean ROUGE-L recall of greedy answers against
    ``answer``; ``{split}_truth_ratio``: forget splits ``closer_to_1_better``, others ``true_better``, plus
    ``_median`` and ``_logmean`` (the true answer is the paraphrase; the answer on ``normalized_prob`` splits,
    as in TOFU, and where a split has no paraphrase);
    ``model_utility``: harmonic mean of the prob, ROUGE and truth ratio of the ``utility`` splits evaluated
    (``parts["model_utility"]`` names them). A ``holdout`` split gets only ``holdout_prob``. Greedy answers stop
    at EOS, the chat end-of-turn and the ``stop`` strings; ``{split}_gen_tokens`` is their mean length in
    tokens. ``raw`` holds the per-example ``{split}_prob`` and ``{split}_truth_ratio`` lists.
    """
    from jobs.evaluate.scoring import generate_answers, score_answers

    out_m: dict[str, float] = {}
    raw: dict[str, list[float]] = {}
    for split, records in data.items():
        if not records or not is_qa_split(records):
            continue  # the mc and general splits belong to other suites
        qs = [r["question"] for r in records]
        refs = [r["answer"] for r in records]
        ans_nll, ans_n = score_answers(ctx.model, ctx.tokenizer, qs, refs, ctx.batch_size, ctx.max_length, ctx.template)
        options_style = split in opts.normalized_prob
        truth = None if split == "holdout" else truth_answers(records, options_style)
        pert = score_perturbed(ctx, records) if truth else None
        normalized = options_style and pert is not None
        probs = M.normalized_prob(ans_nll, ans_n, *pert) if normalized else M.answer_prob(ans_nll, ans_n)
        out_m[f"{split}_prob"] = float(np.nanmean(probs))
        raw[f"{split}_prob"] = probs.tolist()
        if split == "holdout":
            continue
        gen, lengths = generate_answers(
            ctx.model, ctx.tokenizer, qs, ctx.max_new_tokens, ctx.batch_size, ctx.template, opts.stop
        )
        out_m[f"{split}_rouge"] = float(np.mean(M.rouge_l_recall(gen, refs)))
        out_m[f"{split}_gen_tokens"] = float(np.mean(lengths))
        if pert is not None:
            if truth == "answer":
                true_nll, true_n = ans_nll, ans_n
            else:
                true_nll, true_n = score_answers(
                    ctx.model,
                    ctx.tokenizer,
                    qs,
                    [r[truth] for r in records],
                    ctx.batch_size,
                    ctx.max_length,
                    ctx.template,
                )
            tr = M.truth_ratio_raw(true_nll, true_n, *pert)
            agg = M.closer_to_1_better if is_forget_split(split) else M.true_better
            out_m[f"{split}_truth_ratio"] = agg(tr)
            out_m[f"{split}_truth_ratio_median"] = M.truth_ratio_median(tr)
            out_m[f"{split}_truth_ratio_logmean"] = M.truth_ratio_logmean(tr)
            raw[f"{split}_truth_ratio"] = tr.tolist()
    parts = [
        f"{split}_{m}"
        for split in opts.utility
        for m in ("prob", "rouge", "truth_ratio")
        if f"{split}_truth_ratio" in out_m
    ]
    if parts:
        out_m["model_utility"] = M.model_utility(out_m[p] for p in parts)
    return {"metrics": out_m, "raw": raw, "parts": {"model_utility": parts} if parts else {}}
