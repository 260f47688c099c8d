"""TOFU's metrics as pure functions on numbers (numpy/scipy only; no torch, no model).

References: Maini et al. 2024, "TOFU: A Task of Fictitious Unlearning for LLMs" (arXiv:2401.06121), and
its maintained implementation, open-unlearning (github.com/locuslab/open-unlearning):
``src/evals/metrics/memorization.py`` (probability, truth_ratio) and ``src/evals/metrics/utils.py``
(evaluate_probability, get_forget_quality, eval_text_similarity); ``hm_aggregate`` (model utility).

Inputs are the per-example summed answer NLL (nats) and answer token counts that
:func:`jobs.evaluate.scoring.score_answers` returns. An example with 0 answer tokens has no
probability: it gives NaN, and the aggregates below ignore NaN.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def _avg_nll(nll_sum, n_tokens) -> np.ndarray:
    nll_sum = np.asarray(nll_sum, dtype=np.float64)
    n = np.asarray(n_tokens, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(n > 0, nll_sum / np.where(n > 0, n, 1.0), np.nan)


def answer_prob(nll_sum, n_tokens) -> np.ndarray:
    """Length-normalised answer probability, per example.

    ``p_i = exp(-nll_sum_i / n_i) = P(a_i | q_i) ** (1 / |a_i|)``: TOFU's "Probability" (the
    geometric mean of the answer's token probabilities; open-unlearning ``evaluate_probability``:
    ``exp(-avg_loss)``). NaN where ``n_i == 0``.
    """
    return np.exp(-_avg_nll(nll_sum, n_tokens))


def truth_ratio_raw(para_nll_sum, para_n, pert_nll_sum, pert_n) -> np.ndarray:
    """Raw truth ratio ``R_i`` per example (wrong over right; lower means the truth is preferred).

    With length-normalised probabilities ``p~ = P(a|q) ** (1/|a|) = exp(-nll/|a|)``::

        R_i = GM_k p~(pert_ik) / p~(para_i) = exp(mean_k nll_ik/|pert_ik| - nll_i/|para_i|)

    as TOFU's code computes it (``aggregate_eval_stat.py``: ``np.exp(avg_perturbed_loss -
    avg_paraphrased_loss)``, whose inverse it aggregates; the paper writes an arithmetic mean over the
    perturbed answers, the code averages their log probabilities: a geometric mean). In log space, with
    no guard: R is exact however small ``p~(para)`` is. open-unlearning's ``truth_ratio`` divides by
    ``p~(para) + 1e-10`` instead, which caps R at ``p~(pert) / 1e-10`` (see docs/evaluation.md).

    ``pert_nll_sum`` and ``pert_n`` are ``[N, K]``; entries with NaN or ``n == 0`` (ragged
    lists padded) are left out of the mean over k.
    """
    log_correct = -_avg_nll(para_nll_sum, para_n)
    log_wrong = -np.nanmean(_avg_nll(np.atleast_2d(pert_nll_sum), np.atleast_2d(pert_n)), axis=1)
    with np.errstate(over="ignore"):
        return np.exp(log_wrong - log_correct)


def normalized_prob(true_nll_sum, true_n, pert_nll_sum, pert_n) -> np.ndarray:
    """TOFU's probability on the real-authors and world-facts sets, per example: the length-normalised
    probability of the true answer against itself plus every perturbed answer::

        p_i = p~(a_i) / (p~(a_i) + sum_k p~(pert_ik)),   p~ = exp(-nll / |a|)

    (TOFU ``aggregate_eval_stat.py``: ``avg_true_prob / avg_all_prob``; open-unlearning
    ``probability_w_options``). Computed in log space; padded entries (NaN or ``n == 0``) are left out.
    """
    log_true = -_avg_nll(true_nll_sum, true_n)
    log_pert = -_avg_nll(np.atleast_2d(pert_nll_sum), np.atleast_2d(pert_n))
    log_pert = np.where(np.isnan(log_pert), -np.inf, log_pert)
    log_all = np.logaddexp(log_true, np.logaddexp.reduce(log_pert, axis=1))
    return np.exp(log_true - log_all)


def _finite(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).ravel()
    return x[~np.isnan(x)]


def closer_to_1_better(ratios) -> float:
    """Forget-split aggregate: ``mean_i min(R_i, 1 / R_i)`` (TOFU's forget truth ratio; open-unlearning's
    ``closer_to_1_better``, which divides by ``R + 1e-10``). 1 when right and wrong answers are equally
    likely, towards 0 when either is far likelier."""
    r = _finite(ratios)
    with np.errstate(divide="ignore"):
        return float(np.mean(np.minimum(r, 1.0 / r)))


def true_better(ratios) -> float:
    """Aggregate of every other split: ``mean_i max(0, 1 - R_i)``, i.e. TOFU's ``max(0, 1 - 1/R')`` of its
    right-over-wrong ratio ``R' = 1/R`` (open-unlearning ``true_better``). 1 when the true answer is far
    likelier than the perturbed ones."""
    r = _finite(ratios)
    return float(np.mean(np.maximum(0.0, 1.0 - r)))


def truth_ratio_median(ratios) -> float:
    """``median_i R_i``: robust beside the plain mean, which explodes once ``p~(para) -> 0``."""
    return float(np.median(_finite(ratios)))


def truth_ratio_logmean(ratios) -> float:
    """``mean_i log R_i`` (natural log; 0 means right and wrong equally likely on average)."""
    r = _finite(ratios)
    return float(np.mean(np.log(np.maximum(r, np.finfo(np.float64).tiny))))


def rouge_l_recall(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """Per-example ROUGE-L recall of each prediction against its reference.

    ``LCS(pred, ref) / |ref|`` over Porter-stemmed word tokens, via ``rouge_score``'s
    ``RougeScorer(["rougeL"], use_stemmer=True).score(ref, pred)["rougeL"].recall`` (as
    open-unlearning's ``eval_text_similarity``, ``rougeL_recall``).
    """
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return np.array(
        [scorer.score(ref, pred)["rougeL"].recall for pred, ref in zip(predictions, references)],
        dtype=np.float64,
    )


def rouge_l_f1(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """Per-example ROUGE-L F1 (``rouge_score``'s ``rougeL`` fmeasure, Porter stemming): MUSE's VerbMem and
    KnowMem score."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return np.array(
        [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)], dtype=np.float64
    )


