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

    stop: list[str] = Field(default_factory=list, description="strings that end a greedy answer (EOS and a chat "
                            "end-of-turn always do), e.g. ['\\n']")


def _has_truth_fields(records: list[dict]) -> bool:
    return all(r.get("paraphrased_answer") and r.get("perturbed_answers") for r in records)


def truth_ratios(ctx: SuiteContext, records: list[dict]) -> np.ndarray:
    """Raw truth ratio per record: paraphrase vs perturbed answers, scored in two batched calls."""
    from jobs.evaluate.scoring import score_answers

    opts = dict(batch_size=ctx.batch_size, max_length=ctx.max_length, template=ctx.template)
    qs = [r["question"] for r in records]
    para_nll, para_n = score_answers(ctx.model, ctx.tokenizer, qs, [r["paraphrased_answer"] for r in records], **opts)
    perts = [list(r["perturbed_answers"]) for r in records]
    k = max(len(p) for p in perts)
    flat_q = [q for q, p in zip(qs, perts) for _ in p]
    flat_a = [a for p in perts for a in p]
    nll, n = score_answers(ctx.model, ctx.tokenizer, flat_q, flat_a, **opts)
    pert_nll = np.full((len(records), k), np.nan)
    pert_n = np.zeros((len(records), k))
    pos = 0
    for i, p in enumerate(perts):  # ragged lists: NaN-padded, ignored by truth_ratio_raw
        pert_nll[i, : len(p)], pert_n[i, : len(p)] = nll[pos : pos + len(p)], n[pos : pos + len(p)]
        pos += len(p)
    return M.truth_ratio_raw(para_nll, para_n, pert_nll, pert_n)


def forget_quality_vs_oracle(result: dict, oracle: dict) -> Optional[float]:
    """TOFU's forget quality: the KS-test p-value of the model's forget truth ratios against the oracle's."""
    mine, ref = result.get("raw", {}).get("forget_truth_ratio"), oracle.get("raw", {}).get("forget_truth_ratio")
    return None if mine is None or ref is None else M.forget_quality(mine, ref)


@register_suite(
    "qa", needs=("forget",), options=QaOptions,
    groups=(("Privacy", r"^holdout_"), ("Forget", r"^forget(_.*)?$"), ("Utility", r"^(retain_.*|model_utility)$")),
    references=(Reference("forget_quality", forget_quality_vs_oracle),))
def qa_suite(ctx: SuiteContext, data: dict[str, list[dict]], opts: QaOptions) -> dict:
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

    out_m: dict[str, float] = {}
    raw: dict[str, list[float]] = {}
    for split, records in data.items():
        if not records or not is_qa_split(records):
            continue  # the mc and general splits belong to other suites
        qs = [r["question"] for r in records]
        refs = [r["answer"] for r in records]
        probs = M.answer_prob(*score_answers(ctx.model, ctx.tokenizer, qs, refs, ctx.batch_size, ctx.max_length,
                                             ctx.template))
        out_m[f"{split}_prob"] = float(np.nanmean(probs))
        raw[f"{split}_prob"] = probs.tolist()
        if split == "holdout":
            continue
        gen, lengths = generate_answers(ctx.model, ctx.tokenizer, qs, ctx.max_new_tokens, ctx.batch_size,
                                        ctx.template, opts.stop)
        out_m[f"{split}_rouge"] = float(np.mean(M.rouge_l_recall(gen, refs)))
        out_m[f"{split}_gen_tokens"] = float(np.mean(lengths))
        if _has_truth_fields(records):
            tr = truth_ratios(ctx, records)
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
