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

EPS = 1e-10  # open-unlearning's guard in wrong / (correct + 1e-10)


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

        R_i = GM_k p~(pert_ik) / (p~(para_i) + 1e-10)
            = exp(-mean_k nll_ik/|pert_ik|) / (exp(-nll_i/|para_i|) + 1e-10)

    The paper writes the numerator as an arithmetic mean over perturbed answers, but both TOFU's
    code (``aggregate_eval_stat.py``: exp of the difference of mean average losses) and
    open-unlearning's ``truth_ratio`` (``aggregate_to_1D`` over the perturbed answers' ``avg_loss``,
    then ``exp(-.)``; ``wrong_prob / (correct_prob + 1e-10)``) average the *log* probabilities,
    i.e. take a geometric mean. We follow the code. Computed in log space, so ``R <= 1e10``.

    ``pert_nll_sum`` and ``pert_n`` are ``[N, K]``; entries with NaN or ``n == 0`` (ragged
    lists padded) are left out of the mean over k.
    """
    log_correct = -_avg_nll(para_nll_sum, para_n)
    log_wrong = -np.nanmean(_avg_nll(np.atleast_2d(pert_nll_sum), np.atleast_2d(pert_n)), axis=1)
    log_r = log_wrong - np.logaddexp(log_correct, np.log(EPS))
    return np.exp(log_r)


def _finite(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).ravel()
    return x[~np.isnan(x)]


def closer_to_1_better(ratios) -> float:
    """Forget-split aggregate: ``mean_i min(R_i, 1 / (R_i + 1e-10))`` (open-unlearning ``truth_ratio``,
    aggregator ``closer_to_1_better``). 1 when right and wrong answers are equally likely."""
    r = _finite(ratios)
    return float(np.mean(np.minimum(r, 1.0 / (r + EPS))))


def true_better(ratios) -> float:
    """Retain-split aggregate: ``mean_i max(0, 1 - R_i)`` (open-unlearning ``truth_ratio``, aggregator
    ``true_better``). 1 when the paraphrased truth is far likelier than the perturbed answers."""
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


def forget_quality(tr_model, tr_oracle) -> float:
    """TOFU's forget quality: the two-sample Kolmogorov-Smirnov test p-value between the unlearned
    model's and the retain-only oracle's raw forget truth ratios,
    ``scipy.stats.ks_2samp(R_model, R_oracle).pvalue``.

    open-unlearning (``get_forget_quality``) tests ``1 / (R + 1e-10)`` instead; the KS statistic only
    depends on the samples' ranks, which a strictly monotone map like ``1/x`` preserves (reversed),
    so the p-value is the same.
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