def forget_quality(tr_model, tr_oracle) -> float:
    """TOFU's forget quality: the two-sample Kolmogorov-Smirnov test p-value between the unlearned
    model's and the retain-only oracle's raw forget truth ratios,
    ``scipy.stats.ks_2samp(R_model, R_oracle).pvalue``.

    open-unlearning (``get_forget_quality``) tests ``1 / (R + 1e-10)`` instead; the KS statistic only
    depends on the samples' ranks, which a strictly monotone map like ``1/x`` preserves (reversed),
    so the p-value is the same (unless the guard's cap ties two ratios).
    """
    a, b = _finite(tr_model), _finite(tr_oracle)
    if len(a) == 0 or len(b) == 0:
        raise ValueError("forget_quality needs non-empty truth-ratio samples")
    from scipy import stats  # imported here: config checks and `spunge validate` need no scipy

    return float(stats.ks_2samp(a, b).pvalue)


def model_utility(values: Iterable[float]) -> float:
    """TOFU's model utility: the harmonic mean ``n / sum_j 1/v_j`` of the retain(-style) metrics
    (``scipy.stats.hmean``; open-unlearning ``hm_aggregate``); 0 if any value is 0 (or below)."""
    v = np.asarray(list(values), dtype=np.float64)
    if len(v) == 0:
        raise ValueError("model_utility needs at least one value")
    if np.isnan(v).any():
        return float("nan")
    if (v <= 0).any():
        return 0.0
    from scipy import stats

    return float(stats.hmean(v))
